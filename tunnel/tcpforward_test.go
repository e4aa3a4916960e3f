package tunnel

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"github.com/rs/zerolog"

	"github.com/socksfwd/socksfwd/internal/testnet"
	"github.com/socksfwd/socksfwd/socksclient"
	"github.com/socksfwd/socksfwd/socksclient/sockstest"
)

// serveForTest runs svc's Serve until the test's cleanup closes it, and
// fails the test if Serve ended with an error. The returned stop does the
// same earlier: it closes svc and returns once Serve has returned, so that
// every goroutine of the service has stopped and its counters are final.
func serveForTest(t *testing.T, svc interface {
	Serve(context.Context) error
	Close() error
}) (stop func()) {
	served := make(chan error, 1)
	go func() { served <- svc.Serve(context.Background()) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			svc.Close()
			if err := <-served; err != nil {
				t.Errorf("Serve: %v", err)
			}
		})
	}
	serveStops.Store(svc, stop)
	t.Cleanup(func() {
		stop()
		serveStops.Delete(svc)
	})
	return stop
}

// serveStops maps each service serveForTest runs to its stop.
var serveStops sync.Map

// stopServing is the stop serveForTest returned for svc, for helpers that
// do not hand it on: it closes svc and returns once Serve has returned.
func stopServing(t *testing.T, svc any) {
	t.Helper()
	stop, ok := serveStops.Load(svc)
	if !ok {
		t.Fatalf("%T is not served by serveForTest", svc)
	}
	stop.(func())()
}

// logBuf is a goroutine-safe log sink for assertions; waitFor blocks until
// a line appears.
type logBuf struct {
	mu      sync.Mutex
	b       bytes.Buffer
	changed chan struct{} // closed and replaced on every write
}

func (l *logBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.changed != nil {
		close(l.changed)
		l.changed = nil
	}
	return l.b.Write(p)
}

// returnsWithin fails the test with what unless f returns within d.
func returnsWithin(t *testing.T, d time.Duration, what string, f func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	select {
	case <-done:
	case <-time.After(d):
		t.Fatal(what)
	}
}

// waitForCount waits until the log holds s n times, at most 5 s.
func (l *logBuf) waitForCount(t *testing.T, s string, n int) {
	t.Helper()
	timeout := time.After(5 * time.Second)
	for {
		l.mu.Lock()
		if strings.Count(l.b.String(), s) >= n {
			l.mu.Unlock()
			return
		}
		if l.changed == nil {
			l.changed = make(chan struct{})
		}
		ch := l.changed
		l.mu.Unlock()
		select {
		case <-ch:
		case <-timeout:
			t.Fatalf("log never said %q %d times:\n%s", s, n, l)
		}
	}
}

// waitFor waits until the log contains s, at most 5 s.
func (l *logBuf) waitFor(t *testing.T, s string) {
	t.Helper()
	l.waitForCount(t, s, 1)
}

func (l *logBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func newSocks(t *testing.T, cfg sockstest.Config) *sockstest.Server {
	t.Helper()
	s, err := sockstest.NewServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// startForward runs a TCPForward to target through proxies and returns its
// listening address and the log.
func startForward(t *testing.T, target string, proxies ...string) (*TCPForward, string, *logBuf) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return startForwardOn(t, ln, target, proxies...)
}

// startForwardOn is startForward on a listener of the test's.
func startForwardOn(t *testing.T, ln net.Listener, target string, proxies ...string) (*TCPForward, string, *logBuf) {
	t.Helper()
	var dialers []*socksclient.Dialer
	for _, p := range proxies {
		dialers = append(dialers, &socksclient.Dialer{ProxyAddr: p, HandshakeTimeout: 5 * time.Second})
	}
	tgt, err := socksclient.ParseAddr(target)
	if err != nil {
		t.Fatal(err)
	}
	logs := &logBuf{}
	f := NewTCPForward(TCPForwardConfig{
		Name: ln.Addr().String(), Target: tgt, Upstreams: socksclient.NewUpstreams(dialers...),
		Logger: zerolog.New(logs).Level(zerolog.DebugLevel),
	}, ln)
	serveForTest(t, f)
	return f, ln.Addr().String(), logs
}

func roundTrip(t *testing.T, addr, msg string) error {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte(msg)); err != nil {
		return err
	}
	c.(*net.TCPConn).CloseWrite()
	got, err := io.ReadAll(c)
	if err != nil {
		return err
	}
	if string(got) != msg {
		return errors.New("echo mismatch: got " + string(got))
	}
	return nil
}

