package dnsforward

import (
	"sync"
	"time"
)

// Retransmission timeout bounds for the udp transport. Before any answer
// the first wait is rtoInitial (about what recursive resolvers start an
// unknown server with); rtoMin keeps a very close resolver from being
// flooded with duplicates when an answer is merely a little late (a
// recursive resolver's cache miss takes far longer than its round trip);
// rtoMax keeps room for several sends within the default timeout.
const (
	rtoInitial = 400 * time.Millisecond
	rtoMin     = 100 * time.Millisecond
	rtoMax     = 2 * time.Second
)

// rttEstimator derives a retransmission timeout from measured round trips
// the way TCP and resolvers do (RFC 6298): a smoothed round trip (SRTT)
// and its variation (RTTVAR), RTO = SRTT + 4·RTTVAR within
// [rtoMin, rtoMax]. Only answers to a query sent once are measured (an
// answer after a retransmission could be to either send: Karn's rule), and
// a timeout doubles the RTO until the next measurement, so a resolver that
// became slower is not retransmitted to on every query forever.
type rttEstimator struct {
	mu     sync.Mutex
	srtt   time.Duration
	rttvar time.Duration
	cur    time.Duration // 0 until the first sample or timeout: rtoInitial
}

// rto is the wait before the first retransmission of a new query.
func (e *rttEstimator) rto() time.Duration {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.cur == 0 {
		return rtoInitial
	}
	return e.cur
}

// sample records the round trip of an answer to a query sent once.
func (e *rttEstimator) sample(rtt time.Duration) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.srtt == 0 {
		e.srtt = rtt
		e.rttvar = rtt / 2
	} else {
		diff := e.srtt - rtt
		if diff < 0 {
			diff = -diff
		}
		e.rttvar = (3*e.rttvar + diff) / 4
		e.srtt = (7*e.srtt + rtt) / 8
	}
	e.cur = min(max(e.srtt+4*e.rttvar, rtoMin), rtoMax)
}

// timedOut records that a query sent with a wait of used got no answer in
// that time. Queries in flight together time out together, so the RTO
// doubles from what the query used, not once per query.
func (e *rttEstimator) timedOut(used time.Duration) {
	e.mu.Lock()
	defer e.mu.Unlock()
	cur := e.cur
	if cur == 0 {
		cur = rtoInitial
	}
	e.cur = max(cur, min(2*used, rtoMax))
}
