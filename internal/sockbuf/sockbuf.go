// Package sockbuf sizes socket buffers. UDP relay sockets are enlarged: a
// relay that falls behind for a moment loses datagrams at its own socket
// when the buffers are the kernel's default (about 208 KiB); root may exceed
// net.core.rmem_max with SO_RCVBUFFORCE, others get what the sysctl allows.
// TCP sockets to a peer on this host are capped instead (LoopbackTCPSize).
package sockbuf

import (
	"net"
	"net/netip"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Size is what UDP relay sockets ask for in each direction.
const Size = 4 << 20

// Grow sets c's receive and send buffers to Size, forcing past the sysctl
// limits where the process may; errors are ignored (the default still
// works, only with more loss under bursts).
func Grow(c *net.UDPConn) {
	rc, err := c.SyscallConn()
	if err != nil {
		return
	}
	rc.Control(func(fd uintptr) {
		for _, opt := range [][2]int{{unix.SO_RCVBUFFORCE, unix.SO_RCVBUF}, {unix.SO_SNDBUFFORCE, unix.SO_SNDBUF}} {
			if unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, opt[0], Size) != nil {
				unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, opt[1], Size)
			}
		}
	})
}

// LoopbackTCPSize is what a TCP socket whose peer is on this host asks for
// in each direction (the kernel doubles it for its bookkeeping). Over
// loopback the round trip is tens of microseconds, so even 10 Gbit/s needs
// well under 128 KiB in flight; left to autotuning, the relay's sockets
// grow to megabytes and queue that much, and the bytes have left the CPU
// caches by the time they are read. Through Dante on this project's 2-core
// bench machine the cap raised throughput by 30-45 % (README, Performance).
// Peers on other hosts keep autotuning: a capped buffer would cap a long
// path's throughput at the buffer per round trip.
const LoopbackTCPSize = 128 << 10

// CapLoopbackTCP is a Control hook for net.Dialer and net.ListenConfig: a
// TCP socket that connects to, or listens on, a loopback address gets
// LoopbackTCPSize buffers; anything else is left alone. Connections a
// listener accepts inherit its buffer sizes, so a loopback listener costs
// nothing per connection. A socket option that fails leaves the kernel's
// default, which works, only slower; it is not an error.
func CapLoopbackTCP(network, address string, c syscall.RawConn) error {
	if !strings.HasPrefix(network, "tcp") || !isLoopback(address) {
		return nil
	}
	return c.Control(func(fd uintptr) {
		unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, LoopbackTCPSize)
		unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUF, LoopbackTCPSize)
	})
}

// isLoopback reports whether an "ip:port" names a loopback address; a name,
// or an unspecified address (which takes peers from anywhere), does not.
func isLoopback(address string) bool {
	ap, err := netip.ParseAddrPort(address)
	return err == nil && ap.Addr().Unmap().IsLoopback()
}
