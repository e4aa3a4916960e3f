package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/net/proxy"

	"github.com/socksfwd/socksfwd/internal/testnet"
	"github.com/socksfwd/socksfwd/socksclient/sockstest"
)

// daemon is socksfwd run in-process by runWith, with signals fed by the
// test and every log line parsed, so a test waits for what the log says
// (readiness) instead of sleeping.
type daemon struct {
	t    *testing.T
	sigs chan os.Signal
	exit chan int

	mu    sync.Mutex
	lines []map[string]any
	added chan struct{} // a line arrived
}

func startDaemon(t *testing.T, args ...string) *daemon {
	t.Helper()
	return startDaemonEnv(t, noEnv, args...)
}

// startDaemonEnv is startDaemon with getenv as the environment.
func startDaemonEnv(t *testing.T, getenv func(string) string, args ...string) *daemon {
	t.Helper()
	d := &daemon{t: t, sigs: make(chan os.Signal, 4), exit: make(chan int, 1), added: make(chan struct{}, 1)}
	pr, pw := io.Pipe()
	scanned := make(chan struct{})
	go func() {
		defer close(scanned)
		sc := bufio.NewScanner(pr)
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			var m map[string]any
			if json.Unmarshal(sc.Bytes(), &m) != nil {
				m = map[string]any{"message": sc.Text()}
			}
			d.mu.Lock()
			d.lines = append(d.lines, m)
			d.mu.Unlock()
			select {
			case d.added <- struct{}{}:
			default:
			}
		}
	}()
	go func() {
		code := runWith(append([]string{"socksfwd", "--log-format", "json"}, args...), io.Discard, pw, getenv, d.sigs)
		pw.Close()
		<-scanned
		d.exit <- code
	}()
	t.Cleanup(func() {
		select {
		case d.sigs <- syscall.SIGTERM:
		default:
		}
		select {
		case d.sigs <- syscall.SIGTERM: // a second one cuts a drain short
		default:
		}
		select {
		case <-d.exit:
		case <-time.After(30 * time.Second):
			t.Error("socksfwd did not stop")
		}
	})
	return d
}

func noEnv(string) string { return "" }

// count returns how many log lines have message msg (a prefix) so far.
func (d *daemon) count(msg string) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	n := 0
	for _, l := range d.lines {
		if s, _ := l["message"].(string); strings.HasPrefix(s, msg) {
			n++
		}
	}
	return n
}

// waitFor waits until n log lines start with msg and returns the last one.
func (d *daemon) waitFor(msg string, n int) map[string]any {
	d.t.Helper()
	deadline := time.After(20 * time.Second)
	for {
		d.mu.Lock()
		var last map[string]any
		k := 0
		for _, l := range d.lines {
			if s, _ := l["message"].(string); strings.HasPrefix(s, msg) {
				k++
				last = l
			}
		}
		d.mu.Unlock()
		if k >= n {
			return last
		}
		select {
		case <-d.added:
		case code := <-d.exit:
			d.exit <- code
			d.t.Fatalf("socksfwd exited (%d) before logging %q ×%d; log: %v", code, msg, n, d.dump())
		case <-deadline:
			d.t.Fatalf("no %q ×%d in the log: %v", msg, n, d.dump())
		}
	}
}

func (d *daemon) dump() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	var b strings.Builder
	for _, l := range d.lines {
		fmt.Fprintf(&b, "\n  %v", l)
	}
	return b.String()
}

// stop sends SIGTERM and returns the exit code.
func (d *daemon) stop() int {
	d.t.Helper()
	d.sigs <- syscall.SIGTERM
	select {
	case code := <-d.exit:
		d.exit <- code // for the cleanup
		return code
	case <-time.After(20 * time.Second):
		d.t.Fatal("socksfwd did not stop after SIGTERM")
		return -1
	}
}

// reload rewrites the config file and sends SIGHUP, then waits for the
// n-th "reloaded" line and returns it.
func (d *daemon) reload(path, config string, n int) map[string]any {
	d.t.Helper()
	if err := os.WriteFile(path, []byte(config), 0o600); err != nil {
		d.t.Fatal(err)
	}
	d.sigs <- syscall.SIGHUP
	return d.waitFor("reload", n)
}

