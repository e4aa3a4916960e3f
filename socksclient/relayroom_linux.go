package socksclient

import (
	"time"

	"golang.org/x/sys/unix"
)

// relayNap sleeps the thread between looks at a relay (nanosleep: Go's
// timers wait at least about a millisecond in an otherwise idle process).
// Its Timespec lives in the room so that a nap allocates nothing.
type relayNap struct{ ts unix.Timespec }

func (n *relayNap) sleep(d time.Duration) {
	n.ts = unix.NsecToTimespec(int64(d))
	unix.Nanosleep(&n.ts, nil)
}
