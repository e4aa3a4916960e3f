package tunnel

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/socksfwd/socksfwd/internal/peertest"
	"github.com/socksfwd/socksfwd/internal/testnet"
)

// failingControl is a reply pool's control that fails its first n calls
// with errno and counts every call.
func failingControl(n int, errno error, calls *int) func(network, address string, c syscall.RawConn) error {
	return func(network, address string, c syscall.RawConn) error {
		*calls++
		if *calls <= n {
			return errno
		}
		return nil
	}
}

// newUnbindableReplyPool is a reply pool every socket of which fails in
// control, so nothing is bound or sent; calls counts the sockets tried.
func newUnbindableReplyPool(t *testing.T) (p *replyPool, stats *TransparentUDPStats, logs *logBuf, calls *int) {
	logs, stats, calls = &logBuf{}, &TransparentUDPStats{}, new(int)
	control := failingControl(1<<30, errors.New("no socket in this test"), calls)
	p = newReplyPool(8, time.Minute, &TransparentUDPConfig{Name: "tproxy-udp", Control: control, Logger: zerolog.New(logs)}, stats)
	t.Cleanup(p.close)
	return p, stats, logs, calls
}

// logLines returns the log lines that name remote.
func logLines(logs *logBuf, remote string) []string {
	var lines []string
	for _, l := range strings.Split(logs.String(), "\n") {
		if strings.Contains(l, `"remote":"`+remote+`"`) {
			lines = append(lines, l)
		}
	}
	return lines
}

// TestReplyPoolRefusesNonRemoteSource: a reply whose source the proxy
// named as a wildcard address, port 0, a multicast or the broadcast
// address is dropped before any socket is bound to it (0.0.0.0:53 would
// take a local resolver's port), and logged once a period for them all
// (the line names the first).
func TestReplyPoolRefusesNonRemoteSource(t *testing.T) {
	p, stats, logs, calls := newUnbindableReplyPool(t)
	client := netip.MustParseAddrPort("127.0.0.2:40000")
	refused := []string{"0.0.0.0:53", "[::]:53", "198.51.100.7:0", "[2001:db8::7]:0", "224.0.0.251:5353", "[ff02::fb]:5353", "255.255.255.255:67"}
	for _, r := range refused {
		for range 3 {
			if p.send([]byte("x"), netip.MustParseAddrPort(r), client) {
				t.Errorf("a reply from %s was sent", r)
			}
		}
	}
	if n := strings.Count(logs.String(), "the proxy named a wildcard"); n != 1 || len(logLines(logs, refused[0])) != 1 {
		t.Errorf("%d lines for the refused sources, want 1 naming %s:\n%s", n, refused[0], logs)
	}
	if *calls != 0 || p.Len() != 0 || stats.ReplyBindFailures.Load() != 0 || stats.ReplySockets.Load() != 0 {
		t.Errorf("%d sockets tried, %d remotes held, %d bind failures, %d reply sockets; want none",
			*calls, p.Len(), stats.ReplyBindFailures.Load(), stats.ReplySockets.Load())
	}
	if strings.Contains(logs.String(), "cannot bind") {
		t.Errorf("a bind was tried:\n%s", logs)
	}
	// A remote's address is still tried.
	p.send([]byte("x"), netip.MustParseAddrPort("198.51.100.7:53"), client)
	if stats.ReplyBindFailures.Load() != 1 || p.Len() != 1 {
		t.Errorf("198.51.100.7:53: %d bind failures, %d remotes held; want 1, 1", stats.ReplyBindFailures.Load(), p.Len())
	}
}

// TestReplyPoolRetriesBind: a reply socket whose bind failed (descriptors
// ran out, say) is bound again after a back-off of a second, doubling
// while it keeps failing, instead of leaving the remote on the raw path
// for as long as its flow lives. The failure is counted once, and the log
// names the error; only EADDRINUSE is blamed on a local service.
func TestReplyPoolRetriesBind(t *testing.T) {
	if !inFreshNetns(t) { // binding a remote's address needs IP_TRANSPARENT
		return
	}
	synctest.Test(t, func(t *testing.T) {
		logs := &logBuf{}
		var stats TransparentUDPStats
		calls := 0
		p := newReplyPool(8, time.Minute, &TransparentUDPConfig{Name: "tproxy-udp", Control: failingControl(2, unix.EMFILE, &calls), Logger: zerolog.New(logs)}, &stats)
		defer p.close()
		remote := netip.MustParseAddrPort("198.51.100.7:7")
		bound := func() bool { s := p.get(remote); return s != nil && s.pc != nil }
		var elapsed time.Duration
		for _, step := range []struct {
			after time.Duration
			bound bool
			calls int
		}{
			{0, false, 1},
			{time.Second - time.Millisecond, false, 1}, // within the back-off: no try
			{time.Millisecond, false, 2},               // a second on: tried, failed again
			{time.Second, false, 2},                    // the back-off doubled
			{time.Second, true, 3},
			{time.Minute / 2, true, 3}, // bound stays bound
		} {
			time.Sleep(step.after)
			elapsed += step.after
			if got := bound(); got != step.bound || calls != step.calls {
				t.Fatalf("at %v: bound %v after %d binds, want %v after %d\n%s", elapsed, got, calls, step.bound, step.calls, logs)
			}
		}
		if n, s := stats.ReplyBindFailures.Load(), stats.ReplySockets.Load(); n != 1 || s != 1 {
			t.Errorf("%d bind failures, %d reply sockets; want 1, 1", n, s)
		}
		lines := logLines(logs, remote.String())
		if len(lines) != 1 || !strings.Contains(lines[0], "too many open files") || strings.Contains(lines[0], "local service") {
			t.Errorf("want one line naming EMFILE, no local service:\n%s", logs)
		}

		inUse := netip.MustParseAddrPort("198.51.100.8:7")
		calls = 0
		p.control = failingControl(1, unix.EADDRINUSE, &calls)
		p.get(inUse)
		if lines := logLines(logs, inUse.String()); len(lines) != 1 || !strings.Contains(lines[0], "a local service holds that address and port") {
			t.Errorf("EADDRINUSE: want one line blaming a local service:\n%s", logs)
		}
	})
}

