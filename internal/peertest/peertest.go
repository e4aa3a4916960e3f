// Package peertest starts real peers for interop tests and benchmarks:
// Dante (danted), microsocks, OpenSSH's ssh -D against a throwaway sshd,
// and PostgreSQL, each on a free loopback port with a generated config,
// stopped in cleanup.
//
// A peer whose program is missing skips the test, or fails it when
// CI=true, where every real-peer test must run. Facts about each peer that
// bite are in shared/spec/NOTES.md.
package peertest

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// TB is what peertest needs from a test: satisfied by testing.TB, and by
// small adapters in testscript commands and cmd/socksbench.
type TB interface {
	Helper()
	Fatalf(format string, args ...any)
	Skipf(format string, args ...any)
	Logf(format string, args ...any)
	Cleanup(func())
	TempDir() string
}

// startTimeout bounds how long a peer may take to accept connections.
const startTimeout = 30 * time.Second

// Require finds a program, or skips (fails under CI=true) when missing.
func Require(t TB, program string) string {
	t.Helper()
	path, err := exec.LookPath(program)
	if err != nil {
		Missing(t, "%s is not installed (make deps installs it): %v", program, err)
	}
	return path
}

// Missing skips the test, or fails it under CI=true, for something the
// machine lacks (a program, root, an IPv6 loopback): under CI every
// real-peer test must run, so a skip there would hide a lost test.
func Missing(t TB, format string, args ...any) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf("CI=true requires every peer: "+format, args...)
	}
	t.Skipf(format, args...)
}

// RequireRoot skips (fails under CI) unless running as root, which Dante's
// username method, sshd and unshare need.
func RequireRoot(t TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Missing(t, "needs root")
	}
}

// FreePort returns a loopback port that was free a moment ago.
//
// Ports are handed out from below the kernel's ephemeral range, one after
// the other: a port the kernel picked for a listener and that was closed
// again is the next ephemeral port an outgoing connection of a parallel
// test may take before the caller binds it, which made tests fail with
// "address already in use". Below the range no outgoing connection takes
// it, and no two callers in this process get the same one.
func FreePort(t TB) int {
	t.Helper()
	if hi := ephemeralStart(); hi >= belowEphemeralLow+1000 {
		lo := belowEphemeralLow
		for range 200 {
			port := lo + int(nextPort.Add(1))%(hi-lo)
			if freeOnBoth(port) {
				return port
			}
		}
	}
	// Free on UDP too: peers such as dnsmasq bind both, and an ephemeral
	// UDP socket of another test may hold a number TCP has free.
	for range 20 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("free port: %v", err)
		}
		port := ln.Addr().(*net.TCPAddr).Port
		ln.Close()
		if freeOnBoth(port) {
			return port
		}
	}
	t.Fatalf("free port: no port free on both TCP and UDP in 20 tries")
	return 0
}

// nextPort counts the ports FreePort has tried; it starts at a number of
// this process's own, so that test binaries run one after the other do
// not walk the same ports while the last one's are in TIME_WAIT.
var nextPort = func() *atomic.Int32 {
	var n atomic.Int32
	n.Store(int32(os.Getpid() % 4096 * 3))
	return &n
}()

// FreePort hands out ports from belowEphemeralLow up to ephemeralStart,
// the start of the kernel's ephemeral range (Linux's
// ip_local_port_range, 32768 by default), when there is room.
const belowEphemeralLow = 20000

// ephemeralStart is the first ephemeral port, 0 where it cannot be read;
// read once.
var ephemeralStart = sync.OnceValue(func() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 0
	}
	fields := strings.Fields(string(b))
	if len(fields) != 2 {
		return 0
	}
	start, _ := strconv.Atoi(fields[0])
	return start
})

// freeOnBoth reports whether port is free on loopback for TCP and UDP.
func freeOnBoth(port int) bool {
	ln, err := net.Listen("tcp", hostPort(port))
	if err != nil {
		return false
	}
	defer ln.Close()
	pc, err := net.ListenPacket("udp", hostPort(port))
	if err != nil {
		return false
	}
	pc.Close()
	return true
}

// StartListening starts a peer whose command line argv(port) makes it
// listen on port (TCP and maybe UDP), and waits until it accepts TCP
// connections. A port taken between choosing and binding it (by another
// test's socket) gets a new one, up to three times.
func StartListening(t TB, name string, argv func(port int) []string) (*Proc, string) {
	t.Helper()
	for attempt := 1; ; attempt++ {
		port := FreePort(t)
		addr := hostPort(port)
		p := Start(t, name, argv(port)...)
		err := waitTCP(p, addr)
		if err == nil {
			return p, addr
		}
		if attempt < 3 && p.Exited() && strings.Contains(p.Output(), "in use") {
			continue
		}
		t.Fatalf("%v", err)
	}
}

// Proc is a running peer process.
type Proc struct {
	Name string
	cmd  *exec.Cmd
	out  *syncBuffer
	done chan struct{}
	err  error
}

// Pid is the process id.
func (p *Proc) Pid() int { return p.cmd.Process.Pid }

// Signal sends sig to the process (not its group).
func (p *Proc) Signal(sig os.Signal) error { return p.cmd.Process.Signal(sig) }

// Wait waits for the process to end, at most d, and reports whether it did.
func (p *Proc) Wait(d time.Duration) bool {
	select {
	case <-p.done:
		return true
	case <-time.After(d):
		return false
	}
}

// Output is what the process printed so far.
func (p *Proc) Output() string { return p.out.String() }

