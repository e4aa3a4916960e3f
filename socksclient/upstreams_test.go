package socksclient

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"testing/synctest"
	"time"
)

// Time in these tests is a synctest bubble's: the durations asserted are
// what the hedging logic chose, not how fast the machine is.

var testTarget = Addr{IP: netip.MustParseAddr("192.0.2.1"), Port: 80}

type proxyMode int

const (
	proxyWorks      proxyMode = iota // answers after delay, with rep
	proxyBlackHole                   // accepts and reads, never answers
	proxyRefused                     // the dial fails
	proxyTargetHole                  // answers the greeting, never the request (a black-holed target)
	proxyNoReply                     // closes at the request: ssh -D's way to say the target failed
)

// fakeProxy plays one upstream over net.Pipe, so that a synctest bubble
// sees every wait as durable.
type fakeProxy struct {
	name       string
	mode       proxyMode
	script     []proxyMode   // the mode of the n-th dial, mode past its end
	delay      time.Duration // before the method selection
	replyDelay time.Duration // before the reply: the time it takes to reach the target
	rep        ReplyCode

	dials atomic.Int32
	open  atomic.Int32 // connections whose server side is still up
}

func (p *fakeProxy) dialer() *Dialer {
	return &Dialer{ProxyAddr: p.name, ProxyDial: p.dial}
}

func (p *fakeProxy) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	mode := p.mode
	if n := int(p.dials.Add(1)) - 1; n < len(p.script) {
		mode = p.script[n]
	}
	if mode == proxyRefused {
		return nil, &net.OpError{Op: "dial", Net: network, Err: syscall.ECONNREFUSED}
	}
	c, srv := net.Pipe()
	p.open.Add(1)
	go p.serve(srv, mode)
	return c, nil
}

// serve ends when the client closes its side, so a closed loser leaves no
// goroutine behind.
func (p *fakeProxy) serve(srv net.Conn, mode proxyMode) {
	defer p.open.Add(-1)
	defer srv.Close()
	defer io.Copy(io.Discard, srv)
	if mode == proxyBlackHole {
		return
	}
	if _, err := ReadGreeting(srv); err != nil {
		return
	}
	time.Sleep(p.delay) // a slow proxy, in the bubble's time
	if _, err := srv.Write([]byte{Version, byte(MethodNoAuth)}); err != nil {
		return
	}
	if _, err := ReadRequest(srv); err != nil || mode == proxyTargetHole {
		return
	}
	if mode == proxyNoReply {
		srv.Close()
		return
	}
	if p.replyDelay > 0 {
		// Reaching the target ends early when the client gives up, as a
		// proxy's connect to the target does when its client closes.
		gone := make(chan struct{})
		go func() {
			defer close(gone)
			io.Copy(io.Discard, srv)
		}()
		defer func() { <-gone }()
		select {
		case <-time.After(p.replyDelay):
		case <-gone:
			return
		}
	}
	b, _ := Reply{Code: p.rep, Addr: Addr{IP: netip.IPv4Unspecified()}}.AppendTo(nil)
	srv.Write(b)
}

// stateLog records OnStateChange calls.
type stateLog struct {
	mu     sync.Mutex
	events []string
	causes []error
}

func (l *stateLog) hook(proxy string, up bool, cause error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	state := "down"
	if up {
		state = "up"
	}
	l.events = append(l.events, proxy+" "+state)
	l.causes = append(l.causes, cause)
}

func (l *stateLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.events, ", ")
}

// set is the changes in sorted order, for upstreams that change at the
// same instant.
func (l *stateLog) set() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(slices.Sorted(slices.Values(l.events)), ", ")
}

func (l *stateLog) cause(i int) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.causes[i]
}

func group(log *stateLog, proxies ...*fakeProxy) *Upstreams {
	ds := make([]*Dialer, len(proxies))
	for i, p := range proxies {
		ds[i] = p.dialer()
	}
	u := NewUpstreams(ds...)
	u.OnStateChange(log.hook)
	return u
}

// dialOK dials testTarget, wants success through want, and closes the session.
func dialOK(t *testing.T, ctx context.Context, u *Upstreams, want *fakeProxy) {
	t.Helper()
	c, d, err := u.DialAddr(ctx, testTarget)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if d.ProxyAddr != want.name {
		t.Fatalf("dialed through %s, want %s", d.ProxyAddr, want.name)
	}
}

