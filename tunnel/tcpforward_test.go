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
	"time"

	"github.com/rs/zerolog"

	"github.com/socksfwd/socksfwd/internal/testnet"
	"github.com/socksfwd/socksfwd/socksclient"
	"github.com/socksfwd/socksfwd/socksclient/sockstest"
)

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

// waitFor waits until the log contains s, at most 5 s.
func (l *logBuf) waitFor(t *testing.T, s string) {
	t.Helper()
	timeout := time.After(5 * time.Second)
	for {
		l.mu.Lock()
		if strings.Contains(l.b.String(), s) {
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
			t.Fatalf("log never said %q:\n%s", s, l)
		}
	}
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
	var dialers []*socksclient.Dialer
	for _, p := range proxies {
		dialers = append(dialers, &socksclient.Dialer{ProxyAddr: p, HandshakeTimeout: 5 * time.Second})
	}
	tgt, err := socksclient.ParseAddr(target)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	logs := &logBuf{}
	f := NewTCPForward(TCPForwardConfig{
		Name: ln.Addr().String(), Target: tgt, Upstreams: socksclient.NewUpstreams(dialers...),
		Logger: zerolog.New(logs).Level(zerolog.DebugLevel),
	}, ln)
	served := make(chan error, 1)
	go func() { served <- f.Serve(context.Background()) }()
	t.Cleanup(func() {
		f.Close()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
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
		if err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("read err = %v, want the conn closed at once", err)
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

func TestTCPForwardShutdownDrains(t *testing.T) {
	f, addr, c := liveSession(t)
	shut := make(chan error, 1)
	go func() { shut <- f.Shutdown(context.Background()) }()
	// The live session keeps working, and Shutdown waits for its end.
	c.Write([]byte("b"))
	if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
		t.Fatalf("live session cut during drain: %v", err)
	}
	c.(*net.TCPConn).CloseWrite()
	io.Copy(io.Discard, c)
	if err := <-shut; err != nil {
		t.Fatal(err)
	}
	if c2, err := net.Dial("tcp", addr); err == nil {
		c2.Close()
		t.Fatal("listener still accepting after Shutdown")
	}
}

func TestTCPForwardShutdownTimeoutCuts(t *testing.T) {
	f, _, c := liveSession(t)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := f.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown = %v", err)
	}
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatal("session survived the shutdown timeout")
	}
}
