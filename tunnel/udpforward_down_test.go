package tunnel

import (
	"context"
	"io"
	"math/bits"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/socksfwd/socksfwd/internal/testnet"
	"github.com/socksfwd/socksfwd/socksclient"
	"github.com/socksfwd/socksfwd/socksclient/sockstest"
)

// refusingUpstream is a SOCKS server whose UDP ASSOCIATE names a relay
// port where nothing is taken yet, so that the first datagram sent there
// is refused (an ICMP port unreachable). It returns the server's address
// and the relay, which the test may answer later (refusingRelay.answer).
func refusingUpstream(t *testing.T) (string, *refusingRelay) {
	t.Helper()
	relay := newRefusingRelay(t)
	up := testnet.Serve(t, func(c net.Conn) {
		req, err := socksclient.Handshake(c, socksclient.ServerConfig{HandshakeTimeout: 10 * time.Second})
		if err != nil {
			return
		}
		req.Reply(socksclient.RepSucceeded, socksclient.AddrFromAddrPort(relay.addr.AddrPort()))
		io.Copy(io.Discard, c) // the association lasts until the client hangs up
	})
	return up.Addr().String(), relay
}

// forwardVia serves a UDPForward to target through the SOCKS server at
// proxy until cleanup.
func forwardVia(t *testing.T, proxy string, target socksclient.Addr) (*UDPForward, *net.UDPAddr, *logBuf) {
	t.Helper()
	pc := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
	logs := &logBuf{}
	f := NewUDPForward(UDPForwardConfig{
		Name: pc.LocalAddr().String(), Target: target,
		Upstreams: socksclient.NewUpstreams(&socksclient.Dialer{ProxyAddr: proxy, HandshakeTimeout: 5 * time.Second}),
		Logger:    zerolog.New(logs),
	}, pc)
	serveForTest(t, f)
	return f, pc.LocalAddr().(*net.UDPAddr), logs
}

// TestUDPForwardRelayRefused: an ICMP error from the proxy's relay (a
// datagram it refused) is counted and the session's replies still come
// back; it used to stop the association's reader for good.
func TestUDPForwardRelayRefused(t *testing.T) {
	proxy, relay := refusingUpstream(t)
	// The relay below is an echo: the reply carries the header sent, the
	// target's address.
	target := socksclient.Addr{IP: netip.MustParseAddr("192.0.2.1"), Port: 53}
	f, fwd, logs := forwardVia(t, proxy, target)
	c := udpClient(t, "udp4")
	if _, err := c.WriteToUDP([]byte("refused"), fwd); err != nil {
		t.Fatal(err)
	}
	logs.waitFor(t, "an ICMP error came back") // logged once counted
	if n := f.Stats().RelayRefused.Load(); n != 1 {
		t.Fatalf("RelayRefused = %d, want 1", n)
	}
	relay.answer(t)
	if err := udpRoundTrip(c, fwd, []byte("after"), 2*time.Second); err != nil {
		t.Fatalf("after the refusal: %v", err)
	}
}

// liveRelay is the relay address of the live association of the session
// of client c.
func liveRelay(t *testing.T, f *UDPForward, c *net.UDPConn) netip.AddrPort {
	t.Helper()
	return liveAssoc(t, f, c).Relay()
}

// liveAssoc is the live association of c's session (c on 127.0.0.1).
func liveAssoc(t *testing.T, f *UDPForward, c *net.UDPConn) *socksclient.UDPConn {
	t.Helper()
	src := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(c.LocalAddr().(*net.UDPAddr).Port))
	f.mu.Lock()
	s := f.sessions[src]
	f.mu.Unlock()
	if s == nil {
		t.Fatal("the client has no session")
	}
	a := s.live.Load()
	if a == nil {
		t.Fatal("the session has no live association")
	}
	return a
}

