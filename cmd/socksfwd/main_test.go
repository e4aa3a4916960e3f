package main

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rogpeppe/go-internal/testscript"
	"github.com/rs/zerolog"
	"go.uber.org/goleak"

	"github.com/socksfwd/socksfwd/internal/peertest"
	"github.com/socksfwd/socksfwd/internal/testnet"
	"github.com/socksfwd/socksfwd/socksclient/sockstest"
)

func TestMain(m *testing.M) {
	testscript.Main(m, map[string]func(){
		"socksfwd": func() { os.Exit(run(os.Args, os.Stdout, os.Stderr, os.Getenv)) },
	})
}

// TestScripts drives the built binary through testdata/script/*.txtar:
// flags, environment, config file, errors, exit codes and signals.
func TestScripts(t *testing.T) {
	verifyNoLeaks(t)
	testscript.Run(t, testscript.Params{
		Dir: "testdata/script",
		Setup: func(env *testscript.Env) error {
			clearProxyEnv(env)
			env.Setenv("HUGE", strings.Repeat("x", 100000))
			root, err := filepath.Abs("../..")
			env.Setenv("REPO", root)
			if err != nil {
				return err
			}
			return listenReadiness(env)
		},
		Cmds: scriptCmds(nil),
	})
}

type scriptCmd = func(ts *testscript.TestScript, neg bool, args []string)

// scriptCmds is the commands every script gets, plus extra.
func scriptCmds(extra map[string]scriptCmd) map[string]scriptCmd {
	cmds := map[string]scriptCmd{
		"echoserver":   cmdEchoServer,
		"socksserver":  cmdSocksServer,
		"freeport":     cmdFreePort,
		"roundtrip":    cmdRoundTrip,
		"waitready":    cmdWaitReady,
		"waitport":     cmdWaitPort,
		"udpecho":      cmdUDPEcho,
		"waitudp":      cmdWaitUDP,
		"udproundtrip": cmdUDPRoundTrip,
		"sleep":        cmdSleep,
		"checkjson":    cmdCheckJSON,
	}
	for k, v := range extra {
		cmds[k] = v
	}
	return cmds
}

// clearProxyEnv drops any inherited proxy: scripts set their own.
func clearProxyEnv(env *testscript.Env) {
	env.Setenv("ALL_PROXY", "")
	env.Setenv("all_proxy", "")
}

// verifyNoLeaks checks, once the test and its (parallel) subtests are done,
// that no goroutine they started is left. testscript.Main owns TestMain, so
// goleak runs per test here.
func verifyNoLeaks(t *testing.T) {
	t.Cleanup(func() { goleak.VerifyNone(t) })
}

// tb adapts a TestScript to testnet.TB.
type tb struct{ ts *testscript.TestScript }

func (t tb) Helper()           {}
func (t tb) Cleanup(f func())  { t.ts.Defer(f) }
func (t tb) Fatal(args ...any) { t.ts.Fatalf("%v", args...) }

// echoserver VAR: start an echo server, its address in $VAR.
func cmdEchoServer(ts *testscript.TestScript, neg bool, args []string) {
	ln := testnet.Echo(tb{ts: ts})
	ts.Setenv(args[0], ln.Addr().String())
}

// sleep DURATION: let time pass, for what is measured in time (a TTL
// counting down), never to wait for something to be ready.
func cmdSleep(ts *testscript.TestScript, neg bool, args []string) {
	d, err := time.ParseDuration(args[0])
	ts.Check(err)
	time.Sleep(d)
}

// waitudp ADDR: wait up to 10 s until something listens on UDP ADDR: a
// probe datagram no longer draws "connection refused" (ICMP port
// unreachable). As waitport, for processes that do not say when they are
// ready; the probe is a datagram the listener receives.
func cmdWaitUDP(ts *testscript.TestScript, neg bool, args []string) {
	c, err := net.Dial("udp", args[0])
	ts.Check(err)
	defer c.Close()
	deadline := time.Now().Add(10 * time.Second)
	buf := make([]byte, 512)
	for time.Now().Before(deadline) {
		c.Write([]byte{0})
		c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		if _, err := c.Read(buf); !errors.Is(err, syscall.ECONNREFUSED) {
			return
		}
		time.Sleep(20 * time.Millisecond) // the process is starting; bounded readiness probe
	}
	ts.Fatalf("nothing listens on udp %s", args[0])
}

