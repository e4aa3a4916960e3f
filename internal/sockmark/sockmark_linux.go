//go:build linux

package sockmark

import (
	"errors"
	"fmt"
	"syscall"

	"golang.org/x/sys/unix"
)

// Control returns a control that sets SO_MARK to mark on every socket it
// sees. Its error, when the process may not set marks, is the one Check
// returns; a dial or listen using it then fails rather than sending
// unmarked traffic that the rules would capture again.
func Control(mark uint32) ControlFunc {
	return func(network, address string, c syscall.RawConn) error {
		var serr error
		if err := c.Control(func(fd uintptr) { serr = setMark(int(fd), mark) }); err != nil {
			return err
		}
		return serr
	}
}

// Check sets mark on a throwaway socket, so that a process that may not
// (it lacks CAP_NET_ADMIN) learns so at start-up, not at its first
// upstream connection. That error matches errors.Is(err, fs.ErrPermission).
func Check(mark uint32) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		// A kernel without IPv4 still has IPv6.
		fd, err = unix.Socket(unix.AF_INET6, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	}
	if err != nil {
		return fmt.Errorf("socket mark: opening a socket to try it on: %w", err)
	}
	defer unix.Close(fd)
	return setMark(fd, mark)
}

func setMark(fd int, mark uint32) error {
	// SetsockoptInt passes 32 bits; through int32 the marks from 1<<31 up
	// keep their bits where int is 32 bits too.
	err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, int(int32(mark)))
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.EPERM):
		return fmt.Errorf("--mark needs CAP_NET_ADMIN (run as root or grant the capability): %w", err)
	default:
		return fmt.Errorf("setting socket mark %#x: %w", mark, err)
	}
}

// Of reads a socket's mark back from the kernel.
func Of(c syscall.Conn) (uint32, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0, err
	}
	var mark int
	var gerr error
	if err := rc.Control(func(fd uintptr) { mark, gerr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK) }); err != nil {
		return 0, err
	}
	return uint32(mark), gerr
}
