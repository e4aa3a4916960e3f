//go:build unix

package main

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/socksfwd/socksfwd/internal/testnet"
)

// notifySocket stands in for systemd's NOTIFY_SOCKET: a unixgram socket
// the test reads. A goroutine keeps reading, as systemd does: the
// kernel queues only a few datagrams (net.unix.max_dgram_qlen), and a
// full queue would hold the watchdog's sends up.
type notifySocket struct {
	t    *testing.T
	path string
	msgs chan string
}

// endOfNotifications is what the test itself sends last: once it is read,
// so is everything socksfwd sent before.
const endOfNotifications = "TEST=end"

func newNotifySocket(t *testing.T) *notifySocket {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	n := &notifySocket{t: t, path: path, msgs: make(chan string, 10000)}
	done := readNotifications(c, func(msg string) {
		select {
		case n.msgs <- msg:
		default:
			t.Errorf("more than %d notifications", cap(n.msgs))
		}
	})
	t.Cleanup(func() { c.Close(); <-done })
	return n
}

// next returns the next message.
func (n *notifySocket) next() string {
	n.t.Helper()
	select {
	case m := <-n.msgs:
		return m
	case <-time.After(20 * time.Second):
		n.t.Fatal("no notification")
		return ""
	}
}

// expect reads the next message and wants it to be want, exactly.
func (n *notifySocket) expect(want string) {
	n.t.Helper()
	if got := n.next(); got != want {
		n.t.Fatalf("notification %q, want %q", got, want)
	}
}

// rest returns the messages not read yet: once socksfwd has exited, every
// one it sent.
func (n *notifySocket) rest() []string {
	n.t.Helper()
	c, err := net.Dial("unixgram", n.path)
	if err != nil {
		n.t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte(endOfNotifications)); err != nil {
		n.t.Fatal(err)
	}
	var msgs []string
	for range cap(n.msgs) {
		m := n.next()
		if m == endOfNotifications {
			return msgs
		}
		msgs = append(msgs, m)
	}
	n.t.Fatal("the notifications never end")
	return nil
}

func mapEnv(env map[string]string) func(string) string {
	return func(k string) string { return env[k] }
}

func monotonicUsec(t *testing.T) int64 {
	t.Helper()
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		t.Fatal(err)
	}
	return ts.Nano() / 1000
}

// expectReloading checks a RELOADING=1 message: its MONOTONIC_USEC is the
// clock when the reload began, between the test's readings around it.
func (n *notifySocket) expectReloading(before int64) {
	n.t.Helper()
	lines := strings.Split(n.next(), "\n")
	after := monotonicUsec(n.t)
	if len(lines) != 3 || lines[0] != "RELOADING=1" || lines[2] != "STATUS=reloading the configuration" {
		n.t.Fatalf("notification %q, want RELOADING=1, MONOTONIC_USEC and STATUS", lines)
	}
	v, ok := strings.CutPrefix(lines[1], "MONOTONIC_USEC=")
	usec, err := strconv.ParseInt(v, 10, 64)
	if !ok || err != nil || usec < before || usec > after {
		n.t.Fatalf("%q: want MONOTONIC_USEC between %d and %d", lines[1], before, after)
	}
}