// TestReplyPoolRetriesRawSocket: a raw socket that could not be made (an
// EMFILE) is tried again after a back-off instead of dropping every reply
// that needs it for the listener's whole life; the log names the error.
func TestReplyPoolRetriesRawSocket(t *testing.T) {
	peertest.RequireRoot(t) // CAP_NET_RAW
	client := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
	to := client.LocalAddr().(*net.UDPAddr).AddrPort()
	from := netip.MustParseAddrPort("127.0.0.1:9")
	logs := &logBuf{}
	synctest.Test(t, func(t *testing.T) {
		var stats TransparentUDPStats
		calls := 0
		p := newReplyPool(4, time.Minute, &TransparentUDPConfig{Control: failingControl(1, unix.EMFILE, &calls), Logger: zerolog.New(logs)}, &stats)
		defer p.close()
		first := p.sendRaw([]byte("lost"), from, to)
		second := p.sendRaw([]byte("lost"), from, to) // within the back-off: not tried
		if first || second || calls != 1 {
			t.Fatalf("the raw socket's control failed: want two drops and one try, got %d tries", calls)
		}
		time.Sleep(time.Second)
		if !p.sendRaw([]byte("again"), from, to) {
			t.Fatalf("no raw socket a second after a failure (%d tries)\n%s", calls, logs)
		}
	})
	if n := strings.Count(logs.String(), "\n"); n != 1 || !strings.Contains(logs.String(), "too many open files") {
		t.Errorf("want one line naming EMFILE:\n%s", logs)
	}
	buf := make([]byte, 16)
	client.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, src, err := client.ReadFromUDPAddrPort(buf)
	if err != nil || string(buf[:n]) != "again" || src != from {
		t.Fatalf("got %q from %v (%v), want %q from %v", buf[:n], src, err, "again", from)
	}
}

// TestRawOptionsKeepErrno: a raw socket option that cannot be set fails
// with the system's error, not only the option's name.
func TestRawOptionsKeepErrno(t *testing.T) {
	err := setRawOptions(-1, unix.SOL_IP, unix.IP_TRANSPARENT)
	if !errors.Is(err, unix.EBADF) || !strings.Contains(err.Error(), "IP_TRANSPARENT") {
		t.Errorf("err = %v, want EBADF naming IP_TRANSPARENT", err)
	}
}

// TestReplyBindFailedLine: the line for a reply socket that cannot bind
// says what becomes of the replies: a raw socket only where the process
// may open one, else dropped (it said "raw socket" without CAP_NET_RAW,
// beside the line saying they were dropped).
func TestReplyBindFailedLine(t *testing.T) {
	for _, c := range []struct {
		err       error
		raw       bool
		want, not []string
	}{
		{unix.EADDRINUSE, true, []string{"a local service holds", "go through a raw socket"}, []string{"dropped"}},
		{unix.EADDRINUSE, false, []string{"a local service holds", "dropped", "CAP_NET_RAW"}, []string{"go through"}},
		{unix.EACCES, false, []string{"CAP_NET_BIND_SERVICE", "dropped", "CAP_NET_RAW"}, []string{"go through"}},
		{unix.EACCES, true, []string{"CAP_NET_BIND_SERVICE", "go through a raw socket"}, []string{"dropped", "until a retry"}},
		{unix.EMFILE, true, []string{"go through a raw socket until a retry binds it"}, []string{"dropped"}},
	} {
		line := replyBindFailedLine(fmt.Errorf("listen udp4: bind: %w", c.err), c.raw)
		for _, w := range c.want {
			if !strings.Contains(line, w) {
				t.Errorf("%v, raw %v: %q lacks %q", c.err, c.raw, line, w)
			}
		}
		for _, n := range c.not {
			if strings.Contains(line, n) {
				t.Errorf("%v, raw %v: %q says %q", c.err, c.raw, line, n)
			}
		}
	}
}

