// Package sockmark puts a firewall mark (SO_MARK) on the sockets socksfwd
// opens toward its upstreams, so that netfilter rules capturing traffic
// into socksfwd can recognise socksfwd's own traffic and let it pass
// instead of capturing it again (a loop). Marks are a Linux feature;
// elsewhere every function reports ErrUnsupported.
package sockmark

import (
	"errors"
	"fmt"
	"syscall"
)

// ControlFunc is the Control hook of net.Dialer and net.ListenConfig: it
// runs on each new socket before it connects or binds.
type ControlFunc = func(network, address string, c syscall.RawConn) error

// ErrUnsupported is what every function returns on systems without socket
// marks.
var ErrUnsupported = errors.New("socket marks need Linux")

// maxMark is the largest mark: the kernel keeps it in 32 bits.
const maxMark = 1<<32 - 1

// checkRange rejects a mark the kernel cannot hold. The comparison is in
// int64 so it compiles where int is 32 bits.
func checkRange(mark int) error {
	if mark < 0 || int64(mark) > maxMark {
		return fmt.Errorf("socket mark %d is out of range (0 to %#x)", mark, uint32(maxMark))
	}
	return nil
}

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