// TestHedgeBlackHoledPrimary: a primary that accepts and never answers
// costs the first dial the hedge delay, not the handshake timeout; it goes
// down once (one report), is skipped during its backoff, and loses again
// after it without a second report.
func TestHedgeBlackHoledPrimary(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		hole, ok := &fakeProxy{name: "hole:1080", mode: proxyBlackHole}, &fakeProxy{name: "ok:1080"}
		var log stateLog
		u := group(&log, hole, ok)

		start := time.Now()
		dialOK(t, context.Background(), u, ok)
		if waited := time.Since(start); waited != DefaultHedgeDelay {
			t.Fatalf("dial took %v, want the hedge delay %v", waited, DefaultHedgeDelay)
		}
		synctest.Wait()
		if n := hole.open.Load() + ok.open.Load(); n != 0 {
			t.Fatalf("%d proxy connections still open after the dial and Close", n)
		}
		if log.String() != "hole:1080 down" || !strings.Contains(log.cause(0).Error(), "no reply to the handshake within 300ms, while ok:1080") {
			t.Fatalf("state changes %q (cause %v), want one: hole:1080 down", log.String(), log.cause(0))
		}
		st := u.Status()
		if st[0].Up || st[0].Backoff != time.Second || !st[1].Up {
			t.Fatalf("status %+v, want the black hole down for 1s", st)
		}

		// In backoff it is tried last, so the working one answers at once.
		dials := hole.dials.Load()
		start = time.Now()
		dialOK(t, context.Background(), u, ok)
		if time.Since(start) != 0 || hole.dials.Load() != dials {
			t.Fatalf("during the backoff the black hole was dialed (%d) or waited for (%v)", hole.dials.Load()-dials, time.Since(start))
		}

		// After it, it is tried first again, loses again, and backs off longer.
		time.Sleep(time.Second)
		dialOK(t, context.Background(), u, ok)
		if hole.dials.Load() != dials+1 || u.Status()[0].Backoff != 2*time.Second {
			t.Fatalf("after the backoff: %d dials, status %+v", hole.dials.Load()-dials, u.Status()[0])
		}
		if log.String() != "hole:1080 down" {
			t.Fatalf("state changes %q, want only the first down", log.String())
		}
	})
}

// TestHedgeCallerDeadline: a caller's deadline shorter than the handshake
// timeout (DNS: 5 s against 10 s) leaves each upstream its share even with
// no fixed hedge delay, so the next one is tried in time and the black
// hole backs off.
func TestHedgeCallerDeadline(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		hole, ok := &fakeProxy{name: "hole:1080", mode: proxyBlackHole}, &fakeProxy{name: "ok:1080"}
		var log stateLog
		u := group(&log, hole, ok)
		u.SetHedgeDelay(0)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		start := time.Now()
		dialOK(t, ctx, u, ok)
		if waited := time.Since(start); waited != 2500*time.Millisecond {
			t.Fatalf("second upstream answered after %v, want half the deadline", waited)
		}
		if log.String() != "hole:1080 down" || u.Status()[0].Up {
			t.Fatalf("state changes %q, status %+v; want the black hole down", log.String(), u.Status())
		}
	})
	synctest.Test(t, func(t *testing.T) {
		// Three: each not yet started is left its share of what remains.
		h1, h2, ok := &fakeProxy{name: "h1:1080", mode: proxyBlackHole}, &fakeProxy{name: "h2:1080", mode: proxyBlackHole}, &fakeProxy{name: "ok:1080"}
		var log stateLog
		u := group(&log, h1, h2, ok)
		u.SetHedgeDelay(0)
		ctx, cancel := context.WithTimeout(context.Background(), 6*time.Second)
		defer cancel()
		start := time.Now()
		dialOK(t, ctx, u, ok)
		if waited := time.Since(start); waited != 4*time.Second {
			t.Fatalf("third upstream answered after %v, want 2s + 2s", waited)
		}
		if log.set() != "h1:1080 down, h2:1080 down" {
			t.Fatalf("state changes %q", log.String())
		}
	})
}

// TestHedgeAllBlackHoled: when nothing answers before the caller's
// deadline, the error says so on one line, and every upstream that had
// its hedge delay goes down once.
func TestHedgeAllBlackHoled(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h1, h2 := &fakeProxy{name: "h1:1080", mode: proxyBlackHole}, &fakeProxy{name: "h2:1080", mode: proxyBlackHole}
		var log stateLog
		u := group(&log, h1, h2)
		for range 2 {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_, d, err := u.DialAddr(ctx, testTarget)
			cancel()
			if !errors.Is(err, context.DeadlineExceeded) || d != nil {
				t.Fatalf("err = %v, dialer %v; want the deadline and no dialer", err, d)
			}
			msg := err.Error()
			if !strings.HasPrefix(msg, "all 2 upstreams failed: ") || strings.Contains(msg, "\n") ||
				strings.Count(msg, "h1:1080") != 1 || strings.Count(msg, "h2:1080") != 1 {
				t.Fatalf("err = %q, want one line naming each upstream once", msg)
			}
		}
		if log.set() != "h1:1080 down, h2:1080 down" {
			t.Fatalf("state changes %q, want each down once", log.String())
		}
		synctest.Wait()
		if n := h1.open.Load() + h2.open.Load(); n != 0 {
			t.Fatalf("%d proxy connections left open", n)
		}
	})
}

// TestHedgeCallerCancel: a caller that gives up (a closing service) says
// nothing about the upstream.
func TestHedgeCallerCancel(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		hole := &fakeProxy{name: "hole:1080", mode: proxyBlackHole}
		var log stateLog
		u := group(&log, hole)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() {
			_, _, err := u.DialAddr(ctx, testTarget)
			done <- err
		}()
		time.Sleep(5 * time.Second) // past the hedge delay, within the handshake timeout
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Fatalf("err = %v, want context.Canceled", err)
		}
		if log.String() != "" || !u.Status()[0].Up {
			t.Fatalf("state changes %q, status %+v; want none", log.String(), u.Status())
		}
	})
}

