//go:build unix

package tunnel

import (
	"net"

	"golang.org/x/sys/unix"
)

// acceptQueued reports whether connections the kernel has completed wait
// in ln's accept queue (a listening socket polls readable then).
func acceptQueued(ln net.Listener) bool {
	queued := false
	withFD(ln, func(fd int) { // a *net.TCPListener, or one wrapping it
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, err := unix.Poll(fds, 0)
		queued = err == nil && n > 0 && fds[0].Revents&unix.POLLIN != 0
	})
	return queued
}
