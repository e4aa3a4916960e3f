package tunnel

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/socksfwd/socksfwd/internal/testnet"
	"github.com/socksfwd/socksfwd/socksclient"
	"github.com/socksfwd/socksfwd/socksclient/sockstest"
)

type udpFwdOpts struct {
	idle        time.Duration
	maxSessions int
	listen      string         // default 127.0.0.1:0
	target      netip.AddrPort // default: a UDP echo
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
	f := NewUDPForward(UDPForwardConfig{
		Name: pc.LocalAddr().String(), Target: socksclient.AddrFromAddrPort(o.target),
		Upstreams:   socksclient.NewUpstreams(&socksclient.Dialer{ProxyAddr: proxy.Addr(), HandshakeTimeout: 5 * time.Second}),
		IdleTimeout: o.idle, MaxSessions: o.maxSessions,
		Logger: zerolog.New(logs).Level(zerolog.DebugLevel),
	}, pc)
	served := make(chan error, 1)
	go func() { served <- f.Serve(context.Background()) }()
	t.Cleanup(func() {
		f.Close()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
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

// udpRoundTrip sends msg to the forward and waits for the echo, resending
// (at most 5 times) in case the datagram was lost to an association change.
func udpRoundTrip(c *net.UDPConn, fwd *net.UDPAddr, msg []byte, wait time.Duration) error {
	buf := make([]byte, 65536)
	for range 5 {
		if _, err := c.WriteToUDP(msg, fwd); err != nil {
			return err
		}
		c.SetReadDeadline(time.Now().Add(wait))
		n, _, err := c.ReadFromUDP(buf)
		if err != nil {
			continue
		}
		if !bytes.Equal(buf[:n], msg) {
			return fmt.Errorf("got %d bytes, want %d", n, len(msg))
		}
		return nil
	}
	return fmt.Errorf("no echo for %d-byte datagram", len(msg))
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
	f, fwd, _ := startUDPForward(t, sockstest.Config{}, udpFwdOpts{listen: "[::1]:0"})
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
}

func TestUDPForwardSessionCap(t *testing.T) {
	f, fwd, logs := startUDPForward(t, sockstest.Config{}, udpFwdOpts{maxSessions: 1})
	first, second := udpClient(t, "udp4"), udpClient(t, "udp4")
	if err := udpRoundTrip(first, fwd, []byte("one"), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := udpRoundTrip(second, fwd, []byte("two"), 200*time.Millisecond); err == nil {
		t.Fatal("a new source beyond the cap got through")
	}
	if err := udpRoundTrip(first, fwd, []byte("still"), 5*time.Second); err != nil {
		t.Fatalf("existing session stopped working: %v", err)
	}
	if f.Stats().DroppedFull.Load() == 0 {
		t.Fatal("drops not counted")
	}
	logs.waitFor(t, "UDP session table full")
}

// A slow relay on this host with a small buffer gets bursts several times
// its size whole: the forward's batches wait for room in its socket (the
// burst waits in the forward's own buffer), and the session's log line
// counts the waits.
func TestUDPForwardSlowLocalRelay(t *testing.T) {
	sink := testnet.NewUDPSink(t)
	f, fwd, logs := startUDPForward(t, sockstest.Config{UDPSlowRelay: true}, udpFwdOpts{target: sink.Addr()})
	c := udpClient(t, "udp4")
	arrived := func(n int64) bool {
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
			if sink.Count() >= n {
				return true
			}
		}
		return false
	}
	// The session and its association first.
	for range 5 {
		c.WriteToUDP([]byte("first"), fwd)
		if arrived(1) {
			break
		}
	}
	// Waves of 60 datagrams of 1200 bytes (about 140 KB as the kernel
	// counts them) fit the forward's socket even where it cannot grow
	// past the default 208 KB; the relay keeps 64 KiB.
	const waves, wave = 5, 60
	start := sink.Count()
	for i := range waves {
		for range wave {
			if _, err := c.WriteToUDP(make([]byte, 1200), fwd); err != nil {
				t.Fatal(err)
			}
		}
		if !arrived(start + int64((i+1)*wave)) {
			break
		}
	}
	f.Close()
	logs.waitFor(t, "UDP session ended")
	if !strings.Contains(logs.String(), `"relay_waits":`) {
		t.Fatalf("no batch waited for the relay:\n%s", logs)
	}
	if lost := start + waves*wave - sink.Count(); lost != 0 {
		if strings.Contains(logs.String(), `"relay_stalls":0`) {
			t.Fatalf("%d of %d datagrams lost though no wait was given up:\n%s", lost, waves*wave, logs)
		}
		t.Logf("%d lost after the relay stalled on a starved machine:\n%s", lost, logs)
	}
}

func TestUDPForwardIdleTimeout(t *testing.T) {
	f, fwd, logs := startUDPForward(t, sockstest.Config{}, udpFwdOpts{idle: 50 * time.Millisecond})
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

func TestUDPForwardControlDropped(t *testing.T) {
	_, fwd, logs := startUDPForward(t, sockstest.Config{UDPCloseControlAfter: 2}, udpFwdOpts{})
	c := udpClient(t, "udp4")
	for i := range 6 {
		if err := udpRoundTrip(c, fwd, []byte{byte(i)}, 300*time.Millisecond); err != nil {
			t.Fatalf("datagram %d: %v\n%s", i, err, logs)
		}
	}
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