// TestReplyPoolLocalSource: a reply whose source is this host's own
// address (a process beside a proxy on this host, or a proxy naming one)
// gets no reply socket, which would take the datagrams of a local service
// on that address or its port; it goes by the raw socket.
func TestReplyPoolLocalSource(t *testing.T) {
	peertest.RequireRoot(t) // CAP_NET_RAW
	client := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
	to := client.LocalAddr().(*net.UDPAddr).AddrPort()
	own := []netip.Addr{netip.MustParseAddr("127.0.0.1")}
	if addrs, err := net.InterfaceAddrs(); err == nil {
		for _, a := range addrs {
			if n, ok := a.(*net.IPNet); ok {
				if ip, ok := netip.AddrFromSlice(n.IP.To4()); ok && !ip.IsLoopback() {
					own = append(own, ip) // the route lookup's case, where the host has one
					break
				}
			}
		}
	}
	logs := &logBuf{}
	var stats TransparentUDPStats
	p := newReplyPool(8, time.Minute, &TransparentUDPConfig{Name: "t", Logger: zerolog.New(logs)}, &stats)
	defer p.close()
	for _, a := range own {
		free := testnet.ListenUDP(t, "udp4", netip.AddrPortFrom(a, 0).String())
		from := free.LocalAddr().(*net.UDPAddr).AddrPort()
		free.Close()
		if !p.send([]byte("from "+a.String()), from, to) {
			t.Fatalf("a reply from %s was not sent\n%s", from, logs)
		}
		client.SetReadDeadline(time.Now().Add(5 * time.Second))
		b := make([]byte, 64)
		n, src, err := client.ReadFromUDPAddrPort(b)
		if err != nil || string(b[:n]) != "from "+a.String() || src != from {
			t.Fatalf("client got %q from %s (%v), want the reply from %s", b[:n], src, err, from)
		}
		if n := stats.ReplySockets.Load(); n != 0 {
			t.Fatalf("%d reply sockets bound at this host's own %s", n, from)
		}
		// The port stays free for a local service.
		svc, err := net.ListenPacket("udp4", net.JoinHostPort("0.0.0.0", strconv.Itoa(int(from.Port()))))
		if err != nil {
			t.Fatalf("a service cannot bind the port after a reply from %s: %v", from, err)
		}
		svc.Close()
	}
	if !strings.Contains(logs.String(), "this host's own") {
		t.Errorf("no line saying why no reply socket was bound:\n%s", logs)
	}
}

// TestReplyPoolRefusedSourcesKeepLogs: a proxy naming a thousand bogus
// sources (port 0) gets one line for them all, and leaves the throttle
// room for a real remote's bind failure (it filled the per-remote keys,
// after which bind failures were counted but never logged).
func TestReplyPoolRefusedSourcesKeepLogs(t *testing.T) {
	p, stats, logs, _ := newUnbindableReplyPool(t)
	client := netip.MustParseAddrPort("127.0.0.2:40000")
	for i := range 1100 {
		p.send([]byte("x"), netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 51, byte(i >> 8), byte(i)}), 0), client)
	}
	real := netip.MustParseAddrPort("203.0.113.9:5000")
	p.send([]byte("x"), real, client)
	if n := stats.ReplyBindFailures.Load(); n != 1 {
		t.Fatalf("%d bind failures, want the real remote's", n)
	}
	if lines := logLines(logs, real.String()); len(lines) != 1 {
		t.Errorf("the real remote's bind failure has %d lines, want 1:\n%s", len(lines), logs)
	}
	if n := strings.Count(logs.String(), "the proxy named a wildcard, port 0"); n != 1 {
		t.Errorf("%d lines for the refused sources, want 1", n)
	}
}

// TestReplyPoolLocalSourcesKeepLogs: replies from this host's own address
// on a thousand ports (a proxy beside busy local peers, or naming them)
// get one line for them all and count no bind failure; a real remote's
// bind failure is still logged (they filled the per-remote throttle).
func TestReplyPoolLocalSourcesKeepLogs(t *testing.T) {
	p, stats, logs, _ := newUnbindableReplyPool(t)
	client := netip.MustParseAddrPort("127.0.0.2:40000")
	for port := range uint16(1100) {
		p.send([]byte("x"), netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port+1), client)
	}
	if n := stats.ReplyBindFailures.Load(); n != 0 {
		t.Errorf("%d bind failures for this host's own address, want none", n)
	}
	if n := strings.Count(logs.String(), "not bound: the remote's address is this host's own"); n != 1 {
		t.Errorf("%d lines for this host's own address, want 1", n)
	}
	real := netip.MustParseAddrPort("203.0.113.9:5000")
	p.send([]byte("x"), real, client)
	if lines := logLines(logs, real.String()); len(lines) != 1 || stats.ReplyBindFailures.Load() != 1 {
		t.Errorf("the real remote's bind failure: %d lines, %d counted; want 1, 1:\n%s", len(lines), stats.ReplyBindFailures.Load(), logs)
	}
}
