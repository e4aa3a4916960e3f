package tunnel

import (
	"net"
	"net/netip"
	"testing"
	"testing/synctest"
	"time"

	"github.com/rs/zerolog"

	"github.com/socksfwd/socksfwd/internal/peertest"
	"github.com/socksfwd/socksfwd/internal/testnet"
)

// TestReplyPoolRawSocketExpires: the raw socket made for replies whose
// reply socket could not bind is closed once unused for the idle timeout
// (the kernel copies every UDP packet the host receives to a raw UDP
// socket, filtered or not), and made again when needed.
func TestReplyPoolRawSocketExpires(t *testing.T) {
	peertest.RequireRoot(t) // CAP_NET_RAW
	client := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
	to := client.LocalAddr().(*net.UDPAddr).AddrPort()
	from := netip.MustParseAddrPort("127.0.0.1:9")
	synctest.Test(t, func(t *testing.T) {
		var stats TransparentUDPStats
		p := newReplyPool(4, time.Minute, &TransparentUDPConfig{Logger: zerolog.Nop()}, &stats)
		defer p.close()
		if !p.sendRaw([]byte("hi"), from, to) {
			t.Fatal("raw send failed")
		}
		raw := func() bool { p.mu.Lock(); defer p.mu.Unlock(); return p.raw[0] != nil }
		time.Sleep(30 * time.Second)
		p.expire()
		if !raw() {
			t.Fatal("the raw socket was closed while in use")
		}
		time.Sleep(time.Minute)
		p.expire()
		if raw() {
			t.Fatal("the raw socket is still open after a minute unused")
		}
		if !p.sendRaw([]byte("again"), from, to) || !raw() {
			t.Fatal("no raw socket made again when needed")
		}
	})
	buf := make([]byte, 16)
	for _, want := range []string{"hi", "again"} {
		client.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, src, err := client.ReadFromUDPAddrPort(buf)
		if err != nil || string(buf[:n]) != want || src != from {
			t.Fatalf("got %q from %v (%v), want %q from %v", buf[:n], src, err, want, from)
		}
	}
}
