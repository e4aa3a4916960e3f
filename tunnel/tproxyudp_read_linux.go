package tunnel

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ListenTransparentUDP opens a UDP socket for datagrams sent by a TPROXY
// rule: IP_TRANSPARENT (and IPV6_TRANSPARENT on an IPv6 socket), so that
// TPROXY may hand it datagrams addressed to anyone, and
// IP_RECVORIGDSTADDR (IPV6_RECVORIGDSTADDR), so that each datagram says
// where it was going. Without CAP_NET_ADMIN the error wraps
// ErrTransparentUDPNeedsNetAdmin.
func ListenTransparentUDP(addr string) (*net.UDPConn, error) {
	lc := net.ListenConfig{Control: controlTransparentUDP}
	pc, err := lc.ListenPacket(context.Background(), "udp", addr)
	if err != nil {
		return nil, err
	}
	return pc.(*net.UDPConn), nil
}

func controlTransparentUDP(network, address string, c syscall.RawConn) error {
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
	if err := unix.SetsockoptInt(fd, unix.SOL_IP, unix.IP_TRANSPARENT, 1); err != nil {
		if errors.Is(err, unix.EPERM) {
			return fmt.Errorf("%w: %w", ErrTransparentUDPNeedsNetAdmin, err)
		}
		return fmt.Errorf("set IP_TRANSPARENT: %w", err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_IP, unix.IP_RECVORIGDSTADDR, 1); err != nil {
		return fmt.Errorf("set IP_RECVORIGDSTADDR: %w", err)
	}
	if !v6 {
		return nil
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1); err != nil {
		if errors.Is(err, unix.EPERM) {
			return fmt.Errorf("%w: %w", ErrTransparentUDPNeedsNetAdmin, err)
		}
		return fmt.Errorf("set IPV6_TRANSPARENT: %w", err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_IPV6, unix.IPV6_RECVORIGDSTADDR, 1); err != nil {
		return fmt.Errorf("set IPV6_RECVORIGDSTADDR: %w", err)
	}
	return nil
}

// origDstOOBLen is room for the one control message we ask for (a
// sockaddr_in6 at most), with a margin.
const origDstOOBLen = 128

// origDstReader reads a batch of datagrams per system call (recvmmsg)
// with each one's source and original destination. Its buffers are
// allocated once, so a read allocates nothing.
type origDstReader struct {
	rc       syscall.RawConn
	msgs     []unix.Mmsghdr
	iovs     []unix.Iovec
	names    []unix.RawSockaddrInet6
	oob      []byte // origDstOOBLen per datagram
	slots    [][]byte
	headroom int
	n        int
	err      error
	readFn   func(fd uintptr) bool
}

// newOrigDstReader reads from c into slots, datagram i at
// slots[i][headroom:].
func newOrigDstReader(c *net.UDPConn, slots [][]byte, headroom int) (*origDstReader, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	r := &origDstReader{
		rc:       rc,
		msgs:     make([]unix.Mmsghdr, len(slots)),
		iovs:     make([]unix.Iovec, len(slots)),
		names:    make([]unix.RawSockaddrInet6, len(slots)),
		oob:      make([]byte, origDstOOBLen*len(slots)),
		slots:    slots,
		headroom: headroom,
	}
	for i := range r.msgs {
		b := slots[i][headroom:]
		r.iovs[i].Base = &b[0]
		r.iovs[i].SetLen(len(b))
		h := &r.msgs[i].Hdr
		h.Iov = &r.iovs[i]
		h.SetIovlen(1)
		h.Name = (*byte)(unsafe.Pointer(&r.names[i]))
		h.Control = &r.oob[i*origDstOOBLen]
	}
	r.readFn = r.read
	return r, nil
}

// Read waits for at least one datagram and returns how many it read.
func (r *origDstReader) Read() (int, error) {
	if err := r.rc.Read(r.readFn); err != nil {
		return 0, err
	}
	return r.n, r.err
}

func (r *origDstReader) read(fd uintptr) bool {
	for i := range r.msgs {
		h := &r.msgs[i].Hdr
		h.Flags = 0
		h.Namelen = unix.SizeofSockaddrInet6
		h.SetControllen(origDstOOBLen)
	}
	var n uintptr
	var e unix.Errno
	for {
		n, _, e = unix.RawSyscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&r.msgs[0])), uintptr(len(r.msgs)), unix.MSG_DONTWAIT, 0, 0)
		if e != unix.EINTR {
			break
		}
	}
	switch e {
	case unix.EAGAIN:
		return false // wait for the poller
	case 0:
		r.n, r.err = int(n), nil
	default:
		r.n, r.err = 0, e
	}
	return true
}

