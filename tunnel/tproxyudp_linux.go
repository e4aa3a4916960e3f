package tunnel

import (
	"context"
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/socksfwd/socksfwd/internal/allowlist"
	"github.com/socksfwd/socksfwd/internal/logthrottle"
	"github.com/socksfwd/socksfwd/internal/sockbuf"
	"github.com/socksfwd/socksfwd/socksclient"
)

// Log causes of a transparent UDP listener, besides the UDP forward's.
const (
	causeNoDest        = "no original destination" + onlyRedirected
	causeNotRedirected = "not redirected" + onlyRedirected
	onlyRedirected     = " (only datagrams a TPROXY rule sent are relayed)"
	causeOwnRelay      = "addressed to one of this listener's own UDP relays: the capture rules brought socksfwd's own datagrams back (leave its traffic out with --mark, or the relay's address with --exclude)"
)

// TransparentUDP relays datagrams that TPROXY rules sent to its socket:
// one session per client address, each with its own UDP ASSOCIATE that
// carries the client's datagrams to any number of destinations (each
// datagram's original destination, as an IP address), and brings replies
// back with the remote's address as their source.
type TransparentUDP struct {
	udpTable // sessions that send each datagram to its own destination
	cfg      TransparentUDPConfig
	pc       *net.UDPConn
	listen   netip.AddrPort
	replies  *replyPool
	relays   relaySet // of the live associations: datagrams to them are our own, come back
	stats    TransparentUDPStats
	// packetInfo: datagrams carry the interface they arrived on (asked
	// for once an allow list is set).
	packetInfo atomic.Bool
}

// NewTransparentUDP returns a listener serving on pc, which
// ListenTransparentUDP opened.
func NewTransparentUDP(cfg TransparentUDPConfig, pc *net.UDPConn) *TransparentUDP {
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = DefaultUDPIdleTimeout
	}
	if cfg.MaxReplySockets <= 0 {
		cfg.MaxReplySockets = DefaultTProxyReplySockets
	}
	sockbuf.Grow(pc)
	listen := pc.LocalAddr().(*net.UDPAddr).AddrPort()
	t := &TransparentUDP{
		cfg: cfg, pc: pc,
		listen: netip.AddrPortFrom(listen.Addr().Unmap(), listen.Port()),
	}
	t.configure(udpTableConfig{
		name: cfg.Name, logger: cfg.Logger, upstreams: cfg.Upstreams, stats: &t.stats.UDPStats,
		endMsg: "transparent UDP session ended", copyDown: t.copyDown,
		idleTimeout: cfg.IdleTimeout, maxSessions: cfg.MaxSessions, queueBytes: cfg.QueueBytes,
		relays: &t.relays,
	})
	t.replies = newReplyPool(cfg.MaxReplySockets, cfg.IdleTimeout, &t.cfg, &t.stats)
	return t
}

// SetLimits changes the idle timeout of the sessions started from now on
// and the bound of the session table (a reload), as UDPForward's does;
// zero or less means the default. Live sessions keep their timeout; a
// lower bound ends no session at once. Reply sockets keep the idle
// timeout the listener started with.
func (t *TransparentUDP) SetLimits(idleTimeout time.Duration, maxSessions int) {
	t.udpTable.SetLimits(idleTimeout, maxSessions)
}

// SetAllow sets the client sources served from now on (nil: every
// source). With a list, each datagram also says the interface it arrived
// on, so that the host's own (captured local programs, on loopback) is
// served whatever its source address; without one that costs nothing.
func (t *TransparentUDP) SetAllow(l *allowlist.List) {
	if l != nil && !t.packetInfo.Swap(true) {
		if err := recvPacketInfo(t.pc); err != nil {
			t.cfg.Logger.Warn().Err(err).Str("listener", t.cfg.Name).
				Msg("cannot learn datagrams' interface: the host's own are held to --allow by their source address")
		}
	}
	t.udpTable.SetAllow(l)
}

// Stats returns the live counters.
func (t *TransparentUDP) Stats() *TransparentUDPStats { return &t.stats }

// Addr is the listening address.
func (t *TransparentUDP) Addr() net.Addr { return t.pc.LocalAddr() }

// Shutdown stops the listener. UDP has nothing to drain, so it is Close.
func (t *TransparentUDP) Shutdown(ctx context.Context) error { return t.Close() }