// Exited reports whether the process has ended.
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Stop ends the process group: SIGTERM, then SIGKILL after 5 s.
func (p *Proc) Stop() {
	if p.Exited() {
		return
	}
	terminateGroup(p.cmd.Process)
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		killGroup(p.cmd.Process)
		<-p.done
	}
}

// Start runs argv in its own process group, stopped in cleanup.
func Start(t TB, name string, argv ...string) *Proc {
	t.Helper()
	cmd := exec.Command(argv[0], argv[1:]...)
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = groupAttr()
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	p := &Proc{Name: name, cmd: cmd, out: out, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(p.Stop)
	return p
}

// WaitTCP waits until addr accepts connections, failing if p exits first.
func WaitTCP(t TB, p *Proc, addr string) {
	t.Helper()
	if err := waitTCP(p, addr); err != nil {
		t.Fatalf("%v", err)
	}
}

func waitTCP(p *Proc, addr string) error {
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	for {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", addr)
		if err == nil {
			c.Close()
			if p == nil || groupListens(p.Pid(), portOf(addr)) {
				return nil
			}
			// Another process took the port: the peer fails to bind and
			// exits, and StartListening tries another port.
		}
		if p != nil && p.Exited() {
			return fmt.Errorf("%s exited before listening on %s: %v\n%s", p.Name, addr, p.err, p.Output())
		}
		select {
		case <-ctx.Done():
			out := ""
			if p != nil {
				out = p.Output()
			}
			return fmt.Errorf("%s not listening on %s after %s\n%s", nameOf(p), addr, startTimeout, out)
		case <-time.After(20 * time.Millisecond): // a readiness probe, bounded by startTimeout
		}
	}
}

func portOf(addr string) int {
	_, port, _ := net.SplitHostPort(addr)
	n, _ := strconv.Atoi(port)
	return n
}

// WaitOutput waits until p has printed s, for peers that must not be
// probed with a connection (iperf3 -s takes any connection as a test).
func WaitOutput(t TB, p *Proc, s string) {
	t.Helper()
	deadline := time.Now().Add(startTimeout)
	for !strings.Contains(p.Output(), s) {
		if p.Exited() {
			t.Fatalf("%s exited: %v\n%s", p.Name, p.err, p.Output())
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not print %q after %s\n%s", p.Name, s, startTimeout, p.Output())
		}
		time.Sleep(20 * time.Millisecond) // a readiness probe, bounded by startTimeout
	}
}

func nameOf(p *Proc) string {
	if p == nil {
		return "peer"
	}
	return p.Name
}

// WithHosts runs argv so that the program alone sees extra /etc/hosts
// entries (name → IP): a private mount namespace with a bind-mounted hosts
// file. That is how a target name is made resolvable by the proxy only,
// never by socksfwd.
func WithHosts(t TB, hosts map[string]string, argv ...string) []string {
	t.Helper()
	if len(hosts) == 0 {
		return argv
	}
	base, err := os.ReadFile("/etc/hosts")
	if err != nil {
		t.Fatalf("read /etc/hosts: %v", err)
	}
	return withHostsFile(t, base, hosts, argv)
}

// WithOnlyHosts is WithHosts with the given entries in place of the
// system's /etc/hosts, so that a name this host resolves (localhost) can
// mean another address to the program.
func WithOnlyHosts(t TB, hosts map[string]string, argv ...string) []string {
	t.Helper()
	return withHostsFile(t, nil, hosts, argv)
}

func withHostsFile(t TB, base []byte, hosts map[string]string, argv []string) []string {
	t.Helper()
	RequireRoot(t)
	Require(t, "unshare")
	var b bytes.Buffer
	b.Write(base)
	for name, ip := range hosts {
		fmt.Fprintf(&b, "\n%s %s\n", ip, name)
	}
	path := filepath.Join(t.TempDir(), "hosts")
	if err := os.WriteFile(path, b.Bytes(), 0o644); err != nil {
		t.Fatalf("write hosts: %v", err)
	}
	script := `mount --bind "$0" /etc/hosts && exec "$@"`
	return append([]string{"unshare", "--mount", "--propagation", "private", "sh", "-c", script, path}, argv...)
}

// writeFile writes a generated config file.
func writeFile(t TB, dir, name, content string) string {
	t.Helper()
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatalf("write %s: %v", path, err)
	}
	return path
}

func runCmd(argv ...string) error {
	out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%v: %w: %s", argv, err, bytes.TrimSpace(out))
	}
	return nil
}

// TestUser is a system account for username authentication (Dante checks
// system passwords) and for sshd logins. Its password holds the characters
// that proxy URLs must escape.
const (
	TestUser     = "sfwdtest"
	TestPassword = "p@ss:w/rd%"
)

var userOnce sync.Once

// EnsureTestUser creates TestUser with TestPassword, once per process.
func EnsureTestUser(t TB) {
	t.Helper()
	RequireRoot(t)
	var err error
	userOnce.Do(func() {
		if exec.Command("id", TestUser).Run() != nil {
			if err = runCmd("useradd", "--system", "--shell", "/bin/sh", "--home-dir", "/nonexistent", "--no-create-home", TestUser); err != nil {
				return
			}
		}
		cmd := exec.Command("chpasswd")
		cmd.Stdin = bytes.NewBufferString(TestUser + ":" + TestPassword + "\n")
		if out, e := cmd.CombinedOutput(); e != nil {
			err = fmt.Errorf("chpasswd: %w: %s", e, out)
		}
	})
	if err != nil {
		t.Fatalf("test user: %v", err)
	}
}

func hostPort(port int) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(port)) }

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.b.Len() > 1<<20 {
		return len(p), nil // keep the tail of a chatty peer out of memory
	}
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