// TestStopDeadlineCoversRemovedListeners: SIGTERM's --shutdown-timeout
// also ends the drain of a listener an earlier reload removed under a
// longer timeout.
func TestStopDeadlineCoversRemovedListeners(t *testing.T) {
	verifyNoLeaks(t)
	echo := testnet.Echo(t).Addr().String()
	a := newSocks(t)
	p1, p2 := freePort(t), freePort(t)
	conf := func(timeout string, ports ...string) string {
		locals := make([]string, len(ports))
		for i, p := range ports {
			locals[i] = fmt.Sprintf("%q", "127.0.0.1:"+p+":"+echo)
		}
		return fmt.Sprintf("server = [%q]\nlocal = [%s]\nshutdown-timeout = %q\n", a.Addr(), strings.Join(locals, ", "), timeout)
	}
	path := writeConfig(t, conf("1h", p1, p2))
	d := startDaemon(t, "-c", path)
	d.waitFor("forwarding", 2)
	hold(t, "127.0.0.1:"+p2) // keeps the removed listener draining
	d.reload(path, conf("200ms", p1), 1)
	start := time.Now()
	d.stop()
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("SIGTERM took %s with a 200ms --shutdown-timeout", took)
	}
}

// TestReloadNamesNewCredentials: a new password in --server-password-file
// is taken by a reload, and the reload line says so without showing it.
func TestReloadNamesNewCredentials(t *testing.T) {
	verifyNoLeaks(t)
	echo := testnet.Echo(t).Addr().String()
	dir := t.TempDir()
	pw := filepath.Join(dir, "pw")
	if err := os.WriteFile(pw, []byte("old-secret"), 0o600); err != nil {
		t.Fatal(err)
	}
	conf := fmt.Sprintf("server = [%q]\nserver-user = \"u\"\nserver-password-file = %q\nlocal = [%q]\n",
		newSocks(t).Addr(), pw, "127.0.0.1:"+freePort(t)+":"+echo)
	path := filepath.Join(dir, "socksfwd.toml")
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	d := startDaemon(t, "-c", path)
	d.waitFor("forwarding", 1)
	if err := os.WriteFile(pw, []byte("new-secret"), 0o600); err != nil {
		t.Fatal(err)
	}
	line := d.reload(path, conf, 1)
	if changes := fmt.Sprint(line["changes"]); !strings.Contains(changes, "upstream credentials") {
		t.Errorf("changes = %v, want the upstream credentials named", changes)
	}
	if strings.Contains(d.dump(), "secret") {
		t.Errorf("a password reached the log:%s", d.dump())
	}
	d.stop()
}

func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	return port
}

func newSocks(t *testing.T) *sockstest.Server {
	t.Helper()
	s, err := sockstest.NewServer(sockstest.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// sendTo connects to addr and sends msg, with a 10 s deadline.
func sendTo(addr, msg string) (net.Conn, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, msg); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// echoOnce connects, sends msg, half-closes and checks the echo.
func echoOnce(addr, msg string) error {
	got, err := callOnce(addr, msg)
	if err != nil {
		return err
	}
	if got != msg {
		return fmt.Errorf("echo %q, want %q", got, msg)
	}
	return nil
}

// writeConfig writes text to a socksfwd.toml of the test's and returns its
// path.
func writeConfig(t *testing.T, text string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "socksfwd.toml")
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// heldSession is a connection through a forward, opened and checked with
// one exchange, kept open to be finished later.
type heldSession struct{ c net.Conn }

func hold(t *testing.T, addr string) *heldSession {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(60 * time.Second))
	if _, err := io.WriteString(c, "ping"); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatalf("held session through %s: %v", addr, err)
	}
	return &heldSession{c: c}
}

// finish exchanges once more, half-closes and expects a clean end.
func (h *heldSession) finish() error {
	if _, err := io.WriteString(h.c, "last"); err != nil {
		return err
	}
	h.c.(*net.TCPConn).CloseWrite()
	got, err := io.ReadAll(h.c)
	if err != nil {
		return err
	}
	if string(got) != "last" {
		return fmt.Errorf("got %q after the reload, want %q", got, "last")
	}
	return nil
}

// loader opens connections to addr at a steady rate until stopped, and
// counts those that failed.
type loader struct {
	addr     string
	stopped  chan struct{}
	progress chan struct{} // a connection succeeded
	done     sync.WaitGroup
	ok, fail atomic.Int64
	firstErr atomic.Pointer[error]
}

