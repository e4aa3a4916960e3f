package tunnel

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/socksfwd/socksfwd/internal/peertest"
	"github.com/socksfwd/socksfwd/internal/testnet"
	"github.com/socksfwd/socksfwd/socksclient/sockstest"
)

// netnsEnv names the network namespace a test binary was re-run in.
const netnsEnv = "TUNNEL_TEST_NETNS"

// inFreshNetns reports whether the test runs in a network namespace of its
// own, where it may change routes and netfilter rules. If not, it re-runs
// this one test there (root, ip(8) and nft needed; without them the test
// skips, or fails under CI=true) and reports false: the caller returns.
func inFreshNetns(t *testing.T) bool {
	t.Helper()
	if os.Getenv(netnsEnv) != "" {
		return true
	}
	peertest.RequireRoot(t)
	peertest.Require(t, "ip")
	peertest.Require(t, "nft")
	name := fmt.Sprintf("tunneltest-%d-%s", os.Getpid(), t.Name())
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	rerun(t, netnsEnv+"="+name, "ip", "netns", "exec", name)
	return false
}

// rerun runs this one test again in a child test binary started through
// the command prefix, with env added, and fails unless it passes there.
func rerun(t *testing.T, env string, prefix ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	argv := append(prefix, os.Args[0], "-test.run", "^"+t.Name()+"$", "-test.count=1", "-test.v", "-test.timeout=90s")
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	// The race detector's exit pause (1 s) is no use to a child.
	cmd.Env = append(os.Environ(), env, "GORACE="+os.Getenv("GORACE")+" atexit_sleep_ms=0")
	out, err := cmd.CombinedOutput()
	t.Logf("%s:\n%s", strings.Join(prefix, " "), out)
	if err != nil {
		t.Fatalf("rerun through %s: %v", strings.Join(prefix, " "), err)
	}
	if !strings.Contains(string(out), "--- PASS: "+t.Name()) {
		t.Fatalf("rerun through %s did not pass", strings.Join(prefix, " "))
	}
}

// run runs a command of the test's netns setup.
func run(t *testing.T, stdin string, argv ...string) {
	t.Helper()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdin = strings.NewReader(stdin)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s: %v %s", strings.Join(argv, " "), err, out)
	}
}

// routeTestNetsToLo brings up the namespace's loopback and routes
// 198.51.100.0/24 and 2001:db8::/64, documentation ranges, through it: an
// app's connection there stands for one to a remote host, for netfilter
// to capture. The source is loopback's address; without it the kernel
// would pick none (loopback's addresses have host scope) and connect from
// 0.0.0.0.
func routeTestNetsToLo(t *testing.T) {
	t.Helper()
	run(t, "", "ip", "link", "set", "lo", "up")
	run(t, "", "ip", "route", "add", "198.51.100.0/24", "dev", "lo", "src", "127.0.0.1")
	run(t, "", "ip", "-6", "route", "add", "2001:db8::/64", "dev", "lo", "src", "::1")
}

