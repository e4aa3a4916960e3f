//go:build !linux

package socksclient

import "time"

// relayNap sleeps between looks at a relay. No relay is looked at here
// (no sock_diag), so Go's timer is good enough.
type relayNap struct{}

func (relayNap) sleep(d time.Duration) { time.Sleep(d) }
