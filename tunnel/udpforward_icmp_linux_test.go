package tunnel

import (
	"encoding/binary"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/socksfwd/socksfwd/internal/peertest"
	"github.com/socksfwd/socksfwd/internal/testnet"
	"github.com/socksfwd/socksfwd/socksclient/sockstest"
)

// TestUDPForwardICMPErrorsKeepReader: ICMP errors other than port
// unreachable about a datagram sent to the relay (a firewall's REJECT
// answers "administratively prohibited", which reads as EHOSTUNREACH) are
// counted and the association's replies keep coming. Before, only
// ECONNREFUSED was read past: the reply reader stopped for good, with the
// association alive, and every later reply was lost uncounted. (Net and
// host unreachable, codes 0 and 1, are soft errors the kernel does not
// report to a socket without IP_RECVERR.)
func TestUDPForwardICMPErrorsKeepReader(t *testing.T) {
	for _, tc := range []struct {
		name string
		code byte
	}{{"port unreachable", 3}, {"administratively prohibited", 13}, {"host administratively prohibited", 10}} {
		t.Run(tc.name, func(t *testing.T) {
			f, fwd, logs := startUDPForward(t, sockstest.Config{}, udpFwdOpts{})
			c := udpClient(t, "udp4")
			if err := udpRoundTrip(c, fwd, []byte("before"), 5*time.Second); err != nil {
				t.Fatal(err)
			}
			a := liveAssoc(t, f, c)
			injectICMPUnreachable(t, tc.code, a.LocalAddr().(*net.UDPAddr).AddrPort(), a.Relay())
			logs.waitFor(t, "an ICMP error came back") // logged once counted
			if n := f.Stats().RelayRefused.Load(); n != 1 {
				t.Fatalf("RelayRefused = %d, want 1", n)
			}
			if err := udpRoundTrip(c, fwd, []byte("after"), 5*time.Second); err != nil {
				t.Fatalf("after the ICMP error: %v (association alive %v)", err, a.Alive())
			}
		})
	}
}

// TestUDPForwardFragNeededKeepsReader: an ICMP "fragmentation needed"
// about a datagram sent to the relay (a router on the way with a smaller
// MTU: PPPoE, a VPN) reads as EMSGSIZE on the association's socket; it is
// counted, and the replies keep coming. Before, it stopped the reply
// reader for good, the association still alive and every later reply
// lost uncounted. In a namespace of its own: the MTU the ICMP carries
// stays in the kernel's route cache.
func TestUDPForwardFragNeededKeepsReader(t *testing.T) {
	if !inFreshNetns(t) {
		return
	}
	run(t, "", "ip", "link", "set", "lo", "up")
	f, fwd, logs := startUDPForward(t, sockstest.Config{}, udpFwdOpts{})
	c := udpClient(t, "udp4")
	if err := udpRoundTrip(c, fwd, []byte("before"), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	a := liveAssoc(t, f, c)
	if err := testnet.InjectICMPUnreachable(4, 1280, a.LocalAddr().(*net.UDPAddr).AddrPort(), a.Relay()); err != nil {
		peertest.Missing(t, "a raw ICMP socket: %v", err)
	}
	logs.waitFor(t, "an ICMP error came back")
	for i := range 3 {
		if err := udpRoundTrip(c, fwd, []byte("after"), 5*time.Second); err != nil {
			t.Fatalf("round trip %d after the ICMP error: %v (association alive %v)", i, err, a.Alive())
		}
	}
}

// TestUDPForwardStrangersDoNotKeepSessionAlive: datagrams a stranger sends
// to the relay's outside port are dropped (WrongPeer) and do not count as
// the session's traffic: it still idles out. Before, each refreshed it, so
// an off-path host could keep a session and its association forever and
// it was never the idlest to evict.
func TestUDPForwardStrangersDoNotKeepSessionAlive(t *testing.T) {
	const idle = 300 * time.Millisecond
	f, fwd, _ := startUDPForward(t, sockstest.Config{}, udpFwdOpts{idle: idle})
	c := udpClient(t, "udp4")
	if err := udpRoundTrip(c, fwd, []byte("x"), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	relay := liveRelay(t, f, c)
	stranger := udpClient(t, "udp4")
	// Time passing is what is tested: the idle timeout, with a stranger
	// sending every third of it, for six of them.
	for range 18 {
		if _, err := stranger.WriteToUDPAddrPort([]byte("spray"), relay); err != nil {
			t.Fatal(err)
		}
		time.Sleep(idle / 3)
	}
	if n := f.Stats().Association.WrongPeer.Load(); n == 0 {
		t.Fatal("no stranger's datagram reached the association: the test proves nothing")
	}
	if hasSession(f, c) {
		t.Fatalf("the session is alive %v after the client's last datagram (idle timeout %v), kept by a stranger's", 6*idle, idle)
	}
}

// TestUDPForwardSessionStartKeepsOrder: a burst that starts a session
// comes out in the order it went in. The first datagrams queue while the
// session associates; the fast path, which opens once the association is
// live, used to send newer ones while older ones still waited in the
// queue.
func TestUDPForwardSessionStartKeepsOrder(t *testing.T) {
	_, fwd, _ := startUDPForward(t, sockstest.Config{}, udpFwdOpts{})
	for round := range 5 {
		c := udpClient(t, "udp4")
		for i := range 400 {
			if _, err := c.WriteToUDP(binary.BigEndian.AppendUint16(nil, uint16(i)), fwd); err != nil {
				t.Fatal(err)
			}
			if i%8 == 7 {
				// A paced burst, not a wait: datagrams keep coming while
				// the session associates and once it is live.
				time.Sleep(20 * time.Microsecond)
			}
		}
		// Echoes until none comes for a while: a burst may lose some to
		// full socket buffers; those that come must be in order.
		buf := make([]byte, 64)
		last, got := -1, 0
		for {
			c.SetReadDeadline(time.Now().Add(time.Second))
			n, _, err := c.ReadFromUDP(buf)
			if err != nil {
				break
			}
			if n != 2 {
				t.Fatalf("an echo of %d bytes", n)
			}
			i := int(binary.BigEndian.Uint16(buf))
			if i < last {
				t.Fatalf("round %d: echo %d came after %d: reordered at the session's start", round, i, last)
			}
			last, got = i, got+1
		}
		if got == 0 {
			t.Fatalf("round %d: no echo", round)
		}
	}
}

// injectICMPUnreachable sends to 127.0.0.1 an ICMP destination unreachable
// with code, quoting a UDP datagram from → to, as a router or firewall on
// the way to the relay would.
func injectICMPUnreachable(t *testing.T, code byte, from, to netip.AddrPort) {
	t.Helper()
	if err := testnet.InjectICMPUnreachable(code, 0, from, to); err != nil {
		peertest.Missing(t, "a raw ICMP socket: %v", err)
	}
}