// TestHedgeTargetAnswer: a REP about the target is the answer, even from
// a slow primary while a hedge runs; the hedge is cut short and nothing
// goes down. REP 7 is the proxy's failing: the next one is tried.
func TestHedgeTargetAnswer(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		slow := &fakeProxy{name: "slow:1080", delay: time.Second, rep: RepConnectionRefused}
		hole := &fakeProxy{name: "hole:1080", mode: proxyBlackHole}
		var log stateLog
		u := group(&log, slow, hole)
		_, d, err := u.DialAddr(context.Background(), testTarget)
		var re *ReplyError
		if !errors.As(err, &re) || re.Code != RepConnectionRefused || d == nil || d.ProxyAddr != "slow:1080" {
			t.Fatalf("err = %v, dialer %v; want the primary's REP 5", err, d)
		}
		if hole.dials.Load() != 1 {
			t.Fatalf("hedge dialed %d times, want once", hole.dials.Load())
		}
		synctest.Wait()
		if log.String() != "" || hole.open.Load() != 0 {
			t.Fatalf("state changes %q, %d connections open; want none", log.String(), hole.open.Load())
		}
	})
	// The next proxy is tried after REP 7 to CONNECT (the proxy's failing:
	// it goes down), and after REP 8 (it cannot carry this address, IPv6 or
	// a name, and stays up for the targets it can reach) and REP 1, general
	// failure (the server's own trouble by RFC 1928: Tor's, or a -D door
	// whose upstreams are all down; servers also send it for a target they
	// have no better code for, so it stays up), and after a CONNECT closed
	// without a reply (ssh -D's answer when the target fails: it stays up).
	for _, tc := range []struct {
		rep     ReplyCode
		mode    proxyMode
		changes string
	}{{RepCommandNotSupported, proxyWorks, "refusing:1080 down"}, {RepAddrTypeNotSupported, proxyWorks, ""}, {RepGeneralFailure, proxyWorks, ""}, {0, proxyNoReply, ""}} {
		synctest.Test(t, func(t *testing.T) {
			refusing := &fakeProxy{name: "refusing:1080", rep: tc.rep, mode: tc.mode}
			ok := &fakeProxy{name: "ok:1080"}
			var log stateLog
			u := group(&log, refusing, ok)
			dialOK(t, context.Background(), u, ok)
			synctest.Wait()
			if log.String() != tc.changes {
				t.Fatalf("REP %d: state changes %q; want %q", tc.rep, log.String(), tc.changes)
			}
			if tc.changes != "" && !errors.Is(log.cause(0), ErrCommandNotSupported) {
				t.Fatalf("REP %d: down for %v", tc.rep, log.cause(0))
			}
		})
	}
	// REP 7 to BIND: the next proxy is tried, and one without BIND (as
	// ssh -D) stays up for the CONNECTs it serves.
	synctest.Test(t, func(t *testing.T) {
		noBind := &fakeProxy{name: "nobind:1080", rep: RepCommandNotSupported}
		ok := &fakeProxy{name: "ok:1080"}
		var log stateLog
		u := group(&log, noBind, ok)
		b, d, err := u.Bind(context.Background(), testTarget)
		if err != nil || d == nil || d.ProxyAddr != "ok:1080" {
			t.Fatalf("Bind: %v through %v; want ok:1080", err, d)
		}
		b.Close()
		synctest.Wait()
		if log.String() != "" {
			t.Fatalf("state changes %q; want none", log.String())
		}
	})
}

// TestHedgeBothAnswer: when the hedge and the primary both complete, one
// wins and the other's connection is closed.
func TestHedgeBothAnswer(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p1 := &fakeProxy{name: "p1:1080", delay: 400 * time.Millisecond}
		p2 := &fakeProxy{name: "p2:1080", delay: 100 * time.Millisecond}
		var log stateLog
		u := group(&log, p1, p2)
		c, _, err := u.DialAddr(context.Background(), testTarget)
		if err != nil {
			t.Fatal(err)
		}
		synctest.Wait()
		if n := p1.open.Load() + p2.open.Load(); n != 1 {
			t.Fatalf("%d proxy connections open, want the winner's only", n)
		}
		c.Close()
	})
}

