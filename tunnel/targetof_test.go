package tunnel

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/socksfwd/socksfwd/internal/testnet"
	"github.com/socksfwd/socksfwd/socksclient"
	"github.com/socksfwd/socksfwd/socksclient/sockstest"
)

// startTargetOfForward serves a TCPForward on ln whose sessions take their
// target from targetOf; its fixed Target is a closed port, so a session
// that used it would fail.
func startTargetOfForward(t *testing.T, ln net.Listener, targetOf func(net.Conn) (socksclient.Addr, error), proxy string) (*TCPForward, *logBuf) {
	t.Helper()
	unused, err := socksclient.ParseAddr(testnet.ClosedPort(t))
	if err != nil {
		t.Fatal(err)
	}
	logs := &logBuf{}
	f := NewTCPForward(TCPForwardConfig{
		Name: ln.Addr().String(), Target: unused, TargetOf: targetOf,
		Upstreams: socksclient.NewUpstreams(&socksclient.Dialer{ProxyAddr: proxy, HandshakeTimeout: 5 * time.Second}),
		Logger:    zerolog.New(logs).Level(zerolog.DebugLevel),
	}, ln)
	serveForTest(t, f)
	return f, logs
}

// expectReset dials addr and expects the forward to reset the connection
// without a byte.
func expectReset(t *testing.T, addr string) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		// The reset can win the race with connect's completion.
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatal(err)
		}
		return
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("read err = %v, want ECONNRESET", err)
	}
}

// TestTargetOfEndToEnd: each session goes where TargetOf says, given the
// accepted connection, with half-close intact and the target in the log.
func TestTargetOfEndToEnd(t *testing.T) {
	echo := testnet.Echo(t).Addr().(*net.TCPAddr).AddrPort()
	proxy := newSocks(t, sockstest.Config{})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	listen := ln.Addr().String()
	asked := make(chan string, 3)
	targetOf := func(c net.Conn) (socksclient.Addr, error) {
		asked <- c.LocalAddr().String()
		return socksclient.AddrFromAddrPort(echo), nil
	}
	f, logs := startTargetOfForward(t, ln, targetOf, proxy.Addr())
	for range 3 {
		if err := roundTrip(t, listen, "through the hook"); err != nil { // writes, half-closes, reads to EOF
			t.Fatal(err)
		}
		if got := <-asked; got != listen {
			t.Errorf("TargetOf got a conn on %s, want the accepted one on %s", got, listen)
		}
	}
	logs.waitForCount(t, "session ended", 3)
	if n := strings.Count(logs.String(), `"target":"`+echo.String()+`"`); n != 3 {
		t.Errorf("%d session lines name the target %s, want 3:\n%s", n, echo, logs)
	}
	if got := f.Stats().Failed.Load(); got != 0 {
		t.Errorf("failed = %d", got)
	}
}

// TestTargetOfErrorRefuses: a TargetOf error resets the client, counts the
// session as failed, never reaches the proxy, and logs one line with the
// cause.
func TestTargetOfErrorRefuses(t *testing.T) {
	proxy := newSocks(t, sockstest.Config{})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cause := errors.New("test cause: nowhere to go")
	f, logs := startTargetOfForward(t, ln, func(net.Conn) (socksclient.Addr, error) { return socksclient.Addr{}, cause }, proxy.Addr())
	expectReset(t, ln.Addr().String())
	logs.waitFor(t, "session refused")
	if n := strings.Count(logs.String(), "\n"); n != 1 || !strings.Contains(logs.String(), cause.Error()) {
		t.Errorf("want one line naming the cause, got:\n%s", logs)
	}
	if got := f.Stats().Failed.Load(); got != 1 {
		t.Errorf("failed = %d, want 1", got)
	}
	if n := proxy.Handshakes(); n != 0 {
		t.Errorf("the proxy saw %d handshakes for a refused session", n)
	}
}

// TestTargetOfRefusalReasons: the refusals of a transparent listener are
// counted by reason, apart from failures: a connection no rule sent, and
// socksfwd's own connection to its proxy taken by the capture rules (a
// loop, which /metrics must tell apart from a target that failed).
func TestTargetOfRefusalReasons(t *testing.T) {
	proxy := newSocks(t, sockstest.Config{})
	for _, cause := range []error{ErrNotRedirected, ErrCaptureLoop} {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		var n atomic.Int32
		f, logs := startTargetOfForward(t, ln, func(net.Conn) (socksclient.Addr, error) {
			return socksclient.Addr{}, fmt.Errorf("original destination 192.0.2.%d:1080: %w", n.Add(1), cause)
		}, proxy.Addr())
		expectReset(t, ln.Addr().String())
		logs.waitFor(t, "session refused")
		expectReset(t, ln.Addr().String()) // another destination, the same cause
		s := f.Stats()
		got := map[error]int64{ErrNotRedirected: s.RejectedNotRedirected.Load(), ErrCaptureLoop: s.RejectedCaptureLoop.Load()}
		if got[cause] != 2 || s.Failed.Load() != 0 {
			t.Errorf("%v: rejected %v, failed %d; want both counted under its own reason", cause, got, s.Failed.Load())
		}
		if l := strings.Count(logs.String(), "session refused"); l != 1 {
			t.Errorf("%v: %d lines for two refusals to two destinations, want 1 a period:\n%s", cause, l, logs)
		}
	}
}

func TestTransparentIsListener(t *testing.T) {
	local := func(ip netip.Addr) bool { return ip.IsLoopback() }
	ap := netip.MustParseAddrPort
	for _, tc := range []struct {
		dst, listen string
		want        bool
	}{
		{"127.0.0.1:12345", "127.0.0.1:12345", true},
		{"127.0.0.1:12345", "[::ffff:127.0.0.1]:12345", true},
		{"127.0.0.1:80", "127.0.0.1:12345", false},
		{"127.0.0.2:12345", "127.0.0.1:12345", false},  // another socket's address
		{"127.0.0.1:12345", "0.0.0.0:12345", true},     // wildcard: any local address
		{"127.0.0.1:12345", "[::]:12345", true},        // dual-stack wildcard
		{"[::1]:12345", "[::]:12345", true},            //
		{"198.51.100.7:12345", "[::]:12345", false},    // TPROXY'd to a remote on the same port
		{"198.51.100.7:12345", "0.0.0.0:12345", false}, //
		{"[::1]:80", "[::]:12345", false},
	} {
		if got := isListener(ap(tc.dst), ap(tc.listen), local); got != tc.want {
			t.Errorf("isListener(%s, listener %s) = %v, want %v", tc.dst, tc.listen, got, tc.want)
		}
	}
}