// Slot is datagram i's whole slot: headroom, then the payload.
func (r *origDstReader) Slot(i int) []byte { return r.slots[i][:r.headroom+int(r.msgs[i].Len)] }

// Truncated reports whether datagram i was longer than its slot.
func (r *origDstReader) Truncated(i int) bool { return r.msgs[i].Hdr.Flags&unix.MSG_TRUNC != 0 }

// Addr is the source of datagram i, IPv4-mapped addresses unmapped.
func (r *origDstReader) Addr(i int) netip.AddrPort { return rawSockaddrAddrPort(&r.names[i]) }

// OrigDst is where datagram i was going; false when it carried no
// original destination.
func (r *origDstReader) OrigDst(i int) (netip.AddrPort, bool) {
	n := int(r.msgs[i].Hdr.Controllen)
	return parseOrigDst(r.oob[i*origDstOOBLen : i*origDstOOBLen+min(n, origDstOOBLen)])
}

// rawSockaddrAddrPort decodes a sockaddr_in or sockaddr_in6, unmapped.
func rawSockaddrAddrPort(sa *unix.RawSockaddrInet6) netip.AddrPort {
	switch sa.Family {
	case unix.AF_INET:
		sa4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		return netip.AddrPortFrom(netip.AddrFrom4(sa4.Addr), netPort(&sa4.Port))
	case unix.AF_INET6:
		a := netip.AddrFrom16(sa.Addr)
		if a.Is4In6() {
			return netip.AddrPortFrom(a.Unmap(), netPort(&sa.Port))
		}
		if sa.Scope_id != 0 && a.IsLinkLocalUnicast() {
			a = a.WithZone(strconv.FormatUint(uint64(sa.Scope_id), 10))
		}
		return netip.AddrPortFrom(a, netPort(&sa.Port))
	}
	return netip.AddrPort{}
}

// cmsgAlignTo is the alignment of control messages: the size of a long.
const cmsgAlignTo = int(unsafe.Sizeof(uintptr(0)))

func cmsgAlign(n int) int { return (n + cmsgAlignTo - 1) &^ (cmsgAlignTo - 1) }

// parseOrigDst finds IP_ORIGDSTADDR or IPV6_ORIGDSTADDR among the control
// messages in oob and decodes it, IPv4-mapped addresses unmapped. It reads
// the bytes itself (no allocation, no alignment assumed): a cmsghdr is a
// native-endian length of a long's size, then level and type as int32.
func parseOrigDst(oob []byte) (netip.AddrPort, bool) {
	hdrLen := cmsgAlign(unix.SizeofCmsghdr)
	for len(oob) >= unix.SizeofCmsghdr {
		var l uint64
		if cmsgAlignTo == 8 {
			l = binary.NativeEndian.Uint64(oob)
		} else {
			l = uint64(binary.NativeEndian.Uint32(oob))
		}
		level := int32(binary.NativeEndian.Uint32(oob[cmsgAlignTo:]))
		typ := int32(binary.NativeEndian.Uint32(oob[cmsgAlignTo+4:]))
		if l < uint64(hdrLen) || l > uint64(len(oob)) {
			return netip.AddrPort{}, false
		}
		data := oob[hdrLen:l]
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
		next := cmsgAlign(int(l))
		if next >= len(oob) {
			break
		}
		oob = oob[next:]
	}
	return netip.AddrPort{}, false
}
