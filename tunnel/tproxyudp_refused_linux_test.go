package tunnel

import (
	"context"
	"net"
	"net/netip"
	"testing"

	"github.com/socksfwd/socksfwd/socksclient"
)

// TestTransparentUDPRelayRefused: an ICMP error from the proxy's relay (a
// datagram it refused) is counted and the association's reader reads on;
// it used to stop for good, so that no reply reached the client again.
func TestTransparentUDPRelayRefused(t *testing.T) {
	proxy, relay := refusingUpstream(t)
	dial := func(ctx context.Context, network, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, proxy)
	}
	tu, logs := quietTransparent(t, dial, TransparentUDPConfig{})
	a, _, err := tu.upstreams.Associate(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	// The reader the session would start, for a client that sends nothing
	// itself.
	s := &udpSession{t: &tu.udpTable, client: netip.MustParseAddrPort("127.0.0.2:9")}
	done := make(chan struct{})
	go func() {
		defer close(done)
		tu.copyDown(s, a)
	}()
	defer func() {
		a.Close()
		<-done
	}()
	// A remote by name: the echoed reply names it, which a transparent
	// reply cannot come from, so it is dropped and counted without a
	// reply socket (and so without IP_TRANSPARENT).
	remote := socksclient.Addr{Name: "remote.test", Port: 7}
	send := func() {
		t.Helper()
		if err := a.WritePacket(make([]byte, socksclient.MaxUDPHeaderLen+5), socksclient.MaxUDPHeaderLen, remote); err != nil {
			t.Fatal(err)
		}
	}
	send()
	st := tu.Stats()
	logs.waitFor(t, "an ICMP error came back") // logged once counted
	if n := st.RelayRefused.Load(); n != 1 {
		t.Fatalf("RelayRefused = %d, want 1", n)
	}
	relay.answer(t)
	send()
	// The reply read after the refusal: the reader went on.
	logs.waitFor(t, "UDP datagram dropped: a reply could not be delivered")
	if n := st.DroppedReply.Load(); n != 1 {
		t.Fatalf("DroppedReply = %d, want 1", n)
	}
}