// listenTransparent is ListenTransparent on addr until the test's end.
func listenTransparent(t *testing.T, addr string) net.Listener {
	t.Helper()
	ln, err := ListenTransparent(context.Background(), "tcp", addr, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// portOf is a listener's port.
func portOf(ln net.Listener) uint16 { return ln.Addr().(*net.TCPAddr).AddrPort().Port() }

// acceptVia dials dst and returns the connection ln accepted for it
// (netfilter sent it there) and the client's end.
func acceptVia(t *testing.T, ln net.Listener, dst string) (accepted, client net.Conn) {
	t.Helper()
	client, err := net.DialTimeout("tcp", dst, 10*time.Second)
	if err != nil {
		t.Fatalf("dial %s: %v", dst, err)
	}
	t.Cleanup(func() { client.Close() })
	ln.(*net.TCPListener).SetDeadline(time.Now().Add(10 * time.Second))
	accepted, err = ln.Accept()
	if err != nil {
		t.Fatalf("accept for %s: %v", dst, err)
	}
	t.Cleanup(func() { accepted.Close() })
	if unmapped(accepted.RemoteAddr()) != unmapped(client.LocalAddr()) {
		t.Fatalf("accepted a connection from %s, want the client %s", accepted.RemoteAddr(), client.LocalAddr())
	}
	return accepted, client
}

func unmapped(a net.Addr) netip.AddrPort {
	ap := a.(*net.TCPAddr).AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// wantOriginal checks the original destination of a connection to dst.
func wantOriginal(t *testing.T, ln net.Listener, dst string) net.Conn {
	t.Helper()
	c, _ := acceptVia(t, ln, dst)
	got, err := OriginalDestination(c)
	if err != nil {
		t.Fatalf("connection to %s: %v", dst, err)
	}
	if want := netip.MustParseAddrPort(dst); got != want {
		t.Errorf("connection to %s (accepted on %s): original destination %s", dst, c.LocalAddr(), got)
	}
	if !got.Addr().Is4() && !got.Addr().Is6() || got.Addr().Is4In6() {
		t.Errorf("original destination %s is mapped", got)
	}
	return c
}

// noNetAdminEnv marks a test binary re-run without CAP_NET_ADMIN and
// CAP_NET_RAW.
const noNetAdminEnv = "TUNNEL_TEST_NO_NET_ADMIN"

// TestListenTransparentWithoutPermission: without the capability for
// IP_TRANSPARENT the listener still opens (REDIRECT needs no more), says
// it is not transparent, and serves.
func TestListenTransparentWithoutPermission(t *testing.T) {
	if os.Geteuid() == 0 && os.Getenv(noNetAdminEnv) == "" {
		peertest.Require(t, "setpriv")
		// Root keeps only the capabilities of its bounding set across exec.
		rerun(t, noNetAdminEnv+"=1", "setpriv", "--bounding-set", "-net_admin,-net_raw", "--")
		return
	}
	ln := listenTransparent(t, "127.0.0.1:0")
	if IsTransparent(ln) {
		t.Error("IsTransparent = true without CAP_NET_ADMIN")
	}
	wantOriginal(t, ln, ln.Addr().String())
}

// TestListenTransparentControl: the caller's control runs on the socket
// (its error fails the listen), and accepted connections send no
// keep-alive probes.
func TestListenTransparentControl(t *testing.T) {
	var saw []string
	control := func(network, address string, c syscall.RawConn) error {
		saw = append(saw, network)
		return nil
	}
	ln, err := ListenTransparent(context.Background(), "tcp4", "127.0.0.1:0", control)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	if len(saw) != 1 || saw[0] != "tcp4" {
		t.Errorf("control saw %v, want one tcp4 socket", saw)
	}
	c, _ := acceptVia(t, ln, ln.Addr().String())
	keepAlive := -1
	rc, err := c.(syscall.Conn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	rc.Control(func(fd uintptr) { keepAlive, err = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_KEEPALIVE) })
	if err != nil || keepAlive != 0 {
		t.Errorf("SO_KEEPALIVE = %d (%v) on an accepted connection, want 0", keepAlive, err)
	}

	refused := errors.New("control refused")
	if _, err := ListenTransparent(context.Background(), "tcp", "127.0.0.1:0", func(string, string, syscall.RawConn) error { return refused }); !errors.Is(err, refused) {
		t.Errorf("listen with a failing control: err = %v", err)
	}
}

// TestTransparentRefusesDirectConnection: a connection made straight to a
// transparent listener (no rule sent it) is refused with one log line that
// says so, the client sees a reset, and the proxy sees nothing.
func TestTransparentRefusesDirectConnection(t *testing.T) {
	for _, addr := range []string{"127.0.0.1:0", ":0"} {
		t.Run(addr, func(t *testing.T) {
			ln := listenTransparent(t, addr)
			proxy := newSocks(t, sockstest.Config{})
			listen := ln.Addr().(*net.TCPAddr).AddrPort()
			f, logs := startTargetOfForward(t, ln, TransparentTarget(listen), proxy.Addr())
			expectReset(t, fmt.Sprintf("127.0.0.1:%d", listen.Port()))
			logs.waitFor(t, "session refused")
			if n := strings.Count(logs.String(), "\n"); n != 1 || !strings.Contains(logs.String(), "no rule redirected the connection to socksfwd") {
				t.Errorf("want one line saying no rule redirected the connection, got:\n%s", logs)
			}
			if got, failed := f.Stats().RejectedNotRedirected.Load(), f.Stats().Failed.Load(); got != 1 || failed != 0 {
				t.Errorf("rejected as not redirected %d, failed %d; want 1 and 0", got, failed)
			}
			if n := proxy.Handshakes(); n != 0 {
				t.Errorf("the proxy saw %d handshakes", n)
			}
		})
	}
}

// TestTransparentTargetNotRedirected: the refusal is ErrNotRedirected, for
// the listener's own address and, on a wildcard listener, for any local
// address on its port.
func TestTransparentTargetNotRedirected(t *testing.T) {
	for _, tc := range []struct{ listen, dial string }{
		{"127.0.0.1:0", "127.0.0.1"},
		{"0.0.0.0:0", "127.0.0.1"},
		{"0.0.0.0:0", "127.0.0.2"}, // another local address than the one asked
	} {
		ln := listenTransparent(t, tc.listen)
		listen := ln.Addr().(*net.TCPAddr).AddrPort()
		c, _ := acceptVia(t, ln, fmt.Sprintf("%s:%d", tc.dial, listen.Port()))
		if _, err := TransparentTarget(listen)(c); !errors.Is(err, ErrNotRedirected) {
			t.Errorf("listener %s, connection to %s: err = %v, want ErrNotRedirected", listen, c.LocalAddr(), err)
		}
	}
}

func TestTransparentIsLocalAddr(t *testing.T) {
	for ip, want := range map[string]bool{
		"127.0.0.1":        true,
		"127.0.0.2":        true, // all of 127/8 is local
		"::ffff:127.0.0.1": true,
		"192.0.2.1":        false, // TEST-NET-1
		"2001:db8::1":      false,
	} {
		if got := isLocalAddr(netip.MustParseAddr(ip)); got != want {
			t.Errorf("isLocalAddr(%s) = %v, want %v", ip, got, want)
		}
	}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range addrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil && !isLocalAddr(p.Addr()) {
			t.Errorf("isLocalAddr(%s) = false for an interface's address", p.Addr())
		}
	}
}

// TestOriginalDestinationRedirect: after a real nft REDIRECT, the original
// destination comes from conntrack, for IPv4, IPv6 and IPv4 on a dual-stack
// listener, and a connection straight to the listener is still refused
// when conntrack knows it (no NAT: its original destination is the
// listener).
func TestOriginalDestinationRedirect(t *testing.T) {
	if !inFreshNetns(t) {
		return
	}
	routeTestNetsToLo(t)
	ln4 := listenTransparent(t, "127.0.0.1:0")
	ln6 := listenTransparent(t, "[::1]:0")
	lnDual := listenTransparent(t, "[::]:0")
	run(t, fmt.Sprintf(`
table ip tunneltest {
	chain out {
		type nat hook output priority -100; policy accept;
		ip daddr 127.0.0.1 tcp dport 9 redirect to :%[1]d
		ip daddr 198.51.100.0/24 tcp dport 80 redirect to :%[1]d
		ip daddr 198.51.100.0/24 tcp dport 81 redirect to :%[3]d
	}
}
table ip6 tunneltest {
	chain out {
		type nat hook output priority -100; policy accept;
		ip6 daddr ::1 tcp dport 9 redirect to :%[2]d
		ip6 daddr 2001:db8::/64 tcp dport 80 redirect to :%[2]d
		ip6 daddr 2001:db8::/64 tcp dport 81 redirect to :%[3]d
	}
}`, portOf(ln4), portOf(ln6), portOf(lnDual)), "nft", "-f", "-")

	wantOriginal(t, ln4, "127.0.0.1:9")
	wantOriginal(t, ln4, "198.51.100.7:80")
	wantOriginal(t, ln6, "[::1]:9")
	wantOriginal(t, ln6, "[2001:db8::7]:80")
	wantOriginal(t, lnDual, "198.51.100.7:81") // v4-mapped on the socket, unmapped here
	wantOriginal(t, lnDual, "[2001:db8::7]:81")

	for _, ln := range []net.Listener{ln4, ln6, lnDual} {
		listen := ln.Addr().(*net.TCPAddr).AddrPort()
		dst := listen
		if listen.Addr().IsUnspecified() {
			dst = netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), listen.Port())
		}
		c := wantOriginal(t, ln, dst.String())
		if _, err := TransparentTarget(listen)(c); !errors.Is(err, ErrNotRedirected) {
			t.Errorf("straight to %s: err = %v, want ErrNotRedirected", dst, err)
		}
	}
}