// Close stops reading, ends every session, closes the reply sockets and
// waits for every goroutine. It is idempotent.
func (t *TransparentUDP) Close() error {
	t.closeSessions(t.pc)
	t.replies.close() // after the sessions, which send through it
	return nil
}

// Serve reads datagrams until Close (or ctx is done) and hands each to
// its client's session; it returns nil on such a stop. Datagrams come in
// batches (recvmmsg) with their original destinations. Those of sessions
// with a live association are wrapped in place and sent from here, a
// batch per session; the others are copied to the session, which
// associates first.
func (t *TransparentUDP) Serve(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() { t.Close() })
	defer stop()
	// Started under the table's lock, so that a Close that came first is
	// seen, and one that comes later waits for it.
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return nil
	}
	t.wg.Go(t.expireReplies)
	t.mu.Unlock()
	r, err := newOrigDstReader(t.pc, newReadSlots(), socksclient.MaxUDPHeaderLen)
	if err != nil {
		return err
	}
	d := newUDPDispatch()
	return t.serveBatches(r.Read, func(n int) {
		packetInfo := t.packetInfo.Load() // asked for with an allow list only
		for i := range n {
			if r.Truncated(i) {
				t.dropped(&t.stats.DroppedLarge, causeOversize)
				continue
			}
			dst, ok := r.OrigDst(i)
			if !ok {
				t.dropUnrouted(causeNoDest, &t.stats.DroppedNoDest, r.Addr(i), dst)
				continue
			}
			if dst.Port() == t.listen.Port() && isListener(dst, t.listen, isLocalAddr) {
				t.dropUnrouted(causeNotRedirected, &t.stats.DroppedNotRedirected, r.Addr(i), dst)
				continue
			}
			if t.relays.has(dst) {
				// Relayed, it would come back again, each time through a
				// new association: a loop that grows.
				t.dropUnrouted(causeOwnRelay, &t.stats.DroppedOwnRelay, r.Addr(i), dst)
				continue
			}
			fromLo := packetInfo && r.FromLoopback(i)
			t.dispatch(d, r.Addr(i), fromLo, r.Slot(i), i, socksclient.AddrFromAddrPort(dst))
		}
		d.flush(r)
	})
}

// dropUnrouted counts a datagram no TPROXY rule sent (or one addressed to
// the listener itself) and logs the cause once a period.
func (t *TransparentUDP) dropUnrouted(cause string, counter *atomic.Int64, src, dst netip.AddrPort) {
	counter.Add(1)
	if ok, suppressed := t.logs.Allow(cause); ok {
		ev := t.cfg.Logger.Warn().Str("listener", t.cfg.Name).Str("client", src.String()).Func(logthrottle.Repeats("repeats", suppressed))
		if dst.IsValid() {
			ev = ev.Str("destination", dst.String())
		}
		ev.Msg("UDP datagram dropped: " + cause)
	}
}

// expireReplies closes idle reply sockets until Close.
func (t *TransparentUDP) expireReplies() {
	tick := time.NewTicker(max(t.cfg.IdleTimeout/2, time.Second))
	defer tick.Stop()
	for {
		select {
		case <-tick.C:
			t.replies.expire()
		case <-t.done:
			return
		}
	}
}

// copyDown relays the association's datagrams to s's client, each with
// its remote's address as the source, through the reply sockets.
func (t *TransparentUDP) copyDown(s *udpSession, a *socksclient.UDPConn) {
	bp := getUDPBuf(len(udpBufClasses) - 1)
	defer putUDPBuf(bp)
	for {
		off, n, from, err := a.ReadPacket(*bp)
		if err != nil {
			if socksclient.IsICMPError(err) {
				t.relayICMP(err)
				continue
			}
			return
		}
		remote, ok := from.AddrPort()
		remote = netip.AddrPortFrom(remote.Addr().Unmap(), remote.Port())
		// The proxy picks the reply's source: one of the other family than
		// the client's cannot be its source address (and would take the
		// raw path with a wrong-sized header).
		if ok && remote.Addr().Is4() != s.client.Addr().Unmap().Is4() {
			ok = false
		}
		if !ok || !t.replies.send((*bp)[off:n], remote, s.client) {
			t.dropped(&t.stats.DroppedReply, causeReply)
			continue
		}
		// Only a reply delivered keeps the session from idling out.
		s.touch()
		s.down.Add(1)
		t.stats.DatagramsDown.Add(1)
		t.stats.BytesDown.Add(int64(n - off))
	}
}