func startLoader(addr string, every time.Duration) *loader {
	l := &loader{addr: addr, stopped: make(chan struct{}), progress: make(chan struct{}, 1)}
	l.done.Go(func() {
		tick := time.NewTicker(every)
		defer tick.Stop()
		var conns sync.WaitGroup
		defer conns.Wait()
		for i := 0; i < 100000; i++ { // bounded; stop ends it long before
			select {
			case <-l.stopped:
				return
			case <-tick.C:
			}
			conns.Go(func() {
				if err := echoOnce(l.addr, fmt.Sprintf("msg %d", i)); err != nil {
					l.fail.Add(1)
					l.firstErr.CompareAndSwap(nil, &err)
					return
				}
				l.ok.Add(1)
				select {
				case l.progress <- struct{}{}:
				default:
				}
			})
		}
	})
	return l
}

// waitMore waits until n more connections have succeeded, so that each
// reload happens under load.
func (l *loader) waitMore(t *testing.T, n int64) {
	t.Helper()
	want := l.ok.Load() + n
	deadline := time.After(20 * time.Second)
	for l.ok.Load() < want {
		select {
		case <-l.progress:
		case <-deadline:
			t.Fatalf("load on %s stalled: %d ok, %d failed", l.addr, l.ok.Load(), l.fail.Load())
		}
	}
}

// stop ends the load and waits for every connection it opened.
func (l *loader) stop() { close(l.stopped); l.done.Wait() }

func (l *loader) check(t *testing.T, name string) {
	t.Helper()
	if n := l.fail.Load(); n > 0 {
		t.Errorf("%s: %d of %d connections failed; first: %v", name, n, n+l.ok.Load(), *l.firstErr.Load())
	}
	if l.ok.Load() == 0 {
		t.Errorf("%s: no connection got through", name)
	}
}

// TestReloadUnderLoad: connections arrive at 200 a second over the
// forwards while five reloads each change the upstream list, the first
// also adding a forward and the third removing one. No connection opened
// before a reload fails, sessions held across every reload finish cleanly,
// sessions in flight on the removed forward drain, and the log names each
// change.
func TestReloadUnderLoad(t *testing.T) {
	verifyNoLeaks(t)
	echo := testnet.Echo(t).Addr().String()
	a, b := newSocks(t), newSocks(t)
	p1, p2, p3 := freePort(t), freePort(t), freePort(t)
	fwd := func(port string) string { return fmt.Sprintf("%q", "127.0.0.1:"+port+":"+echo) }
	conf := func(servers []*sockstest.Server, ports ...string) string {
		addrs := make([]string, len(servers))
		for i, s := range servers {
			addrs[i] = fmt.Sprintf("%q", s.Addr())
		}
		locals := make([]string, len(ports))
		for i, p := range ports {
			locals[i] = fwd(p)
		}
		return fmt.Sprintf("server = [%s]\nlocal = [%s]\nshutdown-timeout = \"20s\"\n", strings.Join(addrs, ", "), strings.Join(locals, ", "))
	}
	path := writeConfig(t, conf([]*sockstest.Server{a}, p1, p2))
	d := startDaemon(t, "-c", path)
	d.waitFor("forwarding", 2)

	addr := func(p string) string { return "127.0.0.1:" + p }
	held := []*heldSession{hold(t, addr(p1)), hold(t, addr(p2))}
	l1 := startLoader(addr(p1), 10*time.Millisecond) // 100/s on each forward
	l2 := startLoader(addr(p2), 10*time.Millisecond)
	underLoad := func(ls ...*loader) {
		for _, l := range ls {
			l.waitMore(t, 20)
		}
	}
	// reload applies a new file, checks the log line names the upstream
	// change and want, and that a new session goes through first.
	reload := func(n int, servers []*sockstest.Server, want string, ports ...string) {
		t.Helper()
		line := d.reload(path, conf(servers, ports...), n)
		changes := fmt.Sprint(line["changes"])
		if !strings.Contains(changes, "upstreams") || !strings.Contains(changes, want) {
			t.Errorf("reload %d changes = %v, want the upstreams and %q", n, changes, want)
		}
		before := servers[0].Requests()
		if err := echoOnce(addr(p1), fmt.Sprintf("after reload %d", n)); err != nil {
			t.Fatalf("after reload %d: %v", n, err)
		}
		if servers[0].Requests() == before {
			t.Errorf("after reload %d a new session did not go through the new first upstream", n)
		}
	}
	underLoad(l1, l2)

	reload(1, []*sockstest.Server{a, b}, "+tcp 127.0.0.1:"+p3, p1, p2, p3)
	held = append(held, hold(t, addr(p3)))
	l3 := startLoader(addr(p3), 20*time.Millisecond)
	underLoad(l1, l2, l3)

	reload(2, []*sockstest.Server{b, a}, "upstreams", p1, p2, p3)
	underLoad(l1, l2, l3)

	// 3 removes the second forward while ten of its sessions are in the
	// middle of an exchange: they must drain, not drop.
	var inFlight []*heldSession
	for range 10 {
		inFlight = append(inFlight, hold(t, addr(p2)))
	}
	l2.stop()
	reload(3, []*sockstest.Server{b}, "-tcp 127.0.0.1:"+p2, p1, p3)
	if !refuses(addr(p2)) {
		t.Error("the removed forward still accepts new connections after the reload line")
	}
	for i, h := range append(inFlight, held[1]) {
		if err := h.finish(); err != nil {
			t.Errorf("session %d on the removed forward: %v", i, err)
		}
	}
	d.waitFor("removed listener drained", 1)
	underLoad(l1, l3)

	reload(4, []*sockstest.Server{a}, "upstreams", p1, p3)
	underLoad(l1, l3)
	reload(5, []*sockstest.Server{a, b}, "upstreams", p1, p3)
	underLoad(l1, l3)

	l1.stop()
	l3.stop()
	l1.check(t, "forward 1")
	l2.check(t, "forward 2 (until removed)")
	l3.check(t, "forward 3")
	for i, h := range []*heldSession{held[0], held[2]} {
		if err := h.finish(); err != nil {
			t.Errorf("held session %d across the reloads: %v", i, err)
		}
	}
	if n := d.count("forwarding"); n != 3 {
		t.Errorf("%d forwarding lines, want 3 (each listener once)", n)
	}
	if code := d.stop(); code != exitOK {
		t.Errorf("exit %d after SIGTERM, want 0", code)
	}
}

