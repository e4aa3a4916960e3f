package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/socksfwd/socksfwd/internal/peertest"
	"github.com/socksfwd/socksfwd/internal/sockbuf"
	"github.com/socksfwd/socksfwd/internal/testnet"
	"github.com/socksfwd/socksfwd/socksclient"
	"github.com/socksfwd/socksfwd/tunnel"
)

// passFile returns a duplicate of a socket the test bound, as systemd
// passes one, and closes the test's own descriptor.
func passFile(t *testing.T, c interface {
	File() (*os.File, error)
	Close() error
}) *os.File {
	t.Helper()
	f, err := c.File()
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	return f
}

func sockopt(t *testing.T, c syscall.Conn, level, opt int) int {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var v int
	var gerr error
	rc.Control(func(fd uintptr) { v, gerr = unix.GetsockoptInt(int(fd), level, opt) })
	if gerr != nil {
		t.Fatal(gerr)
	}
	return v
}

// TestAdoptPassedSockets: a listener given a socket systemd passed serves
// that socket with what a bind here would have set (small loopback
// buffers, no keep-alive probes, the transparent options), a DNS listener
// given only its UDP socket binds the TCP one at the same address, the
// socket outlives the listener that served it (a reload may add it back),
// and close releases it.
func TestAdoptPassedSockets(t *testing.T) {
	verifyNoLeaks(t)
	tcpLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tcpAddr := tcpLn.Addr().String()
	// The DNS listener binds TCP at its UDP socket's port, and the
	// transparent pair shares one port: ports below the ephemeral range,
	// which no outgoing connection of a parallel test can hold.
	dnsPC, err := net.ListenPacket("udp", net.JoinHostPort("127.0.0.1", strconv.Itoa(peertest.FreePort(t))))
	if err != nil {
		t.Fatal(err)
	}
	dnsAddr := dnsPC.LocalAddr().String()
	tpLn, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(peertest.FreePort(t))))
	if err != nil {
		t.Fatal(err)
	}
	tpPC, err := net.ListenPacket("udp", tpLn.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	tpAddr := tpLn.Addr().String()
	files := []*os.File{passFile(t, tcpLn.(*net.TCPListener)), passFile(t, dnsPC.(*net.UDPConn)), passFile(t, tpLn.(*net.TCPListener)), passFile(t, tpPC.(*net.UDPConn))}

	cfg := defaultConfig()
	cfg.Server = []string{"127.0.0.1:1080"}
	cfg.Local = []string{tcpAddr + ":db:5432"}
	cfg.DNS = dnsAddr
	cfg.DNSUpstream = []string{"10.0.0.53"}
	cfg.Transparent = []string{tpAddr, tpAddr + "/udp"}
	p, err := buildPlan(cfg)
	if err != nil {
		t.Fatal(err)
	}
	passed, err := passedSockets(files)
	sd := &systemd{passed: passed}
	defer sd.close()
	if err != nil {
		t.Fatal(err)
	}
	if err := matchPassed(passed, p.listens); err != nil {
		t.Fatal(err)
	}
	s := newSupervisor(zerolog.Nop(), nil)
	s.sd, s.plan, s.ups = sd, p, socksclient.NewUpstreams(p.dialers...)
	listener := func(kind listenKind) listenPlan {
		for _, l := range p.listens {
			if l.kind == kind {
				return l
			}
		}
		t.Fatalf("no %s listener in the plan", kind)
		return listenPlan{}
	}

	for round := range 2 { // the second time, after the first closed its sockets
		socks, err := s.open(listener(kindTCP))
		if err != nil {
			t.Fatal(err)
		}
		if got := socks.ln.Addr().String(); got != tcpAddr {
			t.Fatalf("round %d: listening on %s, want the passed %s", round, got, tcpAddr)
		}
		ln := socks.ln.(syscall.Conn)
		if got := sockopt(t, ln, unix.SOL_SOCKET, unix.SO_RCVBUF); got != 2*sockbuf.LoopbackTCPSize {
			t.Errorf("round %d: SO_RCVBUF %d, want the loopback cap (%d, doubled by the kernel)", round, got, 2*sockbuf.LoopbackTCPSize)
		}
		c, err := net.Dial("tcp", tcpAddr)
		if err != nil {
			t.Fatal(err)
		}
		accepted, err := socks.ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		if sockopt(t, accepted.(syscall.Conn), unix.SOL_SOCKET, unix.SO_KEEPALIVE) != 0 {
			t.Errorf("round %d: keep-alive probes on an accepted connection", round)
		}
		accepted.Close()
		c.Close()
		socks.close()
	}

	socks, err := s.open(listener(kindDNS))
	if err != nil {
		t.Fatal(err)
	}
	if socks.pc.LocalAddr().String() != dnsAddr || socks.ln.Addr().String() != dnsAddr {
		t.Errorf("DNS on udp %s and tcp %s, want both on the passed %s", socks.pc.LocalAddr(), socks.ln.Addr(), dnsAddr)
	}
	socks.close()

	// Transparent listeners: the passed sockets get IP_TRANSPARENT (root
	// may set it) and, for UDP, the original destination of each datagram.
	peertest.RequireRoot(t)
	socks, err = s.open(listener(kindTransparent))
	if err != nil {
		t.Fatal(err)
	}
	if !tunnel.IsTransparent(socks.ln) {
		t.Error("the passed transparent TCP socket has no IP_TRANSPARENT")
	}
	socks.close()
	socks, err = s.open(listener(kindTransparentUDP))
	if err != nil {
		t.Fatal(err)
	}
	if sockopt(t, socks.pc, unix.SOL_IP, unix.IP_TRANSPARENT) != 1 || sockopt(t, socks.pc, unix.SOL_IP, unix.IP_RECVORIGDSTADDR) != 1 {
		t.Error("the passed transparent UDP socket lacks IP_TRANSPARENT or IP_RECVORIGDSTADDR")
	}
	socks.close()

	// Once closed, nothing holds the addresses any more.
	sd.close()
	again, err := net.Listen("tcp", tcpAddr)
	if err != nil {
		t.Fatalf("after close, %s is still held: %v", tcpAddr, err)
	}
	again.Close()
}

