package main

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/socksfwd/socksfwd/internal/peertest"
	"github.com/socksfwd/socksfwd/internal/sockmark"
	"github.com/socksfwd/socksfwd/internal/testnet"
)

// TestMarkTopBit: a mark with the top bit set passes the start-up check
// and reaches the upstream socket whole (as an int it went negative where
// int is 32 bits, and was refused as out of range).
func TestMarkTopBit(t *testing.T) {
	peertest.RequireRoot(t) // CAP_NET_ADMIN for SO_MARK
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	for _, mark := range []Mark{0x80000000, 0xffffffff} {
		if err := checkMark(&plan{cfg: Config{Mark: mark}}); err != nil {
			t.Fatalf("checkMark(%#x): %v", uint32(mark), err)
		}
		d, err := parseServer(ln.Addr().String(), "", "", mark)
		if err != nil {
			t.Fatal(err)
		}
		c, err := (&net.Dialer{Control: d.Control}).DialContext(context.Background(), "tcp", ln.Addr().String())
		if err != nil {
			t.Fatalf("mark %#x: %v", uint32(mark), err)
		}
		got, err := sockmark.Of(c.(*net.TCPConn))
		c.Close()
		if err != nil || got != uint32(mark) {
			t.Errorf("socket mark %#x (%v), want %#x", got, err, uint32(mark))
		}
	}
}

// TestMarkOnOwnDials: --mark reaches the sockets socksfwd dials on its own,
// not only those toward an upstream: -R's dials to its local target and
// --http's direct dials to a --no-proxy target. Capture rules that leave
// marked traffic alone would otherwise take these and loop them back.
func TestMarkOnOwnDials(t *testing.T) {
	peertest.RequireRoot(t) // CAP_NET_ADMIN for SO_MARK
	verifyNoLeaks(t)
	const mark = 0x438
	socks := newSocks(t)
	target, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer target.Close()
	remoteFile := filepath.Join(t.TempDir(), "remote")
	d := startDaemon(t, "-S", socks.Addr(), "--mark", fmt.Sprint(mark), "-R", "0:"+target.Addr().String(),
		"--remote-addr-file", remoteFile, "--http", "127.0.0.1:0", "--no-proxy", "127.0.0.1")
	d.waitFor("reverse "+socks.Addr()+" listens on", 1)
	d.waitFor("HTTP proxy on", 1)

	// markOfDial finds, among this process's descriptors, the socket whose
	// local address is the peer of a connection the target accepted: the
	// socket socksfwd dialed it with.
	markOfDial := func(how string, open func() (net.Conn, error)) {
		t.Helper()
		c, err := open()
		if err != nil {
			t.Fatalf("%s: %v", how, err)
		}
		defer c.Close()
		in, err := target.Accept()
		if err != nil {
			t.Fatal(err)
		}
		defer in.Close()
		want := in.RemoteAddr().(*net.TCPAddr).AddrPort()
		fds, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range fds {
			fd, err := strconv.Atoi(e.Name())
			if err != nil {
				continue
			}
			sa, err := unix.Getsockname(fd)
			if a, ok := sa.(*unix.SockaddrInet4); err != nil || !ok || netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port)) != want {
				continue
			}
			got, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK)
			if err != nil || got != mark {
				t.Errorf("%s: the dial's socket has mark %#x (%v), want %#x", how, got, err, mark)
			}
			return
		}
		t.Fatalf("%s: no socket of this process is at %s", how, want)
	}

	markOfDial("-R to its target", func() (net.Conn, error) {
		return net.Dial("tcp", remoteLinesOf(t, remoteFile)[0])
	})
	markOfDial("--http CONNECT to a --no-proxy target", func() (net.Conn, error) {
		c, err := net.Dial("tcp", d.listener("http"))
		if err != nil {
			return nil, err
		}
		fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %[1]s\r\n\r\n", target.Addr())
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err == nil && resp.StatusCode != http.StatusOK {
			err = fmt.Errorf("CONNECT: %s", resp.Status)
		}
		if err != nil {
			c.Close()
			return nil, err
		}
		return c, nil
	})
}

// TestRulesLookupMarked: `socksfwd rules` looks a proxy's name up through
// sockets carrying --mark, as the daemon does, so that DNS capture rules
// already loaded do not take its query into a --dns that may not run.
func TestRulesLookupMarked(t *testing.T) {
	peertest.RequireRoot(t) // CAP_NET_ADMIN for SO_MARK
	const mark = 0x438
	d, err := parseServer("proxy.example:1080", "", "", mark)
	if err != nil {
		t.Fatal(err)
	}
	r := rulesResolver(d)
	if r == net.DefaultResolver || r.Dial == nil {
		t.Fatal("with --mark, the rules look names up with the default resolver")
	}
	c, err := r.Dial(context.Background(), "udp", "127.0.0.1:53")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got, err := sockmark.Of(c.(*net.UDPConn)); err != nil || got != mark {
		t.Errorf("the lookup's socket has mark %#x (%v), want %#x", got, err, mark)
	}
	unmarked, err := parseServer("proxy.example:1080", "", "", 0)
	if err != nil {
		t.Fatal(err)
	}
	if rulesResolver(unmarked) != net.DefaultResolver {
		t.Error("without --mark, the rules do not use the system's resolver")
	}
}