// TestReloadFailureKeepsRunning: a broken file, or a new listener that
// cannot bind, is one log line and changes nothing, not even the parts of
// the new plan that would have worked.
func TestReloadFailureKeepsRunning(t *testing.T) {
	verifyNoLeaks(t)
	echo := testnet.Echo(t).Addr().String()
	socks := newSocks(t)
	p1, p2 := freePort(t), freePort(t)
	good := fmt.Sprintf("server = [%q]\nlocal = [%q]\n", socks.Addr(), "127.0.0.1:"+p1+":"+echo)
	path := writeConfig(t, good)
	d := startDaemon(t, "-c", path)
	d.waitFor("forwarding", 1)
	held := hold(t, "127.0.0.1:"+p1)

	line := d.reload(path, "server = [\n", 1)
	if msg, _ := line["message"].(string); !strings.HasPrefix(msg, "reload failed") || !strings.Contains(fmt.Sprint(line["error"]), "socksfwd.toml:") {
		t.Errorf("broken file: %v, want reload failed naming the file", line)
	}

	// The new plan drops p1 and adds a listener on a busy port: nothing of
	// it may apply, p1 keeps serving.
	busy := testnet.Echo(t).Addr().String()
	bad := fmt.Sprintf("server = [%q]\nlocal = [%q, %q]\n", socks.Addr(), "127.0.0.1:"+p2+":"+echo, busy+":"+echo)
	line = d.reload(path, bad, 2)
	if !strings.Contains(fmt.Sprint(line["error"]), "cannot listen") {
		t.Errorf("busy port: %v, want cannot listen", line)
	}
	if err := echoOnce("127.0.0.1:"+p1, "still here"); err != nil {
		t.Errorf("after two failed reloads the running forward: %v", err)
	}
	if err := echoOnce("127.0.0.1:"+p2, "half applied"); err == nil {
		t.Error("a failed reload left a new listener bound")
	}
	if err := held.finish(); err != nil {
		t.Error(err)
	}
	if n := d.count("reload failed"); n != 2 {
		t.Errorf("%d reload-failed lines, want 2", n)
	}
}