// activated is socksfwd started by systemd-socket-activate, which binds
// the sockets, waits for a first client and then executes socksfwd with
// them (LISTEN_FDS), as systemd does with a .socket unit.
type activated struct {
	t      *testing.T
	cmd    *exec.Cmd
	exited chan error

	mu    sync.Mutex
	lines []string // stderr: systemd-socket-activate's, then socksfwd's
	added chan struct{}
}

func startActivated(t *testing.T, activateArgs []string, args ...string) *activated {
	t.Helper()
	bin := peertest.Require(t, "systemd-socket-activate")
	// testscript's TestMain put a "socksfwd" (this test binary, which then
	// runs main) first on PATH, which systemd-socket-activate passes on.
	argv := append(append(activateArgs, "socksfwd", "--log-format", "json"), args...)
	a := &activated{t: t, cmd: exec.Command(bin, argv...), exited: make(chan error, 1), added: make(chan struct{}, 1)}
	stderr, err := a.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := a.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			a.mu.Lock()
			a.lines = append(a.lines, sc.Text())
			a.mu.Unlock()
			select {
			case a.added <- struct{}{}:
			default:
			}
		}
		a.exited <- a.cmd.Wait() // after the last read, as StderrPipe wants
	}()
	t.Cleanup(func() {
		a.cmd.Process.Kill()
		<-a.exited
	})
	return a
}

// waitLine waits until n lines of stderr start with prefix.
func (a *activated) waitLine(prefix string, n int) {
	a.t.Helper()
	deadline := time.After(20 * time.Second)
	for {
		a.mu.Lock()
		k := 0
		for _, l := range a.lines {
			if strings.HasPrefix(l, prefix) {
				k++
			}
		}
		a.mu.Unlock()
		if k >= n {
			return
		}
		select {
		case <-a.added:
		case err := <-a.exited:
			a.exited <- err
			a.t.Fatalf("exited (%v) before %d lines %q: %q", err, n, prefix, a.lines)
		case <-deadline:
			a.t.Fatalf("no %d lines %q: %q", n, prefix, a.lines)
		}
	}
}