// TestUDPForwardDropsRepliesFromOthers: a relay passes on what anyone
// sends to its outside port. A reply whose header names another sender
// than the target (its address and port; its port alone when the target
// is a name the proxy resolved) is dropped and counted, never delivered
// as the target's.
func TestUDPForwardDropsRepliesFromOthers(t *testing.T) {
	for _, byName := range []bool{false, true} {
		f, fwd, _ := startUDPForward(t, sockstest.Config{}, udpFwdOpts{})
		if byName {
			// sockstest resolves it to 127.0.0.1, where the echo is.
			f.SetTarget(socksclient.Addr{Name: "localhost", Port: f.cfg.Target.Port})
		}
		c := udpClient(t, "udp4")
		if err := udpRoundTrip(c, fwd, []byte("first"), 5*time.Second); err != nil {
			t.Fatalf("by name %v: %v", byName, err)
		}
		stranger := udpClient(t, "udp4")
		if _, err := stranger.WriteToUDPAddrPort([]byte("injected by another host"), liveRelay(t, f, c)); err != nil {
			t.Fatal(err)
		}
		// The next datagram the client reads is the echo, not the injection.
		if err := udpRoundTrip(c, fwd, []byte("second"), 5*time.Second); err != nil {
			t.Fatalf("by name %v: %v", byName, err)
		}
		// The relay passed the injection on before it read "second", sent
		// after it, and the association's one reader dropped it before it
		// read the echo. An echo can reach the client before the forward
		// has counted it: once Close has waited for the sessions and their
		// readers, the counters are final.
		f.Close()
		if n := f.Stats().Association.WrongPeer.Load(); n != 1 {
			t.Fatalf("by name %v: Association.WrongPeer = %d, want 1", byName, n)
		}
		if n := f.Stats().DatagramsDown.Load(); n != 2 {
			t.Fatalf("by name %v: %d datagrams down, want the 2 echoes", byName, n)
		}
	}
}

// TestUDPForwardReassociationBacksOff: a proxy that ends every association
// at once (here after its first datagram) costs a handful of handshakes,
// not one per client datagram: associations that die young make the
// session wait, longer each time, before the next; the datagrams
// meanwhile are dropped and counted.
func TestUDPForwardReassociationBacksOff(t *testing.T) {
	requested := make(chan socksclient.Request, 64)
	f, fwd, logs := startUDPForward(t, sockstest.Config{UDPCloseControlAfter: 1, Requested: requested}, udpFwdOpts{})
	c := udpClient(t, "udp4")
	buf := make([]byte, 64)
	start := time.Now()
	for i := range 20 {
		if _, err := c.WriteToUDP([]byte{byte(i)}, fwd); err != nil {
			t.Fatal(err)
		}
		// An echo or none: the association ends right after the datagram.
		c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		c.ReadFromUDP(buf)
	}
	// The backoff allows associations at 0, 0.1, 0.3, 0.7, 1.5, 3.1 s...:
	// about log2 of the tenths of a second the loop took, plus some in
	// hand for a slow machine. Without it there is one per datagram.
	allowed := 3 + bits.Len(uint(time.Since(start)/(100*time.Millisecond)))
	if n := len(requested); n < 1 || n > allowed {
		t.Fatalf("%d UDP ASSOCIATE requests for 20 datagrams in %s, want 1 to %d\n%s", n, time.Since(start), allowed, logs)
	}
	stopServing(t, f) // Serve counts what it sends on the fast path: it must have returned
	if f.Stats().DroppedNoAssoc.Load() == 0 || f.Stats().DroppedQueue.Load() != 0 {
		t.Errorf("%d datagrams counted as dropped for want of an association while the session waited, %d for a full queue",
			f.Stats().DroppedNoAssoc.Load(), f.Stats().DroppedQueue.Load())
	}
	checkAccounted(t, &f.udpTable, f.Stats().Received.Load())
}

