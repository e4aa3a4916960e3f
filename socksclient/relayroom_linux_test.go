package socksclient

import (
	"net"
	"net/netip"
	"testing"
	"testing/synctest"
	"time"

	"golang.org/x/sys/unix"

	"github.com/socksfwd/socksfwd/internal/testnet"
	"github.com/socksfwd/socksfwd/internal/udpbatch"
)

// relayPair is a "relay" socket with a small receive buffer (64 KiB: room
// for some 28 datagrams of 1200 bytes) and a client socket connected to it.
func relayPair(t *testing.T) (relay, client *net.UDPConn) {
	t.Helper()
	relay = testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
	relay.SetReadBuffer(32 << 10) // the kernel doubles it
	client, err := net.DialUDP("udp4", nil, relay.LocalAddr().(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	return relay, client
}

// mustRelayRoom is flow control from client to relay, which the kernel
// must offer for a relay on 127.0.0.1.
func mustRelayRoom(t *testing.T, relay, client *net.UDPConn, stats *UDPStats) *relayRoom {
	t.Helper()
	room := newRelayRoom(addrPort(client), addrPort(relay), stats)
	if room == nil {
		t.Fatal("no flow control toward a relay on 127.0.0.1")
	}
	return room
}

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

// drain reads up to max datagrams that are waiting on c, without waiting
// for more, and returns how many it read.
func drain(t *testing.T, c *net.UDPConn, max int) int {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var buf [2048]byte
	n := 0
	rc.Read(func(fd uintptr) bool {
		for n < max {
			if _, err := unix.Read(int(fd), buf[:]); err != nil {
				break // EAGAIN: nothing more waiting
			}
			n++
		}
		return true
	})
	return n
}

// A burst far larger than the relay's buffer arrives whole: batches wait
// for room instead of overflowing it. The relay reads only while a batch
// waits, three datagrams per nap, so every batch after the first few must
// wait, and a batch sent without room would be dropped at the relay. The
// clock is synctest's: a nap advances it by exactly its length and
// nothing else does, so a loaded machine cannot turn a wait into a stall.
// (synctest sees no socket as blocked; none of these calls blocks.)
func TestRelayRoomHoldsBatchesBack(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		relay, client := relayPair(t)
		stats := new(UDPStats)
		room := mustRelayRoom(t, relay, client, stats)
		const total = 1000
		got, naps := 0, 0
		room.sleep = func(d time.Duration) {
			if naps++; naps > 100*total {
				t.Fatalf("%d naps for %d datagrams", naps, total)
			}
			got += drain(t, relay, 3)
			time.Sleep(d)
		}
		sendBatches(t, client, room, total, 1200)
		got += drain(t, relay, total)

		m, err := diagQuerier().UDPReceiver(addrPort(client), addrPort(relay))
		if err != nil {
			t.Fatal(err)
		}
		waits, stalls := stats.RelayWaits.Load(), stats.RelayStalls.Load()
		if batches := int64(total / 8); waits < batches/2 || stalls != 0 || m.Drops != 0 || got != total {
			t.Fatalf("%d of %d batches waited, %d stalled; the relay dropped %d datagrams; %d of %d arrived; "+
				"want most batches to wait, none to stall, no drop, every datagram",
				waits, batches, stalls, m.Drops, got, total)
		}
	})
}

// A relay that never reads stalls a wait: it ends after relayWaitMax and a
// bit, counted as a stall, with the thread's own nap (nanosleep) between
// looks.
func TestRelayRoomStalledRelay(t *testing.T) {
	relay, client := relayPair(t)
	for range 40 { // more than fits
		if _, err := client.Write(make([]byte, 1200)); err != nil {
			t.Fatal(err)
		}
	}
	stats := new(UDPStats)
	room := mustRelayRoom(t, relay, client, stats)
	room.wait(8 * chargedSize(1200))
	if w, s := stats.RelayWaits.Load(), stats.RelayStalls.Load(); w != 1 || s != 1 {
		t.Fatalf("%d waits and %d stalls, want one each", w, s)
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
