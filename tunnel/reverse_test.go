package tunnel

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/socksfwd/socksfwd/internal/peertest"
	"github.com/socksfwd/socksfwd/internal/testnet"
	"github.com/socksfwd/socksfwd/socksclient"
	"github.com/socksfwd/socksfwd/socksclient/sockstest"
)

// reverseRun is a Reverse under test with what it reported.
type reverseRun struct {
	r      *Reverse
	logs   *logBuf
	listen chan socksclient.Addr // every OnListen, the zero Addr included
	mu     sync.Mutex
	rearms []Rearm
}

// startReverse runs a Reverse asking for remote, relaying to target,
// through proxies, until the test's cleanup.
func startReverse(t *testing.T, remote socksclient.Addr, target string, proxies ...string) *reverseRun {
	t.Helper()
	run := &reverseRun{logs: &logBuf{}, listen: make(chan socksclient.Addr, 256)}
	var dialers []*socksclient.Dialer
	for _, p := range proxies {
		dialers = append(dialers, &socksclient.Dialer{ProxyAddr: p, HandshakeTimeout: 5 * time.Second})
	}
	run.r = NewReverse(ReverseConfig{
		Name: "test", Remote: remote, Target: target, Upstreams: socksclient.NewUpstreams(dialers...),
		OnListen: func(a socksclient.Addr) {
			select {
			case run.listen <- a:
			default:
				t.Error("OnListen: too many events unread")
			}
		},
		OnRearm: func(re Rearm) {
			run.mu.Lock()
			run.rearms = append(run.rearms, re)
			run.mu.Unlock()
		},
		Logger: zerolog.New(run.logs).Level(zerolog.DebugLevel),
	})
	serveForTest(t, run.r)
	return run
}

// next waits for the next address the server listens at (skipping the
// "listens nowhere" events), at most 10 s.
func (run *reverseRun) next(t *testing.T) socksclient.Addr {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case a := <-run.listen:
			if a.Port != 0 {
				return a
			}
		case <-timeout:
			t.Fatalf("the server never listened (again); log:\n%s", run.logs)
		}
	}
}

// lost waits for OnListen's "listens nowhere", at most 10 s.
func (run *reverseRun) lost(t *testing.T) {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case a := <-run.listen:
			if a.Port == 0 {
				return
			}
		case <-timeout:
			t.Fatalf("the forward never lost its address; log:\n%s", run.logs)
		}
	}
}