// TestUpstreamsBackoff: a failed upstream is tried last for 1 s, doubling
// to 30 s; success resets it; each change is reported once.
func TestUpstreamsBackoff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		primary := &fakeProxy{name: "primary:1080", mode: proxyRefused}
		secondary := &fakeProxy{name: "secondary:1080", mode: proxyRefused}
		var log stateLog
		u := group(&log, primary, secondary)

		dialFails := func() {
			t.Helper()
			_, _, err := u.DialAddr(context.Background(), testTarget)
			if err == nil || !errors.Is(err, syscall.ECONNREFUSED) {
				t.Fatalf("err = %v", err)
			}
		}
		dialFails()
		dialFails()
		// Both in backoff are still tried, in order, so a returning server
		// is found; a failure within the backoff is the same outage.
		if primary.dials.Load() != 2 || secondary.dials.Load() != 2 {
			t.Fatalf("dials %d, %d", primary.dials.Load(), secondary.dials.Load())
		}
		if st := u.Status(); st[0].Backoff != time.Second || st[1].Backoff != time.Second || st[0].Up {
			t.Fatalf("status %+v, want both down for 1s", st)
		}
		// Failing again once the backoff is over doubles it.
		time.Sleep(1100 * time.Millisecond)
		dialFails()
		if st := u.Status(); st[0].Backoff != 2*time.Second || st[1].Backoff != 2*time.Second || st[0].Up {
			t.Fatalf("status %+v, want both down for 2s", st)
		}
		if log.String() != "primary:1080 down, secondary:1080 down" {
			t.Fatalf("state changes %q, want one down each", log.String())
		}

		// The secondary comes back; once it has worked it goes first, while
		// the primary's backoff (to 3.1 s) lasts.
		time.Sleep(1500 * time.Millisecond)
		secondary.mode = proxyWorks
		dialOK(t, context.Background(), u, secondary) // both in backoff: primary first, fails
		time.Sleep(400 * time.Millisecond)
		before := primary.dials.Load()
		dialOK(t, context.Background(), u, secondary)
		if primary.dials.Load() != before {
			t.Fatal("primary in backoff was tried before the healthy secondary")
		}
		if st := u.Status(); !st[1].Up || st[1].Backoff != 0 {
			t.Fatalf("secondary status %+v, want reset", st[1])
		}
		if log.String() != "primary:1080 down, secondary:1080 down, secondary:1080 up" {
			t.Fatalf("state changes %q", log.String())
		}

		for range 10 { // each once its backoff is over
			over := u.Status()[0].DownUntil
			u.markDown(u.current()[0], over, over, errors.New("x"))
		}
		if b := u.Status()[0].Backoff; b != maxBackoff {
			t.Fatalf("backoff = %v, want capped at %v", b, maxBackoff)
		}
		// A failure within the backoff does not back off again
		// (concurrent dials to one dead proxy).
		st := u.Status()[0]
		u.markDown(u.current()[0], time.Now(), time.Now(), errors.New("x"))
		if now := u.Status()[0]; !now.DownUntil.Equal(st.DownUntil) {
			t.Fatalf("a failure within the backoff moved it: %+v, was %+v", now, st)
		}
	})
	if !IsUpstreamFailure(errors.New("unreachable")) || IsUpstreamFailure(&ReplyError{Cmd: CmdConnect, Code: RepConnectionRefused}) ||
		!IsUpstreamFailure(&ReplyError{Cmd: CmdUDPAssociate, Code: RepCommandNotSupported}) ||
		!IsUpstreamFailure(&ReplyError{Cmd: CmdConnect, Code: RepGeneralFailure}) ||
		IsUpstreamFailure(fmt.Errorf("x: %w", context.Canceled)) {
		t.Fatal("IsUpstreamFailure misclassifies")
	}
}

// TestUpstreamsErrorOneLine: the all-failed error has each cause once, on
// one line, and each stays reachable with errors.Is and errors.As.
func TestUpstreamsErrorOneLine(t *testing.T) {
	errA, errB := errors.New("cause A"), errors.New("cause B")
	failing := func(name string, err error) *Dialer {
		return &Dialer{ProxyAddr: name, ProxyDial: func(context.Context, string, string) (net.Conn, error) { return nil, err }}
	}
	u := NewUpstreams(failing("a:1080", errA), failing("b:1080", errB))
	_, d, err := u.DialAddr(context.Background(), testTarget)
	if err == nil || d != nil {
		t.Fatalf("err = %v, dialer %v", err, d)
	}
	msg := err.Error()
	if strings.Contains(msg, "\n") || strings.Count(msg, "cause A") != 1 || strings.Count(msg, "cause B") != 1 ||
		!strings.HasPrefix(msg, "all 2 upstreams failed: socks connect") {
		t.Fatalf("err = %q, want one line with each cause once", msg)
	}
	var op *net.OpError
	if !errors.Is(err, errA) || !errors.Is(err, errB) || !errors.As(err, &op) {
		t.Fatalf("causes not reachable in %q", msg)
	}
	// One upstream: its error as is, with its dialer.
	u = NewUpstreams(failing("a:1080", errA))
	if _, d, err := u.DialAddr(context.Background(), testTarget); !errors.Is(err, errA) || d == nil || strings.Contains(err.Error(), "upstreams failed") {
		t.Fatalf("single upstream: err = %v, dialer %v", err, d)
	}
	if _, _, err := NewUpstreams().DialAddr(context.Background(), testTarget); !errors.Is(err, errNoUpstreams) {
		t.Fatalf("no upstreams: %v", err)
	}
}

