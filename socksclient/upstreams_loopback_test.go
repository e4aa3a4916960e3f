package socksclient_test

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/socksfwd/socksfwd/internal/testnet"
	"github.com/socksfwd/socksfwd/socksclient"
	"github.com/socksfwd/socksfwd/socksclient/sockstest"
)

// changes records OnStateChange calls.
type changes struct {
	mu     sync.Mutex
	events []change
}

type change struct {
	proxy string
	up    bool
	cause error
}

func (c *changes) hook(proxy string, up bool, cause error) {
	c.mu.Lock()
	c.events = append(c.events, change{proxy, up, cause})
	c.mu.Unlock()
}

func (c *changes) list() []change {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]change(nil), c.events...)
}

// blackHole accepts connections and never answers, as a proxy whose
// process hangs or a firewall that swallows replies does.
func blackHole(t *testing.T) string {
	return testnet.Serve(t, func(c net.Conn) { io.Copy(io.Discard, c) }).Addr().String()
}

func workingProxy(t *testing.T) *sockstest.Server {
	srv, err := sockstest.NewServer(sockstest.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return srv
}

// hedgeOps runs each Upstreams operation once and closes what it opened.
var hedgeOps = []struct {
	name string
	run  func(ctx context.Context, u *socksclient.Upstreams, echo socksclient.Addr) (*socksclient.Dialer, error)
}{
	{"connect", func(ctx context.Context, u *socksclient.Upstreams, echo socksclient.Addr) (*socksclient.Dialer, error) {
		c, d, err := u.DialAddr(ctx, echo)
		if err != nil {
			return d, err
		}
		defer c.Close()
		c.Write([]byte("ping"))
		buf := make([]byte, 4)
		if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "ping" {
			return d, errors.New("no echo through the session")
		}
		return d, nil
	}},
	{"bind", func(ctx context.Context, u *socksclient.Upstreams, _ socksclient.Addr) (*socksclient.Dialer, error) {
		b, d, err := u.Bind(ctx, socksclient.Addr{})
		if err == nil {
			b.Close()
		}
		return d, err
	}},
	{"udp associate", func(ctx context.Context, u *socksclient.Upstreams, _ socksclient.Addr) (*socksclient.Dialer, error) {
		a, d, err := u.Associate(ctx)
		if err == nil {
			a.Close()
		}
		return d, err
	}},
}

// TestUpstreamsHedgeLoopback: with the first upstream black-holed and a
// handshake timeout of an hour, every operation succeeds through the
// second well within the caller's deadline (which is shorter than the
// handshake timeout) only if the dial is hedged; the black hole backs off
// and is reported down once.
func TestUpstreamsHedgeLoopback(t *testing.T) {
	echo, err := socksclient.ParseAddr(testnet.Echo(t).Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	for _, op := range hedgeOps {
		t.Run(op.name, func(t *testing.T) {
			hole, good := blackHole(t), workingProxy(t)
			var log changes
			u := socksclient.NewUpstreams(
				&socksclient.Dialer{ProxyAddr: hole, HandshakeTimeout: time.Hour},
				&socksclient.Dialer{ProxyAddr: good.Addr(), HandshakeTimeout: time.Hour},
			)
			u.OnStateChange(log.hook)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			d, err := op.run(ctx, u, echo)
			if err != nil {
				t.Fatal(err)
			}
			if d.ProxyAddr != good.Addr() {
				t.Fatalf("went through %s, want the working %s", d.ProxyAddr, good.Addr())
			}
			ev := log.list()
			if len(ev) != 1 || ev[0].proxy != hole || ev[0].up || ev[0].cause == nil {
				t.Fatalf("state changes %+v, want one: %s down", ev, hole)
			}
			if st := u.Status(); st[0].Up || !st[0].DownUntil.After(time.Now()) || !st[1].Up {
				t.Fatalf("status %+v, want the black hole in backoff", st)
			}
			// In backoff it goes last: the next dial needs no hedge.
			if d, err := op.run(ctx, u, echo); err != nil || d.ProxyAddr != good.Addr() {
				t.Fatalf("second dial: %v through %v", err, d)
			}
			if len(log.list()) != 1 {
				t.Fatalf("state changes %+v, want still one", log.list())
			}
		})
	}
}

// TestUpstreamsDeadFirstLoopback: a refused first upstream is skipped at
// once, reported down once, and not dialed again during its backoff.
func TestUpstreamsDeadFirstLoopback(t *testing.T) {
	echo, err := socksclient.ParseAddr(testnet.Echo(t).Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	dead, good := testnet.ClosedPort(t), workingProxy(t)
	var log changes
	u := socksclient.NewUpstreams(&socksclient.Dialer{ProxyAddr: dead}, &socksclient.Dialer{ProxyAddr: good.Addr()})
	u.SetHedgeDelay(time.Hour) // the failure, not the hedge, moves on
	u.OnStateChange(log.hook)
	for range 3 {
		if d, err := hedgeOps[0].run(context.Background(), u, echo); err != nil || d.ProxyAddr != good.Addr() {
			t.Fatalf("%v through %v", err, d)
		}
	}
	ev := log.list()
	if len(ev) != 1 || ev[0].proxy != dead || ev[0].up || !errors.Is(ev[0].cause, syscall.ECONNREFUSED) {
		t.Fatalf("state changes %+v, want one: %s down, refused", ev, dead)
	}
	if good.Handshakes() != 3 {
		t.Fatalf("working proxy saw %d handshakes, want 3", good.Handshakes())
	}
}

// TestUpstreamsTargetRefusedLoopback: a REP about the target is no
// failover: the second upstream is never asked.
func TestUpstreamsTargetRefusedLoopback(t *testing.T) {
	refusing, err := sockstest.NewServer(sockstest.Config{Reply: socksclient.RepHostUnreachable})
	if err != nil {
		t.Fatal(err)
	}
	defer refusing.Close()
	good := workingProxy(t)
	var log changes
	u := socksclient.NewUpstreams(&socksclient.Dialer{ProxyAddr: refusing.Addr()}, &socksclient.Dialer{ProxyAddr: good.Addr()})
	u.SetHedgeDelay(time.Hour) // only the reply decides here
	u.OnStateChange(log.hook)
	_, d, err := u.DialAddr(context.Background(), socksclient.Addr{Name: "db.internal", Port: 5432})
	var re *socksclient.ReplyError
	if !errors.As(err, &re) || re.Code != socksclient.RepHostUnreachable || d == nil || d.ProxyAddr != refusing.Addr() {
		t.Fatalf("err = %v through %v, want the first proxy's REP 4", err, d)
	}
	if good.Handshakes() != 0 || len(log.list()) != 0 {
		t.Fatalf("second proxy asked %d times, state changes %+v", good.Handshakes(), log.list())
	}
}

// TestUpstreamsAttemptWaitedOnTarget: a try that runs out of time while
// the proxy, greeted, waits on the target (a dead target; the caller's
// deadline, as a DNS query's, or the handshake timeout) is reported
// WaitedOnTarget, which the metrics keep apart from the proxy's own
// timeouts; one whose proxy never answered the greeting is not.
func TestUpstreamsAttemptWaitedOnTarget(t *testing.T) {
	target, err := socksclient.ParseAddr("192.0.2.1:53")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		fault    sockstest.Fault
		callerTO bool // the caller's deadline, else the handshake timeout
		want     bool
	}{
		{sockstest.FaultHangAfterRequest, true, true},
		{sockstest.FaultHangAfterRequest, false, true},
		{sockstest.FaultHangAfterGreeting, true, false},
		{sockstest.FaultHangAfterGreeting, false, false},
	} {
		srv, err := sockstest.NewServer(sockstest.Config{Fault: c.fault})
		if err != nil {
			t.Fatal(err)
		}
		handshake, caller := 10*time.Second, 200*time.Millisecond
		if !c.callerTO {
			handshake, caller = caller, handshake
		}
		u := socksclient.NewUpstreams(&socksclient.Dialer{ProxyAddr: srv.Addr(), HandshakeTimeout: handshake})
		var mu sync.Mutex
		var got []socksclient.Attempt
		u.OnAttempt(func(a socksclient.Attempt) {
			mu.Lock()
			got = append(got, a)
			mu.Unlock()
		})
		ctx, cancel := context.WithTimeout(context.Background(), caller)
		if conn, _, err := u.DialAddr(ctx, target); err == nil {
			conn.Close()
			t.Fatalf("fault %d: the dial succeeded", c.fault)
		}
		cancel()
		srv.Close()
		mu.Lock()
		if len(got) != 1 || got[0].Err == nil || got[0].WaitedOnTarget != c.want {
			t.Errorf("fault %d, caller's deadline %v: attempts %+v, want one failed with WaitedOnTarget %v", c.fault, c.callerTO, got, c.want)
		}
		// The caller's deadline also tells, in the error, where the
		// handshake stood: a caller without OnAttempt (a DNS query) reads
		// it there.
		if len(got) == 1 && c.callerTO {
			de, ok := errors.AsType[*socksclient.DeadlineError](got[0].Err)
			if !ok || de.AtProxy == c.want || !errors.Is(got[0].Err, context.DeadlineExceeded) {
				t.Errorf("fault %d: error %v, want a DeadlineError with AtProxy %v", c.fault, got[0].Err, !c.want)
			}
		}
		mu.Unlock()
	}
}