// udpecho VAR: start a UDP echo server, its address in $VAR.
func cmdUDPEcho(ts *testscript.TestScript, neg bool, args []string) {
	ts.Setenv(args[0], testnet.UDPEcho(tb{ts: ts}).LocalAddr().String())
}

// udproundtrip ADDR SIZE: send one SIZE-byte datagram to ADDR and expect
// it back within 10 s; a forward queues it while it builds its
// association. Nothing resends it: wait for the listener first (waitudp),
// and a datagram lost on loopback fails the script. With !, expect no
// answer within 2 s.
func cmdUDPRoundTrip(ts *testscript.TestScript, neg bool, args []string) {
	size, err := strconv.Atoi(args[1])
	ts.Check(err)
	c, err := net.ListenUDP("udp", nil)
	ts.Check(err)
	defer c.Close()
	to, err := net.ResolveUDPAddr("udp", args[0])
	ts.Check(err)
	msg := bytes.Repeat([]byte{'u'}, size)
	wait := udpAnswerTimeout
	if neg {
		wait = udpSilenceTimeout
	}
	if _, err := c.WriteToUDP(msg, to); err != nil {
		ts.Fatalf("send a %d-byte datagram to %s: %v", size, args[0], err)
	}
	c.SetReadDeadline(time.Now().Add(wait))
	buf := make([]byte, 65536)
	n, _, err := c.ReadFromUDP(buf)
	switch {
	case neg && err == nil:
		ts.Fatalf("unexpected answer (%d bytes) to a %d-byte datagram from %s", n, size, args[0])
	case neg && !isTimeout(err):
		ts.Fatalf("no answer from %s, but not for want of one: %v", args[0], err)
	case neg:
	case err != nil:
		ts.Fatalf("no echo of a %d-byte datagram from %s within %s: %v", size, args[0], wait, err)
	case !bytes.Equal(buf[:n], msg):
		ts.Fatalf("the answer from %s is %d bytes, not the %d-byte datagram sent", args[0], n, size)
	}
}

// How long a script command waits for one datagram's answer, and how long
// it listens for silence (the answer that must not come).
const (
	udpAnswerTimeout  = 10 * time.Second
	udpSilenceTimeout = 2 * time.Second
)

// isTimeout reports whether err is a read deadline passing.
func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// socksserver VAR [user pass]: start a sockstest server, its address in $VAR.
func cmdSocksServer(ts *testscript.TestScript, neg bool, args []string) {
	cfg := sockstest.Config{}
	if len(args) == 3 {
		cfg.Users = map[string]string{args[1]: args[2]}
	}
	srv, err := sockstest.NewServer(cfg)
	ts.Check(err)
	ts.Defer(func() { srv.Close() })
	ts.Setenv(args[0], srv.Addr())
}

// freeport VAR: a loopback port nothing listens on, in $VAR.
func cmdFreePort(ts *testscript.TestScript, neg bool, args []string) {
	ts.Setenv(args[0], strconv.Itoa(peertest.FreePort(peerTB{ts})))
}

// readiness receives what the script's socksfwd processes tell systemd:
// READY=1 once every listener is bound (and again after a reload). The
// script's NOTIFY_SOCKET is its unixgram socket, and a goroutine keeps
// reading it, as systemd does, so that no sender waits for room.
type readiness struct {
	ready chan struct{} // a READY=1 arrived
}

type readinessKey struct{}

// listenReadiness opens the script's notify socket and points
// NOTIFY_SOCKET at it; the socket closes when the script ends.
func listenReadiness(env *testscript.Env) error {
	path := filepath.Join(env.WorkDir, "notify")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return err
	}
	r := &readiness{ready: make(chan struct{}, 64)}
	done := readNotifications(c, func(msg string) {
		for line := range strings.Lines(msg) {
			if strings.TrimSpace(line) == "READY=1" {
				select {
				case r.ready <- struct{}{}:
				default: // nobody waits for that many; waitready fails on its own
				}
			}
		}
	})
	env.Defer(func() { c.Close(); <-done })
	env.Values[readinessKey{}] = r
	env.Setenv("NOTIFY_SOCKET", path)
	return nil
}

// readNotifications hands each datagram c receives to deliver until c is
// closed, then closes the channel it returns.
func readNotifications(c *net.UnixConn, deliver func(msg string)) <-chan struct{} {
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 4096)
		for {
			n, err := c.Read(buf)
			if err != nil {
				return
			}
			deliver(string(buf[:n]))
		}
	}()
	return done
}

