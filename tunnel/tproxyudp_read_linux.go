package tunnel

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/socksfwd/socksfwd/internal/bindaddr"
	"github.com/socksfwd/socksfwd/internal/udpbatch"
)

// ListenTransparentUDP opens a UDP socket for datagrams sent by a TPROXY
// rule: IP_TRANSPARENT (and IPV6_TRANSPARENT on an IPv6 socket), so that
// TPROXY may hand it datagrams addressed to anyone, and
// IP_RECVORIGDSTADDR (IPV6_RECVORIGDSTADDR), so that each datagram says
// where it was going. Without CAP_NET_ADMIN the error wraps
// ErrTransparentUDPNeedsNetAdmin.
func ListenTransparentUDP(addr string) (*net.UDPConn, error) {
	lc := net.ListenConfig{Control: ControlTransparentUDP}
	pc, err := lc.ListenPacket(context.Background(), bindaddr.Network("udp", addr), addr)
	if err != nil {
		return nil, err
	}
	return pc.(*net.UDPConn), nil
}

// ControlTransparentUDP sets the options ListenTransparentUDP sets, as a
// net.ListenConfig Control hook or on a socket bound elsewhere. An
// IP_TRANSPARENT already on is left as it is: a socket systemd made with
// Transparent=yes then needs no CAP_NET_ADMIN here.
func ControlTransparentUDP(network, address string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) { serr = setTransparentUDP(int(fd), network == "udp6") })
	if err != nil {
		return err
	}
	return serr
}

// setTransparentUDP sets the options of a TPROXY UDP listener. An IPv6
// socket gets the IPv4 options too: a dual-stack one receives both.
func setTransparentUDP(fd int, v6 bool) error {
	if err := setOnce(fd, unix.SOL_IP, unix.IP_TRANSPARENT); err != nil {
		if errors.Is(err, unix.EPERM) {
			return fmt.Errorf("%w: %w", ErrTransparentUDPNeedsNetAdmin, err)
		}
		return fmt.Errorf("set IP_TRANSPARENT: %w", err)
	}
	if v6 {
		if err := setOnce(fd, unix.SOL_IPV6, unix.IPV6_TRANSPARENT); err != nil {
			if errors.Is(err, unix.EPERM) {
				return fmt.Errorf("%w: %w", ErrTransparentUDPNeedsNetAdmin, err)
			}
			return fmt.Errorf("set IPV6_TRANSPARENT: %w", err)
		}
	}
	return setRecvOrigDst(fd, v6)
}

// recvPacketInfo has each datagram say the interface it arrived on
// (IP_PKTINFO, and IPV6_RECVPKTINFO on an IPv6 socket): one on loopback
// was sent by this host, which --allow always serves.
func recvPacketInfo(c *net.UDPConn) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	err = rc.Control(func(fd uintptr) {
		if serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_PKTINFO, 1); serr != nil {
			serr = fmt.Errorf("set IP_PKTINFO: %w", serr)
			return
		}
		if sa, err := unix.Getsockname(int(fd)); err == nil {
			if _, v6 := sa.(*unix.SockaddrInet6); v6 {
				if serr = unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_RECVPKTINFO, 1); serr != nil {
					serr = fmt.Errorf("set IPV6_RECVPKTINFO: %w", serr)
				}
			}
		}
	})
	if err != nil {
		return err
	}
	return serr
}

// setRecvOrigDst has each datagram say where it was going
// (IP_RECVORIGDSTADDR; on an IPv6 socket, which a dual-stack one is,
// IPV6_RECVORIGDSTADDR too).
func setRecvOrigDst(fd int, v6 bool) error {
	if err := unix.SetsockoptInt(fd, unix.SOL_IP, unix.IP_RECVORIGDSTADDR, 1); err != nil {
		return fmt.Errorf("set IP_RECVORIGDSTADDR: %w", err)
	}
	if v6 {
		if err := unix.SetsockoptInt(fd, unix.SOL_IPV6, unix.IPV6_RECVORIGDSTADDR, 1); err != nil {
			return fmt.Errorf("set IPV6_RECVORIGDSTADDR: %w", err)
		}
	}
	return nil
}

// setOnce turns a boolean option on unless it is on already: setting
// IP_TRANSPARENT takes CAP_NET_ADMIN even when it changes nothing.
func setOnce(fd, level, opt int) error {
	if v, err := unix.GetsockoptInt(fd, level, opt); err == nil && v != 0 {
		return nil
	}
	return unix.SetsockoptInt(fd, level, opt, 1)
}

// origDstOOBLen is room for the control messages we ask for: the
// original destination (a sockaddr_in6 at most, 48 bytes with its
// header) and the packet info (40 at most).
const origDstOOBLen = 128