// TestNotifySequence: under systemd (NOTIFY_SOCKET) socksfwd says READY
// once its listeners are bound, RELOADING with the monotonic time on
// SIGHUP and READY again after the reload, whether it succeeded or failed,
// and STOPPING when the drain begins; each with a one-line STATUS.
func TestNotifySequence(t *testing.T) {
	verifyNoLeaks(t)
	echo := testnet.Echo(t).Addr().String()
	socks := newSocks(t)
	p1, p2 := freePort(t), freePort(t)
	conf := func(ports ...string) string {
		var locals []string
		for _, p := range ports {
			locals = append(locals, fmt.Sprintf("%q", "127.0.0.1:"+p+":"+echo))
		}
		return fmt.Sprintf("server = [%q]\nlocal = [%s]\n", socks.Addr(), strings.Join(locals, ", "))
	}
	path := filepath.Join(t.TempDir(), "socksfwd.toml")
	if err := os.WriteFile(path, []byte(conf(p1)), 0o600); err != nil {
		t.Fatal(err)
	}
	ns := newNotifySocket(t)
	d := startDaemonEnv(t, mapEnv(map[string]string{"NOTIFY_SOCKET": ns.path}), "-c", path)

	ns.expect("READY=1\nSTATUS=1 listener via " + socks.Addr())
	// READY means bound: a client may connect at once.
	if err := echoOnce("127.0.0.1:"+p1, "right after READY"); err != nil {
		t.Fatal(err)
	}

	before := monotonicUsec(t)
	if err := os.WriteFile(path, []byte(conf(p1, p2)), 0o600); err != nil {
		t.Fatal(err)
	}
	d.sigs <- syscall.SIGHUP
	ns.expectReloading(before)
	ns.expect("READY=1\nSTATUS=reloaded: 2 listeners via " + socks.Addr())
	if err := echoOnce("127.0.0.1:"+p2, "right after the reload"); err != nil {
		t.Fatal(err)
	}

	before = monotonicUsec(t)
	if err := os.WriteFile(path, []byte("server = [\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	d.sigs <- syscall.SIGHUP
	ns.expectReloading(before)
	msg := ns.next()
	if !strings.HasPrefix(msg, "READY=1\nSTATUS=reload failed, configuration kept (") || !strings.Contains(msg, "socksfwd.toml") ||
		!strings.HasSuffix(msg, "): 2 listeners via "+socks.Addr()) || strings.Count(msg, "\n") != 1 {
		t.Fatalf("after a failed reload: %q, want READY=1 and a one-line STATUS naming the file", msg)
	}

	if code := d.stop(); code != exitOK {
		t.Fatalf("exit %d", code)
	}
	ns.expect("STOPPING=1\nSTATUS=stopping: draining sessions")
	if rest := ns.rest(); len(rest) > 0 {
		t.Errorf("notifications after STOPPING: %q", rest)
	}
}

// TestNotifyWatchdog: with WATCHDOG_USEC set, WATCHDOG=1 follows READY
// again and again until the process ends.
func TestNotifyWatchdog(t *testing.T) {
	verifyNoLeaks(t)
	echo := testnet.Echo(t).Addr().String()
	socks := newSocks(t)
	ns := newNotifySocket(t)
	env := map[string]string{"NOTIFY_SOCKET": ns.path, "WATCHDOG_USEC": "20000"} // a ping every 10 ms
	d := startDaemonEnv(t, mapEnv(env), "-S", socks.Addr(), "-L", "127.0.0.1:0:"+echo)
	ns.expect("READY=1\nSTATUS=1 listener via " + socks.Addr())
	for range 5 {
		ns.expect("WATCHDOG=1")
	}
	if code := d.stop(); code != exitOK {
		t.Fatalf("exit %d", code)
	}
	stopping := false
	for _, m := range ns.rest() {
		switch {
		case m == "WATCHDOG=1":
		case !stopping && strings.HasPrefix(m, "STOPPING=1\n"):
			stopping = true
		default:
			t.Errorf("unexpected notification %q", m)
		}
	}
	if !stopping {
		t.Error("no STOPPING=1")
	}
}

// TestNotifyWatchdogStopsWhileStuck: the supervisor's own loop pings the
// watchdog, so a supervisor stuck in a reload (here on a password file that
// is a FIFO nobody writes) sends no WATCHDOG=1 until it is free again, and
// systemd would restart it. Before, a goroutine of its own pinged on.
func TestNotifyWatchdogStopsWhileStuck(t *testing.T) {
	echo := testnet.Echo(t).Addr().String()
	socks := newSocks(t)
	dir := t.TempDir()
	fifo := filepath.Join(dir, "password")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "socksfwd.toml")
	conf := fmt.Sprintf("server = [%q]\nlocal = [%q]\n", socks.Addr(), "127.0.0.1:0:"+echo)
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	ns := newNotifySocket(t)
	env := map[string]string{"NOTIFY_SOCKET": ns.path, "WATCHDOG_USEC": "20000"} // a ping every 10 ms
	d := startDaemonEnv(t, mapEnv(env), "-c", path)
	ns.expect("READY=1\nSTATUS=1 listener via " + socks.Addr())
	ns.expect("WATCHDOG=1")

	stuck := conf + fmt.Sprintf("server-user = \"u\"\nserver-password-file = %q\n", fifo)
	if err := os.WriteFile(path, []byte(stuck), 0o600); err != nil {
		t.Fatal(err)
	}
	d.sigs <- syscall.SIGHUP
	for m := ns.next(); !strings.HasPrefix(m, "RELOADING=1\n"); m = ns.next() {
		if m != "WATCHDOG=1" {
			t.Fatalf("notification %q before RELOADING", m)
		}
	}
	// Time passing is what is tested: twenty ping intervals of a stuck
	// reload.
	time.Sleep(200 * time.Millisecond)
	w, err := os.OpenFile(fifo, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	w.WriteString("secret\n")
	w.Close()
	if m := ns.next(); !strings.HasPrefix(m, "READY=1\n") {
		t.Fatalf("notification %q while the reload was stuck, want none until its READY=1", m)
	}
	if code := d.stop(); code != exitOK {
		t.Fatalf("exit %d", code)
	}
}