// waitready: wait up to 20 s for the next READY=1 from a socksfwd the
// script started (in the order they say it): the readiness signal it
// gives systemd, sent once every listener is bound. A script starts one
// socksfwd at a time and waits for it; one that never gets ready fails.
func cmdWaitReady(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 0 {
		ts.Fatalf("usage: waitready")
	}
	r, _ := ts.Value(readinessKey{}).(*readiness)
	if r == nil {
		ts.Fatalf("waitready: no notify socket (listenReadiness in Setup)")
	}
	select {
	case <-r.ready:
	case <-time.After(20 * time.Second):
		ts.Fatalf("no socksfwd said READY=1 within 20 s")
	}
}

// waitport ADDR: wait up to 10 s for something to listen on TCP ADDR:
// for processes with no readiness signal of their own
// (systemd-socket-activate's sockets), or as a probe a listener must
// answer. A socksfwd the script starts says when it is ready (waitready).
func cmdWaitPort(ts *testscript.TestScript, neg bool, args []string) {
	ts.Check(dialRetry(args[0]))
}

func dialRetry(addr string) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			return c.Close()
		}
		if errors.Is(err, syscall.ECONNRESET) {
			return nil // accepted, then reset by a failing session: it listens
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(20 * time.Millisecond) // the process is starting; bounded readiness probe
	}
}

// roundtrip ADDR MSG: connect (once: wait for the listener first), send
// MSG, half-close, and expect MSG back, then EOF, within 10 s. With !,
// expect the connection to be closed (EOF or a reset) without an echo
// within those 10 s: a read that times out fails, since a failed session
// must close its client at once rather than leave it hanging.
func cmdRoundTrip(ts *testscript.TestScript, neg bool, args []string) {
	c, err := net.Dial("tcp", args[0])
	if neg && errors.Is(err, syscall.ECONNRESET) {
		return // the reset beat connect's completion: closed without an echo
	}
	ts.Check(err)
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	c.Write([]byte(args[1]))
	c.(*net.TCPConn).CloseWrite()
	got, err := io.ReadAll(bufio.NewReader(c))
	switch {
	case neg && string(got) == args[1]:
		ts.Fatalf("roundtrip got the echo %q; want the connection closed without one", got)
	case neg && isTimeout(err):
		ts.Fatalf("roundtrip: the connection was left open (%d bytes, then %v); want it closed at once", len(got), err)
	case neg && err != nil && !errors.Is(err, syscall.ECONNRESET):
		ts.Fatalf("roundtrip got %q, then %v; want EOF or a reset", got, err)
	case neg:
	case err != nil || string(got) != args[1]:
		ts.Fatalf("roundtrip got %q, then %v; want the echo %q, then EOF", got, err, args[1])
	}
}

