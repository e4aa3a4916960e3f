package logthrottle

import (
	"strconv"
	"testing"
	"time"
)

func fakeClock(t *Throttle) *time.Time {
	now := time.Unix(1000, 0)
	t.now = func() time.Time { return now }
	return &now
}

func TestAllowOncePerPeriodWithCount(t *testing.T) {
	th := New(time.Minute)
	now := fakeClock(th)
	if ok, n := th.Allow("dial: refused"); !ok || n != 0 {
		t.Fatalf("first: ok=%v n=%d, want true 0", ok, n)
	}
	for i := range 5 {
		if ok, _ := th.Allow("dial: refused"); ok {
			t.Fatalf("repeat %d within the period was allowed", i)
		}
	}
	if ok, _ := th.Allow("other cause"); !ok {
		t.Fatal("a different cause was suppressed")
	}
	*now = now.Add(time.Minute)
	if ok, n := th.Allow("dial: refused"); !ok || n != 5 {
		t.Fatalf("after the period: ok=%v n=%d, want true 5", ok, n)
	}
	if ok, _ := th.Allow("dial: refused"); ok {
		t.Fatal("a new period did not start")
	}
}

func TestResetReportsSuppressed(t *testing.T) {
	th := New(time.Minute)
	fakeClock(th)
	if _, seen := th.Reset("x"); seen {
		t.Fatal("Reset of an unseen cause reported it seen")
	}
	th.Allow("x")
	th.Allow("x")
	th.Allow("x")
	if n, seen := th.Reset("x"); !seen || n != 2 {
		t.Fatalf("Reset: n=%d seen=%v, want 2 true", n, seen)
	}
	if ok, _ := th.Allow("x"); !ok {
		t.Fatal("a cause after Reset was not logged at once")
	}
}

func TestBoundedKeys(t *testing.T) {
	th := New(time.Minute)
	now := fakeClock(th)
	for i := range maxKeys {
		th.Allow(strconv.Itoa(i))
	}
	if ok, _ := th.Allow("one too many"); ok {
		t.Fatal("a cause past the bound was admitted while all are live")
	}
	*now = now.Add(time.Minute)
	if ok, _ := th.Allow("one too many"); !ok {
		t.Fatal("expired causes were not forgotten to make room")
	}
	if len(th.keys) > maxKeys {
		t.Fatalf("%d keys, bound %d", len(th.keys), maxKeys)
	}
}

// TestFullTableForgetsExpiredCounts: a full table makes room by forgetting
// causes whose period is over, even those with repeats still uncounted,
// so that a new cause is logged rather than dropped for good.
func TestFullTableForgetsExpiredCounts(t *testing.T) {
	th := New(time.Minute)
	now := fakeClock(th)
	for i := range maxKeys {
		th.Allow(strconv.Itoa(i))
		th.Allow(strconv.Itoa(i)) // a repeat: suppressed 1
	}
	*now = now.Add(time.Minute)
	if ok, _ := th.Allow("new cause"); !ok {
		t.Fatal("a new cause was dropped while every other cause's period was over")
	}
}
