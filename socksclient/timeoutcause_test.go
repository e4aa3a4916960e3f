package socksclient

import (
	"context"
	"errors"
	"io"
	"os"
	"testing"
	"time"
)

// lateContext has a deadline that has passed while its Done is not
// closed yet: the moment between a connect's own "i/o timeout" and the
// context's timer.
type lateContext struct{ context.Context }

func (lateContext) Deadline() (time.Time, bool) { return time.Now().Add(-time.Millisecond), true }

// TestTimeoutCauseBeforeContextTimer: a connect that times out at the
// caller's deadline a moment before the caller's context says so is the
// caller's deadline all the same (a DeadlineError naming the stage), not
// a bare "i/o timeout" that a DNS query took for its resolver's silence.
// A failure that is no timeout stays what it is.
func TestTimeoutCauseBeforeContextTimer(t *testing.T) {
	parent := lateContext{context.Background()}
	hctx, cancel := context.WithTimeout(parent, time.Hour)
	defer cancel()
	ioTimeout := &os.SyscallError{Syscall: "connect", Err: os.ErrDeadlineExceeded}
	de, ok := errors.AsType[*DeadlineError](timeoutCause(parent, hctx, time.Hour, ioTimeout, stageConnect))
	if !ok || !de.AtProxy {
		t.Errorf("a connect timed out at the caller's deadline: %v, want a DeadlineError at the proxy", timeoutCause(parent, hctx, time.Hour, ioTimeout, stageConnect))
	}
	refused := errors.New("connect: connection refused")
	if err := timeoutCause(parent, hctx, time.Hour, refused, stageConnect); err != refused {
		t.Errorf("a refused connect: %v, want it as it is", err)
	}
}

// TestFaultLateDeadline: a try cut by the caller's deadline, reported as
// a DeadlineError before the caller's context says so, is judged as the
// caller's deadline: no fault of a proxy given less than its patience. It
// had been taken for the proxy's own handshake timeout and marked it down.
func TestFaultLateDeadline(t *testing.T) {
	h := &hedgedDial[io.Closer]{ctx: context.Background(), hedge: time.Second, attempts: []attempt{{}}}
	h.attempts[0].progress.proxyAt = time.Now().Add(-10 * time.Millisecond)
	err := &DeadlineError{AtProxy: true, stage: stageConnect}
	if got := h.fault(0, err, -1); got != nil {
		t.Errorf("a try of 10 ms cut by the caller's deadline: fault %v, want none", got)
	}
	h.attempts[0].progress.proxyAt = time.Now().Add(-2 * time.Second)
	if got := h.fault(0, err, -1); got == nil {
		t.Error("a try of 2 s (hedge 1 s) cut by the caller's deadline: no fault, want the proxy's")
	}
}
