package socksclient

import (
	"errors"
	"net"
	"net/netip"
	"testing"
	"testing/synctest"
	"time"

	"github.com/socksfwd/socksfwd/internal/sockdiag"
	"github.com/socksfwd/socksfwd/internal/testnet"
)

func addrPort(c *net.UDPConn) netip.AddrPort { return c.LocalAddr().(*net.UDPAddr).AddrPort() }

// fakeRelay is a relay's socket as the probe sees it: limit bytes of
// buffer, queued of them taken, read at drainRate bytes a second of
// synctest's clock.
type fakeRelay struct {
	limit, queued int
	drainRate     int
	last          time.Time
	looks         int
	err           error // what the next look fails with
}

func newFakeRelay(limit, queued, drainRate int) *fakeRelay {
	return &fakeRelay{limit: limit, queued: queued, drainRate: drainRate, last: time.Now()}
}

func (f *fakeRelay) UDPReceiver(from, to netip.AddrPort) (sockdiag.Mem, error) {
	f.looks++
	if f.err != nil {
		return sockdiag.Mem{}, f.err
	}
	f.advance()
	return sockdiag.Mem{Queued: f.queued, Limit: f.limit}, nil
}

func (f *fakeRelay) advance() {
	now := time.Now()
	f.queued = max(0, f.queued-int(now.Sub(f.last).Seconds()*float64(f.drainRate)))
	f.last = now
}

// send is a batch of n bytes arriving, after its wait.
func (f *fakeRelay) send(n int) {
	f.advance()
	f.queued += n
}

// fakeRoom is flow control toward f whose naps are synctest's sleeps,
// bounded in number.
func fakeRoom(t *testing.T, f *fakeRelay) (*relayRoom, *UDPStats) {
	t.Helper()
	stats := new(UDPStats)
	room := probeRelayRoom(f, netip.MustParseAddrPort("127.0.0.1:40000"), netip.MustParseAddrPort("127.0.0.1:1080"), stats)
	if room == nil {
		t.Fatal("no flow control through a probe that answers")
	}
	naps := 0
	room.sleep = func(d time.Duration) {
		// A wait naps a few dozen times at most before it stalls.
		if naps++; naps > 10000 {
			t.Fatalf("%d naps: the wait spins (this nap: %v)", naps, d)
		}
		time.Sleep(d)
	}
	return room, stats
}

const batch = 8 * 2368 // eight datagrams of 1200 bytes, as charged

// Batches within the room the relay had at the last look go without
// another look; the first beyond it looks again.
func TestRelayRoomCredit(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFakeRelay(4*batch, 0, 0)
		room, stats := fakeRoom(t, f)
		for range 4 {
			room.wait(batch)
			f.send(batch)
		}
		if f.looks != 1 || stats.RelayWaits.Load() != 0 {
			t.Fatalf("%d looks and %d waits for four batches that fit, want the first look only", f.looks, stats.RelayWaits.Load())
		}
		f.queued = 0 // the relay read everything
		room.wait(batch)
		if f.looks != 2 || stats.RelayWaits.Load() != 0 {
			t.Fatalf("%d looks and %d waits for a fifth batch the relay has room for again, want one more look, no wait", f.looks, stats.RelayWaits.Load())
		}
	})
}

// A batch for a full relay waits until the relay has read enough for it,
// and no longer: it never lands in a buffer without room for it.
func TestRelayRoomWaitsForRoom(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFakeRelay(64<<10, 64<<10, 4<<20)
		room, stats := fakeRoom(t, f)
		start := time.Now()
		for range 100 {
			room.wait(batch)
			f.send(batch)
			if f.queued > f.limit {
				t.Fatalf("a batch went with %d bytes queued in a %d-byte buffer", f.queued-batch, f.limit)
			}
		}
		elapsed := time.Since(start)
		if stats.RelayWaits.Load() < 90 || stats.RelayStalls.Load() != 0 {
			t.Fatalf("%d waits and %d stalls for 100 batches into a full relay, want a wait for nearly each and no stall",
				stats.RelayWaits.Load(), stats.RelayStalls.Load())
		}
		// The batches went at the relay's pace: no faster, and no slower than
		// a nap's overshoot per batch.
		pace := time.Duration(100*batch) * time.Second / time.Duration(f.drainRate)
		if elapsed < pace-time.Duration(f.limit)*time.Second/time.Duration(f.drainRate) || elapsed > pace+100*relayPollMax {
			t.Fatalf("100 batches took %v; the relay reads them in %v", elapsed, pace)
		}
	})
}

// A relay that makes no room stalls the wait after relayWaitMax and the
// time a quarter of its buffer takes at relayMinDrain; for
// relayStallPause after that, batches go at once without a look; then
// flow control looks again.
func TestRelayRoomStall(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFakeRelay(64<<10, 64<<10, 0)
		room, stats := fakeRoom(t, f)
		start := time.Now()
		room.wait(batch)
		waited := time.Since(start)
		limit := relayWaitMax + time.Duration(f.limit/4)*time.Second/relayMinDrain
		if stats.RelayWaits.Load() != 1 || stats.RelayStalls.Load() != 1 || waited < limit || waited > limit+relayPollMax {
			t.Fatalf("%d waits, %d stalls after %v; want one each after %v", stats.RelayWaits.Load(), stats.RelayStalls.Load(), waited, limit)
		}
		looks := f.looks
		time.Sleep(relayStallPause - time.Millisecond)
		room.wait(batch)
		if f.looks != looks || stats.RelayWaits.Load() != 1 {
			t.Fatalf("a batch during the pause after a stall looked or waited")
		}
		time.Sleep(time.Millisecond)
		f.queued = 0
		room.wait(batch)
		if f.looks != looks+1 {
			t.Fatalf("after the pause: %d looks, want %d", f.looks, looks+1)
		}
	})
}

// A batch larger than the relay's whole buffer goes once the buffer is
// empty: waiting longer would never make room.
func TestRelayRoomBatchLargerThanBuffer(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFakeRelay(16<<10, 0, 4<<20)
		room, stats := fakeRoom(t, f)
		room.wait(batch)
		if stats.RelayWaits.Load() != 0 {
			t.Fatal("a batch waited for an empty relay")
		}
		f.send(batch)
		room.wait(batch)
		if f.queued != 0 || stats.RelayWaits.Load() != 1 || stats.RelayStalls.Load() != 0 {
			t.Fatalf("%d bytes queued, %d waits, %d stalls; want one wait until the relay was empty",
				f.queued, stats.RelayWaits.Load(), stats.RelayStalls.Load())
		}
	})
}

// When the probe stops answering (the relay's socket is gone), flow
// control turns off for good: no more looks, no waits.
func TestRelayRoomProbeFails(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFakeRelay(64<<10, 64<<10, 0)
		room, stats := fakeRoom(t, f)
		f.err = sockdiag.ErrNoSocket
		room.wait(batch)
		room.wait(batch)
		if f.looks != 2 || stats.RelayWaits.Load() != 0 {
			t.Fatalf("%d looks and %d waits, want one failed look after the first and no wait", f.looks, stats.RelayWaits.Load())
		}
	})
	f := newFakeRelay(0, 0, 0)
	f.err = errors.New("no answer")
	if probeRelayRoom(f, netip.AddrPort{}, netip.AddrPort{}, new(UDPStats)) != nil {
		t.Fatal("flow control through a probe that cannot see the relay")
	}
}

// Only a relay on a loopback address whose socket the kernel can find is
// flow-controlled (and none where the kernel cannot tell: not Linux).
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
