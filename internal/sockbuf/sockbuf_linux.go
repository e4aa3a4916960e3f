//go:build linux

package sockbuf

import (
	"net"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

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