func TestTCPForwardEcho(t *testing.T) {
	echo := testnet.Echo(t).Addr().String()
	proxy := newSocks(t, sockstest.Config{})
	f, addr, logs := startForward(t, echo, proxy.Addr())
	for range 5 {
		if err := roundTrip(t, addr, "hello through socks"); err != nil {
			t.Fatal(err)
		}
	}
	f.Close()
	if got := f.Stats().Sessions.Load(); got != 5 {
		t.Errorf("sessions = %d", got)
	}
	if got := f.Stats().BytesUp.Load(); got != 5*19 {
		t.Errorf("bytes up = %d", got)
	}
	if !strings.Contains(logs.String(), `"bytes_down":19`) {
		t.Errorf("log lacks session end: %s", logs)
	}
}

func TestTCPForwardRefusedTarget(t *testing.T) {
	proxy := newSocks(t, sockstest.Config{})
	_, addr, logs := startForward(t, testnet.ClosedPort(t), proxy.Addr())
	// Twice: the listener keeps serving after a refusal.
	for range 2 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			// The reset can win the race with connect's completion.
			if !errors.Is(err, syscall.ECONNRESET) {
				t.Fatal(err)
			}
			continue
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		_, err = c.Read(make([]byte, 1))
		c.Close()
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("read err = %v, want ECONNRESET at once", err)
		}
	}
	// The log names the REP code.
	logs.waitFor(t, "connection refused (REP 0x05)")
}

func TestTCPForwardFailover(t *testing.T) {
	echo := testnet.Echo(t).Addr().String()
	dead := testnet.ClosedPort(t)
	good := newSocks(t, sockstest.Config{})
	badAuth := newSocks(t, sockstest.Config{Fault: sockstest.FaultNoAcceptable})
	_, addr, _ := startForward(t, echo, dead, badAuth.Addr(), good.Addr())
	for range 3 {
		if err := roundTrip(t, addr, "failover"); err != nil {
			t.Fatal(err)
		}
	}
	// The broken upstreams are in backoff: later sessions skip them (at
	// most one retry if a slow machine let the 1 s backoff lapse).
	if n := badAuth.Handshakes(); n > 2 {
		t.Errorf("bad upstream tried %d times for 3 sessions, want backoff to skip it", n)
	}
}

func TestTCPForwardDeadUpstreamReturns(t *testing.T) {
	echo := testnet.Echo(t).Addr().String()
	proxyAddr := testnet.ClosedPort(t)
	_, addr, logs := startForward(t, echo, proxyAddr)
	if err := roundTrip(t, addr, "x"); err == nil {
		t.Fatal("round trip succeeded with the upstream down")
	}
	logs.waitFor(t, "session failed")
	// The upstream comes back on the same address; the listener was kept.
	srv, err := sockstest.Listen(proxyAddr, sockstest.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	if err := roundTrip(t, addr, "back again"); err != nil {
		t.Fatal(err)
	}
}

// liveSession starts a forward to an echo server and returns it with one
// session that has completed an exchange.
func liveSession(t *testing.T) (*TCPForward, string, net.Conn) {
	t.Helper()
	echo := testnet.Echo(t).Addr().String()
	proxy := newSocks(t, sockstest.Config{})
	f, addr, _ := startForward(t, echo, proxy.Addr())
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.Write([]byte("a"))
	if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	return f, addr, c
}

// closeNotifyListener tells when the forward stops accepting.
type closeNotifyListener struct {
	net.Listener
	once   sync.Once
	closed chan struct{}
}

func (l *closeNotifyListener) Close() error {
	l.once.Do(func() { close(l.closed) })
	return l.Listener.Close()
}

// newCloseNotifyListener listens on 127.0.0.1 at a free port.
func newCloseNotifyListener(t *testing.T) *closeNotifyListener {
	t.Helper()
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return &closeNotifyListener{Listener: inner, closed: make(chan struct{})}
}

func TestTCPForwardShutdownDrains(t *testing.T) {
	echo := testnet.Echo(t).Addr().String()
	proxy := newSocks(t, sockstest.Config{})
	ln := newCloseNotifyListener(t)
	f, addr, _ := startForwardOn(t, ln, echo, proxy.Addr())
	c := dialExchange(t, addr)
	shut := make(chan error, 1)
	go func() { shut <- f.Shutdown(context.Background()) }()
	<-ln.closed // Shutdown has stopped accepting and is draining
	// The live session keeps working, and Shutdown waits for its end.
	c.Write([]byte("b"))
	if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
		t.Fatalf("live session cut during drain: %v", err)
	}
	select {
	case err := <-shut:
		t.Fatalf("Shutdown returned (%v) while a session was live", err)
	default:
	}
	c.(*net.TCPConn).CloseWrite()
	io.Copy(io.Discard, c)
	select {
	case err := <-shut:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Shutdown still waiting after the last session ended")
	}
	if c2, err := net.Dial("tcp", addr); err == nil {
		c2.Close()
		t.Fatal("listener still accepting after Shutdown")
	}
}

