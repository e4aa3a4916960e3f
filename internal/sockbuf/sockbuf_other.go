//go:build !linux

package sockbuf

import (
	"net"
	"syscall"
)

// Grow sets c's receive and send buffers to Size, or to as much as the
// system allows; errors are ignored (the default still works, only with
// more loss under bursts).
func Grow(c *net.UDPConn) {
	growTo(c.SetReadBuffer)
	growTo(c.SetWriteBuffer)
}

// CapLoopbackTCP is a Control hook for net.Dialer and net.ListenConfig. It
// caps loopback TCP buffers on Linux only, where the cap was measured to
// help; here the system's own sizing stands.
func CapLoopbackTCP(network, address string, c syscall.RawConn) error { return nil }