// TestOriginalDestinationTPROXY: after a real nft TPROXY the accepted
// socket carries the original destination (no NAT entry to ask); the
// listener is transparent (root); and a TPROXY'd connection to a remote
// on the listener's own port is relayed, not taken for a loop.
func TestOriginalDestinationTPROXY(t *testing.T) {
	if !inFreshNetns(t) {
		return
	}
	ln := tproxyTCPNetns(t)
	port := portOf(ln)
	listen := ln.Addr().(*net.TCPAddr).AddrPort()
	for _, dst := range []string{
		"198.51.100.7:80", "[2001:db8::7]:80",
		fmt.Sprintf("198.51.100.7:%d", port), fmt.Sprintf("[2001:db8::7]:%d", port),
	} {
		c := wantOriginal(t, ln, dst)
		got, err := TransparentTarget(listen)(c)
		if err != nil {
			t.Errorf("TPROXY to %s: %v", dst, err)
		} else if got.Name != "" || got.String() != dst {
			t.Errorf("TPROXY to %s: target %+v", dst, got)
		}
	}
	c := wantOriginal(t, ln, fmt.Sprintf("127.0.0.1:%d", port))
	if _, err := TransparentTarget(listen)(c); !errors.Is(err, ErrNotRedirected) {
		t.Errorf("straight to the listener: err = %v, want ErrNotRedirected", err)
	}
}