// origDstReader reads a batch of datagrams per system call (recvmmsg)
// with each one's source and original destination, allocation-free.
type origDstReader struct{ *udpbatch.Reader }

// newOrigDstReader reads from c into slots, datagram i at
// slots[i][headroom:].
func newOrigDstReader(c *net.UDPConn, slots [][]byte, headroom int) (*origDstReader, error) {
	r, err := udpbatch.NewControlReader(c, slots, headroom, origDstOOBLen)
	if err != nil {
		return nil, err
	}
	return &origDstReader{r}, nil
}

// OrigDst is where datagram i was going; false when it carried no
// original destination.
func (r *origDstReader) OrigDst(i int) (netip.AddrPort, bool) { return parseOrigDst(r.OOB(i)) }

// FromLoopback reports whether datagram i arrived on the loopback
// interface (a socket with IP_PKTINFO, see setTransparentUDP).
func (r *origDstReader) FromLoopback(i int) bool { return arrivedOnLoopback(r.OOB(i)) }

// cmsgAlignTo is the alignment of control messages: the size of a long.
const cmsgAlignTo = int(unsafe.Sizeof(uintptr(0)))

func cmsgAlign(n int) int { return (n + cmsgAlignTo - 1) &^ (cmsgAlignTo - 1) }

// parseOrigDst finds IP_ORIGDSTADDR or IPV6_ORIGDSTADDR among the control
// messages in oob and decodes it, IPv4-mapped addresses unmapped.
func parseOrigDst(oob []byte) (netip.AddrPort, bool) {
	for {
		level, typ, data, rest, ok := nextCmsg(oob)
		if !ok {
			return netip.AddrPort{}, false
		}
		switch {
		case level == unix.SOL_IP && typ == unix.IP_ORIGDSTADDR && len(data) >= unix.SizeofSockaddrInet4:
			if binary.NativeEndian.Uint16(data) != unix.AF_INET {
				return netip.AddrPort{}, false
			}
			return netip.AddrPortFrom(netip.AddrFrom4([4]byte(data[4:8])), binary.BigEndian.Uint16(data[2:])), true
		case level == unix.SOL_IPV6 && typ == unix.IPV6_ORIGDSTADDR && len(data) >= unix.SizeofSockaddrInet6:
			if binary.NativeEndian.Uint16(data) != unix.AF_INET6 {
				return netip.AddrPort{}, false
			}
			a := netip.AddrFrom16([16]byte(data[8:24])).Unmap()
			return netip.AddrPortFrom(a, binary.BigEndian.Uint16(data[2:])), true
		}
		oob = rest
	}
}

// loopbackIfindex is the loopback interface's index in every network
// namespace (the kernel's LOOPBACK_IFINDEX).
const loopbackIfindex = 1

// arrivedOnLoopback reports whether the IP_PKTINFO or IPV6_PKTINFO among
// the control messages in oob names the loopback interface: the datagram
// was sent by this host, as none from elsewhere arrives there.
func arrivedOnLoopback(oob []byte) bool {
	for {
		level, typ, data, rest, ok := nextCmsg(oob)
		if !ok {
			return false
		}
		switch {
		case level == unix.SOL_IP && typ == unix.IP_PKTINFO && len(data) >= unix.SizeofInet4Pktinfo:
			return int32(binary.NativeEndian.Uint32(data)) == loopbackIfindex // ipi_ifindex first
		case level == unix.SOL_IPV6 && typ == unix.IPV6_PKTINFO && len(data) >= unix.SizeofInet6Pktinfo:
			return int32(binary.NativeEndian.Uint32(data[16:])) == loopbackIfindex // after ipi6_addr
		}
		oob = rest
	}
}

// nextCmsg decodes the first control message in oob and returns the rest;
// ok is false when there is none or it is malformed. It reads the bytes
// itself (no allocation, no alignment assumed): a cmsghdr is a
// native-endian length of a long's size, then level and type as int32.
func nextCmsg(oob []byte) (level, typ int32, data, rest []byte, ok bool) {
	hdrLen := cmsgAlign(unix.SizeofCmsghdr)
	if len(oob) < unix.SizeofCmsghdr {
		return 0, 0, nil, nil, false
	}
	var l uint64
	if cmsgAlignTo == 8 {
		l = binary.NativeEndian.Uint64(oob)
	} else {
		l = uint64(binary.NativeEndian.Uint32(oob))
	}
	if l < uint64(hdrLen) || l > uint64(len(oob)) {
		return 0, 0, nil, nil, false
	}
	level = int32(binary.NativeEndian.Uint32(oob[cmsgAlignTo:]))
	typ = int32(binary.NativeEndian.Uint32(oob[cmsgAlignTo+4:]))
	if next := cmsgAlign(int(l)); next < len(oob) {
		rest = oob[next:]
	}
	return level, typ, oob[hdrLen:l], rest, true
}
