package tunnel

import (
	"context"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/rs/zerolog"

	"github.com/socksfwd/socksfwd/socksclient"
)

// TestReverseBackoffGrowsWhenBindsDie: a proxy that accepts BIND (its
// first reply) and drops the control connection at once is asked again
// after a pause that doubles, up to its bound, rather than every second
// for ever with two log lines each time. On the fake clock of a synctest
// bubble, with the proxy on the other end of a pipe.
func TestReverseBackoffGrowsWhenBindsDie(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var mu sync.Mutex
		var binds []time.Time
		dying := &socksclient.Dialer{ProxyAddr: "192.0.2.1:1080", HandshakeTimeout: 5 * time.Second,
			ProxyDial: func(ctx context.Context, network, addr string) (net.Conn, error) {
				c, proxy := net.Pipe()
				go func() {
					defer proxy.Close() // right after the first reply
					if !acceptBind(proxy) {
						return
					}
					mu.Lock()
					binds = append(binds, time.Now())
					mu.Unlock()
					firstReply(proxy)
				}()
				return c, nil
			}}
		r := NewReverse(ReverseConfig{
			Name: "test", Remote: socksclient.Addr{IP: netip.IPv4Unspecified()}, Target: "127.0.0.1:1",
			Upstreams: socksclient.NewUpstreams(dying), Logger: zerolog.Nop(),
		})
		served := make(chan error, 1)
		go func() { served <- r.Serve(context.Background()) }()
		time.Sleep(2 * time.Minute)
		r.Close()
		<-served

		mu.Lock()
		defer mu.Unlock()
		if len(binds) < 5 {
			t.Fatalf("%d BINDs in 2 minutes, want at least 5", len(binds))
		}
		want := []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second}
		for i, w := range want {
			if gap := binds[i+1].Sub(binds[i]); gap < w {
				t.Errorf("BIND %d came %s after the one before, want %s or more", i+2, gap, w)
			}
		}
		if n := len(binds); n > 12 {
			t.Errorf("%d BINDs in 2 minutes: the pause does not grow", n)
		}
	})
}

// acceptBind plays a proxy's side up to a BIND request, without
// authentication; false when the client asked something else.
func acceptBind(proxy net.Conn) bool {
	if _, err := socksclient.ReadGreeting(proxy); err != nil {
		return false
	}
	b, _ := socksclient.MethodSelection{Method: socksclient.MethodNoAuth}.AppendTo(nil)
	proxy.Write(b)
	req, err := socksclient.ReadRequest(proxy)
	return err == nil && req.Cmd == socksclient.CmdBind
}

// firstReply says the proxy listens for the caller, on 192.0.2.1:4000.
func firstReply(proxy net.Conn) {
	b, _ := socksclient.Reply{Code: socksclient.RepSucceeded,
		Addr: socksclient.AddrFromAddrPort(netip.MustParseAddrPort("192.0.2.1:4000"))}.AppendTo(nil)
	proxy.Write(b)
}

// refusingBindProxy is a proxy at the other end of a pipe that accepts
// every BIND (its first reply), then, when refuse says so for that BIND,
// answers REP 2 in the second reply at once, as Dante does for a caller
// from another address than the BIND named; else it waits for a caller
// that never comes.
func refusingBindProxy(refuse func() bool) *socksclient.Dialer {
	return &socksclient.Dialer{ProxyAddr: "192.0.2.1:1080", HandshakeTimeout: 5 * time.Second,
		ProxyDial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, proxy := net.Pipe()
			go func() {
				defer proxy.Close()
				if !acceptBind(proxy) {
					return
				}
				firstReply(proxy)
				if !refuse() {
					proxy.Read(make([]byte, 1))
					return
				}
				b, _ := socksclient.Reply{Code: socksclient.RepNotAllowed, Addr: socksclient.AddrFromAddrPort(netip.MustParseAddrPort("0.0.0.0:0"))}.AppendTo(nil)
				proxy.Write(b)
			}()
			return c, nil
		}}
}

// serveReverseFor runs an -R expecting its caller from 198.51.100.7
// through proxy for d on the bubble's clock, then closes it.
func serveReverseFor(proxy *socksclient.Dialer, d time.Duration) *Reverse {
	r := NewReverse(ReverseConfig{
		Name: "test", Remote: socksclient.Addr{IP: netip.MustParseAddr("198.51.100.7")}, Target: "127.0.0.1:1",
		Upstreams: socksclient.NewUpstreams(proxy), Logger: zerolog.Nop(),
	})
	served := make(chan error, 1)
	go func() { served <- r.Serve(context.Background()) }()
	time.Sleep(d)
	r.Close()
	<-served
	return r
}

// TestReverseWrongCallersNoBackoff: with a bind_address, a proxy that
// refuses each caller from another address (REP 2 in the second reply, as
// Dante does) is asked to listen again at once, every time: a backoff let
// anyone who reached the port keep the forward closed for up to 30 s.
func TestReverseWrongCallersNoBackoff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const refused = 5
		var mu sync.Mutex
		var binds []time.Time
		r := serveReverseFor(refusingBindProxy(func() bool {
			mu.Lock()
			defer mu.Unlock()
			binds = append(binds, time.Now())
			return len(binds) <= refused
		}), time.Minute)

		mu.Lock()
		defer mu.Unlock()
		if len(binds) != refused+1 {
			t.Fatalf("%d BINDs, want %d (one after each refused caller)", len(binds), refused+1)
		}
		// At once but for the floor that keeps a proxy refusing with no
		// caller from spinning the loop (the backoff took 31 s).
		if gap := binds[refused].Sub(binds[0]); gap > refused*wrongCallerFloor {
			t.Errorf("the last BIND came %s after the first, want at most %s", gap, refused*wrongCallerFloor)
		}
		if n := r.Stats().Failures[CauseSecondReply].Load(); n != refused {
			t.Errorf("second_reply failures %d, want %d", n, refused)
		}
	})
}

// TestReverseRefusingProxyDoesNotSpin: a proxy that answers REP 2 in the
// second reply at once, with no caller at all, is asked again at most ten
// times a second (it was asked 40 000 times a second).
func TestReverseRefusingProxyDoesNotSpin(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var binds atomic.Int64
		// Past 200 the loop spins: the proxy stops refusing, so that the
		// bubble's clock can move on and the test fail rather than hang.
		serveReverseFor(refusingBindProxy(func() bool { return binds.Add(1) <= 200 }), 10*time.Second)
		if n := binds.Load(); n > 101 {
			t.Errorf("%d BINDs in 10 s against a proxy that refuses with no caller, want at most 101", n)
		}
	})
}

// TestReverseRebindEndsSessionWait: a fixed-port forward whose server
// cannot bind the port twice waits for the session that holds it; a
// Rebind (other upstreams, which may bind it) ends that wait, a Retry
// does not.
func TestReverseRebindEndsSessionWait(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := NewReverse(ReverseConfig{Name: "test", Upstreams: socksclient.NewUpstreams(), Logger: zerolog.Nop()})
		defer r.Close()
		held := &reverseSession{done: make(chan struct{})}
		waited := make(chan bool, 1)
		go func() {
			var d time.Duration
			waited <- r.waitSession(held, &d)
		}()
		r.Retry()
		synctest.Wait()
		select {
		case <-waited:
			t.Fatal("a Retry ended the wait for the session")
		default:
		}
		r.Rebind()
		if !<-waited {
			t.Fatal("the wait ended as a stop")
		}
	})
}
