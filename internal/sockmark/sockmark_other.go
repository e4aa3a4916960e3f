//go:build !linux

package sockmark

import "syscall"

// Control returns a control that fails with ErrUnsupported: a socket
// meant to carry a mark must not go out without it.
func Control(mark uint32) ControlFunc {
	return func(network, address string, c syscall.RawConn) error { return ErrUnsupported }
}

// Check returns ErrUnsupported.
func Check(mark uint32) error { return ErrUnsupported }

// Of reads a socket's mark: there is none off Linux.
func Of(c syscall.Conn) (uint32, error) { return 0, ErrUnsupported }