// TestShutdownStopsAllListenersAtOnce: on SIGTERM every listener stops
// accepting while the sessions of all of them are still draining (the old
// serve drained one forward after another, and a later forward kept
// accepting meanwhile); the process exits once the last session ends.
func TestShutdownStopsAllListenersAtOnce(t *testing.T) {
	verifyNoLeaks(t)
	echo := testnet.Echo(t).Addr().String()
	socks := newSocks(t)
	ports := []string{freePort(t), freePort(t), freePort(t)}
	args := []string{"-S", socks.Addr()}
	for _, p := range ports {
		args = append(args, "-L", "127.0.0.1:"+p+":"+echo)
	}
	d := startDaemon(t, args...)
	d.waitFor("forwarding", 3)
	var held []*heldSession
	for _, p := range ports {
		held = append(held, hold(t, "127.0.0.1:"+p))
	}
	d.sigs <- syscall.SIGTERM
	d.waitFor("draining sessions", 1)
	for _, p := range ports {
		if !refuses("127.0.0.1:" + p) {
			t.Errorf("listener %s still accepts after the draining line", p)
		}
	}
	// Every held session is still served during the drain.
	for i := len(held) - 1; i >= 0; i-- {
		select {
		case code := <-d.exit:
			t.Fatalf("exited (%d) with %d sessions still live", code, i+1)
		default:
		}
		if err := held[i].finish(); err != nil {
			t.Errorf("session %d during the drain: %v", i, err)
		}
	}
	select {
	case code := <-d.exit:
		d.exit <- code
		if code != exitOK {
			t.Errorf("exit %d after a drain, want 0", code)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("no exit after the last session ended")
	}
}

// refuses reports whether addr refuses a connection now.
func refuses(addr string) bool {
	c, err := net.Dial("tcp", addr)
	if err == nil {
		c.Close()
	}
	return errors.Is(err, syscall.ECONNREFUSED)
}

// TestSecondSignalCuts: a second SIGTERM during the drain cuts the live
// sessions at once and exits 1.
func TestSecondSignalCuts(t *testing.T) {
	verifyNoLeaks(t)
	echo := testnet.Echo(t).Addr().String()
	socks := newSocks(t)
	port := freePort(t)
	d := startDaemon(t, "-S", socks.Addr(), "-L", "127.0.0.1:"+port+":"+echo)
	d.waitFor("forwarding", 1)
	held := hold(t, "127.0.0.1:"+port)
	d.sigs <- syscall.SIGTERM
	d.waitFor("draining sessions", 1)
	d.sigs <- syscall.SIGTERM
	select {
	case code := <-d.exit:
		d.exit <- code
		if code != exitRuntime {
			t.Errorf("exit %d after a second signal, want %d", code, exitRuntime)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("a second signal did not end the drain")
	}
	// A cut session must not look complete: it is reset, not closed.
	if _, err := io.ReadAll(held.c); !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("the cut session ended with %v, want a reset", err)
	}
	if d.count("second signal") != 1 {
		t.Error("no log line for the second signal")
	}
}

// fakeResolver answers every A query over TCP with ip.
func fakeResolver(t *testing.T, ip string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &dns.Server{Listener: ln, Handler: dns.HandlerFunc(func(w dns.ResponseWriter, q *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(q)
		rr, _ := dns.NewRR(q.Question[0].Name + " 60 IN A " + ip)
		m.Answer = append(m.Answer, rr)
		w.WriteMsg(m)
	})}
	served := make(chan struct{})
	go func() { defer close(served); srv.ActivateAndServe() }()
	t.Cleanup(func() { srv.Shutdown(); <-served })
	return ln.Addr().String()
}

// TestReloadDNS: a reload that changes the resolvers keeps the DNS
// listener bound and sends new queries to the new resolver.
func TestReloadDNS(t *testing.T) {
	verifyNoLeaks(t)
	socks := newSocks(t)
	r1, r2 := fakeResolver(t, "192.0.2.1"), fakeResolver(t, "192.0.2.2")
	port := freePort(t)
	conf := func(resolver string) string {
		return fmt.Sprintf("server = [%q]\ndns = %q\ndns-upstream = [%q]\ndns-cache-size = 0\n", socks.Addr(), "127.0.0.1:"+port, resolver)
	}
	path := writeConfig(t, conf(r1))
	d := startDaemon(t, "-c", path)
	d.waitFor("DNS on", 1)
	ask := func() string {
		t.Helper()
		c := &dns.Client{Net: "tcp", Timeout: 10 * time.Second}
		q := new(dns.Msg)
		q.SetQuestion("app.internal.", dns.TypeA)
		r, _, err := c.Exchange(q, "127.0.0.1:"+port)
		if err != nil {
			t.Fatal(err)
		}
		if len(r.Answer) != 1 {
			t.Fatalf("answer %v", r)
		}
		return r.Answer[0].(*dns.A).A.String()
	}
	if got := ask(); got != "192.0.2.1" {
		t.Fatalf("before the reload: %s, want the first resolver's 192.0.2.1", got)
	}
	line := d.reload(path, conf(r2), 1)
	if want := "dns 127.0.0.1:" + port + " dns-upstream [" + r1 + "] → [" + r2 + "]"; !strings.Contains(fmt.Sprint(line["changes"]), want) {
		t.Errorf("changes = %v, want %q", line["changes"], want)
	}
	if got := ask(); got != "192.0.2.2" {
		t.Errorf("after the reload: %s, want the new resolver's 192.0.2.2", got)
	}
	if n := d.count("DNS on"); n != 1 {
		t.Errorf("the DNS listener was started %d times, want once (kept bound)", n)
	}
}

// TestPortZeroListeners: two forwards on port 0 are two listeners, each
// served and each stopped on SIGTERM (one used to replace the other in the
// supervisor's table and keep the process from ever stopping).
func TestPortZeroListeners(t *testing.T) {
	verifyNoLeaks(t)
	echo := testnet.Echo(t).Addr().String()
	other := testnet.Echo(t).Addr().String()
	socks := newSocks(t)
	d := startDaemon(t, "-S", socks.Addr(), "-L", "127.0.0.1:0:"+echo, "-L", "127.0.0.1:0:"+other)
	d.waitFor("forwarding", 2)
	if n := d.count("forwarding"); n != 2 {
		t.Fatalf("%d listeners, want 2", n)
	}
	if code := d.stop(); code != exitOK {
		t.Errorf("exit %d, want 0", code)
	}
}

// TestFailedReloadReleasesAdminSocket: a reload that adds --admin and
// fails on another listener's bind leaves --admin's port free, so that a
// later reload can add it. Before, the admin socket stayed bound (its
// server had never served) and every such reload failed until a restart.
func TestFailedReloadReleasesAdminSocket(t *testing.T) {
	echo := testnet.Echo(t).Addr().String()
	socks := newSocks(t)
	p1, adminPort := freePort(t), freePort(t)
	good := fmt.Sprintf("server = [%q]\nlocal = [%q]\n", socks.Addr(), "127.0.0.1:"+p1+":"+echo)
	path := writeConfig(t, good)
	d := startDaemon(t, "-c", path)
	d.waitFor("forwarding", 1)

	busy := testnet.Echo(t).Addr().String() // --http on a port in use
	line := d.reload(path, good+fmt.Sprintf("admin = %q\nhttp = %q\n", "127.0.0.1:"+adminPort, busy), 1)
	if msg, _ := line["message"].(string); strings.HasPrefix(msg, "reloaded") {
		t.Fatalf("a reload with --http on a busy port: %v", msg)
	}
	if ln, err := net.Listen("tcp", "127.0.0.1:"+adminPort); err != nil {
		t.Errorf("the failed reload left --admin's port bound: %v", err)
	} else {
		ln.Close()
	}
	line = d.reload(path, good+fmt.Sprintf("admin = %q\n", "127.0.0.1:"+adminPort), 2)
	if msg, _ := line["message"].(string); !strings.HasPrefix(msg, "reloaded") {
		t.Errorf("adding --admin afterwards: %v %v", msg, line["error"])
	}
}

// TestReloadDNSFollowsNewUpstreams: after -S changes (the DNS settings do
// not), DNS queries go through the new upstream, as new -L, -D and --http
// sessions do. Before, the forwarder's pooled tunnels through the removed
// upstream stayed in use.
func TestReloadDNSFollowsNewUpstreams(t *testing.T) {
	oldProxy, newProxy := newSocks(t), newSocks(t)
	resolver := fakeResolver(t, "192.0.2.1")
	port := freePort(t)
	conf := func(server string) string {
		return fmt.Sprintf("server = [%q]\ndns = %q\ndns-upstream = [%q]\ndns-cache-size = 0\n", server, "127.0.0.1:"+port, resolver)
	}
	path := writeConfig(t, conf(oldProxy.Addr()))
	d := startDaemon(t, "-c", path)
	d.waitFor("DNS on", 1)
	ask := func() {
		t.Helper()
		c := &dns.Client{Net: "tcp", Timeout: 10 * time.Second}
		q := new(dns.Msg)
		q.SetQuestion("app.internal.", dns.TypeA)
		if _, _, err := c.Exchange(q, "127.0.0.1:"+port); err != nil {
			t.Fatal(err)
		}
	}
	ask()
	d.reload(path, conf(newProxy.Addr()), 1)
	before := oldProxy.Requests()
	for range 5 {
		ask()
	}
	if newProxy.Requests() == 0 || oldProxy.Requests() != before {
		t.Errorf("after the reload to -S %s: old proxy requests %d → %d, new proxy %d; want every query through the new one",
			newProxy.Addr(), before, oldProxy.Requests(), newProxy.Requests())
	}
}

// TestReloadRenamesReverseSeries: a -R on a fixed port whose target a
// reload changes keeps its BIND and takes its new spec as its name: its
// re-arm series move to the new name, and go when a reload removes it.
// Before, the histogram stayed under the old name (still updated), and
// stayed in /metrics after the -R was removed.
func TestReloadRenamesReverseSeries(t *testing.T) {
	socks := newSocks(t)
	echo, echo2 := testnet.Echo(t).Addr().String(), testnet.Echo(t).Addr().String()
	fixed, admin, p1 := freePort(t), "127.0.0.1:"+freePort(t), freePort(t)
	config := func(remote string) string {
		c := fmt.Sprintf("server = [%q]\nadmin = %q\nlocal = [%q]\n", socks.Addr(), admin, "127.0.0.1:"+p1+":"+echo)
		if remote != "" {
			c += fmt.Sprintf("remote = [%q]\n", remote)
		}
		return c
	}
	path := writeConfig(t, config(fixed+":"+echo))
	d := startDaemon(t, "-c", path)
	listens := "reverse " + socks.Addr() + " listens on"
	d.waitFor(listens, 1)
	series := func(spec string) string {
		return `socksfwd_reverse_rearm_seconds_count{reverse="` + spec + `"}`
	}
	if err := echoOnce("127.0.0.1:"+fixed, "first"); err != nil {
		t.Fatal(err)
	}
	// Armed again once the re-arm is recorded (a fixed port's re-arm is
	// not logged).
	if n := scrapeUntil(t, admin, series(fixed+":"+echo), 1)[series(fixed+":"+echo)]; n != 1 {
		t.Fatalf("re-arms under the first name: %v, want 1", n)
	}

	d.reload(path, config(fixed+":"+echo2), 1)
	if err := echoOnce("127.0.0.1:"+fixed, "second"); err != nil {
		t.Fatal(err)
	}
	m := scrapeUntil(t, admin, series(fixed+":"+echo2), 1)
	if _, ok := m[series(fixed+":"+echo)]; ok {
		t.Errorf("the old name's re-arm series is still in /metrics after the rename")
	}
	if n := m[series(fixed+":"+echo2)]; n != 1 {
		t.Errorf("re-arms under the new name: %v, want 1", n)
	}

	d.reload(path, config(""), 2)
	d.waitFor("removed listener drained", 1)
	for k := range scrape(t, admin) {
		if strings.Contains(k, "rearm_seconds") && strings.Contains(k, fixed) {
			t.Errorf("the -R is gone, /metrics still has %s", k)
		}
	}
}

// TestReloadMovesPortToAnotherListener: a reload that turns -L P into
// -D P (the same address) hands the socket over instead of failing to
// bind a port the old listener holds until it drains, and the -L's live
// session runs on; the next one, --http P, takes it from the door. One
// that widens the address (127.0.0.1:P to 0.0.0.0:P) cannot share a
// socket: it fails, keeps the running configuration, and says how to get
// there.
func TestReloadMovesPortToAnotherListener(t *testing.T) {
	verifyNoLeaks(t)
	echo := testnet.Echo(t).Addr().String()
	socks := newSocks(t)
	p := freePort(t)
	addr := "127.0.0.1:" + p
	path := writeConfig(t, fmt.Sprintf("server = [%q]\nlocal = [%q]\n", socks.Addr(), addr+":"+echo))
	d := startDaemon(t, "-c", path)
	d.waitFor("forwarding", 1)

	line := d.reload(path, fmt.Sprintf("server = [%q]\nlocal = [%q]\nallow = [\"127.0.0.0/8\"]\n", socks.Addr(), "0.0.0.0:"+p+":"+echo), 1)
	if msg, _ := line["message"].(string); strings.HasPrefix(msg, "reloaded") || !strings.Contains(fmt.Sprint(line["error"]), "next reload") {
		t.Errorf("widening the address: %v %v; want a failure that says how", msg, line["error"])
	}
	held := hold(t, addr) // through the -L, still running

	line = d.reload(path, fmt.Sprintf("server = [%q]\ndynamic = %q\n", socks.Addr(), addr), 2)
	if msg, _ := line["message"].(string); !strings.HasPrefix(msg, "reloaded") {
		t.Fatalf("-L %s becoming -D %s: %v %v", p, addr, msg, line["error"])
	}
	dialer, err := proxy.SOCKS5("tcp", addr, nil, &net.Dialer{Timeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	c, err := dialer.Dial("tcp", echo)
	if err != nil {
		t.Fatalf("through the -D that took the port: %v", err)
	}
	c.Close()
	if err := held.finish(); err != nil {
		t.Errorf("the -L session across the reload: %v", err)
	}

	line = d.reload(path, fmt.Sprintf("server = [%q]\nhttp = %q\n", socks.Addr(), addr), 3)
	if msg, _ := line["message"].(string); !strings.HasPrefix(msg, "reloaded") {
		t.Fatalf("-D %s becoming --http %s: %v %v", addr, addr, msg, line["error"])
	}
	hc, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer hc.Close()
	hc.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(hc, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", echo, echo)
	status, err := bufio.NewReader(hc).ReadString('\n')
	if err != nil || !strings.HasPrefix(status, "HTTP/1.1 200") {
		t.Errorf("CONNECT through the --http that took the port: %q %v", status, err)
	}
}

// TestFlagListReplacesFileList: -L on the command line replaces the
// file's local forwards; socksfwd says so, at start and on reload.
func TestFlagListReplacesFileList(t *testing.T) {
	verifyNoLeaks(t)
	echo := testnet.Echo(t).Addr().String()
	socks := newSocks(t)
	conf := fmt.Sprintf("server = [%q]\nlocal = [%q]\n", socks.Addr(), "127.0.0.1:"+freePort(t)+":"+echo)
	path := writeConfig(t, conf)
	d := startDaemon(t, "-c", path, "-L", "127.0.0.1:"+freePort(t)+":"+echo)
	line := d.waitFor(`-L (--local) replaces the 1 "local" value(s) of the config file`, 1)
	if line["level"] != "warn" {
		t.Errorf("the line: %v; want a warning", line)
	}
	d.waitFor("forwarding", 1)
	d.reload(path, conf, 1)
	d.waitFor(`-L (--local) replaces`, 2)

	// --print-config, where a user checks the merge, says so too.
	var stdout, stderr strings.Builder
	if code := run([]string{"socksfwd", "-c", path, "-L", "7011:h:1", "--print-config"}, &stdout, &stderr, func(string) string { return "" }); code != exitOK {
		t.Fatalf("--print-config: exit %d: %s", code, stderr.String())
	}
	if !strings.Contains(stderr.String(), `warning: -L (--local) replaces the 1 "local" value(s) of the config file`) ||
		!strings.Contains(stdout.String(), "7011:h:1") {
		t.Errorf("--print-config printed\n%s\nand said\n%s\nwant the merged -L and the warning", stdout.String(), stderr.String())
	}
}

// TestReloadHintBlamesOnlyWhatHoldsThePort: the port of the added
// listener is held by another program; a removed -L with the same port
// number on another address is not in its way, and is not blamed.
func TestReloadHintBlamesOnlyWhatHoldsThePort(t *testing.T) {
	verifyNoLeaks(t)
	echo := testnet.Echo(t).Addr().String()
	socks := newSocks(t)
	p := freePort(t)
	other, err := net.Listen("tcp", "127.0.0.1:"+p) // another program's
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	path := writeConfig(t, fmt.Sprintf("server = [%q]\nlocal = [%q]\n", socks.Addr(), "127.0.0.2:"+p+":"+echo))
	d := startDaemon(t, "-c", path)
	d.waitFor("forwarding", 1)
	line := d.reload(path, fmt.Sprintf("server = [%q]\nlocal = [%q]\n", socks.Addr(), "127.0.0.1:"+p+":"+echo), 1)
	if e := fmt.Sprint(line["error"]); strings.Contains(e, "which this reload removes") {
		t.Errorf("bind refused by an unrelated socket, error blames the removed listener on 127.0.0.2:%s:\n%s", p, e)
	}
}
