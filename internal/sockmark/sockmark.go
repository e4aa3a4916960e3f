// Package sockmark puts a firewall mark (SO_MARK) on the sockets socksfwd
// opens toward its upstreams, so that netfilter rules capturing traffic
// into socksfwd can recognise socksfwd's own traffic and let it pass
// instead of capturing it again (a loop). A mark is a uint32, as the
// kernel keeps it, from the flag to the socket: an int would turn marks
// of 0x80000000 and up negative where int is 32 bits. Marks are a Linux
// feature; elsewhere every function reports ErrUnsupported.
package sockmark

import (
	"errors"
	"syscall"
)

// ControlFunc is the Control hook of net.Dialer and net.ListenConfig: it
// runs on each new socket before it connects or binds.
type ControlFunc = func(network, address string, c syscall.RawConn) error

// ErrUnsupported is what every function returns on systems without socket
// marks.
var ErrUnsupported = errors.New("socket marks need Linux")

// Chain returns a control that runs each of fs in order on the same
// socket and stops at the first error. Nil entries are skipped; with none
// left Chain returns nil (no control at all), and with one it returns that
// one unwrapped, so chaining optional hooks costs nothing when unused.
func Chain(fs ...ControlFunc) ControlFunc {
	var set []ControlFunc
	for _, f := range fs {
		if f != nil {
			set = append(set, f)
		}
	}
	switch len(set) {
	case 0:
		return nil
	case 1:
		return set[0]
	}
	return func(network, address string, c syscall.RawConn) error {
		for _, f := range set {
			if err := f(network, address, c); err != nil {
				return err
			}
		}
		return nil
	}
}