// dialCaller connects to addr as a remote caller would, with a 10 s
// deadline; the connection is closed at cleanup.
func dialCaller(t *testing.T, addr socksclient.Addr) *net.TCPConn {
	t.Helper()
	c, err := net.Dial("tcp", addr.String())
	if err != nil {
		t.Fatalf("caller: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// call connects to addr as a remote caller, sends msg, half-closes and
// returns what came back before the far end closed.
func call(t *testing.T, addr socksclient.Addr, msg string) (string, net.Conn) {
	t.Helper()
	c := dialCaller(t, addr)
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatalf("caller write: %v", err)
	}
	c.CloseWrite()
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("caller read: %v (got %q)", err, got)
	}
	return string(got), c
}

var anyPeer = socksclient.Addr{IP: netip.IPv4Unspecified()}

func withPort(port int) socksclient.Addr {
	return socksclient.Addr{IP: netip.IPv4Unspecified(), Port: uint16(port)}
}

// TestReverseDante: through a real Dante, with the port the server
// chooses and with a fixed one, twenty callers in a row each reach the
// local echo server, data both ways with half-close, and each session's
// end line names its caller.
func TestReverseDante(t *testing.T) {
	if testing.Short() {
		t.Skip("starts danted")
	}
	dante := peertest.Dante(t, peertest.DanteOptions{})
	echo := testnet.Echo(t).Addr().String()
	for _, tc := range []struct {
		name   string
		remote socksclient.Addr
	}{{"port 0", anyPeer}, {"fixed port", withPort(peertest.FreePort(t))}} {
		t.Run(tc.name, func(t *testing.T) {
			run := startReverse(t, tc.remote, echo, dante.Addr)
			seen := map[socksclient.Addr]bool{}
			ended := 0 // session end lines so far
			if tc.remote.Port != 0 {
				// Dante cannot bind the port again while a session uses
				// it: the forward learns that from the first session.
				addr := run.next(t)
				hold := dialCaller(t, addr)
				run.logs.waitFor(t, "serves one caller at a time")
				// Nothing listens while the session holds the port, and the
				// forward says so (the admin endpoint, --remote-addr-file).
				run.lost(t)
				if a, ok := run.r.Remote(); ok {
					t.Errorf("Remote() = %s while the session holds the port", a)
				}
				hold.Close()
				ended++
			}
			for i := range 20 {
				addr := run.next(t)
				if tc.remote.Port != 0 && addr.Port != tc.remote.Port {
					t.Fatalf("caller %d: server listens on %s, asked for port %d", i, addr, tc.remote.Port)
				}
				seen[addr] = true
				msg := strings.Repeat("x", i*1000+1)
				got, c := call(t, addr, msg)
				if got != msg {
					t.Fatalf("caller %d: echo of %d bytes came back as %d bytes", i, len(msg), len(got))
				}
				ended++
				run.logs.waitForCount(t, `"message":"session ended"`, ended)
				if !strings.Contains(run.logs.String(), `"client":"`+c.LocalAddr().String()+`"`) {
					t.Fatalf("caller %d: no session end line names %s:\n%s", i, c.LocalAddr(), run.logs)
				}
			}
			st := run.r.Stats()
			want := int64(20)
			if tc.remote.Port != 0 {
				want++ // the one held open
			}
			if st.Sessions.Load() != want || st.BytesUp.Load() != st.BytesDown.Load() || st.BytesUp.Load() == 0 {
				t.Errorf("stats: %d sessions, %d bytes up, %d down", st.Sessions.Load(), st.BytesUp.Load(), st.BytesDown.Load())
			}
			for c := range NumReverseCauses {
				if n := st.Failures[c].Load(); n != 0 {
					t.Errorf("%d failures of cause %s:\n%s", n, c, run.logs)
				}
			}
			// Each BIND asks for any port, and the proxy's kernel picks
			// one at random, now and then one an earlier session gave
			// back; a forward that asked for the same port again would
			// see one address throughout.
			if tc.remote.Port == 0 && len(seen) < 15 {
				t.Errorf("port 0: %d distinct addresses for 20 BINDs, want most of them distinct", len(seen))
			}
			run.mu.Lock()
			if len(run.rearms) < 19 {
				t.Errorf("%d re-arms reported, want 19 at least", len(run.rearms))
			}
			run.mu.Unlock()
		})
	}
}

// TestReverseRearmsAtOnce: a server that can bind a port again while a
// connection uses it (sockstest sets SO_REUSEADDR) listens again on the
// fixed port while the first session is still open: the next BIND is not
// held back by the relay.
func TestReverseRearmsAtOnce(t *testing.T) {
	proxy := newSocks(t, sockstest.Config{})
	echo := testnet.Echo(t).Addr().String()
	run := startReverse(t, withPort(peertest.FreePort(t)), echo, proxy.Addr())
	addr := run.next(t)
	first := dialCaller(t, addr)
	if again := run.next(t); again != addr {
		t.Fatalf("re-armed on %s, want %s", again, addr)
	}
	if got, _ := call(t, addr, "second"); got != "second" {
		t.Fatalf("second caller got %q", got)
	}
	first.Write([]byte("first"))
	first.CloseWrite()
	if got, _ := io.ReadAll(first); string(got) != "first" {
		t.Fatalf("first caller got %q", got)
	}
	run.mu.Lock()
	defer run.mu.Unlock()
	for _, re := range run.rearms {
		if re.Held != 0 {
			t.Errorf("a re-arm waited %s for a session; this server needs no wait", re.Held)
		}
	}
}

// TestReverseControlCut: the control connection dropped while waiting for
// a caller (the test server's, and Dante's): one line says so, and the
// forward comes back.
func TestReverseControlCut(t *testing.T) {
	t.Run("sockstest", func(t *testing.T) { testReverseControlCut(t, newSocks(t, sockstest.Config{}).Addr()) })
	t.Run("dante", func(t *testing.T) {
		if testing.Short() {
			t.Skip("starts danted")
		}
		testReverseControlCut(t, peertest.Dante(t, peertest.DanteOptions{}).Addr)
	})
}

func testReverseControlCut(t *testing.T, proxy string) {
	cutter := testnet.NewCutter(t, proxy)
	echo := testnet.Echo(t).Addr().String()
	run := startReverse(t, anyPeer, echo, cutter.Addr())
	run.next(t)
	if n := cutter.Cut(); n != 1 {
		t.Fatalf("cut %d connections, want the control connection", n)
	}
	run.lost(t)
	addr := run.next(t)
	// No half-close here: the cutter does not pass one on.
	c := dialCaller(t, addr)
	c.Write([]byte("back"))
	got := make([]byte, 4)
	if _, err := io.ReadFull(c, got); err != nil || string(got) != "back" {
		t.Fatalf("after the cut, caller got %q, %v", got, err)
	}
	logs := run.logs.String()
	if strings.Count(logs, "closed while waiting for a caller") != 1 || !strings.Contains(logs, `"failed_tries":1`) {
		t.Errorf("want one line for the cut and one for the return:\n%s", logs)
	}
	if n := run.r.Stats().Failures[CauseControlLost].Load(); n != 1 {
		t.Errorf("control_lost failures %d, want 1", n)
	}
}

// TestReverseUnsupported: a server without BIND (REP 7, or closing the
// connection at the request as ssh -D does) is one error line naming the
// server and the fix, and Serve goes on without a retry until Retry.
func TestReverseUnsupported(t *testing.T) {
	for _, cfg := range []sockstest.Config{{Reply: socksclient.RepCommandNotSupported}, {Fault: sockstest.FaultCloseAfterRequest}} {
		proxy := newSocks(t, cfg)
		run := startReverse(t, anyPeer, "127.0.0.1:1", proxy.Addr())
		run.logs.waitFor(t, "has no BIND")
		logs := run.logs.String()
		if !strings.Contains(logs, proxy.Addr()) || !strings.Contains(logs, `"level":"error"`) || !strings.Contains(logs, "Dante") {
			t.Errorf("the error names neither the server nor the fix:\n%s", logs)
		}
		if n := proxy.Requests(); n != 1 {
			t.Errorf("%d requests, want 1", n)
		}
		if n := run.r.Stats().Failures[CauseUnsupported].Load(); n != 1 {
			t.Errorf("unsupported failures %d, want 1", n)
		}
	}
}

// TestReverseUnsupportedAsksAgain: a server that said it has no BIND is
// asked again after reverseUnsupportedRetry, without a reload: a proxy
// restarted with BIND at the same address is found.
func TestReverseUnsupportedAsksAgain(t *testing.T) {
	was := reverseUnsupportedRetry
	reverseUnsupportedRetry = 20 * time.Millisecond
	t.Cleanup(func() { reverseUnsupportedRetry = was })
	asked := make(chan socksclient.Request, 4)
	proxy := newSocks(t, sockstest.Config{Reply: socksclient.RepCommandNotSupported, Requested: asked})
	startReverse(t, anyPeer, "127.0.0.1:1", proxy.Addr())
	for i := range 2 {
		select {
		case <-asked:
		case <-time.After(10 * time.Second):
			t.Fatalf("BIND asked %d times; want it asked again after the refusal", i)
		}
	}
}

// TestReverseRefusedHint: REP 2 to the BIND names Dante's bind and
// bindreply rules.
func TestReverseRefusedHint(t *testing.T) {
	proxy := newSocks(t, sockstest.Config{Reply: socksclient.RepNotAllowed})
	run := startReverse(t, anyPeer, "127.0.0.1:1", proxy.Addr())
	run.logs.waitFor(t, `command: bindreply`)
	if !strings.Contains(run.logs.String(), `command: bind\"`) {
		t.Errorf("no hint of the bind rule:\n%s", run.logs)
	}
}

// TestReverseSecondReplyFaults: a malformed or refusing second reply is a
// failure logged once, and the forward listens again.
func TestReverseSecondReplyFaults(t *testing.T) {
	for _, tc := range []struct {
		cfg  sockstest.Config
		want string
	}{
		{sockstest.Config{Fault: sockstest.FaultBindMalformedSecondReply}, "malformed"},
		{sockstest.Config{BindSecondReply: socksclient.RepNotAllowed}, `command: bindreply`},
	} {
		proxy := newSocks(t, tc.cfg)
		run := startReverse(t, anyPeer, testnet.Echo(t).Addr().String(), proxy.Addr())
		addr := run.next(t)
		dialCaller(t, addr).Close()
		run.lost(t)
		run.next(t)
		if logs := run.logs.String(); !strings.Contains(logs, tc.want) || !strings.Contains(logs, `"cause":"second_reply"`) {
			t.Errorf("log lacks %q:\n%s", tc.want, logs)
		}
	}
}

// TestReverseNoSecondReply: a server that never sends the second reply
// leaves the forward waiting, and Shutdown and Close still end it.
func TestReverseNoSecondReply(t *testing.T) {
	proxy := newSocks(t, sockstest.Config{Fault: sockstest.FaultBindNoSecondReply})
	run := startReverse(t, anyPeer, testnet.Echo(t).Addr().String(), proxy.Addr())
	addr := run.next(t)
	dialCaller(t, addr) // the server has a caller and never says so
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := run.r.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if n := run.r.Stats().Sessions.Load(); n != 0 {
		t.Errorf("%d sessions, want none", n)
	}
}

// TestReverseUnexpectedPeer: with a bind_address, a caller from another
// address (which this server lets through) is closed, not relayed,
// counted, and the forward listens again at once.
func TestReverseUnexpectedPeer(t *testing.T) {
	proxy := newSocks(t, sockstest.Config{})
	run := startReverse(t, socksclient.Addr{IP: netip.MustParseAddr("192.0.2.1")}, testnet.Echo(t).Addr().String(), proxy.Addr())
	addr := run.next(t)
	c := dialCaller(t, addr) // from 127.0.0.1
	c.SetDeadline(time.Now().Add(10 * time.Second))
	c.Write([]byte("hello"))
	if n, err := c.Read(make([]byte, 5)); n != 0 || err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("a caller from the wrong address read %d bytes, %v; want the connection closed", n, err)
	}
	run.next(t)
	if n := run.r.Stats().Failures[CauseSecondReply].Load(); n != 1 {
		t.Errorf("second_reply failures %d, want 1", n)
	}
	if n := run.r.Stats().Sessions.Load(); n != 0 {
		t.Errorf("%d sessions, want none", n)
	}
}

