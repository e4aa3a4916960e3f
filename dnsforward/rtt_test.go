package dnsforward

import (
	"testing"
	"time"
)

func TestRTTEstimator(t *testing.T) {
	var e rttEstimator
	if got := e.rto(); got != rtoInitial {
		t.Fatalf("before any sample: %v, want %v", got, rtoInitial)
	}

	// A steady 40 ms round trip: RTO = SRTT + 4·RTTVAR settles towards
	// the round trip, but never below the floor.
	for range 50 {
		e.sample(40 * time.Millisecond)
	}
	if got := e.rto(); got != rtoMin {
		t.Errorf("steady 40 ms: %v, want the floor %v", got, rtoMin)
	}

	// A steady 300 ms round trip with jitter: above the round trip, below
	// the ceiling.
	for i := range 50 {
		e.sample(time.Duration(280+40*(i%2)) * time.Millisecond)
	}
	if got := e.rto(); got <= 300*time.Millisecond || got >= rtoMax {
		t.Errorf("300 ms ± 20: %v, want between the round trip and %v", got, rtoMax)
	}

	// Timeouts double it up to the ceiling; queries that timed out
	// together double it once.
	used := e.rto()
	e.timedOut(used)
	e.timedOut(used)
	if got := e.rto(); got != min(2*used, rtoMax) {
		t.Errorf("after two timeouts of one wait: %v, want %v", got, min(2*used, rtoMax))
	}
	for range 10 {
		e.timedOut(e.rto())
	}
	if got := e.rto(); got != rtoMax {
		t.Errorf("after many timeouts: %v, want the ceiling %v", got, rtoMax)
	}

	// A slow sample far above the ceiling is capped too.
	var slow rttEstimator
	slow.sample(10 * time.Second)
	if got := slow.rto(); got != rtoMax {
		t.Errorf("10 s round trip: %v, want the ceiling %v", got, rtoMax)
	}
	// And one fresh measurement brings a backed-off RTO back down.
	e.sample(40 * time.Millisecond)
	if got := e.rto(); got >= rtoMax {
		t.Errorf("after a fresh sample: %v, want below the ceiling", got)
	}
}
