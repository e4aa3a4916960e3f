//go:build unix

package tunnel

import "syscall"

// withFD runs f on c's descriptor, for a question asked of the socket
// itself (an option, a peek, a poll); false when c has no descriptor to
// give (not a syscall.Conn, or closed).
func withFD(c any, f func(fd int)) bool {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	return rc.Control(func(fd uintptr) { f(int(fd)) }) == nil
}