// TestReverseTargetRefused: a local target that refuses closes the caller
// at once, is logged, and the forward listens again.
func TestReverseTargetRefused(t *testing.T) {
	proxy := newSocks(t, sockstest.Config{})
	run := startReverse(t, anyPeer, testnet.ClosedPort(t), proxy.Addr())
	addr := run.next(t)
	c := dialCaller(t, addr)
	if n, err := c.Read(make([]byte, 1)); n != 0 || err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("caller read %d bytes, %v; want the connection closed", n, err)
	}
	run.logs.waitFor(t, "local target unreachable")
	run.next(t)
	if n := run.r.Stats().Failures[CauseTarget].Load(); n != 1 {
		t.Errorf("target failures %d, want 1", n)
	}
}

// TestReverseShutdownDrains: Shutdown stops listening, lets a live session
// finish, and the target change of SetTarget applies to the next caller.
func TestReverseShutdownDrains(t *testing.T) {
	proxy := newSocks(t, sockstest.Config{})
	run := startReverse(t, anyPeer, testnet.Echo(t).Addr().String(), proxy.Addr())
	addr := run.next(t)
	c := dialCaller(t, addr)
	run.next(t) // re-armed: the session is live
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		done <- run.r.Shutdown(ctx)
	}()
	run.lost(t)
	c.Write([]byte("still here"))
	c.CloseWrite()
	if got, _ := io.ReadAll(c); string(got) != "still here" {
		t.Fatalf("draining session got %q", got)
	}
	if err := <-done; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
}

