package dnsforward

import (
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// TestWorkers: a task goes to a waiting worker, and to a new one only
// when every worker is busy; a worker ends once it has been idle for
// workerIdle (checked every workerIdle, so within twice that), and at
// once at stop.
func TestWorkers(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		w := newWorkers()
		hold := make(chan struct{})
		var ran atomic.Int32
		held := func() { <-hold; ran.Add(1) } // waiting on the resolver
		quick := func() { ran.Add(1) }
		live := func(want int32, when string) {
			t.Helper()
			synctest.Wait()
			if n := w.live.Load(); n != want {
				t.Fatalf("%s: %d workers, want %d", when, n, want)
			}
		}
		w.run(held)
		live(1, "one task held")
		w.run(held)
		live(2, "a second task while the first worker is busy")
		close(hold)
		synctest.Wait()
		for range 10 {
			w.run(quick)
			synctest.Wait()
		}
		live(2, "ten tasks one after another")
		if n := ran.Load(); n != 12 {
			t.Fatalf("ran %d tasks, want 12", n)
		}
		time.Sleep(workerIdle)
		live(2, "a period after the last task")
		time.Sleep(workerIdle + time.Millisecond)
		live(0, "two idle periods after the last task")

		w.run(quick)
		live(1, "a task after the workers ended")
		w.stop()
		live(0, "stopped")
		w.stop() // a second stop is harmless
	})
}