func TestExitCodes(t *testing.T) {
	verifyNoLeaks(t)
	noEnv := func(string) string { return "" }
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	tests := []struct {
		args []string
		want int
	}{
		{[]string{"-V"}, exitOK},
		{[]string{"-S", "p:1", "-L", "1:h:2", "--print-config"}, exitOK},
		{[]string{}, exitUsage},
		{[]string{"--bogus"}, exitUsage},
		{[]string{"-S", "p:1", "-L", "nonsense"}, exitUsage},
		{[]string{"-S", "p:1", "-L", "1:h:2", "extra-arg"}, exitUsage},
		{[]string{"-S", "p:1", "-L", "1:h:2", "--idle-timeout", "soon"}, exitUsage},
		// zerolog's other levels would hide failures; a zero handshake
		// timeout was taken for the default while --print-config said 0s.
		{[]string{"-S", "p:1", "-L", "1:h:2", "--log-level", "disabled", "--print-config"}, exitUsage},
		{[]string{"-S", "p:1", "-L", "1:h:2", "--log-level", "7", "--print-config"}, exitUsage},
		{[]string{"-S", "p:1", "-L", "1:h:2", "--log-level", "INFO", "--print-config"}, exitOK},
		{[]string{"-S", "p:1", "-L", "1:h:2", "--log-level", "trace", "--print-config"}, exitOK},
		{[]string{"-S", "p:1", "-L", "1:h:2", "--handshake-timeout", "0s", "--print-config"}, exitUsage},
		// The same port twice, written two ways: a configuration error,
		// not a bind failure at start.
		{[]string{"-S", "p:1", "-L", "5432:h:1", "-L", "05432:h:2", "--print-config"}, exitUsage},
		// A --dns-* value is checked without --dns too: a reload that adds
		// --dns must not be the first to hear of it.
		{[]string{"-S", "p:1", "-L", "1:h:2", "--dns-transport", "quic", "--print-config"}, exitUsage},
		{[]string{"-S", "127.0.0.1:1", "-L", busy.Addr().String() + ":h:2"}, exitRuntime},
		{[]string{"-S", "127.0.0.1:1", "--http", busy.Addr().String()}, exitRuntime},
		{[]string{"-S", "p:1", "--http", "3128", "--http-auth", "no-colon"}, exitUsage},
		// A listener option that takes one address, given twice: the
		// flag package kept the last in silence.
		{[]string{"-S", "p:1", "-D", "1080", "--dynamic=1081", "--print-config"}, exitUsage},
		{[]string{"-S", "p:1", "--dns", "5300", "-dns", "5301", "--print-config"}, exitUsage},
		{[]string{"-S", "p:1", "-D", "1080", "--http", "3128", "--print-config"}, exitOK},
		// An option for a listener that is not set is refused, as
		// --http-auth without --http is: it was taken in silence.
		{[]string{"-S", "p:1", "-L", "1:h:2", "--admin-pprof", "--print-config"}, exitUsage},
		{[]string{"-S", "p:1", "-L", "1:h:2", "--admin", "9100", "--admin-pprof", "--print-config"}, exitOK},
		// A --remote-addr-file that cannot be written is found at start,
		// not by a script waiting on it for ever; --print-config (and
		// rules) may run before the service made its directory.
		{[]string{"-S", "127.0.0.1:1", "-R", "0:h:1", "--remote-addr-file", "/nonexistent/dir/remote"}, exitUsage},
		{[]string{"-S", "p:1", "-R", "0:h:1", "--remote-addr-file", "/nonexistent/dir/remote", "--print-config"}, exitOK},
		// -R is TCP only (BIND): said so, not "invalid target port".
		{[]string{"-S", "p:1", "-R", "8080:127.0.0.1:80/udp", "--print-config"}, exitUsage},
	}
	for _, tc := range tests {
		var out, errOut strings.Builder
		got := run(append([]string{"socksfwd"}, tc.args...), &out, &errOut, noEnv)
		if got != tc.want {
			t.Errorf("socksfwd %v = %d, want %d; stderr: %s", tc.args, got, tc.want, errOut.String())
		}
		if tc.want != exitOK && strings.Count(strings.TrimSpace(errOut.String()), "\n") > 2 {
			t.Errorf("socksfwd %v: error is not short: %s", tc.args, errOut.String())
		}
	}
}

// TestConsoleLogWithoutTerminal: --log-format console into a file or a
// pipe writes no colour escapes; durations name their unit.
func TestConsoleLogWithoutTerminal(t *testing.T) {
	var buf strings.Builder
	p := &plan{logLevel: zerolog.InfoLevel}
	p.cfg.LogFormat = "console"
	log := newLogger(p, &buf)
	log.Info().Dur("dur_ms", 1500*time.Microsecond).Msg("hello")
	if out := buf.String(); strings.Contains(out, "\x1b[") || !strings.Contains(out, "dur_ms=1.5") {
		t.Errorf("console log into a buffer: %q; want no escapes and dur_ms=1.5", out)
	}
}

// TestRedactionMarkOnlyInline: the redaction mark is refused only where
// --print-config writes it, a whole inline password; a door password
// holding it after a comma, or a password file holding it, is a password.
func TestRedactionMarkOnlyInline(t *testing.T) {
	pw := filepath.Join(t.TempDir(), "pw")
	if err := os.WriteFile(pw, []byte("xxxxx\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	noEnv := func(string) string { return "" }
	for _, args := range [][]string{
		{"-S", "p:1", "--http", "3128", "--http-auth", "alice:pa,bob:xxxxx", "--print-config"},
		{"-S", "socks5h://bob@p:1", "--server-password-file", pw, "-L", "1:h:1", "--print-config"},
	} {
		var out, errOut strings.Builder
		if code := run(append([]string{"socksfwd"}, args...), &out, &errOut, noEnv); code != exitOK {
			t.Errorf("%q: exit %d: %s", args, code, errOut.String())
		}
	}
}
