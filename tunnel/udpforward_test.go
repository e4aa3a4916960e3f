package tunnel

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"github.com/rs/zerolog"

	"github.com/socksfwd/socksfwd/internal/sockbuf"
	"github.com/socksfwd/socksfwd/internal/testnet"
	"github.com/socksfwd/socksfwd/socksclient"
	"github.com/socksfwd/socksfwd/socksclient/sockstest"
)

type udpFwdOpts struct {
	idle        time.Duration
	maxSessions int
	listen      string         // default 127.0.0.1:0
	target      netip.AddrPort // default: a UDP echo
	// proxyDial, if set, connects to the proxy (socksclient.Dialer.ProxyDial).
	proxyDial func(ctx context.Context, network, addr string) (net.Conn, error)
	// upstreams is how many upstreams lead to the proxy (default 1).
	upstreams int
}

// startUDPForward runs a UDPForward to the target (a UDP echo unless o
// says otherwise) through a sockstest server with cfg; it returns the
// forward, its address and the log.
func startUDPForward(t *testing.T, cfg sockstest.Config, o udpFwdOpts) (*UDPForward, *net.UDPAddr, *logBuf) {
	t.Helper()
	if !o.target.IsValid() {
		o.target = testnet.UDPEcho(t).LocalAddr().(*net.UDPAddr).AddrPort()
	}
	proxy := newSocks(t, cfg)
	if o.listen == "" {
		o.listen = "127.0.0.1:0"
	}
	la, err := net.ResolveUDPAddr("udp", o.listen)
	if err != nil {
		t.Fatal(err)
	}
	pc, err := net.ListenUDP("udp", la)
	if err != nil {
		t.Skipf("cannot listen on %s: %v", o.listen, err)
	}
	logs := &logBuf{}
	dialers := make([]*socksclient.Dialer, max(o.upstreams, 1))
	for i := range dialers {
		dialers[i] = &socksclient.Dialer{ProxyAddr: proxy.Addr(), HandshakeTimeout: 5 * time.Second, ProxyDial: o.proxyDial}
	}
	f := NewUDPForward(UDPForwardConfig{
		Name: pc.LocalAddr().String(), Target: socksclient.AddrFromAddrPort(o.target),
		Upstreams:   socksclient.NewUpstreams(dialers...),
		IdleTimeout: o.idle, MaxSessions: o.maxSessions,
		Logger: zerolog.New(logs).Level(zerolog.DebugLevel),
	}, pc)
	serveForTest(t, f)
	return f, pc.LocalAddr().(*net.UDPAddr), logs
}

