package dnsforward

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/socksfwd/socksfwd/internal/logthrottle"
	"github.com/socksfwd/socksfwd/socksclient"
)

// Backoff bounds for a failing resolver, as for the SOCKS upstreams: it is
// tried after the others for 1 s after its first failure, doubling up to
// 30 s each time it fails again once its backoff is over, so that a dead
// first resolver costs a query its share of the timeout once a backoff,
// not on every query.
const (
	resolverBackoffMin = time.Second
	resolverBackoffMax = 30 * time.Second
)

// resolverHealth is what the forwarder knows of one resolver's state.
//
// For the order of the resolvers (see resolverOrder): from its first
// failure until it answers again it is failing, and tried after the
// others for a backoff (resolverBackoffMin doubling to
// resolverBackoffMax): last rather than never, so that one that answers
// again is found. When the backoff is over, the first query to see it
// tries the resolver in its place again (a probe) while it stays last for
// the others; the probe's failure starts a backoff twice as long, its
// answer ends the failing.
//
// For the log: one line when it starts failing (its queries going on to
// the next resolver), one when it answers again, as the SOCKS upstreams'
// changes are logged, and at most one line per failureLogPeriod, so that
// a resolver that flaps costs a line a period, not one per change. A
// change inside the period is logged by the first query that finds the
// period over and the state still differing from the last line (the line
// then counts the changes it covers).
type resolverHealth struct {
	// answers counts its answers: a failure of an attempt that began
	// before the latest answer is that query's (a slow name, say), not the
	// resolver's, which answered meanwhile.
	answers atomic.Uint64
	// watch is set while an answer may have something to change: the
	// resolver is failing or the last line said so. Otherwise an answer
	// costs two atomic operations and no lock.
	watch atomic.Bool
	// downUntil: while failing, queries deciding before this time (see
	// monotonic) try it after the others; 0 while it is not.
	downUntil atomic.Int64

	mu       sync.Mutex
	failing  bool          // its last attempt that counts failed
	backoff  time.Duration // while failing, the last backoff started
	since    time.Time     // when it started failing
	cause    error         // the last failure's
	toldDown bool          // the last line said it was failing
	nextLine time.Time     // no line before this
	unlogged int64         // changes of state since the last line
	// timedOut: answers+1 when a query timed out on it, at timedOutAt,
	// while it was not failing; 0 when none did. A second timeout, of a
	// query begun after the first and with no answer between, makes it
	// failing: one alone may be a slow name, and so may the queries
	// asked with it (A and AAAA for one name).
	timedOut   uint64
	timedOutAt time.Time
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
		!errors.As(err, &noUDP) && !errors.As(err, &unsendable) && !notResolversSilence(err)
}

// notResolversSilence: a query's time ran out before it reached the
// resolver: the proxy had not answered its handshake, or the query waited
// for a connection another query was dialing. The resolver is not to
// blame; the proxy's own failures are the upstreams' to count.
func notResolversSilence(err error) bool {
	stalled, ok := errors.AsType[*socksclient.DeadlineError](err)
	return ok && stalled.AtProxy || errors.Is(err, errAwaitingConn)
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
		h.failing, h.backoff = false, 0
		h.downUntil.Store(0)
		h.unlogged++
	}
	f.logHealthLocked(i, h)
}

// failed records that an attempt on resolver i, begun when it had given
// answersBefore answers, failed with err (see countsAgainstResolver), in
// a query that chose its order at decided and tried it after the others
// (triedLast) or in its place. The first failure puts the resolver last
// for resolverBackoffMin; a failure when it was tried in its place though
// already failing before the query decided (the probe: see
// resolverHealth) doubles the backoff. Other failures during a backoff
// are the same outage: those of queries that tried it last, or that had
// decided before it started failing.
func (f *Forwarder) failed(i int, answersBefore uint64, decided time.Time, triedLast bool, err error) {
	h := &f.health[i]
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.answers.Load() != answersBefore {
		return // it answered meanwhile: it works
	}
	if !h.failing && errors.Is(err, errNoAnswer) && (h.timedOut != answersBefore+1 || decided.Before(h.timedOutAt)) {
		// One name the resolver is slow to answer (on a quiet host, with
		// no other query to show it works) says little: see timedOut.
		if h.timedOut != answersBefore+1 {
			h.timedOut, h.timedOutAt = answersBefore+1, time.Now()
		}
		return
	}
	now := time.Now()
	switch {
	case !h.failing:
		h.failing, h.since = true, now
		h.backoff = resolverBackoffMin
		h.downUntil.Store(f.monotonic(now.Add(h.backoff)))
		h.unlogged++
	case !triedLast && !decided.Before(h.since):
		h.backoff = min(2*h.backoff, resolverBackoffMax)
		h.downUntil.Store(f.monotonic(now.Add(h.backoff)))
	}
	h.cause = err
	f.logHealthLocked(i, h)
}

// monotonic is t as nanoseconds on the monotonic clock since f was made
// (at least 1): a wall clock stepped back (NTP at boot) must not stretch
// a backoff.
func (f *Forwarder) monotonic(t time.Time) int64 { return max(int64(t.Sub(f.created)), 1) }

// triedLast reports whether a query deciding at now (Unix nanoseconds)
// tries the resolver after the others: it is failing and its backoff is
// not over. The first query to find the backoff over tries it in its
// place (the probe) and keeps it last for the others for probeFor, the
// longest a query takes, unless the probe's outcome comes first.
func (h *resolverHealth) triedLast(now int64, probeFor time.Duration) bool {
	until := h.downUntil.Load()
	switch {
	case until == 0:
		return false
	case now < until:
		return true
	}
	return !h.downUntil.CompareAndSwap(until, now+int64(probeFor))
}

// resolverOrder appends to order the indexes of the resolvers in the
// order a query deciding at decided tries them: in the configured order,
// those in backoff (see resolverHealth) after the others. The first
// first of them are tried in their place. No allocation while order has
// room.
func (f *Forwarder) resolverOrder(order []int, decided time.Time) (_ []int, first int) {
	now := f.monotonic(decided)
	var lastBuf [8]int
	last := lastBuf[:0]
	for i := range f.health {
		if f.health[i].triedLast(now, f.cfg.Timeout) {
			last = append(last, i)
		} else {
			order = append(order, i)
		}
	}
	first = len(order)
	return append(order, last...), first
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
	f.cfg.Logger.Info().Str("resolver", resolver).Dur("failing_for_ms", now.Sub(h.since)).
		Func(logthrottle.Repeats("changes_since_last_line", more)).Msg("DNS resolver answers again")
}