// TestDirectLookupMarked: --http looks a --no-proxy target's name up
// through sockets carrying --mark, as it dials the target with it, so that
// DNS capture rules do not take the lookup back into socksfwd.
func TestDirectLookupMarked(t *testing.T) {
	peertest.RequireRoot(t) // CAP_NET_ADMIN for SO_MARK
	const mark = 0x438
	d := directDialer(mark)
	if d.Resolver == nil || d.Resolver.Dial == nil {
		t.Fatal("with --mark, direct dials look names up with the default resolver")
	}
	c, err := d.Resolver.Dial(context.Background(), "udp", "127.0.0.1:53")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got, err := sockmark.Of(c.(*net.UDPConn)); err != nil || got != mark {
		t.Errorf("the lookup's socket has mark %#x (%v), want %#x", got, err, mark)
	}
	if directDialer(0).Resolver != nil {
		t.Error("without --mark, direct dials do not use the system's resolver")
	}
}

// TestReloadNewUpstreamsWithoutMark: with transparent listeners and no
// --mark, the capture rules leave socksfwd's own connections alone only by
// the proxies' addresses; a reload that names a new proxy host says the
// rules must be printed and loaded again. One that reorders them, drops
// one, changes a port or adds one on loopback (never captured) leaves
// those rules right, and says nothing.
func TestReloadNewUpstreamsWithoutMark(t *testing.T) {
	verifyNoLeaks(t)
	conf := func(servers ...string) string {
		return fmt.Sprintf("server = [\"%s\"]\ntransparent = [\"127.0.0.1:0\"]\n", strings.Join(servers, `", "`))
	}
	path := writeConfig(t, conf("192.0.2.1:1080", "192.0.2.2:1080"))
	d := startDaemon(t, "-c", path)
	d.waitFor("transparent", 1)
	const warning = "the upstreams changed and there is no --mark"
	for i, servers := range [][]string{
		{"192.0.2.1:1080", "192.0.2.2:1080", "127.0.0.1:1080"},
		{"192.0.2.2:1080", "192.0.2.1:1080"},
		{"192.0.2.2:1080"},
		{"socks5://user:pw@192.0.2.2:1081"},
	} {
		d.reload(path, conf(servers...), i+1)
	}
	if n := len(d.linesWith(warning)); n != 0 {
		t.Fatalf("%d warnings that the capture rules name the old upstreams, want none yet:\n%s", n, d.dump())
	}
	d.reload(path, conf("192.0.2.2:1081", "192.0.2.3:1080"), 5)
	if n := len(d.linesWith(warning)); n != 1 {
		t.Errorf("%d warnings that the capture rules name the old upstreams, want 1 (for the new host):\n%s", n, d.dump())
	}
}

// TestReloadMovedCaptureListener: capture rules send to the transparent
// listeners' (and --dns's) ports; a reload that moves one says the rules
// must be printed and loaded again, where it had listed the move alone
// and every captured connection was refused. One that changes only
// other listeners says nothing of the rules.
func TestReloadMovedCaptureListener(t *testing.T) {
	verifyNoLeaks(t)
	echo := testnet.Echo(t).Addr().String()
	conf := func(transparent, local string) string {
		return fmt.Sprintf("server = [\"192.0.2.1:1080\"]\nmark = \"0x438\"\ntransparent = [%q]\nlocal = [%q]\n", transparent, local)
	}
	first, second := "127.0.0.1:"+freePort(t), "127.0.0.1:"+freePort(t)
	path := writeConfig(t, conf(first, "127.0.0.1:0:"+echo))
	d := startDaemon(t, "-c", path)
	d.waitFor("transparent", 1)
	const warning = "the listeners the capture rules send to changed"
	d.reload(path, conf(first, "127.0.0.2:0:"+echo), 1)
	if n := len(d.linesWith(warning)); n != 0 {
		t.Fatalf("%d warnings after moving a -L, want none:\n%s", n, d.dump())
	}
	d.reload(path, conf(second, "127.0.0.2:0:"+echo), 2)
	if n := len(d.linesWith(warning)); n != 1 {
		t.Errorf("%d warnings after moving the transparent listener, want 1:\n%s", n, d.dump())
	}
}

// TestMetricsNotRedirected: a connection made straight to a transparent
// listener is refused and counted under its own reason, not among the
// sessions whose target failed.
func TestMetricsNotRedirected(t *testing.T) {
	verifyNoLeaks(t)
	d := startDaemon(t, "-S", "192.0.2.1:1080", "--transparent", "0", "--admin", "0")
	d.waitFor("admin on", 1)
	tl := d.listener("transparent")
	c, err := net.Dial("tcp", tl)
	if err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second)) // a bound, not a wait
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatal("a connection straight to the transparent listener was served")
	}
	c.Close()
	m := scrape(t, d.listener("admin"))
	for series, want := range map[string]float64{
		fmt.Sprintf(`socksfwd_sessions_rejected_total{listener=%q,proto="transparent",reason="not_redirected"}`, tl): 1,
		fmt.Sprintf(`socksfwd_sessions_rejected_total{listener=%q,proto="transparent",reason="capture_loop"}`, tl):   0,
		fmt.Sprintf(`socksfwd_sessions_failed_total{listener=%q,proto="transparent"}`, tl):                           0,
	} {
		if got, ok := m[series]; !ok || got != want {
			t.Errorf("%s = %v (present %v), want %v", series, got, ok, want)
		}
	}
	d.stop()
}