func udpClient(t *testing.T, network string) *net.UDPConn {
	t.Helper()
	c, err := net.ListenUDP(network, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// udpRoundTrip sends msg to the forward once and waits, at most wait,
// for its echo. A datagram is never sent again: the forward queues what
// comes while a session associates, so on loopback a lost datagram is a
// bug, not noise.
func udpRoundTrip(c *net.UDPConn, fwd *net.UDPAddr, msg []byte, wait time.Duration) error {
	if _, err := c.WriteToUDP(msg, fwd); err != nil {
		return err
	}
	c.SetReadDeadline(time.Now().Add(wait))
	defer c.SetReadDeadline(time.Time{})
	buf := make([]byte, len(msg)+1)
	n, _, err := c.ReadFromUDP(buf)
	if err != nil {
		return fmt.Errorf("no echo for %d-byte datagram: %w", len(msg), err)
	}
	if !bytes.Equal(buf[:n], msg) {
		return fmt.Errorf("got %d bytes, want %d", n, len(msg))
	}
	return nil
}

func TestUDPForwardEcho(t *testing.T) {
	f, fwd, _ := startUDPForward(t, sockstest.Config{}, udpFwdOpts{})
	a, b := udpClient(t, "udp4"), udpClient(t, "udp4")
	for _, size := range []int{1, 1400, 9000, 65000} {
		for i, c := range []*net.UDPConn{a, b} {
			msg := bytes.Repeat([]byte{byte(i + 1)}, size)
			if err := udpRoundTrip(c, fwd, msg, 5*time.Second); err != nil {
				t.Fatalf("client %d: %v", i, err)
			}
		}
	}
	if n := f.Sessions(); n != 2 {
		t.Fatalf("%d sessions, want one per client", n)
	}
}

// Bursts from several clients, interleaved, are read and sent in batches:
// every datagram must reach the target and its echo the right client,
// byte-exact, whatever the grouping (equal sizes go as one segmented send,
// a shorter one ends a run).
func TestUDPForwardBurstsFromSeveralClients(t *testing.T) {
	f, fwd, _ := startUDPForward(t, sockstest.Config{}, udpFwdOpts{})
	clients := []*net.UDPConn{udpClient(t, "udp4"), udpClient(t, "udp4"), udpClient(t, "udp4")}
	for i, c := range clients { // sessions and associations first
		if err := udpRoundTrip(c, fwd, []byte{byte(i)}, 5*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	// Waves of 10 per client: 30 datagrams in flight stay within the
	// default socket buffers of the test relay and echo, so nothing is lost
	// to them on a loaded machine.
	const perClient, wave = 40, 10
	msg := func(client, seq int) []byte {
		size := 1200
		if seq%7 == 6 {
			size = 100 + seq // a shorter one now and then
		}
		b := bytes.Repeat([]byte{byte(client)}, size)
		b[1] = byte(seq)
		return b
	}
	buf := make([]byte, 2048)
	for first := 0; first < perClient; first += wave {
		for seq := first; seq < first+wave; seq++ {
			for i, c := range clients {
				if _, err := c.WriteToUDP(msg(i, seq), fwd); err != nil {
					t.Fatal(err)
				}
			}
		}
		for i, c := range clients {
			seen := make(map[int]bool)
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			for len(seen) < wave {
				n, _, err := c.ReadFromUDP(buf)
				if err != nil {
					t.Fatalf("client %d: %d of %d echoes of datagrams %d…: %v", i, len(seen), wave, first, err)
				}
				seq := int(buf[1])
				if want := msg(i, seq); seq < first || !bytes.Equal(buf[:n], want) {
					t.Fatalf("client %d got %d bytes for seq %d, want %d bytes of its own from this wave", i, n, seq, len(want))
				}
				seen[seq] = true
			}
		}
	}
	if n := f.Sessions(); n != len(clients) {
		t.Fatalf("%d sessions, want %d", n, len(clients))
	}
}

func TestUDPForwardIPv6(t *testing.T) {
	_, fwd, _ := startUDPForward(t, sockstest.Config{}, udpFwdOpts{listen: "[::1]:0"})
	c := udpClient(t, "udp6")
	if err := udpRoundTrip(c, fwd, []byte("v6"), 5*time.Second); err != nil {
		t.Fatal(err)
	}
}

// A datagram longer than any SOCKS relay could take (IPv6 allows 65 527
// bytes) is dropped whole and counted, never forwarded cut short.
func TestUDPForwardDropsOversized(t *testing.T) {
	f, fwd, logs := startUDPForward(t, sockstest.Config{}, udpFwdOpts{listen: "[::1]:0"})
	c := udpClient(t, "udp6")
	if _, err := c.WriteToUDP(make([]byte, 65520), fwd); err != nil {
		t.Skipf("cannot send 65 520 bytes over IPv6 loopback here: %v", err)
	}
	if err := udpRoundTrip(c, fwd, []byte("after"), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if f.Stats().DroppedLarge.Load() != 1 {
		t.Fatalf("DroppedLarge = %d, want 1", f.Stats().DroppedLarge.Load())
	}
	// One log line names the cause (counted drops used to be silent).
	if !strings.Contains(logs.String(), "UDP datagram dropped: too large for a SOCKS UDP header") {
		t.Fatalf("no log line for the drop:\n%s", logs.String())
	}
}

// A new source that finds the table full evicts the session idle the
// longest, as a NAT table does, instead of being locked out until some
// session idles out.
func TestUDPForwardEvictsIdlest(t *testing.T) {
	f, fwd, logs := startUDPForward(t, sockstest.Config{}, udpFwdOpts{maxSessions: 2})
	a, b, c := udpClient(t, "udp4"), udpClient(t, "udp4"), udpClient(t, "udp4")
	for i, cl := range []*net.UDPConn{a, b, c} {
		if err := udpRoundTrip(cl, fwd, []byte{byte(i)}, 5*time.Second); err != nil {
			t.Fatalf("client %d: %v", i, err)
		}
	}
	if !hasSession(f, b) || !hasSession(f, c) || hasSession(f, a) || f.Sessions() != 2 {
		t.Fatalf("want the sessions of b and c after c evicted a, have %d", f.Sessions())
	}
	if err := udpRoundTrip(b, fwd, []byte("b again"), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	// Now c is the idlest.
	if err := udpRoundTrip(a, fwd, []byte("a again"), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if !hasSession(f, a) || !hasSession(f, b) || hasSession(f, c) {
		t.Fatal("a's return did not evict c, the idlest")
	}
	if n := f.Stats().Evicted.Load(); n != 2 {
		t.Fatalf("Evicted = %d, want 2", n)
	}
	logs.waitFor(t, "UDP session table full; evicting")
	if n := strings.Count(logs.String(), "UDP session table full"); n != 1 {
		t.Fatalf("%d lines about the full table, want 1 a period:\n%s", n, logs)
	}
	f.Close()
	checkAccounted(t, &f.udpTable, f.Stats().Received.Load())
}

// A slow relay on this host with a small buffer gets bursts several times
// its size whole: the forward's batches wait for room in its socket (the
// burst waits in the forward's own buffer), and the session's log line
// counts the waits.
//
// Flow control gives a wait up when the relay has made no room for some
// milliseconds of the clock, which a starved machine can take. In a
// synctest bubble the clock stands still while goroutines work or wait on
// sockets, so no wait is given up, and every datagram must arrive.
func TestUDPForwardSlowLocalRelay(t *testing.T) {
	// The target is bound outside the bubble, so that a real timer can
	// close it should a datagram never come (a read in the bubble has no
	// clock to time out on): the test then fails with the log.
	dst := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
	sockbuf.Grow(dst)
	watchdog := time.AfterFunc(30*time.Second, func() { dst.Close() })
	defer watchdog.Stop()
	// A batch that waited for the relay forever (flow control that never
	// sees room and never gives up, whose give-up clock is the bubble's
	// standing one) would keep Serve, and so the bubble and the test,
	// alive after that failure until go test's timeout, minutes later.
	// Bound it on the real clock, saying why.
	stuck := time.AfterFunc(60*time.Second, func() {
		panic("TestUDPForwardSlowLocalRelay: the forward has not stopped 30 s after the watchdog " +
			"closed the target: a batch is held for the relay forever (UDP flow control never " +
			"returns; in the synctest bubble its give-up clock stands still)")
	})
	defer stuck.Stop()
	synctest.Test(t, func(t *testing.T) {
		f, fwd, logs := startUDPForward(t, sockstest.Config{UDPSlowRelay: true},
			udpFwdOpts{target: dst.LocalAddr().(*net.UDPAddr).AddrPort()})
		c := udpClient(t, "udp4")
		buf := make([]byte, 2048)
		receive := func(n int) {
			t.Helper()
			for i := range n {
				if _, _, err := dst.ReadFromUDPAddrPort(buf); err != nil {
					t.Fatalf("datagram %d of %d never arrived: %v\n%s", i+1, n, err, logs)
				}
			}
		}
		// The session and its association first.
		if _, err := c.WriteToUDP([]byte("first"), fwd); err != nil {
			t.Fatal(err)
		}
		receive(1)
		// Waves of 60 datagrams of 1200 bytes (about 140 KB as the kernel
		// counts them) fit the forward's socket even where it cannot grow
		// past the default 208 KB; the relay keeps 64 KiB.
		const waves, wave = 5, 60
		for range waves {
			for range wave {
				if _, err := c.WriteToUDP(make([]byte, 1200), fwd); err != nil {
					t.Fatal(err)
				}
			}
			receive(wave)
		}
		f.Close()
		if !strings.Contains(logs.String(), `"relay_waits":`) || !strings.Contains(logs.String(), `"relay_stalls":0`) {
			t.Fatalf("want batches that waited for the relay, none given up:\n%s", logs)
		}
	})
}

func TestUDPForwardIdleTimeout(t *testing.T) {
	f, fwd, logs := startUDPForward(t, sockstest.Config{}, udpFwdOpts{idle: exchangeIdle})
	c := udpClient(t, "udp4")
	if err := udpRoundTrip(c, fwd, []byte("x"), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	logs.waitFor(t, "UDP session ended")
	if n := f.Sessions(); n != 0 {
		t.Fatalf("%d sessions after idle timeout", n)
	}
	// A new datagram starts a new session.
	if err := udpRoundTrip(c, fwd, []byte("again"), 5*time.Second); err != nil {
		t.Fatal(err)
	}
}

// TestUDPForwardControlDropped: a session whose association the proxy
// ends builds a new one. Here the proxy ends each association after the
// second datagram it relays, and these die young, so the session pauses
// before each next one, longer each time
// (TestUDPForwardReassociationBacksOff). Loss is part of the scenario: the
// echo of the datagram that ended an association is cut off with its
// relay, the datagram that finds the association ended is dropped during
// the pause (as is the next if the pause outlasts the wait for its echo),
// and one sent in the moment before the session learns of the end goes to
// the closed relay. So a datagram is sent again when its echo does not
// come within controlDroppedWait, and each may be sent again at most
// maxResends times: 4 datagrams take at least one new association (each
// carries 2 at most).
func TestUDPForwardControlDropped(t *testing.T) {
	const (
		controlDroppedWait = 300 * time.Millisecond
		// The losses above, with the longest pause these associations
		// reach (400 ms) outlasting one wait: 4 at most a datagram.
		maxResends = 4
	)
	_, fwd, logs := startUDPForward(t, sockstest.Config{UDPCloseControlAfter: 2}, udpFwdOpts{})
	c := udpClient(t, "udp4")
	buf := make([]byte, 64)
	resends := 0
	for i := range 4 {
		echoed := false
		for sends := 0; !echoed; sends++ {
			if sends > maxResends {
				t.Fatalf("datagram %d: no echo after %d sends (%d resends in all)\n%s", i, sends, resends, logs)
			}
			if sends > 0 {
				resends++
			}
			if _, err := c.WriteToUDP([]byte{byte(i)}, fwd); err != nil {
				t.Fatal(err)
			}
			c.SetReadDeadline(time.Now().Add(controlDroppedWait))
			for !echoed { // bounded by the deadline
				n, _, err := c.ReadFromUDP(buf)
				if errors.Is(err, os.ErrDeadlineExceeded) {
					break // lost: send it again
				}
				switch {
				case err != nil:
					t.Fatal(err)
				case n == 1 && buf[0] == byte(i):
					echoed = true
				case n == 1 && buf[0] < byte(i):
					// The late echo of an earlier datagram sent twice.
				default:
					t.Fatalf("datagram %d: got % x", i, buf[:n])
				}
			}
		}
	}
	t.Logf("%d resends for 4 datagrams", resends)
}

func TestUDPForwardNoAssociate(t *testing.T) {
	_, fwd, logs := startUDPForward(t, sockstest.Config{Fault: sockstest.FaultCloseAfterRequest}, udpFwdOpts{})
	c := udpClient(t, "udp4")
	c.WriteToUDP([]byte("x"), fwd)
	logs.waitFor(t, "the server does not support udp associate")
}

// TestUDPForwardAllocs: relaying a datagram each way allocates nothing once
// the session exists (client, forward, sockstest relay and echo all count).
func TestUDPForwardAllocs(t *testing.T) {
	_, fwd, _ := startUDPForward(t, sockstest.Config{}, udpFwdOpts{})
	c := udpClient(t, "udp4")
	if err := udpRoundTrip(c, fwd, []byte("warm"), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	out := make([]byte, 64)
	in := make([]byte, 2048)
	to := fwd.AddrPort()
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	allocs := testing.AllocsPerRun(500, func() {
		if _, err := c.WriteToUDPAddrPort(out, to); err != nil {
			t.Fatal(err)
		}
		if _, _, err := c.ReadFromUDPAddrPort(in); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("%v allocations per relayed datagram, want 0", allocs)
	}
}

// hasSession reports whether the client c has a session.
func hasSession(f *UDPForward, c *net.UDPConn) bool {
	port := c.LocalAddr().(*net.UDPAddr).Port
	f.mu.Lock()
	defer f.mu.Unlock()
	_, ok := f.sessions[netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), uint16(port))]
	return ok
}

// checkAccounted checks, once the service of table f is closed, that each
// of the handed datagrams was sent or counted under one drop reason, and
// that every queued buffer was given back to the byte budget.
func checkAccounted(t *testing.T, f *udpTable, handed int64) {
	t.Helper()
	st := f.stats
	drops := st.DroppedQueue.Load() + st.DroppedNoAssoc.Load() + st.DroppedLarge.Load() + st.DroppedMemory.Load() + st.DroppedEnded.Load() + st.DroppedSend.Load()
	if up := st.DatagramsUp.Load(); up+drops != handed {
		t.Errorf("%d datagrams sent and %d dropped (queue %d, no association %d, large %d, memory %d, ended %d, send %d), but %d came",
			up, drops, st.DroppedQueue.Load(), st.DroppedNoAssoc.Load(), st.DroppedLarge.Load(), st.DroppedMemory.Load(), st.DroppedEnded.Load(), st.DroppedSend.Load(), handed)
	}
	if q := f.queued.Load(); q != 0 {
		t.Errorf("%d queued bytes left charged after Close", q)
	}
}

// slotWith is a read slot holding a datagram of size bytes: headroom, then
// the payload.
func slotWith(payload []byte) []byte {
	return append(make([]byte, socksclient.MaxUDPHeaderLen), payload...)
}

// hangingProxy is a proxy that never answers: a dial waits for the
// caller to give up.
func hangingProxy(ctx context.Context, network, addr string) (net.Conn, error) {
	<-ctx.Done()
	return nil, ctx.Err()
}

// quietForward returns a forward whose upstream is reached through dial,
// on a socket that nothing reads: tests in a synctest bubble (where a
// blocked socket read would stop the clock) play Serve's part through
// session and deliver.
func quietForward(t *testing.T, dial func(ctx context.Context, network, addr string) (net.Conn, error), cfg UDPForwardConfig) (*UDPForward, *logBuf) {
	t.Helper()
	pc := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
	logs := &logBuf{}
	cfg.Name = pc.LocalAddr().String()
	cfg.Target = socksclient.AddrFromAddrPort(netip.MustParseAddrPort("127.0.0.1:9"))
	cfg.Upstreams = socksclient.NewUpstreams(&socksclient.Dialer{ProxyAddr: "proxy.test:1080", ProxyDial: dial})
	cfg.Logger = zerolog.New(logs).Level(zerolog.DebugLevel)
	f := NewUDPForward(cfg, pc)
	t.Cleanup(func() { f.Close() })
	return f, logs
}

// A datagram that Serve hands to a session which has just ended (its
// client was looked up a moment before the idle timeout ended it) goes to
// a fresh session, and its echo comes back; it was lost silently before.
func TestUDPForwardLateDatagramGetsFreshSession(t *testing.T) {
	f, fwd, logs := startUDPForward(t, sockstest.Config{}, udpFwdOpts{idle: exchangeIdle})
	c := udpClient(t, "udp4")
	if err := udpRoundTrip(c, fwd, []byte("x"), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	var (
		src   netip.AddrPort
		stale *udpSession
	)
	for src, stale = range f.sessions {
	}
	f.mu.Unlock()
	logs.waitFor(t, "UDP session ended")
	// The fresh session must outlive its own echo and the check below,
	// however slow its association: only the stale one's end is timed.
	f.SetLimits(time.Hour, 0)
	// What Serve does with a session it looked up before the end.
	got := f.deliver(stale, src, slotWith([]byte("late")))
	buf := make([]byte, 64)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, _, err := c.ReadFromUDP(buf); err != nil || string(buf[:n]) != "late" {
		t.Fatalf("no echo of the late datagram: %q, %v", buf[:n], err)
	}
	if got == nil || got == stale || !hasSession(f, c) {
		t.Fatalf("the datagram went to %p, want a fresh session in the table (the stale one is %p)", got, stale)
	}
	f.Close()
	checkAccounted(t, &f.udpTable, f.Stats().Received.Load()+1)
}

// While an upstream hangs, queued datagrams hold at most the forward's
// byte budget, charged at the size of the buffer each really takes (small
// datagrams take small buffers); beyond it they are dropped and counted.
// When the forward closes, what was queued is counted, and the budget is
// whole again.
func TestUDPForwardQueueBudget(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const budget = 1 << 20
		f, _ := quietForward(t, hangingProxy, UDPForwardConfig{QueueBytes: budget})
		var handed int64
		send := func(src netip.AddrPort, size, count int) {
			for range count {
				f.deliver(f.session(src), src, slotWith(make([]byte, size)))
				handed++
			}
		}
		send(netip.MustParseAddrPort("127.0.0.1:1001"), 60_000, udpQueueLen)
		send(netip.MustParseAddrPort("127.0.0.1:1002"), 100, 10)
		synctest.Wait() // both sessions wait for their association
		largeBuf, smallBuf := udpBufClasses[len(udpBufClasses)-1], udpBufClasses[0]
		fit := budget / largeBuf
		if n := f.Stats().DroppedMemory.Load(); n != int64(udpQueueLen-fit) {
			t.Errorf("DroppedMemory = %d, want %d: %d buffers of %d bytes fit %d", n, udpQueueLen-fit, fit, largeBuf, budget)
		}
		if q, want := f.queued.Load(), int64(fit*largeBuf+10*smallBuf); q != want {
			t.Errorf("%d bytes queued, want %d (the small datagrams in %d-byte buffers)", q, want, smallBuf)
		}
		f.Close()
		if n := f.Stats().DroppedEnded.Load(); n == 0 {
			t.Error("datagrams queued at Close were not counted")
		}
		checkAccounted(t, &f.udpTable, handed)
	})
}

var errSocketBroken = errors.New("test: the socket is broken")

// failingReader fails every read, as a broken socket would, up to limit
// reads; then it waits for stop.
type failingReader struct {
	calls atomic.Int64
	limit int64
	stop  chan struct{}
}

func (r *failingReader) Read() (int, error) {
	if r.calls.Load() == r.limit {
		<-r.stop
		return 0, net.ErrClosed
	}
	r.calls.Add(1)
	return 0, errSocketBroken
}
func (r *failingReader) Slot(int) []byte         { panic("no datagram was read") }
func (r *failingReader) Truncated(int) bool      { panic("no datagram was read") }
func (r *failingReader) Addr(int) netip.AddrPort { panic("no datagram was read") }

// A read that keeps failing is retried after a growing pause, not at
// once forever (a CPU spinning on the error); the first line says so, the
// rest are counted; Serve keeps going, and Close still stops it at once.
func TestUDPForwardReadErrorsBackOff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f, logs := quietForward(t, hangingProxy, UDPForwardConfig{})
		r := &failingReader{limit: 1000, stop: make(chan struct{})}
		defer close(r.stop)
		f.newReader = func(*net.UDPConn, [][]byte) (datagramReader, error) { return r, nil }
		served := make(chan error, 1)
		go func() { served <- f.Serve(context.Background()) }()
		time.Sleep(30 * time.Second)
		synctest.Wait()
		// Pauses of 5 ms doubling to 1 s: about 37 reads in 30 s.
		if n := r.calls.Load(); n < 20 || n > 50 {
			t.Errorf("%d reads in 30 s of failures, want about 37", n)
		}
		if n := f.Stats().ReadErrors.Load(); n != r.calls.Load() {
			t.Errorf("ReadErrors = %d, want %d", n, r.calls.Load())
		}
		if n := strings.Count(logs.String(), "UDP read failed"); n != 1 {
			t.Errorf("%d lines about failed reads, want 1:\n%s", n, logs)
		}
		select {
		case err := <-served:
			t.Fatalf("Serve stopped on a read error: %v", err)
		default:
		}
		f.Close()
		if err := <-served; err != nil {
			t.Fatalf("Serve: %v", err)
		}
	})
}

// With the upstreams down, many sessions failing to associate make one
// log line for the forward, not one per session and retry; the line when
// it works again counts the failures in between. With every upstream
// failed no upstream is named (the error names them all), not an empty one.
func TestUDPForwardAssociateFailuresLogOnce(t *testing.T) {
	var down atomic.Bool
	down.Store(true)
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		if down.Load() {
			return nil, errors.New("test: upstream down")
		}
		var d net.Dialer
		return d.DialContext(ctx, network, addr)
	}
	f, fwd, logs := startUDPForward(t, sockstest.Config{}, udpFwdOpts{idle: 50 * time.Millisecond, proxyDial: dial, upstreams: 2})
	const clients = 5
	for range clients {
		if _, err := udpClient(t, "udp4").WriteToUDP([]byte("x"), fwd); err != nil {
			t.Fatal(err)
		}
	}
	// A session ends (idle) after its failure was handled.
	logs.waitForCount(t, "UDP session ended", clients)
	if n := f.Stats().AssociateFailures.Load(); n != clients {
		t.Fatalf("AssociateFailures = %d, want %d", n, clients)
	}
	if n := strings.Count(logs.String(), "UDP associate fail"); n != 1 {
		t.Fatalf("%d lines for %d failed associations, want 1:\n%s", n, clients, logs)
	}
	if strings.Contains(logs.String(), `"upstream":""`) {
		t.Errorf("a line names an empty upstream:\n%s", logs)
	}
	down.Store(false)
	// The next session must outlive its association and echo, however
	// slow: only the failed sessions' ends were timed.
	f.SetLimits(time.Hour, 0)
	if err := udpRoundTrip(udpClient(t, "udp4"), fwd, []byte("back"), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	logs.waitFor(t, "UDP associate works again")
	if !strings.Contains(logs.String(), fmt.Sprintf(`"failures_since_last_line":%d,"message":"UDP associate works again"`, clients-1)) {
		t.Fatalf("the line when it works again does not count %d failures:\n%s", clients-1, logs)
	}
}

// SetLimits, while datagrams flow: a new idle timeout applies to sessions
// started after it (earlier ones keep theirs), a new bound to the table.
func TestUDPForwardSetLimits(t *testing.T) {
	f, fwd, logs := startUDPForward(t, sockstest.Config{}, udpFwdOpts{maxSessions: 4})
	a, b, c := udpClient(t, "udp4"), udpClient(t, "udp4"), udpClient(t, "udp4")
	if err := udpRoundTrip(a, fwd, []byte("a"), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	f.SetLimits(exchangeIdle, 4)
	if err := udpRoundTrip(b, fwd, []byte("b"), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	logs.waitFor(t, "UDP session ended") // b's, on the new timeout
	if !hasSession(f, a) || hasSession(f, b) {
		t.Fatal("want a's session (old timeout) alive and b's (new timeout) ended")
	}
	f.SetLimits(0, 1)
	if err := udpRoundTrip(c, fwd, []byte("c"), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if !hasSession(f, c) || hasSession(f, a) || f.Stats().Evicted.Load() != 1 {
		t.Fatalf("with a bound of 1, c's session should have evicted a's; %d sessions, %d evicted", f.Sessions(), f.Stats().Evicted.Load())
	}
}

// TestUDPForwardSetTarget: after SetTarget a new client's datagrams go to
// the new target while a live session keeps the one it started with.
func TestUDPForwardSetTarget(t *testing.T) {
	f, fwd, _ := startUDPForward(t, sockstest.Config{}, udpFwdOpts{})
	// The second target answers with a prefix, so a reply says who sent it.
	second := udpClient(t, "udp4")
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 2048)
		for range 100 { // bounded: the test sends a handful
			n, from, err := second.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			second.WriteToUDPAddrPort(append([]byte("second:"), buf[:n]...), from)
		}
	}()
	t.Cleanup(func() { second.Close(); <-done })
	secondAddr := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), second.LocalAddr().(*net.UDPAddr).AddrPort().Port())

	a, b := udpClient(t, "udp4"), udpClient(t, "udp4")
	if err := udpRoundTrip(a, fwd, []byte("a"), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	f.SetTarget(socksclient.AddrFromAddrPort(secondAddr))
	if got := udpExchange(t, b, fwd, "b"); got != "second:b" {
		t.Errorf("a new client after SetTarget got %q, want the new target's %q", got, "second:b")
	}
	if got := udpExchange(t, a, fwd, "a2"); got != "a2" {
		t.Errorf("the live session got %q, want its first target's echo %q", got, "a2")
	}
}

// udpExchange sends msg once and returns the first reply, which must
// come within 5 s (as udpRoundTrip, it never sends again).
func udpExchange(t *testing.T, c *net.UDPConn, fwd *net.UDPAddr, msg string) string {
	t.Helper()
	if _, err := c.WriteToUDP([]byte(msg), fwd); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	defer c.SetReadDeadline(time.Time{})
	buf := make([]byte, 2048)
	n, _, err := c.ReadFromUDP(buf)
	if err != nil {
		t.Fatalf("no reply to %q: %v", msg, err)
	}
	return string(buf[:n])
}

// scriptedBatch plays the fast path's socksclient.UDPBatch with sends that
// fail where the test says: fail maps a datagram (its first payload byte)
// to the error its send meets. Flush keeps UDPBatch's contract: it stops
// at the first failure, so what went is the first datagrams queued.
type scriptedBatch struct {
	fail   map[byte]error
	queued []byte
	went   []byte
}

func (b *scriptedBatch) Add(buf []byte, off int, _ socksclient.Addr) error {
	b.queued = append(b.queued, buf[off])
	return nil
}

func (b *scriptedBatch) Flush() (int, error) {
	defer func() { b.queued = b.queued[:0] }()
	for i, id := range b.queued {
		if err := b.fail[id]; err != nil {
			return i, err
		}
		b.went = append(b.went, id)
	}
	return len(b.queued), nil
}

// slotReader holds datagrams in read slots, as Serve's reader does.
type slotReader [][]byte

func (r slotReader) Read() (int, error)      { panic("flushBatch does not read") }
func (r slotReader) Slot(i int) []byte       { return r[i] }
func (r slotReader) Truncated(int) bool      { return false }
func (r slotReader) Addr(int) netip.AddrPort { panic("flushBatch needs no source") }

// A fast-path flush that fails part-way sends each datagram once at most,
// and loses none uncounted. A send that fails on its own (an ICMP error
// surfacing on it) drops that datagram, counted, and the ones queued after
// it still go; once the association has ended, the datagrams from the
// failed one on go to the session, which sends them on a new one, and none
// that went already goes again.
func TestUDPForwardFastFlushFailsPartWay(t *testing.T) {
	const queued = 6
	for _, tc := range []struct {
		name    string
		fail    map[byte]error
		went    []byte // through the fast path
		dropped int64
		session []byte // handed to the session, which sends them
	}{
		{"a datagram refused", map[byte]error{2: syscall.ECONNREFUSED}, []byte{0, 1, 3, 4, 5}, 1, nil},
		{"two refused", map[byte]error{0: syscall.ECONNREFUSED, 4: syscall.EPERM}, []byte{1, 2, 3, 5}, 2, nil},
		{"association ended", map[byte]error{3: socksclient.ErrAssociationClosed}, []byte{0, 1, 2}, 0, []byte{3, 4, 5}},
		{"closed at once", map[byte]error{0: net.ErrClosed}, nil, 0, []byte{0, 1, 2, 3, 4, 5}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dst := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
			f, _, logs := startUDPForward(t, sockstest.Config{}, udpFwdOpts{target: dst.LocalAddr().(*net.UDPAddr).AddrPort()})
			// A client that sends nothing itself: Serve never touches its
			// session, and the test plays Serve's fast path for it.
			s := f.session(netip.MustParseAddrPort("127.0.0.1:9"))
			b := &scriptedBatch{fail: tc.fail}
			r := make(slotReader, queued)
			for i := range r {
				r[i] = slotWith([]byte{byte(i), 'x'})
				b.Add(r[i], socksclient.MaxUDPHeaderLen, s.target)
				s.fastSlots = append(s.fastSlots, fastSlot{i, s.target})
			}
			s.flushBatch(b, r)
			if !bytes.Equal(b.went, tc.went) {
				t.Errorf("the fast path sent %v, want %v", b.went, tc.went)
			}
			buf := make([]byte, 64)
			dst.SetReadDeadline(time.Now().Add(5 * time.Second))
			for _, want := range tc.session {
				n, _, err := dst.ReadFromUDPAddrPort(buf)
				if err != nil {
					t.Fatalf("the session sent no datagram %d: %v\n%s", want, err, logs)
				}
				if n != 2 || buf[0] != want {
					t.Fatalf("the session sent %v, want datagram %d (all it should send: %v)", buf[:n], want, tc.session)
				}
			}
			st := f.Stats()
			if up, want := st.DatagramsUp.Load(), int64(len(tc.went)+len(tc.session)); up != want {
				t.Errorf("DatagramsUp = %d, want %d", up, want)
			}
			if n := st.DroppedSend.Load(); n != tc.dropped {
				t.Errorf("DroppedSend = %d, want %d", n, tc.dropped)
			}
			f.Close()
			checkAccounted(t, &f.udpTable, queued)
		})
	}
}