// TestUpstreamsSet: a dial in flight finishes on the list and hedge delay
// it started with; new dials use the new ones; an upstream that stays keeps its backoff, a
// new one starts healthy, a removed one reports nothing more.
func TestUpstreamsSet(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		hole, ok, fresh := &fakeProxy{name: "hole:1080", mode: proxyBlackHole}, &fakeProxy{name: "ok:1080"}, &fakeProxy{name: "fresh:1080"}
		var log stateLog
		u := group(&log, hole, ok)
		u.SetHedgeDelay(time.Minute)
		done := make(chan *Dialer, 1)
		start := time.Now()
		go func() {
			c, d, err := u.DialAddr(context.Background(), testTarget)
			if err != nil {
				t.Error(err)
				done <- nil
				return
			}
			c.Close()
			done <- d
		}()
		synctest.Wait() // the dial is waiting on the black hole
		u.SetDialers(fresh.dialer())
		u.SetHedgeDelay(time.Millisecond)
		if ds := u.Dialers(); len(ds) != 1 || ds[0].ProxyAddr != "fresh:1080" {
			t.Fatalf("Dialers() = %v", ds)
		}
		if d := <-done; d == nil || d.ProxyAddr != "ok:1080" || fresh.dials.Load() != 0 {
			t.Fatalf("in-flight dial went through %v (fresh dialed %d times), want ok:1080", d, fresh.dials.Load())
		}
		if waited := time.Since(start); waited != DefaultHandshakeTimeout {
			t.Fatalf("in-flight dial moved on after %v, want the black hole's handshake timeout (its hedge delay was a minute)", waited)
		}
		if log.String() != "" {
			t.Fatalf("removed upstream reported %q", log.String())
		}
		dialOK(t, context.Background(), u, fresh)
	})

	synctest.Test(t, func(t *testing.T) {
		dead, ok := &fakeProxy{name: "dead:1080", mode: proxyRefused}, &fakeProxy{name: "ok:1080"}
		var log stateLog
		u := group(&log, dead, ok)
		dialOK(t, context.Background(), u, ok)
		// The same proxy with a new timeout keeps its backoff; other
		// credentials make it another upstream, fresh.
		same := dead.dialer()
		same.HandshakeTimeout = time.Second
		other := dead.dialer()
		other.Username, other.Password = "u", "p"
		u.SetDialers(ok.dialer(), same, other)
		st := u.Status()
		if !st[0].Up || st[1].Up || st[1].Backoff != time.Second || st[1].Dialer != same || !st[2].Up {
			t.Fatalf("after Set: %+v", st)
		}
	})

	// Concurrent dials while the list changes, for the race detector.
	a, b := &fakeProxy{name: "a:1080"}, &fakeProxy{name: "b:1080"}
	u := NewUpstreams(a.dialer())
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for range 25 {
				c, _, err := u.DialAddr(context.Background(), testTarget)
				if err != nil {
					t.Error(err)
					return
				}
				c.Close()
			}
		})
	}
	for i := range 50 {
		if i%2 == 0 {
			u.SetDialers(b.dialer(), a.dialer())
		} else {
			u.SetDialers(a.dialer())
		}
		u.SetHedgeDelay(time.Duration(i) * time.Millisecond)
		u.OnStateChange(func(string, bool, error) {})
		u.Dialers()
		u.Status()
	}
	wg.Wait()
}

// commandOps runs each command through a group once and closes what it
// opened.
var commandOps = []struct {
	name string
	run  func(context.Context, *Upstreams) (*Dialer, error)
}{
	{"connect", func(ctx context.Context, u *Upstreams) (*Dialer, error) {
		c, d, err := u.DialAddr(ctx, testTarget)
		if err == nil {
			c.Close()
		}
		return d, err
	}},
	{"bind", func(ctx context.Context, u *Upstreams) (*Dialer, error) {
		b, d, err := u.Bind(ctx, Addr{})
		if err == nil {
			b.Close()
		}
		return d, err
	}},
	{"udp associate", func(ctx context.Context, u *Upstreams) (*Dialer, error) {
		a, d, err := u.Associate(ctx)
		if err == nil {
			a.Close()
		}
		return d, err
	}},
}

// TestHedgeSlowTarget: proxies that answer the greeting and then wait on a
// black-holed target (the CONNECT target; for BIND and ASSOCIATE whatever
// the proxy waits on before replying) have done their part. When the
// caller's deadline (DNS gives its first resolver half of --dns-timeout) or
// the handshake timeout passes, the call fails, every proxy was tried, and
// none goes down: one bad target must not reorder failover for all traffic.
func TestHedgeSlowTarget(t *testing.T) {
	for _, op := range commandOps {
		t.Run(op.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				p1, p2 := &fakeProxy{name: "p1:1080", mode: proxyTargetHole}, &fakeProxy{name: "p2:1080", mode: proxyTargetHole}
				var log stateLog
				u := group(&log, p1, p2)

				ctx, cancel := context.WithTimeout(context.Background(), 2500*time.Millisecond)
				_, err := op.run(ctx, u)
				cancel()
				if !errors.Is(err, context.DeadlineExceeded) {
					t.Fatalf("with the caller's deadline: err = %v, want it exceeded", err)
				}
				_, err = op.run(context.Background(), u)
				if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "handshake timed out") {
					t.Fatalf("without a deadline: err = %v, want the handshake timeout", err)
				}
				if p1.dials.Load() != 2 || p2.dials.Load() != 2 {
					t.Fatalf("dials %d, %d; want each proxy tried by each call", p1.dials.Load(), p2.dials.Load())
				}
				if st := u.Status(); log.String() != "" || !st[0].Up || !st[1].Up {
					t.Fatalf("state changes %q, status %+v; want none, both up", log.String(), st)
				}
				synctest.Wait()
				if n := p1.open.Load() + p2.open.Load(); n != 0 {
					t.Fatalf("%d proxy connections left open", n)
				}
			})
		})
	}
	t.Run("beside a black hole", func(t *testing.T) {
		// A proxy that does not answer the greeting is still found out.
		synctest.Test(t, func(t *testing.T) {
			slow, hole := &fakeProxy{name: "slow:1080", mode: proxyTargetHole}, &fakeProxy{name: "hole:1080", mode: proxyBlackHole}
			var log stateLog
			u := group(&log, slow, hole)
			ctx, cancel := context.WithTimeout(context.Background(), 2500*time.Millisecond)
			defer cancel()
			if _, _, err := u.DialAddr(ctx, testTarget); !errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("err = %v, want the deadline", err)
			}
			if st := u.Status(); log.String() != "hole:1080 down" || !st[0].Up || st[1].Up {
				t.Fatalf("state changes %q, status %+v; want only the black hole down", log.String(), st)
			}
		})
	})
}