// tproxyTCPNetns routes the test nets through lo and opens a transparent
// listener on [::]:0 that nft TPROXYs this host's connections to
// 198.51.100.0/24 and 2001:db8::/64, on port 80 and on the listener's own
// port, to.
func tproxyTCPNetns(t *testing.T) net.Listener {
	t.Helper()
	routeTestNetsToLo(t)
	run(t, "", "ip", "rule", "add", "fwmark", "1", "lookup", "100")
	run(t, "", "ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100")
	run(t, "", "ip", "-6", "rule", "add", "fwmark", "1", "lookup", "100")
	run(t, "", "ip", "-6", "route", "add", "local", "::/0", "dev", "lo", "table", "100")
	ln := listenTransparent(t, "[::]:0")
	if !IsTransparent(ln) {
		t.Fatal("IsTransparent = false as root")
	}
	// Locally generated packets are marked on output, so that the mark's
	// routing table delivers them on lo, where prerouting's tproxy takes
	// them to the listener.
	run(t, fmt.Sprintf(`
table inet tunneltest {
	chain out {
		type route hook output priority mangle; policy accept;
		ip daddr 198.51.100.0/24 tcp dport { 80, %[1]d } meta mark set 1
		ip6 daddr 2001:db8::/64 tcp dport { 80, %[1]d } meta mark set 1
	}
	chain pre {
		type filter hook prerouting priority mangle; policy accept;
		meta mark 1 ip daddr 198.51.100.0/24 meta l4proto tcp tproxy ip to :%[1]d
		meta mark 1 ip6 daddr 2001:db8::/64 meta l4proto tcp tproxy ip6 to :%[1]d
	}
}`, portOf(ln)), "nft", "-f", "-")
	return ln
}

// TestTransparentTPROXYNonlocalBind: with ip_nonlocal_bind set (as on
// keepalived and HAProxy hosts), where a bind succeeds for any address, a
// TPROXY'd connection to a remote on the listener's own port is still
// relayed to it, not refused as a connection to the listener; one made
// straight to the listener still is.
func TestTransparentTPROXYNonlocalBind(t *testing.T) {
	if !inFreshNetns(t) {
		return
	}
	run(t, "", "sysctl", "-q", "-w", "net.ipv4.ip_nonlocal_bind=1", "net.ipv6.ip_nonlocal_bind=1")
	ln := tproxyTCPNetns(t)
	port := portOf(ln)
	proxy, requests := recordingUpstream(t)
	f, logs := startTargetOfForward(t, ln, TransparentTarget(ln.Addr().(*net.TCPAddr).AddrPort()), proxy)
	for _, tc := range []struct {
		dst  string
		want []byte
	}{
		{fmt.Sprintf("198.51.100.7:%d", port), []byte{1, 198, 51, 100, 7, byte(port >> 8), byte(port)}},
		{fmt.Sprintf("[2001:db8::7]:%d", port), []byte{4, 0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7, byte(port >> 8), byte(port)}},
	} {
		if err := roundTrip(t, tc.dst, "tproxied"); err != nil {
			t.Fatalf("%s: %v\n%s", tc.dst, err, logs)
		}
		if got := <-requests; string(got) != string(tc.want) {
			t.Errorf("%s: the proxy got ATYP, address, port % x, want % x", tc.dst, got, tc.want)
		}
	}
	expectReset(t, fmt.Sprintf("127.0.0.1:%d", port))
	logs.waitFor(t, "session refused")
	if got := f.Stats().RejectedNotRedirected.Load(); got != 1 || !strings.Contains(logs.String(), ErrNotRedirected.Error()) {
		t.Errorf("straight to the listener: %d rejected as not redirected, want 1:\n%s", got, logs)
	}
}

