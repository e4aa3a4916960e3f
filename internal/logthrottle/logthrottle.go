// Package logthrottle keeps a failure that repeats from flooding the log:
// the first occurrence of a cause is logged at once, repeats within a period
// are only counted, and the next line after the period carries that count.
// It is how a dead upstream costs one log line a period rather than one per
// datagram or query.
package logthrottle

import (
	"sync"
	"time"

	"github.com/rs/zerolog"
)

// maxKeys bounds the causes remembered at once; past it the oldest period
// is forgotten, so a flood of distinct causes cannot grow memory.
const maxKeys = 1024

// Throttle decides, per cause, whether a line may be logged now. The zero
// value is not usable; use New. Safe for concurrent use.
type Throttle struct {
	every time.Duration
	now   func() time.Time

	mu   sync.Mutex
	keys map[string]*entry
}

type entry struct {
	next       time.Time // the earliest time another line may be logged
	suppressed int64     // occurrences counted since the last line
}

// New returns a throttle that logs each cause at most once per every.
func New(every time.Duration) *Throttle {
	return &Throttle{every: every, now: time.Now, keys: make(map[string]*entry)}
}

// Allow records one occurrence of cause. It reports whether a line should
// be logged now, and how many occurrences were suppressed since the last
// line (to be logged with it).
func (t *Throttle) Allow(cause string) (ok bool, suppressed int64) {
	now := t.now()
	t.mu.Lock()
	defer t.mu.Unlock()
	e, found := t.keys[cause]
	if !found {
		if len(t.keys) >= maxKeys {
			t.forgetExpired(now)
		}
		if len(t.keys) >= maxKeys {
			return false, 0 // too many live causes: count nothing more
		}
		t.keys[cause] = &entry{next: now.Add(t.every)}
		return true, 0
	}
	if now.Before(e.next) {
		e.suppressed++
		return false, 0
	}
	n := e.suppressed
	e.suppressed = 0
	e.next = now.Add(t.every)
	return true, n
}

// Reset forgets cause and returns how many occurrences were suppressed
// since its last line: for the "back to normal" line of a state change.
func (t *Throttle) Reset(cause string) (suppressed int64, seen bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	e, ok := t.keys[cause]
	if !ok {
		return 0, false
	}
	delete(t.keys, cause)
	return e.suppressed, true
}

// forgetExpired makes room: a cause whose period is over is forgotten,
// with the count of its repeats since its last line (a cause that never
// comes back would never report them anyway), so that new causes are
// logged rather than dropped once the table has filled.
func (t *Throttle) forgetExpired(now time.Time) {
	for k, e := range t.keys {
		if !now.Before(e.next) {
			delete(t.keys, k)
		}
	}
}

// Repeats adds key=n to a log line when n, the occurrences suppressed
// since the last line, is not zero: a first line carries no count.
func Repeats(key string, n int64) func(*zerolog.Event) {
	return func(e *zerolog.Event) {
		if n != 0 {
			e.Int64(key, n)
		}
	}
}
