package tunnel

import (
	"net"
	"net/netip"

	"golang.org/x/sys/unix"

	"github.com/socksfwd/socksfwd/socksclient"
)

// UDPRepliesFromDestination: a /udp forward on a wildcard address answers
// each client from the address the client sent to.
const UDPRepliesFromDestination = true

// newWildcardReader reads datagrams with the address each was sent to
// (IP_RECVORIGDSTADDR, and IPV6_RECVORIGDSTADDR on an IPv6 socket), for a
// forward on a wildcard address: the replies must leave from that
// address, not from the one the route back picks, which a client that
// sent to another of the host's addresses (and connected its socket, as
// resolvers do) would not take.
func newWildcardReader(pc *net.UDPConn, slots [][]byte) (datagramReader, error) {
	rc, err := pc.SyscallConn()
	if err != nil {
		return nil, err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		domain, _ := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_DOMAIN)
		serr = setRecvOrigDst(int(fd), domain == unix.AF_INET6)
	}); err != nil {
		return nil, err
	}
	if serr != nil {
		return nil, serr
	}
	r, err := newOrigDstReader(pc, slots, socksclient.MaxUDPHeaderLen)
	if err != nil {
		return nil, err
	}
	return localDstReader{r}, nil
}

// localDstReader is a datagramReader that also says which local address
// each datagram was sent to.
type localDstReader struct{ *origDstReader }

// LocalDst is the address datagram i was sent to; invalid if it came
// without one.
func (r localDstReader) LocalDst(i int) netip.Addr {
	ap, ok := r.OrigDst(i)
	if !ok {
		return netip.Addr{}
	}
	return ap.Addr()
}
