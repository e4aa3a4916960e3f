//go:build !linux

package sockmark

import "syscall"

// Control returns a control that fails with ErrUnsupported: a socket
// meant to carry a mark must not go out without it.
func Control(mark int) ControlFunc {
	return func(network, address string, c syscall.RawConn) error { return ErrUnsupported }
}

// Check returns ErrUnsupported, after rejecting an out-of-range mark.
func Check(mark int) error {
	if err := checkRange(mark); err != nil {
		return err
	}
	return ErrUnsupported
}

// Of reads a socket's mark: there is none off Linux.
func Of(c syscall.Conn) (uint32, error) { return 0, ErrUnsupported }
