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
)

// ip6tSOOriginalDst is IP6T_SO_ORIGINAL_DST (linux/netfilter_ipv6/ip6_tables.h),
// which x/sys/unix does not define.
const ip6tSOOriginalDst = 80

// ListenTransparent opens a TCP listener for connections sent by netfilter:
// REDIRECT (NAT) or TPROXY. It sets IP_TRANSPARENT (and IPV6_TRANSPARENT on
// IPv6 sockets), which TPROXY needs, when the process may (CAP_NET_ADMIN);
// without that permission it goes on, since REDIRECT works without it, and
// IsTransparent tells which one the caller got. control, if not nil, runs
// after, on the same socket. Accepted connections send no keep-alive
// probes: the application's own end decides how long an idle session lives.
func ListenTransparent(ctx context.Context, network, addr string, control func(network, address string, c syscall.RawConn) error) (net.Listener, error) {
	lc := net.ListenConfig{
		KeepAlive: -1,
		Control: func(network, address string, c syscall.RawConn) error {
			if err := ControlTransparent(network, address, c); err != nil {
				return err
			}
			if control != nil {
				return control(network, address, c)
			}
			return nil
		},
	}
	return lc.Listen(ctx, network, addr)
}

// ControlTransparent sets the options ListenTransparent sets, as a
// net.ListenConfig Control hook; it works as well on a listener bound
// elsewhere (a socket systemd passed), since IP_TRANSPARENT only matters
// when netfilter looks the socket up.
func ControlTransparent(network, address string, c syscall.RawConn) error {
	return setTransparent(network, c)
}

// setTransparent sets IP_TRANSPARENT (and IPV6_TRANSPARENT on an IPv6
// socket); EPERM is no error.
func setTransparent(network string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TRANSPARENT, 1)
		if serr == nil && network == "tcp6" {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1)
		}
	})
	if err != nil {
		return err
	}
	if serr != nil && !errors.Is(serr, unix.EPERM) {
		return fmt.Errorf("set IP_TRANSPARENT: %w", serr)
	}
	return nil
}

// IsTransparent reports whether ln's socket has IP_TRANSPARENT (or
// IPV6_TRANSPARENT) set, that is whether TPROXY can deliver to it.
func IsTransparent(ln net.Listener) bool {
	on := false
	withFD(ln, func(fd int) {
		level, opt := unix.SOL_IP, unix.IP_TRANSPARENT
		if domain, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN); err == nil && domain == unix.AF_INET6 {
			level, opt = unix.SOL_IPV6, unix.IPV6_TRANSPARENT
		}
		v, err := unix.GetsockoptInt(fd, level, opt)
		on = err == nil && v != 0
	})
	return on
}

// OriginalDestination is where the client of a connection accepted by a
// transparent listener meant to connect. After REDIRECT it is the NAT
// entry's original destination (SO_ORIGINAL_DST, IP6T_SO_ORIGINAL_DST for
// IPv6). After TPROXY nothing was rewritten: the socket's local address is
// the original destination (and without a conntrack entry, or without
// conntrack at all, the getsockopt fails with ENOENT or ENOPROTOOPT). A
// connection made straight to the listener gets the listener's address
// either way. IPv4-mapped addresses are unmapped.
func OriginalDestination(c net.Conn) (netip.AddrPort, error) {
	la, ok := c.LocalAddr().(*net.TCPAddr)
	sc, isSock := c.(syscall.Conn)
	if !ok || !isSock {
		return netip.AddrPort{}, fmt.Errorf("original destination: %T is not a TCP socket", c)
	}
	local := la.AddrPort()
	local = netip.AddrPortFrom(local.Addr().Unmap(), local.Port())
	rc, err := sc.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("original destination: %w", err)
	}
	var q origDstQuery
	q.v4 = local.Addr().Is4()
	if err := rc.Control(q.run); err != nil {
		return netip.AddrPort{}, fmt.Errorf("original destination: %w", err)
	}
	switch {
	case q.err == nil:
		return q.dst, nil
	case errors.Is(q.err, unix.ENOENT), errors.Is(q.err, unix.ENOPROTOOPT):
		return local, nil
	case q.v4:
		return netip.AddrPort{}, fmt.Errorf("original destination: getsockopt SO_ORIGINAL_DST: %w", q.err)
	default:
		return netip.AddrPort{}, fmt.Errorf("original destination: getsockopt IP6T_SO_ORIGINAL_DST: %w", q.err)
	}
}

// origDstQuery holds one getsockopt's input and result, so the Control
// callback is a method value rather than a closure over several variables.
type origDstQuery struct {
	v4  bool
	dst netip.AddrPort
	err error
}

func (q *origDstQuery) run(fd uintptr) {
	if q.v4 {
		// An IPv4 connection on a dual-stack socket answers SOL_IP too.
		var sa unix.RawSockaddrInet4
		if q.err = getsockopt(int(fd), unix.SOL_IP, unix.SO_ORIGINAL_DST, unsafe.Pointer(&sa), unsafe.Sizeof(sa)); q.err == nil {
			q.dst = netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), netPort(&sa.Port))
		}
		return
	}
	var sa unix.RawSockaddrInet6
	if q.err = getsockopt(int(fd), unix.SOL_IPV6, ip6tSOOriginalDst, unsafe.Pointer(&sa), unsafe.Sizeof(sa)); q.err == nil {
		q.dst = netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), netPort(&sa.Port))
	}
}

