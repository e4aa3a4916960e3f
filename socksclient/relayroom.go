package socksclient

import (
	"math/bits"
	"net/netip"
	"sync"
	"time"

	"github.com/socksfwd/socksfwd/internal/sockdiag"
)

// Flow control toward a relay on this host.
//
// Over a network the link paces what a client sends: a burst leaves at the
// link's rate. Over loopback nothing does. A forwarder that was off the CPU
// for a few milliseconds sends its backlog at memory speed, and a relay
// socket with the kernel's default buffer (about 208 KB: some 90 datagrams
// of 1200 bytes) drops most of it, then idles until the next burst. A proxy
// on the same host is common (ss-local, Tor, a v2ray client, a sidecar),
// and there the kernel can say how full the relay's socket is. So a batch
// for a relay on a loopback address waits until the relay has room for it,
// as a write waits for room in a full socket buffer; what cannot wait stays
// in our own (larger) receive buffer, or is dropped there. Only Linux
// tells (sock_diag); elsewhere there is no flow control.

const (
	// A waiting batch sleeps relayPoll before it looks again, then twice
	// as long each time up to relayPollMax: a slow relay costs a few looks
	// a wait, and a sleep overshoots a relay's room by little next to the
	// couple of milliseconds a default buffer lasts. On Linux the thread
	// sleeps (nanosleep): Go's timers wait at least about a millisecond in
	// an otherwise idle process.
	relayPoll    = 50 * time.Microsecond
	relayPollMax = 200 * time.Microsecond
	// A wait ends after relayWaitMax, plus the time a quarter of the
	// relay's buffer takes to drain at relayMinDrain: the kernel gives a
	// UDP socket's memory back in quarters of its buffer, so a relay with
	// a big buffer makes room in big steps. A relay that has made no room
	// by then is stalled (its proxy stopped, say): its batches go at once,
	// and are dropped there as without flow control, for relayStallPause.
	relayWaitMax    = 10 * time.Millisecond
	relayMinDrain   = 16 << 20 // bytes per second
	relayStallPause = time.Second
)

// diagQuerier is the process's one netlink socket for looking at relays;
// nil where the kernel does not answer (no sock_diag, or a sandbox, or not
// Linux).
var diagQuerier = sync.OnceValue(func() *sockdiag.Querier {
	q, err := sockdiag.Open()
	if err != nil {
		return nil
	}
	return q
})

// relayProbe reads a relay socket's receive memory: *sockdiag.Querier, or
// a fake in tests.
type relayProbe interface {
	UDPReceiver(from, to netip.AddrPort) (sockdiag.Mem, error)
}

// relayRoom keeps one association's batches within its relay's free
// receive buffer. It belongs to the batch's goroutine.
type relayRoom struct {
	probe    relayProbe
	from, to netip.AddrPort
	stats    *UDPStats
	// credit is what the relay could still take at the last look, less
	// what was sent since. Sends within it need no look.
	credit     int
	pauseUntil time.Time
	nap        relayNap
	// sleep, when set, replaces nap between looks (tests: a clock they
	// control, or a relay that reads while the batch waits).
	sleep func(time.Duration)
}

// newRelayRoom returns flow control for datagrams from `from` to a relay
// at `to`, or nil when the relay is not on a loopback address or the
// kernel cannot find its socket (another namespace, a NAT rule, a system
// without sock_diag).
func newRelayRoom(from, to netip.AddrPort, stats *UDPStats) *relayRoom {
	if !to.Addr().Unmap().IsLoopback() {
		return nil
	}
	q := diagQuerier()
	if q == nil {
		return nil
	}
	return probeRelayRoom(q, from, to, stats)
}

// probeRelayRoom returns flow control through probe, or nil when it cannot
// see the relay's socket.
func probeRelayRoom(probe relayProbe, from, to netip.AddrPort, stats *UDPStats) *relayRoom {
	m, err := probe.UDPReceiver(from, to)
	if err != nil {
		return nil
	}
	return &relayRoom{probe: probe, from: from, to: to, stats: stats, credit: m.Limit - m.Queued}
}

// wait returns when the relay can take need more bytes (as the kernel
// charges them, see chargedSize), or when it has not made room in time.
func (r *relayRoom) wait(need int) {
	if need <= r.credit {
		r.credit -= need
		return
	}
	if r.probe == nil || (!r.pauseUntil.IsZero() && time.Now().Before(r.pauseUntil)) {
		return
	}
	var deadline time.Time
	for nap := relayPoll; ; nap = min(2*nap, relayPollMax) {
		m, err := r.probe.UDPReceiver(r.from, r.to)
		if err != nil {
			r.probe = nil // the relay's socket is gone, or the kernel stopped answering
			return
		}
		if free := m.Limit - m.Queued; need <= free || m.Queued == 0 {
			r.credit = max(free-need, 0)
			return
		}
		now := time.Now()
		if deadline.IsZero() {
			deadline = now.Add(relayWaitMax + time.Duration(m.Limit/4)*time.Second/relayMinDrain)
			r.stats.add(relayWaits)
		} else if !now.Before(deadline) { // at it exactly, a nap of 0 would spin
			r.stats.add(relayStalls)
			r.credit, r.pauseUntil = 0, now.Add(relayStallPause)
			return
		}
		if d := min(nap, deadline.Sub(now)); r.sleep != nil {
			r.sleep(d)
		} else {
			r.nap.sleep(d)
		}
	}
}

// chargedSize is what a datagram of n bytes costs a receiving socket's
// buffer over loopback: the kernel charges its whole allocation, rounded
// up to a power of two with room for the packet headers, plus its own
// bookkeeping. Measured on Linux 6: 64 bytes cost 832, 1210 bytes 2304,
// 9000 bytes 16 640; this errs by at most 64 bytes on the safe side.
func chargedSize(n int) int { return 1<<bits.Len(uint(n+400-1)) + 320 }