// TestHedgeSlowTargetLosesRace: a primary that answered the greeting and
// waits on a slow target, beaten by a hedge that reached the target first
// (or was refused by it first), is cut short but not marked down, and stays
// first for the next dial.
func TestHedgeSlowTargetLosesRace(t *testing.T) {
	for _, rep := range []ReplyCode{RepSucceeded, RepConnectionRefused} {
		t.Run(rep.String(), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				slow := &fakeProxy{name: "slow:1080", replyDelay: time.Second}
				fast := &fakeProxy{name: "fast:1080", rep: rep}
				var log stateLog
				u := group(&log, slow, fast)
				c, d, err := u.DialAddr(context.Background(), testTarget)
				if rep == RepSucceeded && err == nil {
					c.Close()
				}
				var re *ReplyError
				if d == nil || d.ProxyAddr != "fast:1080" || (rep == RepSucceeded) != (err == nil) ||
					(rep != RepSucceeded && (!errors.As(err, &re) || re.Code != rep)) {
					t.Fatalf("err = %v through %v, want the hedge's answer (%s)", err, d, rep)
				}
				if st := u.Status(); log.String() != "" || !st[0].Up {
					t.Fatalf("state changes %q, status %+v; want none", log.String(), st)
				}
				// Still first: the next dial tries it before the hedge.
				c, d, err = u.DialAddr(context.Background(), testTarget)
				if err == nil {
					c.Close()
				}
				if slow.dials.Load() != 2 {
					t.Fatalf("the slow target's proxy was dialed %d times in two dials (the second went through %v), want 2", slow.dials.Load(), d)
				}
				synctest.Wait()
				if n := slow.open.Load() + fast.open.Load(); n != 0 {
					t.Fatalf("%d proxy connections left open", n)
				}
			})
		})
	}
}

// TestUpstreamsLocalResolutionFailure: with ResolveLocally, a name that
// does not resolve is the target's problem: the proxies are never reached
// and none goes down.
func TestUpstreamsLocalResolutionFailure(t *testing.T) {
	noDNS := &net.Resolver{PreferGo: true, Dial: func(context.Context, string, string) (net.Conn, error) {
		return nil, errors.New("no resolver here")
	}}
	p1, p2 := &fakeProxy{name: "p1:1080"}, &fakeProxy{name: "p2:1080"}
	var log stateLog
	u := group(&log, p1, p2)
	ds := u.Dialers()
	for _, d := range ds {
		d.ResolveLocally, d.Resolver = true, noDNS
	}
	u.SetDialers(ds...)
	_, _, err := u.DialAddr(context.Background(), Addr{Name: "db.internal", Port: 5432})
	if err == nil || !strings.Contains(err.Error(), "resolving db.internal locally failed") {
		t.Fatalf("err = %v, want the resolution failure", err)
	}
	if st := u.Status(); log.String() != "" || !st[0].Up || !st[1].Up || p1.dials.Load()+p2.dials.Load() != 0 {
		t.Fatalf("state changes %q, status %+v, dials %d, %d; want none, both up, no dial",
			log.String(), st, p1.dials.Load(), p2.dials.Load())
	}
}

// TestUpstreamsStaleFailureAfterRecovery: an attempt that began during an
// outage and fails after the upstream came back (here on its handshake
// timeout) is old news: the upstream stays up, with no second "down".
func TestUpstreamsStaleFailureAfterRecovery(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := &fakeProxy{name: "p:1080", script: []proxyMode{proxyRefused, proxyBlackHole}}
		var log stateLog
		u := group(&log, p)
		if _, _, err := u.DialAddr(context.Background(), testTarget); !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("err = %v, want refused", err)
		}
		stale := make(chan error, 1)
		go func() {
			_, _, err := u.DialAddr(context.Background(), testTarget)
			stale <- err
		}()
		synctest.Wait() // the stale attempt waits on the black hole

		time.Sleep(minBackoff)
		dialOK(t, context.Background(), u, p)
		if err := <-stale; !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("stale attempt: err = %v, want the handshake timeout", err)
		}
		if st := u.Status()[0]; log.String() != "p:1080 down, p:1080 up" || !st.Up || st.Backoff != 0 {
			t.Fatalf("state changes %q, status %+v; want down, up, and up now", log.String(), st)
		}
		// A failure of an attempt begun after it came back still counts.
		p.mode = proxyRefused
		u.DialAddr(context.Background(), testTarget)
		if log.String() != "p:1080 down, p:1080 up, p:1080 down" {
			t.Fatalf("state changes %q, want a new down", log.String())
		}
	})
}