// getsockopt reads a socket option of size bytes into val; x/sys/unix has
// no getter for a sockaddr.
func getsockopt(fd, level, opt int, val unsafe.Pointer, size uintptr) error {
	n := uint32(size)
	_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt), uintptr(val), uintptr(unsafe.Pointer(&n)), 0)
	if errno != 0 {
		return errno
	}
	return nil
}

// netPort reads a sockaddr's port, stored in network byte order.
func netPort(p *uint16) uint16 {
	b := (*[2]byte)(unsafe.Pointer(p))
	return uint16(b[0])<<8 | uint16(b[1])
}

// isLocalAddr reports whether ip is an address of this host, in this
// network namespace: the loopback range, or one the kernel routes as
// local (RTN_LOCAL: an interface's address, or an AnyIP local route).
// It asks the routing table, not a test bind: with ip_nonlocal_bind set
// (keepalived and HAProxy hosts) a bind succeeds for any address, and a
// TPROXY'd remote on the listener's own port would be refused. When it
// cannot tell, it says yes, which refuses a session rather than risk
// relaying socksfwd to itself.
func isLocalAddr(ip netip.Addr) bool {
	ip = ip.Unmap().WithZone("")
	if ip.IsLoopback() {
		return true
	}
	local, err := routesLocal(ip)
	return local || err != nil
}

// routeQuery is an RTM_GETROUTE request for one destination: the route
// lookup of `ip route get`, without a mark, so TPROXY's policy routes
// (local 0.0.0.0/0 in a table of their own) do not answer.
type routeQuery struct {
	nh  unix.NlMsghdr
	rt  unix.RtMsg
	rta unix.RtAttr
	dst [16]byte // RTA_DST: 4 bytes used for IPv4
}

// routesLocal asks the kernel, over rtnetlink, whether it delivers ip
// locally. An answer that is an error (no route) means no; err is for a
// question that could not be asked.
func routesLocal(ip netip.Addr) (bool, error) {
	family, addrLen := unix.AF_INET6, 16
	if ip.Is4() {
		family, addrLen = unix.AF_INET, 4
	}
	var q routeQuery
	q.nh = unix.NlMsghdr{
		Len:  uint32(unix.SizeofNlMsghdr + unix.SizeofRtMsg + unix.SizeofRtAttr + addrLen),
		Type: unix.RTM_GETROUTE, Flags: unix.NLM_F_REQUEST, Seq: 1,
	}
	q.rt = unix.RtMsg{Family: uint8(family), Dst_len: uint8(addrLen * 8)}
	q.rta = unix.RtAttr{Len: uint16(unix.SizeofRtAttr + addrLen), Type: unix.RTA_DST}
	if ip.Is4() {
		a := ip.As4()
		copy(q.dst[:], a[:])
	} else {
		q.dst = ip.As16()
	}
	// Non-blocking: the kernel queues its answer before the write
	// returns, and a read that finds none must not hang a thread.
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_ROUTE)
	if err != nil {
		return false, fmt.Errorf("route lookup: %w", err)
	}
	defer unix.Close(fd)
	if _, err := unix.Write(fd, unsafe.Slice((*byte)(unsafe.Pointer(&q)), q.nh.Len)); err != nil {
		return false, fmt.Errorf("route lookup: %w", err)
	}
	var buf [1024]byte // a route is a few hundred bytes; only its head is read
	n, err := unix.Read(fd, buf[:])
	if err != nil {
		return false, fmt.Errorf("route lookup: %w", err)
	}
	return parseRouteAnswer(buf[:n])
}

// parseRouteAnswer reads the kernel's answer to a routeQuery: a route,
// local or not, or an error: "no route" means not local, any other
// error is a question that could not be answered.
func parseRouteAnswer(b []byte) (bool, error) {
	if len(b) < unix.SizeofNlMsghdr+unix.SizeofRtMsg {
		return false, errors.New("route lookup: short answer")
	}
	switch binary.NativeEndian.Uint16(b[4:]) { // nlmsghdr.nlmsg_type
	case unix.NLMSG_ERROR:
		// nlmsgerr.error, a negative errno, follows the header.
		switch errno := unix.Errno(-int32(binary.NativeEndian.Uint32(b[unix.SizeofNlMsghdr:]))); errno {
		case unix.ENETUNREACH, unix.EHOSTUNREACH, unix.ESRCH:
			return false, nil
		default:
			return false, fmt.Errorf("route lookup: %w", errno)
		}
	case unix.RTM_NEWROUTE:
		return b[unix.SizeofNlMsghdr+7] == unix.RTN_LOCAL, nil // rtmsg.rtm_type
	}
	return false, errors.New("route lookup: unexpected answer")
}
