package testnet

import (
	"time"

	"golang.org/x/sys/unix"
)

// Nap pauses the calling thread for d, which may be microseconds: a test
// server playing a slow peer paces itself with it. Go's timers sleep at
// least about a millisecond in an otherwise idle process; nanosleep does
// not.
func Nap(d time.Duration) {
	ts := unix.NsecToTimespec(int64(d))
	unix.Nanosleep(&ts, nil)
}
