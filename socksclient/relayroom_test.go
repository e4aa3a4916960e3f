package socksclient

import (
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/socksfwd/socksfwd/internal/testnet"
	"github.com/socksfwd/socksfwd/internal/udpbatch"
)

// relayPair is a "relay" socket with a small receive buffer and a client
// socket connected to it, with flow control between them.
func relayPair(t *testing.T) (relay, client *net.UDPConn, room *relayRoom, stats *UDPStats) {
	t.Helper()
	relay = testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
	relay.SetReadBuffer(32 << 10) // the kernel doubles it: room for ~27 datagrams of 1200 bytes
	client, err := net.DialUDP("udp4", nil, relay.LocalAddr().(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	stats = new(UDPStats)
	room = newRelayRoom(addrPort(client), addrPort(relay), stats)
	if room == nil {
		t.Fatal("no flow control toward a relay on 127.0.0.1")
	}
	return relay, client, room, stats
}

func addrPort(c *net.UDPConn) netip.AddrPort { return c.LocalAddr().(*net.UDPAddr).AddrPort() }

// sendBatches sends n datagrams of size bytes in batches of 8, each batch
// waiting for room first, as UDPBatch.Flush does.
func sendBatches(t *testing.T, client *net.UDPConn, room *relayRoom, n, size int) {
	t.Helper()
	w, err := udpbatch.NewWriter(client, 8)
	if err != nil {
		t.Fatal(err)
	}
	payload := make([]byte, size)
	for sent := 0; sent < n; {
		need := 0
		for ; sent < n && !w.Full(); sent++ {
			w.Add(payload, netip.AddrPort{})
			need += chargedSize(size)
		}
		room.wait(need)
		if _, err := w.Flush(); err != nil {
			t.Fatalf("flush: %v", err)
		}
	}
}

// A burst far larger than the relay's buffer, toward a relay that reads
// slowly, arrives whole: batches wait for room instead of overflowing it.
func TestRelayRoomHoldsBatchesBack(t *testing.T) {
	relay, client, room, stats := relayPair(t)
	const total = 1000
	var got atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 2048)
		pause := unix.NsecToTimespec(20_000) // ~20 µs a datagram: far slower than the sender
		relay.SetReadDeadline(time.Now().Add(10 * time.Second))
		for got.Load() < total {
			if _, err := relay.Read(buf); err != nil {
				return
			}
			got.Add(1)
			unix.Nanosleep(&pause, nil)
		}
	}()
	sendBatches(t, client, room, total, 1200)
	<-done

	if stats.RelayWaits.Load() == 0 {
		t.Fatal("no batch waited: the burst never filled the relay's buffer")
	}
	if stalls := stats.RelayStalls.Load(); stalls > 0 {
		// The reader made no room for relayWaitMax (a starved test
		// machine): flow control gave up as designed, so some loss is
		// expected.
		t.Logf("%d stalls; %d of %d arrived", stalls, got.Load(), total)
		return
	}
	if got.Load() != total {
		t.Fatalf("%d of %d datagrams arrived", got.Load(), total)
	}
}

// A relay that never reads stalls one wait; for relayStallPause after it,
// batches go at once (and the relay drops them) instead of each waiting.
func TestRelayRoomStalledRelay(t *testing.T) {
	_, client, room, stats := relayPair(t)
	sendBatches(t, client, room, 400, 1200) // 15 times what fits
	if w, s := stats.RelayWaits.Load(), stats.RelayStalls.Load(); w != 1 || s != 1 {
		t.Fatalf("%d waits and %d stalls, want one each", w, s)
	}
}

// Only a relay on a loopback address whose socket the kernel can find is
// flow-controlled.
func TestNewRelayRoom(t *testing.T) {
	from := netip.MustParseAddrPort("127.0.0.1:40000")
	if newRelayRoom(from, netip.MustParseAddrPort("192.0.2.1:1080"), new(UDPStats)) != nil {
		t.Error("flow control toward a relay on another host")
	}
	gone := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
	to := addrPort(gone)
	gone.Close()
	if newRelayRoom(from, to, new(UDPStats)) != nil {
		t.Error("flow control toward a port nobody has bound")
	}
}

// chargedSize never underestimates what the kernel charges the receiving
// socket for a datagram over loopback.
func TestChargedSize(t *testing.T) {
	q := diagQuerier()
	if q == nil {
		t.Fatal("no socket diagnostics on this kernel")
	}
	for _, size := range []int{1, 64, 512, 1210, 1472, 4000, 9000, 30000} {
		rx := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
		tx, err := net.DialUDP("udp4", nil, rx.LocalAddr().(*net.UDPAddr))
		if err != nil {
			t.Fatal(err)
		}
		tx.Write(make([]byte, size))
		m, err := q.UDPReceiver(addrPort(tx), addrPort(rx))
		tx.Close()
		rx.Close()
		if err != nil {
			t.Fatal(err)
		}
		if m.Queued > chargedSize(size) {
			t.Errorf("a %d-byte datagram is charged %d bytes, chargedSize says %d", size, m.Queued, chargedSize(size))
		}
	}
}
