// Package sockbuf enlarges UDP socket buffers. A relay that falls behind
// for a moment loses datagrams at its own socket when the buffers are the
// kernel's default (about 208 KiB); root may exceed net.core.rmem_max with
// SO_RCVBUFFORCE, others get what the sysctl allows.
package sockbuf

import (
	"net"

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