// TestDialProgress: the Dialer records how far the proxy's part of the
// handshake got (connecting, the method selection, authentication), which
// is what Upstreams judges a proxy on.
func TestDialProgress(t *testing.T) {
	const (
		stallGreeting = iota // reads the greeting, never answers
		stallAuth            // selects username/password, never answers it
		rejectAuth           // rejects the credentials
		stallReply           // authenticates, reads the request, never replies
	)
	cases := []struct {
		name    string
		server  int
		greeted bool
	}{
		{"black hole", stallGreeting, false},
		{"stalled authentication", stallAuth, false},
		{"rejected credentials", rejectAuth, false},
		{"waiting on the target", stallReply, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			served := make(chan struct{})
			d := &Dialer{ProxyAddr: "p:1080", Username: "u", Password: "p", ProxyDial: func(context.Context, string, string) (net.Conn, error) {
				c, srv := net.Pipe()
				go func() {
					defer close(served)
					defer srv.Close()
					defer io.Copy(io.Discard, srv)
					defer cancel() // the caller gives up once the server stalls
					if _, err := ReadGreeting(srv); err != nil || tc.server == stallGreeting {
						return
					}
					srv.Write([]byte{Version, byte(MethodUserPass)})
					if _, err := ReadUserPassRequest(srv); err != nil || tc.server == stallAuth {
						return
					}
					if tc.server == rejectAuth {
						srv.Write([]byte{1, 1})
						return
					}
					srv.Write([]byte{1, 0})
					ReadRequest(srv)
				}()
				return c, nil
			}}
			var p handshakeProgress
			_, _, err := d.request(withProgress(ctx, &p), CmdConnect, testTarget)
			<-served
			if err == nil || p.proxyAt.IsZero() || p.greeted != tc.greeted {
				t.Fatalf("err = %v, progress %+v; want a failure, the proxy reached, greeted %v", err, p, tc.greeted)
			}
		})
	}
	t.Run("local resolution failed", func(t *testing.T) {
		d := &Dialer{ProxyAddr: "p:1080", ResolveLocally: true, Resolver: &net.Resolver{PreferGo: true,
			Dial: func(context.Context, string, string) (net.Conn, error) { return nil, errors.New("no resolver here") }}}
		var p handshakeProgress
		if _, _, err := d.request(withProgress(context.Background(), &p), CmdConnect, Addr{Name: "db.internal", Port: 1}); err == nil || p != (handshakeProgress{}) {
			t.Fatalf("err = %v, progress %+v; want a failure before the proxy", err, p)
		}
	})
}

// TestUpstreamsIsProxyAddr: an upstream is recognised by its address when
// given as one (IPv4-mapped or not), and by the addresses its name
// resolved to once a connection to it was made, noted before connect; the
// record keeps the last few addresses only.
func TestUpstreamsIsProxyAddr(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close() // the handshake fails; the connection was made
		}
	}()
	port := ln.Addr().(*net.TCPAddr).AddrPort().Port()
	byName := &Dialer{ProxyAddr: net.JoinHostPort("localhost", fmt.Sprint(port)), HandshakeTimeout: 5 * time.Second}
	u := NewUpstreams(&Dialer{ProxyAddr: "10.200.0.2:1080"}, byName)
	ap := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port)
	if u.IsProxyAddr(ap) {
		t.Fatalf("%s known before any dial", ap)
	}
	byName.DialContext(context.Background(), "tcp", "198.51.100.7:80")
	for _, tc := range []struct {
		addr string
		want bool
	}{
		{"10.200.0.2:1080", true},
		{"[::ffff:10.200.0.2]:1080", true},
		{ap.String(), true},
		{fmt.Sprintf("[::ffff:127.0.0.1]:%d", port), true},
		{fmt.Sprintf("127.0.0.1:%d", port+1), false},
		{"10.200.0.2:80", false},
	} {
		if got := u.IsProxyAddr(netip.MustParseAddrPort(tc.addr)); got != tc.want {
			t.Errorf("IsProxyAddr(%s) = %v, want %v", tc.addr, got, tc.want)
		}
	}

	d := &Dialer{ProxyAddr: "proxy.test:1080"}
	at := func(i int) netip.AddrPort {
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 0, 2, byte(i)}), 1080)
	}
	for i := range dialedKeep {
		d.noteDialed(at(i))
	}
	d.noteDialed(at(3)) // held: nothing is pushed out
	if !d.wasDialed(at(0)) {
		t.Errorf("a redial to a held address pushed out the oldest")
	}
	d.noteDialed(at(dialedKeep))
	if d.wasDialed(at(0)) || !d.wasDialed(at(1)) || !d.wasDialed(at(dialedKeep)) {
		t.Errorf("after %d addresses: first %v, second %v, last %v; want only the first forgotten", dialedKeep+1, d.wasDialed(at(0)), d.wasDialed(at(1)), d.wasDialed(at(dialedKeep)))
	}
}

// TestUpstreamsConcurrentDialsBackOffOnce: two dials that chose their order
// while an upstream was up both fail on it, the second after the first
// already counted it down (its hedge started the upstream later). One
// outage backs it off once: 1 s, not 2 s. Before, the second failure
// counted as new because its attempt began after the first was counted.
func TestUpstreamsConcurrentDialsBackOffOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		primary := &fakeProxy{name: "primary:1080", mode: proxyBlackHole}
		secondary := &fakeProxy{name: "secondary:1080", mode: proxyRefused}
		var log stateLog
		u := group(&log, primary, secondary)
		var wg sync.WaitGroup
		for _, at := range []time.Duration{0, 100 * time.Millisecond} {
			wg.Go(func() {
				time.Sleep(at) // the second dial starts while the secondary is still up
				ctx, cancel := context.WithTimeout(context.Background(), time.Second)
				defer cancel()
				if _, _, err := u.DialAddr(ctx, testTarget); err == nil {
					t.Error("a dial succeeded through a black hole and a refusing proxy")
				}
			})
		}
		wg.Wait()
		if n := secondary.dials.Load(); n != 2 {
			t.Fatalf("secondary dialed %d times, want once per dial", n)
		}
		if st := u.Status()[1]; st.Up || st.Backoff != time.Second {
			t.Fatalf("secondary %+v, want down with the first backoff, 1s", st)
		}
	})
}

