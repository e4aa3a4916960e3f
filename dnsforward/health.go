package dnsforward

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/socksfwd/socksfwd/internal/logthrottle"
)

// resolverHealth is what the log knows of one resolver: one line when it
// starts failing (its queries going on to the next resolver), one when it
// answers again, as the SOCKS upstreams' changes are logged, and at most
// one line per failureLogPeriod, so that a resolver that flaps costs a
// line a period, not one per change. A change inside the period is logged
// by the first query that finds the period over and the state still
// differing from the last line (the line then counts the changes it
// covers).
type resolverHealth struct {
	// answers counts its answers: a failure of an attempt that began
	// before the latest answer is that query's (a slow name, say), not the
	// resolver's, which answered meanwhile.
	answers atomic.Uint64
	// watch is set while an answer may have something to change: the
	// resolver is failing or the last line said so. Otherwise an answer
	// costs two atomic operations and no lock.
	watch atomic.Bool

	mu       sync.Mutex
	failing  bool      // its last attempt that counts failed
	since    time.Time // when it started failing
	cause    error     // the last failure's
	toldDown bool      // the last line said it was failing
	nextLine time.Time // no line before this
	unlogged int64     // changes of state since the last line
}

// countsAgainstResolver reports whether an attempt's error says the
// resolver (or the path to it) failed: not the forwarder closing, not the
// caller giving up, not a query that cannot be sent, not a proxy without
// UDP ASSOCIATE (logged as every query's failure).
func countsAgainstResolver(err error) bool {
	var (
		noUDP      errNoUDPAssociate
		unsendable unsendableError
	)
	return !errors.Is(err, errForwarderClosed) && !errors.Is(err, context.Canceled) &&
		!errors.As(err, &noUDP) && !errors.As(err, &unsendable)
}

// unsendableError: the query itself cannot be sent (it does not pack, or
// does not fit the transport); no resolver is to blame.
type unsendableError struct{ err error }

func (e unsendableError) Error() string { return e.err.Error() }
func (e unsendableError) Unwrap() error { return e.err }

// answered records an answer from resolver i.
func (f *Forwarder) answered(i int) {
	h := &f.health[i]
	h.answers.Add(1)
	if !h.watch.Load() {
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.failing {
		h.failing = false
		h.unlogged++
	}
	f.logHealthLocked(i, h)
}

// failed records that an attempt on resolver i, begun when it had given
// answersBefore answers, failed with err (see countsAgainstResolver).
func (f *Forwarder) failed(i int, answersBefore uint64, err error) {
	h := &f.health[i]
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.answers.Load() != answersBefore {
		return // it answered meanwhile: it works
	}
	if !h.failing {
		h.failing, h.since = true, time.Now()
		h.unlogged++
	}
	h.cause = err
	f.logHealthLocked(i, h)
}

// logHealthLocked logs resolver i's state when the last line said
// otherwise and the period since that line is over. Called with h.mu held.
func (f *Forwarder) logHealthLocked(i int, h *resolverHealth) {
	defer func() { h.watch.Store(h.failing || h.toldDown) }()
	if h.failing == h.toldDown {
		return
	}
	now := time.Now()
	if now.Before(h.nextLine) {
		return
	}
	h.toldDown, h.nextLine = h.failing, now.Add(failureLogPeriod)
	more := h.unlogged - 1
	h.unlogged = 0
	resolver := f.cfg.Resolvers[i].String()
	if h.failing {
		ev := f.cfg.Logger.Warn().Str("resolver", resolver).Str("cause", causeOf(h.cause)).Err(h.cause).
			Func(logthrottle.Repeats("changes_since_last_line", more))
		if i+1 < len(f.pools) {
			ev.Msg("DNS resolver is failing; trying the next one")
		} else {
			ev.Msg("DNS resolver is failing") // queries it fails get SERVFAIL, logged as such
		}
		return
	}
	f.cfg.Logger.Info().Str("resolver", resolver).Dur("failing_for", now.Sub(h.since)).
		Func(logthrottle.Repeats("changes_since_last_line", more)).Msg("DNS resolver answers again")
}