// recordingUpstream is a SOCKS5 server of a few lines: it answers each
// CONNECT with success, sends its request's ATYP, address and port on
// requests, and echoes the session (half-close included). It connects
// nowhere, so netfilter rules cannot send its traffic back to the test.
func recordingUpstream(t *testing.T) (addr string, requests <-chan []byte) {
	reqs := make(chan []byte, 16)
	ln := testnet.Serve(t, func(c net.Conn) {
		c.SetDeadline(time.Now().Add(10 * time.Second))
		greeting := make([]byte, 3) // VER 5, one method: no authentication
		if _, err := io.ReadFull(c, greeting); err != nil {
			return
		}
		c.Write([]byte{5, 0})
		head := make([]byte, 4) // VER CMD RSV ATYP
		if _, err := io.ReadFull(c, head); err != nil {
			return
		}
		n := map[byte]int{1: 4, 4: 16}[head[3]]
		if n == 0 {
			return // not an IP address: no reply, the dial fails
		}
		rest := make([]byte, n+2)
		if _, err := io.ReadFull(c, rest); err != nil {
			return
		}
		reqs <- append(head[3:], rest...)
		c.Write([]byte{5, 0, 0, 1, 127, 0, 0, 1, 0, 0})
		io.Copy(c, c)
		c.(*net.TCPConn).CloseWrite()
	})
	return ln.Addr().String(), reqs
}

// TestTransparentForwardRedirect: an app's connection that nft REDIRECTs
// to a TCPForward with TransparentTarget reaches the proxy as a CONNECT to
// the original destination's IP address (ATYP 1 or 4), with half-close
// intact and the original destination in the session's log line.
func TestTransparentForwardRedirect(t *testing.T) {
	if !inFreshNetns(t) {
		return
	}
	routeTestNetsToLo(t)
	ln := listenTransparent(t, ":0")
	run(t, fmt.Sprintf(`
table inet tunneltest {
	chain out {
		type nat hook output priority -100; policy accept;
		ip daddr 198.51.100.0/24 tcp dport 80 redirect to :%[1]d
		ip6 daddr 2001:db8::/64 tcp dport 80 redirect to :%[1]d
	}
}`, portOf(ln)), "nft", "-f", "-")
	proxy, requests := recordingUpstream(t)
	_, logs := startTargetOfForward(t, ln, TransparentTarget(ln.Addr().(*net.TCPAddr).AddrPort()), proxy)
	for i, tc := range []struct {
		dst  string
		want []byte
	}{
		{"198.51.100.7:80", []byte{1, 198, 51, 100, 7, 0, 80}},
		{"[2001:db8::7]:80", []byte{4, 0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7, 0, 80}},
	} {
		if err := roundTrip(t, tc.dst, "redirected"); err != nil {
			t.Fatalf("%s: %v\n%s", tc.dst, err, logs)
		}
		if got := <-requests; string(got) != string(tc.want) {
			t.Errorf("%s: the proxy got ATYP, address, port % x, want % x", tc.dst, got, tc.want)
		}
		logs.waitForCount(t, "session ended", i+1)
		if want := `"target":"` + tc.dst + `"`; !strings.Contains(logs.String(), want) {
			t.Errorf("log lacks %s:\n%s", want, logs)
		}
	}
}

// TestOriginalDestinationNotTCP: a conn that is no TCP socket is an error,
// not a panic.
func TestOriginalDestinationNotTCP(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	if _, err := OriginalDestination(a); err == nil {
		t.Error("no error for a pipe")
	}
}

// TestParseRouteAnswerErrors: the kernel's "no route" is "not local"; any
// other error is no answer, which isLocalAddr takes for yes.
func TestParseRouteAnswerErrors(t *testing.T) {
	answer := func(errno unix.Errno) []byte {
		b := make([]byte, unix.SizeofNlMsghdr+4+unix.SizeofNlMsghdr)
		binary.NativeEndian.PutUint16(b[4:], unix.NLMSG_ERROR)
		binary.NativeEndian.PutUint32(b[unix.SizeofNlMsghdr:], uint32(-int32(errno)))
		return b
	}
	if local, err := parseRouteAnswer(answer(unix.ENETUNREACH)); local || err != nil {
		t.Errorf("ENETUNREACH: %v, %v; want not local", local, err)
	}
	if _, err := parseRouteAnswer(answer(unix.EINVAL)); !errors.Is(err, unix.EINVAL) {
		t.Errorf("EINVAL: %v; want the error", err)
	}
	if isLocalAddr(netip.MustParseAddr("127.0.0.2")) != true {
		t.Error("127.0.0.2 is not local")
	}
}