// TestUDPForwardOversizeCountedOnce: a datagram too large for a SOCKS
// header, on a session with a live association (the fast path), is
// counted once by the association and once among the forward's drops; the
// session path used to count it in the association a second time.
func TestUDPForwardOversizeCountedOnce(t *testing.T) {
	f, fwd, _ := startUDPForward(t, sockstest.Config{}, udpFwdOpts{})
	c := udpClient(t, "udp4")
	if err := udpRoundTrip(c, fwd, []byte("live"), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	// It fits IPv4, but not with a 10-byte SOCKS header.
	if _, err := c.WriteToUDP(make([]byte, socksclient.MaxUDPDatagram-5), fwd); err != nil {
		t.Fatal(err)
	}
	st := f.Stats()
	if err := udpRoundTrip(c, fwd, []byte("after"), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	// Serve counted the oversized datagram, sent first, before it read
	// this one.
	if n := st.DroppedLarge.Load(); n != 1 {
		t.Fatalf("DroppedLarge = %d, want 1", n)
	}
	if n := st.Association.TooLarge.Load(); n != 1 {
		t.Fatalf("Association.TooLarge = %d, want 1", n)
	}
	// Serve counts a fast-path datagram after sending it, and its echo
	// can come first: Serve must have returned, not only Close.
	stopServing(t, f)
	checkAccounted(t, &f.udpTable, st.Received.Load())
}

// TestUDPForwardReplySendFailureCounted: a reply the listening socket
// fails to send to the client is counted as dropped.
func TestUDPForwardReplySendFailureCounted(t *testing.T) {
	echo := socksclient.AddrFromAddrPort(testnet.UDPEcho(t).LocalAddr().(*net.UDPAddr).AddrPort())
	proxy := newSocks(t, sockstest.Config{})
	f, _, logs := forwardVia(t, proxy.Addr(), echo)
	a, err := (&socksclient.Dialer{ProxyAddr: proxy.Addr(), HandshakeTimeout: 5 * time.Second}).Associate(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	// A client nothing can be sent to (port 0: EINVAL), with the reader
	// the session would start.
	s := &udpSession{t: &f.udpTable, client: netip.MustParseAddrPort("127.0.0.1:0"), target: echo}
	done := make(chan struct{})
	go func() {
		defer close(done)
		f.copyDown(s, a)
	}()
	defer func() {
		a.Close()
		<-done
	}()
	if err := a.WritePacket(make([]byte, socksclient.MaxUDPHeaderLen+5), socksclient.MaxUDPHeaderLen, echo); err != nil {
		t.Fatal(err)
	}
	logs.waitFor(t, "UDP datagram dropped: a reply could not be delivered") // logged once counted
	if n := f.Stats().DroppedReply.Load(); n != 1 {
		t.Fatalf("DroppedReply = %d, want 1", n)
	}
	if n := f.Stats().DatagramsDown.Load(); n != 0 {
		t.Fatalf("DatagramsDown = %d, want 0", n)
	}
}

// TestQueueFastKeepsBatchOfReplacedAssociation: when a session's live
// association changes within one read (the proxy ended the first, the
// session built a second), a datagram for the new one does not replace
// the batch that still holds datagrams for the old one: it takes the
// session path, and the old batch keeps what it holds for the flush.
// Before, the batch was replaced and those datagrams were neither sent
// nor counted.
func TestQueueFastKeepsBatchOfReplacedAssociation(t *testing.T) {
	proxy := newSocks(t, sockstest.Config{})
	d := &socksclient.Dialer{ProxyAddr: proxy.Addr(), HandshakeTimeout: 5 * time.Second}
	var assocs [2]*socksclient.UDPConn
	for i := range assocs {
		a, err := d.Associate(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		defer a.Close()
		assocs[i] = a
	}
	target := socksclient.AddrFromAddrPort(netip.MustParseAddrPort("127.0.0.1:9"))
	s := &udpSession{fixed: true, target: target}
	slot := func() []byte { return make([]byte, socksclient.MaxUDPHeaderLen+4) }
	s.live.Store(assocs[0])
	if got := s.queueFast(slot(), 0, target); got != fastQueued {
		t.Fatalf("first datagram: %d, want queued", got)
	}
	held := s.fast
	s.live.Store(assocs[1])
	if got := s.queueFast(slot(), 1, target); got != fastNone {
		t.Fatalf("a datagram for the new association: %d, want it left to the session path", got)
	}
	if s.fast != held || len(s.fastSlots) != 1 {
		t.Fatalf("the batch holding the first datagram was replaced (slots %d)", len(s.fastSlots))
	}
}
