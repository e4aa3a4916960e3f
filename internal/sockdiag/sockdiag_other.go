//go:build !linux

package sockdiag

import (
	"errors"
	"fmt"
	"net/netip"
)

// errUnsupported is every answer here: the kernel has no socket
// diagnostics.
var errUnsupported = fmt.Errorf("sockdiag: socket diagnostics need Linux: %w", errors.ErrUnsupported)

// Querier would ask about sockets; Open never returns one here.
type Querier struct{}

// Open fails here with an error matching errors.ErrUnsupported.
func Open() (*Querier, error) { return nil, errUnsupported }

// Close does nothing.
func (q *Querier) Close() error { return nil }

// UDPReceiver fails with an error matching errors.ErrUnsupported.
func (q *Querier) UDPReceiver(from, to netip.AddrPort) (Mem, error) { return Mem{}, errUnsupported }