// TestReverseDanteRules: a Dante whose rules leave out bind refuses the
// BIND, one that leaves out bindreply refuses the caller (REP 2 in the
// second reply); either way the log names the rule to add.
func TestReverseDanteRules(t *testing.T) {
	if testing.Short() {
		t.Skip("starts danted")
	}
	for _, tc := range []struct{ without, cause, hint string }{
		{"bind", "refused", `\"command: bind\" must match this client`},
		{"bindreply", "second_reply", `\"command: bindreply\" must match the caller`},
	} {
		t.Run("without "+tc.without, func(t *testing.T) {
			dante := peertest.Dante(t, peertest.DanteOptions{Without: []string{tc.without}})
			run := startReverse(t, anyPeer, testnet.Echo(t).Addr().String(), dante.Addr)
			if tc.without == "bindreply" {
				c := dialCaller(t, run.next(t))
				c.Write([]byte("x"))
				io.ReadAll(c)
			}
			run.logs.waitFor(t, `"cause":"`+tc.cause+`"`)
			if logs := run.logs.String(); !strings.Contains(logs, "(REP 2)") || !strings.Contains(logs, tc.hint) {
				t.Errorf("no hint %s:\n%s", tc.hint, logs)
			}
		})
	}
}

// TestReverseFailureTextPortBusy: a fixed port the proxy did not take is
// blamed on Dante's rule when a bind_address was given, else on the port.
func TestReverseFailureTextPortBusy(t *testing.T) {
	for _, tc := range []struct {
		remote string
		want   string
	}{
		{"10.9.0.2:8081", "Dante binds an asked port only when bind_address is 0.0.0.0"},
		{"0.0.0.0:8081", "TIME_WAIT for up to a minute"},
	} {
		remote, err := socksclient.ParseAddr(tc.remote)
		if err != nil {
			t.Fatal(err)
		}
		r := NewReverse(ReverseConfig{Name: "x", Remote: remote, Upstreams: socksclient.NewUpstreams(&socksclient.Dialer{ProxyAddr: "proxy:1080"})})
		if got := r.failureText(CausePortBusy, errors.New("x"), nil); !strings.Contains(got, tc.want) {
			t.Errorf("-R %s: %q, want it to say %q", tc.remote, got, tc.want)
		}
	}
}