// TestUpstreamsBackoffGrowsOncePerRetry: dials that keep failing on a proxy
// within its backoff (a lone upstream, tried last) do not grow it; only a
// failure once it is over does. Before, six dials in a few milliseconds
// took a lone upstream to 30 s.
func TestUpstreamsBackoffGrowsOncePerRetry(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := &fakeProxy{name: "p:1080", mode: proxyRefused}
		var log stateLog
		u := group(&log, p)
		for range 6 {
			u.DialAddr(context.Background(), testTarget)
			time.Sleep(time.Millisecond)
		}
		if n := p.dials.Load(); n != 6 {
			t.Fatalf("%d dials reached the proxy, want every one (it is the only one)", n)
		}
		if b := u.Status()[0].Backoff; b != minBackoff {
			t.Fatalf("after one outage of 6 ms the backoff is %v, want %v", b, minBackoff)
		}
		time.Sleep(minBackoff)
		u.DialAddr(context.Background(), testTarget)
		if b := u.Status()[0].Backoff; b != 2*minBackoff {
			t.Fatalf("after a retry once the backoff was over: %v, want %v", b, 2*minBackoff)
		}
		if log.String() != "p:1080 down" {
			t.Fatalf("state changes %q, want one down", log.String())
		}
	})
}

// TestUpstreamsLocalShortageBlamesNoProxy: running out of descriptors here
// fails the dial but marks no proxy down.
func TestUpstreamsLocalShortageBlamesNoProxy(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		emfile := func(context.Context, string, string) (net.Conn, error) {
			return nil, &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("socket", syscall.EMFILE)}
		}
		var log stateLog
		u := NewUpstreams(&Dialer{ProxyAddr: "a:1080", ProxyDial: emfile}, &Dialer{ProxyAddr: "b:1080", ProxyDial: emfile})
		u.OnStateChange(log.hook)
		if _, _, err := u.DialAddr(context.Background(), testTarget); !errors.Is(err, syscall.EMFILE) {
			t.Fatalf("err = %v, want EMFILE", err)
		}
		if log.String() != "" || !u.Status()[0].Up || !u.Status()[1].Up {
			t.Fatalf("EMFILE here reported as %q; status %+v", log.String(), u.Status())
		}
	})
}

// TestIsProxyAddrKeptOverReload: a proxy given by name, kept by a reload
// (new Dialers, same proxy), is still known at the addresses it was dialed
// at: a connection from before the reload, still being made, is refused
// rather than relayed if capture rules take it.
func TestIsProxyAddrKeptOverReload(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan struct{})
	go func() {
		defer close(accepted)
		if c, err := ln.Accept(); err == nil {
			c.Close()
		}
	}()
	port := ln.Addr().(*net.TCPAddr).AddrPort().Port()
	name := net.JoinHostPort("localhost", strconv.Itoa(int(port)))
	d := &Dialer{ProxyAddr: name, HandshakeTimeout: 5 * time.Second}
	u := NewUpstreams(d)
	d.DialContext(context.Background(), "tcp", "198.51.100.7:80") // fails after the connect: the proxy closes
	<-accepted
	ap := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port)
	if !u.IsProxyAddr(ap) {
		t.Fatal("the dialed address is not known before the reload")
	}
	u.SetDialers(&Dialer{ProxyAddr: name, HandshakeTimeout: 5 * time.Second})
	if !u.IsProxyAddr(ap) {
		t.Fatalf("%s forgotten after a reload that kept the proxy", ap)
	}
}

// TestNoReplyEveryTime: a proxy that closes every CONNECT without a reply
// (ssh -D whose server forbids forwarding, a broken proxy) carries
// nothing: after noReplyLimit in a row, to several targets, it is down
// and tried last. The same run for one target is that target being down
// (an app retrying a dead database through ssh -D): the proxy stays up,
// as after one such close (TestHedgeTargetAnswer).
func TestNoReplyEveryTime(t *testing.T) {
	target := func(i int) Addr {
		return Addr{IP: netip.AddrFrom4([4]byte{192, 0, 2, byte(1 + i%noReplyTargetsLimit)}), Port: 80}
	}
	synctest.Test(t, func(t *testing.T) {
		broken := &fakeProxy{name: "broken:1080", mode: proxyNoReply}
		ok := &fakeProxy{name: "ok:1080"}
		var log stateLog
		u := group(&log, broken, ok)
		// Two stray failures, then an app retrying one dead target; and
		// the same target long after two others: mostly one target.
		for i := range 2 * noReplyLimit {
			if i < 2 {
				c, _, err := u.DialAddr(context.Background(), target(i+1))
				if err != nil {
					t.Fatal(err)
				}
				c.Close()
				continue
			}
			dialOK(t, context.Background(), u, ok) // one target
		}
		synctest.Wait()
		if log.String() != "" {
			t.Fatalf("after %d requests, mostly for one target, closed without a reply: state changes %q, want none", 2*noReplyLimit, log.String())
		}
		for i := range noReplyLimit {
			c, d, err := u.DialAddr(context.Background(), target(i))
			if err != nil || d.ProxyAddr != "ok:1080" {
				t.Fatalf("dial %d: %v through %v", i, err, d)
			}
			c.Close()
		}
		synctest.Wait()
		if log.String() != "broken:1080 down" || !errors.Is(log.cause(0), ErrNoReply) {
			t.Fatalf("after requests to %d targets closed without a reply: state changes %q (%v), want it down", noReplyTargetsLimit, log.String(), log.cause(0))
		}
		before := broken.dials.Load()
		dialOK(t, context.Background(), u, ok) // in its backoff: the other first
		if broken.dials.Load() != before {
			t.Error("a proxy down for closing every request was still tried first")
		}
	})
}
