//go:build unix

package tunnel

import (
	"net"
	"syscall"

	"golang.org/x/sys/unix"
)

// acceptQueued reports whether connections the kernel has completed wait
// in ln's accept queue (a listening socket polls readable then).
func acceptQueued(ln net.Listener) bool {
	sc, ok := ln.(syscall.Conn) // a *net.TCPListener, or one wrapping it
	if !ok {
		return false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	queued := false
	rc.Control(func(fd uintptr) {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, err := unix.Poll(fds, 0)
		queued = err == nil && n > 0 && fds[0].Revents&unix.POLLIN != 0
	})
	return queued
}
