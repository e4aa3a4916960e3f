//go:build unix && !aix

package tunnel

import (
	"net"

	"golang.org/x/sys/unix"
)

// peerHungUp reports whether c's peer has closed or reset the connection,
// without taking a byte it sent (a peek that does not wait). A conn
// without a TCP socket underneath reports false.
func peerHungUp(c net.Conn) bool {
	tc, ok := unwrapTCP(c)
	if !ok {
		return false
	}
	gone := false
	withFD(tc, func(fd int) {
		var b [1]byte
		n, _, err := unix.Recvfrom(fd, b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		gone = n == 0 && err == nil || err == unix.ECONNRESET
	})
	return gone
}