// stop sends SIGTERM and returns socksfwd's log lines and how the process
// exited.
func (a *activated) stop() ([]map[string]any, error) {
	a.t.Helper()
	a.cmd.Process.Signal(syscall.SIGTERM)
	var err error
	select {
	case err = <-a.exited:
		a.exited <- err // for the cleanup
	case <-time.After(30 * time.Second):
		a.t.Fatal("socksfwd did not stop after SIGTERM")
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	var lines []map[string]any
	for _, l := range a.lines {
		var m map[string]any
		if json.Unmarshal([]byte(l), &m) == nil {
			lines = append(lines, m)
		}
	}
	return lines, err
}

// TestSocketActivation: socksfwd started by systemd-socket-activate serves
// the socket it was given: a client's connection, queued before socksfwd
// even ran, goes through microsocks to the echo server. A reload that
// removes the listener keeps the socket open, and one that adds the
// listener back serves that same socket, connections queued meanwhile
// included; a new listener binds as usual. The real process talks to the
// notify socket through its environment.
func TestSocketActivation(t *testing.T) {
	verifyNoLeaks(t)
	if testing.Short() {
		t.Skip("starts real servers")
	}
	micro := peertest.Microsocks(t, peertest.MicrosocksOptions{})
	echo := testnet.Echo(t).Addr().String()
	p1, p2 := freePort(t), freePort(t)
	conf := func(ports ...string) string {
		var locals []string
		for _, p := range ports {
			locals = append(locals, fmt.Sprintf("%q", "127.0.0.1:"+p+":"+echo))
		}
		return fmt.Sprintf("server = [%q]\nlocal = [%s]\n", micro.Addr, strings.Join(locals, ", "))
	}
	path := filepath.Join(t.TempDir(), "socksfwd.toml")
	write := func(config string) {
		t.Helper()
		if err := os.WriteFile(path, []byte(config), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(conf(p1))
	ns := newNotifySocket(t)
	a := startActivated(t, []string{"-l", "127.0.0.1:" + p1, "-E", "NOTIFY_SOCKET=" + ns.path}, "-c", path)
	a.waitLine("Listening on", 1)

	// The first client is what makes systemd-socket-activate start socksfwd.
	// (microsocks ends a session at the first FIN: hold exchanges without.)
	hold(t, "127.0.0.1:"+p1).c.Close()
	ns.expect("READY=1\nSTATUS=1 listener via " + micro.Addr)

	reload := func(config, status string) {
		t.Helper()
		write(config)
		a.cmd.Process.Signal(syscall.SIGHUP)
		if got := ns.next(); !strings.HasPrefix(got, "RELOADING=1\nMONOTONIC_USEC=") {
			t.Fatalf("notification %q, want RELOADING=1", got)
		}
		ns.expect("READY=1\nSTATUS=" + status)
	}
	reload(conf(p2), "reloaded: 1 listener via "+micro.Addr)
	hold(t, "127.0.0.1:"+p2).c.Close()
	// The removed listener's socket stays open, as under systemd (which
	// keeps its copy): a client connects and waits in its queue...
	waiting, err := net.Dial("tcp", "127.0.0.1:"+p1)
	if err != nil {
		t.Fatalf("the removed listener's socket was closed: %v", err)
	}
	defer waiting.Close()
	if _, err := waiting.Write([]byte("queued")); err != nil {
		t.Fatal(err)
	}
	// ...until a reload adds the listener back on that very socket.
	reload(conf(p1, p2), "reloaded: 2 listeners via "+micro.Addr)
	waiting.SetDeadline(time.Now().Add(20 * time.Second))
	buf := make([]byte, len("queued"))
	if _, err := io.ReadFull(waiting, buf); err != nil || string(buf) != "queued" {
		t.Fatalf("the connection queued while the listener was gone: %q, %v", buf, err)
	}
	waiting.Close() // the drain waits for every session
	hold(t, "127.0.0.1:"+p1).c.Close()

	lines, err := a.stop()
	if err != nil {
		t.Fatalf("exit: %v", err)
	}
	ns.expect("STOPPING=1\nSTATUS=stopping: draining sessions")
	var fromSystemd, bound int
	for _, l := range lines {
		if msg, _ := l["message"].(string); !strings.HasPrefix(msg, "forwarding") {
			continue
		}
		switch l["listener"] {
		case "127.0.0.1:" + p1:
			if l["systemd_socket"] == true {
				fromSystemd++
			}
		case "127.0.0.1:" + p2:
			if l["systemd_socket"] == nil {
				bound++
			}
		}
	}
	if fromSystemd != 2 || bound != 1 {
		t.Errorf("%d forwarding lines on the activated socket (want 2, at start and after the reload) and %d on the bound one (want 1); log: %v", fromSystemd, bound, lines)
	}
}

// TestSystemdUnits: systemd-analyze verifies contrib/systemd as shipped
// (but for the binary's path, which must exist) and rates the sandbox's
// exposure at 2.0 or less (it was 1.6), with no warning: the unit is for
// every systemd (Type=notify and ExecReload; notify-reload needs 253).
func TestSystemdUnits(t *testing.T) {
	analyze := peertest.Require(t, "systemd-analyze")
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for _, name := range []string{"socksfwd.service", "socksfwd.socket"} {
		b, err := os.ReadFile(filepath.Join("..", "..", "contrib", "systemd", name))
		if err != nil {
			t.Fatal(err)
		}
		b = bytes.ReplaceAll(b, []byte("ExecStart=/usr/local/bin/socksfwd "), []byte("ExecStart="+self+" "))
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	out, err := exec.Command(analyze, "--version").Output()
	if err != nil {
		t.Fatal(err)
	}
	var version int
	fmt.Sscanf(string(out), "systemd %d", &version)
	out, err = exec.Command(analyze, "verify", "--man=no", filepath.Join(dir, "socksfwd.service"), filepath.Join(dir, "socksfwd.socket")).CombinedOutput()
	if err != nil {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if line == "" {
			continue
		}
		t.Errorf("systemd %d, verify: %s", version, line)
	}
	out, err = exec.Command(analyze, "security", "--offline=yes", "--threshold=20", filepath.Join(dir, "socksfwd.service")).CombinedOutput()
	if err != nil {
		t.Errorf("systemd-analyze security: %v\n%s", err, out)
	}
}