// dialFor dials addr for the test: the conn closes at cleanup, and every
// read and write on it gives up after 10 s.
func dialFor(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	return c
}

// dialExchange opens a session through the forward at addr to an echo
// target and completes one exchange.
func dialExchange(t *testing.T, addr string) net.Conn {
	t.Helper()
	c := dialFor(t, addr)
	c.Write([]byte("a"))
	if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	return c
}

// rawUpstream is a SOCKS5 server of a few lines: it accepts one CONNECT to
// an IPv4 target per connection and hands the connection, after its
// success reply, to session, so that the test plays the upstream itself,
// down to how it closes.
func rawUpstream(t *testing.T, session func(net.Conn)) string {
	ln := testnet.Serve(t, func(c net.Conn) {
		c.SetDeadline(time.Now().Add(10 * time.Second))
		greeting := make([]byte, 3) // VER 5, one method: no authentication
		if _, err := io.ReadFull(c, greeting); err != nil {
			return
		}
		c.Write([]byte{5, 0})
		req := make([]byte, 10) // VER CMD RSV ATYP=1 ADDR(4) PORT(2)
		if _, err := io.ReadFull(c, req); err != nil || req[3] != 1 {
			return
		}
		c.Write([]byte{5, 0, 0, 1, 127, 0, 0, 1, 0, 0})
		c.SetDeadline(time.Time{})
		session(c)
	})
	return ln.Addr().String()
}

// TestTCPForwardShutdownCutResets: a session still live at the shutdown
// deadline is reset both ways: a client mid-download sees ECONNRESET, not
// an EOF that would make the cut-off download look complete.
func TestTCPForwardShutdownCutResets(t *testing.T) {
	download := bytes.Repeat([]byte("d"), 1000) // the start of a longer one
	upstreamSaw := make(chan error, 1)
	proxy := rawUpstream(t, func(c net.Conn) {
		c.Write(download)
		_, err := c.Read(make([]byte, 1)) // until the forward cuts
		upstreamSaw <- err
	})
	f, addr, logs := startForward(t, "127.0.0.1:9", proxy)
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(c, make([]byte, len(download))); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // the deadline has passed
	if err := f.Shutdown(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("Shutdown = %v", err)
	}
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("client read %v after the cut, want ECONNRESET", err)
	}
	select {
	case err := <-upstreamSaw:
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("upstream read %v after the cut, want ECONNRESET", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("upstream never saw the cut")
	}
	logs.waitFor(t, `"sessions":1,"message":"cutting sessions still open"`)
}

// TestTCPForwardUpstreamResetNamed: a reset by the upstream is logged as
// the upstream's, not as an error on the client's conn, and reaches the
// client as a reset.
func TestTCPForwardUpstreamResetNamed(t *testing.T) {
	proxy := rawUpstream(t, func(c net.Conn) {
		// Wait for the client's first bytes: the relay is running.
		if _, err := io.ReadFull(c, make([]byte, 2)); err != nil {
			return
		}
		c.Write([]byte("partial"))
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
	})
	_, addr, logs := startForward(t, "127.0.0.1:9", proxy)
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	c.Write([]byte("go"))
	if _, err := io.ReadAll(c); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("client read ended with %v, want ECONNRESET", err)
	}
	logs.waitFor(t, `"error":"upstream read: connection reset by peer"`)
	logs.waitFor(t, `"side":"upstream","cause":"upstream reset"`)
}

// TestTCPForwardSetIdleTimeout: a new idle timeout applies to sessions
// accepted after it; a live session keeps the one it started with.
func TestTCPForwardSetIdleTimeout(t *testing.T) {
	echo := testnet.Echo(t).Addr().String()
	proxy := newSocks(t, sockstest.Config{})
	f, addr, logs := startForward(t, echo, proxy.Addr())
	older := dialExchange(t, addr)
	f.SetIdleTimeout(exchangeIdle)
	newer := dialExchange(t, addr)
	if _, err := newer.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("new session read %v, want EOF at its idle timeout", err)
	}
	logs.waitFor(t, `"cause":"idle timeout"`)
	// The older session has been idle longer, and is still served.
	older.Write([]byte("c"))
	if _, err := io.ReadFull(older, make([]byte, 1)); err != nil {
		t.Fatalf("older session: %v", err)
	}
}

