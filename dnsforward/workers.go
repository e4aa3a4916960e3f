package dnsforward

import (
	"sync"
	"sync/atomic"
	"time"
)

// workerIdle ends a worker that has run nothing for this long (at least;
// at most twice as long): the workers shrink back after a burst.
const workerIdle = 2 * time.Second

// workers runs tasks, queries that wait on a resolver, on goroutines that
// take one task after another: a new goroutine per query would grow its
// stack, copying it, on every query (the query path is deeper than a new
// goroutine's stack), about a sixth of the CPU of a forwarded query. A
// task goes to a waiting worker, or to a new one when every worker is
// busy; a worker ends once idle for workerIdle, and all of them at stop.
type workers struct {
	// work hands a task to a waiting worker; unbuffered, so a send
	// succeeds only when one waits.
	work     chan func()
	quit     chan struct{} // closed by stop
	stopOnce sync.Once
	wg       sync.WaitGroup
	live     atomic.Int32
}

func newWorkers() *workers {
	return &workers{work: make(chan func()), quit: make(chan struct{})}
}

// run runs task on a worker. Not after stop.
func (w *workers) run(task func()) {
	select {
	case w.work <- task:
	default:
		w.live.Add(1)
		w.wg.Go(func() { w.worker(task) })
	}
}

// worker runs task, then the tasks handed to it, until it has been idle
// for workerIdle (checked every workerIdle, so no timer is reset per
// task) or stop.
func (w *workers) worker(task func()) {
	defer w.live.Add(-1)
	task()
	idle := time.NewTimer(workerIdle)
	defer idle.Stop()
	ran := false // since the timer last fired
	for {
		select {
		case task := <-w.work:
			task()
			ran = true
		case <-idle.C:
			if !ran {
				return
			}
			ran = false
			idle.Reset(workerIdle)
		case <-w.quit:
			return
		}
	}
}

// stop ends the workers once their tasks are done and waits for them.
func (w *workers) stop() {
	w.stopOnce.Do(func() { close(w.quit) })
	w.wg.Wait()
}