// TestReverseCloseDuringTargetDial: a Close that lands while a caller's
// target dial is under way cuts the session; the target is not to blame,
// so no target failure is counted and no "unreachable" line is logged.
func TestReverseCloseDuringTargetDial(t *testing.T) {
	proxy := newSocks(t, sockstest.Config{})
	echo := testnet.Echo(t).Addr().String()
	inDial := make(chan struct{}, 1)
	release := make(chan struct{})
	logs := &logBuf{}
	listen := make(chan socksclient.Addr, 64)
	r := NewReverse(ReverseConfig{
		Name: "t", Remote: anyPeer, Target: echo,
		Upstreams: socksclient.NewUpstreams(&socksclient.Dialer{ProxyAddr: proxy.Addr(), HandshakeTimeout: 5 * time.Second}),
		TargetControl: func(network, address string, c syscall.RawConn) error {
			select {
			case inDial <- struct{}{}:
			default:
			}
			<-release
			return nil
		},
		OnListen: func(a socksclient.Addr) { listen <- a },
		Logger:   zerolog.New(logs).Level(zerolog.DebugLevel),
	})
	stop := serveForTest(t, r)
	var addr socksclient.Addr
	for addr = range listen {
		if addr.Port != 0 {
			break
		}
	}
	dialCaller(t, addr)
	<-inDial
	closed := make(chan struct{})
	go func() { stop(); close(closed) }()
	<-r.sessCtx.Done() // Close has begun: the dial is cut once it goes on
	close(release)
	<-closed
	if n := r.Stats().Failures[CauseTarget].Load(); n != 0 {
		t.Errorf("failures{cause=target} = %d after a shutdown cut, want 0", n)
	}
	if out := logs.String(); strings.Contains(out, "local target unreachable") || !strings.Contains(out, "cut at shutdown") {
		t.Errorf("the cut session's log:\n%s", out)
	}
}