func TestTCPForwardShutdownTimeoutCuts(t *testing.T) {
	f, _, c := liveSession(t)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := f.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown = %v", err)
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second)) // a failure fails, not hangs
	if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("session survived the shutdown timeout: %v", err)
	}
}

// TestTCPForwardSetTarget: sessions accepted after SetTarget go to the new
// target; a live session stays with its own.
func TestTCPForwardSetTarget(t *testing.T) {
	echo := testnet.Echo(t).Addr().String()
	greeter := testnet.Serve(t, func(c net.Conn) { io.WriteString(c, "second"); c.Close() }).Addr().String()
	proxy := newSocks(t, sockstest.Config{})
	f, addr, _ := startForward(t, echo, proxy.Addr())
	older := dialExchange(t, addr)
	target, err := socksclient.ParseAddr(greeter)
	if err != nil {
		t.Fatal(err)
	}
	f.SetTarget(target)
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if got, _ := io.ReadAll(c); string(got) != "second" {
		t.Errorf("a new session got %q, want the new target's %q", got, "second")
	}
	older.Write([]byte("b"))
	buf := make([]byte, 1)
	if _, err := io.ReadFull(older, buf); err != nil || buf[0] != 'b' {
		t.Errorf("the live session: %q, %v; want its first target's echo", buf, err)
	}
}

// TestTCPForwardCountsBytesLive: a session's bytes reach the forward's
// totals while it is still open, not only when it ends.
func TestTCPForwardCountsBytesLive(t *testing.T) {
	echo := testnet.Echo(t).Addr().String()
	f, addr, logs := startForward(t, echo, newSocks(t, sockstest.Config{}).Addr())
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 1)
	for _, b := range []byte("ab") {
		c.Write([]byte{b})
		if _, err := io.ReadFull(c, buf); err != nil || buf[0] != b {
			t.Fatalf("echo of %q: %q, %v", b, buf, err)
		}
	}
	// Each direction of the relay counts what it wrote before it reads
	// again, and the echo of "b" came through both directions' next
	// reads: "a" is counted each way, "b" may be or not yet.
	st := f.Stats()
	if up, down := st.BytesUp.Load(), st.BytesDown.Load(); up < 1 || up > 2 || down < 1 || down > 2 {
		t.Fatalf("bytes up %d, down %d while the session is open; want 1 or 2 each (\"a\", maybe \"b\")", up, down)
	}
	if n := st.Active.Load(); n != 1 {
		t.Fatalf("active %d: the session ended", n)
	}
	// Once the session has ended (its end line comes after both
	// directions), the totals are exact.
	c.(*net.TCPConn).CloseWrite()
	logs.waitFor(t, "session ended")
	if up, down := st.BytesUp.Load(), st.BytesDown.Load(); up != 2 || down != 2 {
		t.Fatalf("bytes up %d, down %d after the session; want 2, 2", up, down)
	}
}

// failingListener fails every Accept as a process out of descriptors
// does, until it is closed.
type failingListener struct {
	closed chan struct{}
	once   sync.Once
}

func (l *failingListener) Accept() (net.Conn, error) {
	select {
	case <-l.closed:
		return nil, net.ErrClosed
	default:
		return nil, &net.OpError{Op: "accept", Net: "tcp", Err: syscall.EMFILE}
	}
}

func (l *failingListener) Close() error   { l.once.Do(func() { close(l.closed) }); return nil }
func (l *failingListener) Addr() net.Addr { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1} }

// TestTCPForwardAcceptBackoff: accepts failing for want of descriptors
// are retried with a growing pause, logged once a period with the count
// of repeats, and StopAccepting ends a pause at once (a drain does not
// wait it out).
func TestTCPForwardAcceptBackoff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		logs := &logBuf{}
		f := NewTCPForward(TCPForwardConfig{Name: "t", Upstreams: socksclient.NewUpstreams(), Logger: zerolog.New(logs)}, &failingListener{closed: make(chan struct{})})
		served := make(chan error, 1)
		go func() { served <- f.Serve(context.Background()) }()
		time.Sleep(15 * time.Second) // the bubble's clock: dozens of retries, pauses at their 1 s ceiling
		if n := strings.Count(logs.String(), "accept failed"); n != 2 || !strings.Contains(logs.String(), "too many open files") {
			t.Errorf("%d lines in 15 s of failed accepts, want 2 (one per 10 s) naming the cause:\n%s", n, logs)
		}
		start := time.Now()
		f.StopAccepting()
		synctest.Wait()
		select {
		case err := <-served:
			if err != nil || time.Since(start) != 0 {
				t.Errorf("Serve: %v after %v; want nil at once", err, time.Since(start))
			}
		default:
			t.Fatal("Serve still backing off after StopAccepting")
		}
	})
}
