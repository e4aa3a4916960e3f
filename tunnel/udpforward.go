package tunnel

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/rs/zerolog"

	"github.com/socksfwd/socksfwd/internal/sockbuf"
	"github.com/socksfwd/socksfwd/internal/udpbatch"
	"github.com/socksfwd/socksfwd/socksclient"
)

// UDP forward defaults and bounds.
const (
	DefaultUDPIdleTimeout = 60 * time.Second
	DefaultUDPMaxSessions = 1024
	// DefaultUDPQueueBytes bounds, per forward, the memory held by
	// datagrams waiting for their session (while its association is being
	// built, say): without it 64 queued 64 KiB buffers per session times
	// 1024 sessions could hold about 4 GB while an upstream hangs.
	DefaultUDPQueueBytes = 4 << 20
	// udpQueueLen bounds the datagrams waiting for one session's
	// association; beyond it they are dropped, as a full socket would.
	udpQueueLen = 64
	// udpRetryDelay keeps a session whose upstream failed from starting a
	// handshake for every datagram.
	udpRetryDelay = time.Second
	// udpLogEvery is how often a cause that repeats (a full table, a
	// failing association, a failing read) is logged again, with a count.
	udpLogEvery = time.Minute
	// A read that keeps failing is retried after readBackoffMin, doubling
	// up to readBackoffMax, so a broken socket costs no CPU.
	readBackoffMin = 5 * time.Millisecond
	readBackoffMax = time.Second
)

// Log causes, one throttled line each (see logthrottle).
const (
	causeAssociate  = "associate"
	causeTableFull  = "table full"
	causeRead       = "read"
	causeNotAllowed = "not-allowed"
	// Datagrams dropped on the way up, each logged once a period with a
	// count (udpTable.dropped).
	causeQueueFull = "the session's queue is full"
	causeMemory    = "the listener's queued bytes are at their bound"
	causeNoAssoc   = "no association (the upstreams fail, or the proxy ends associations at once and socksfwd waits before the next)"
	causeOversize  = "too large for a SOCKS UDP header"
	causeEnded     = "its session ended before sending it"
	causeSend      = "the send to the proxy's relay failed"
	// And on the way down.
	causeReply     = "a reply could not be delivered to its client"
	causeRelayICMP = "relay-icmp"
)

// UDPForwardConfig describes one -L …/udp forward.
type UDPForwardConfig struct {
	Name      string
	Target    socksclient.Addr // names are resolved by the proxy
	Upstreams *socksclient.Upstreams
	// IdleTimeout ends a session with no datagram either way for this long
	// (default DefaultUDPIdleTimeout).
	IdleTimeout time.Duration
	// MaxSessions bounds the session table (default DefaultUDPMaxSessions);
	// a new source that finds it full evicts the session idle the longest,
	// as a NAT table does.
	MaxSessions int
	// QueueBytes bounds the buffers of datagrams queued for sessions,
	// over the whole forward (default DefaultUDPQueueBytes); datagrams
	// beyond it are dropped and counted (DroppedMemory).
	QueueBytes int
	Logger     zerolog.Logger
}

// UDPStats counts a UDP forward's sessions and datagrams. Every datagram
// read from a client is, once handled, either sent (DatagramsUp) or
// counted under exactly one Dropped reason.
type UDPStats struct {
	Sessions      atomic.Int64 // sessions started
	Active        atomic.Int64
	Evicted       atomic.Int64 // sessions ended to make room for a new source
	Received      atomic.Int64 // datagrams read from clients
	DatagramsUp   atomic.Int64 // client → target
	DatagramsDown atomic.Int64 // target → client
	BytesUp       atomic.Int64 // payload bytes of DatagramsUp
	BytesDown     atomic.Int64 // payload bytes of DatagramsDown
	DroppedQueue  atomic.Int64 // session queue full
	// DroppedNoAssoc: no association to send on (the upstreams fail, or
	// the proxy ends associations at once and the next waits a backoff).
	DroppedNoAssoc atomic.Int64
	DroppedLarge   atomic.Int64 // too large for a SOCKS header, or longer than a slot (IPv6)
	DroppedMemory  atomic.Int64 // the forward's queued bytes were at QueueBytes
	DroppedEnded   atomic.Int64 // queued for a session evicted or closed before it sent them
	DroppedSend    atomic.Int64 // the send failed (e.g. an ICMP error on the association)
	// DroppedReply: a reply that could not be delivered to its client (the
	// send to it failed; for a transparent listener, see
	// TransparentUDPStats). Replies are not among the datagrams Received.
	DroppedReply atomic.Int64
	// RelayRefused counts ICMP errors about datagrams sent to the proxy's
	// relay (its port unreachable, a firewall's "prohibited" on the way;
	// socksclient.IsICMPError): each says a datagram sent up was not
	// taken, and the association goes on.
	RelayRefused atomic.Int64
	// DroppedNotAllowed: the client's source is not in the allow list.
	DroppedNotAllowed atomic.Int64
	// AssociateFailures counts UDP ASSOCIATE attempts that failed.
	AssociateFailures atomic.Int64
	// ReadErrors counts failed reads of the listening socket.
	ReadErrors atomic.Int64
	// Association adds up what every association counted (fragments and
	// malformed headers from the relay, a forward's replies from another
	// peer than its target, relay waits and stalls), live.
	Association socksclient.UDPStats
}

// datagramReader is how Serve reads client datagrams: a udpbatch.Reader,
// or a fake in tests.
type datagramReader interface {
	Read() (int, error)
	Slot(i int) []byte // headroom, then the payload
	Truncated(i int) bool
	Addr(i int) netip.AddrPort
}

// sourceRefused reports whether err is the kernel refusing a datagram's
// source address (IP_PKTINFO).
func sourceRefused(err error) bool {
	return errors.Is(err, syscall.EINVAL) || errors.Is(err, syscall.ENETUNREACH) || errors.Is(err, syscall.EADDRNOTAVAIL)
}

// newBatchReader reads a forward's datagrams; on a wildcard address with
// the local address each was sent to (newWildcardReader).
func newBatchReader(pc *net.UDPConn, slots [][]byte) (datagramReader, error) {
	if a, ok := pc.LocalAddr().(*net.UDPAddr); ok && a.IP.IsUnspecified() {
		return newWildcardReader(pc, slots)
	}
	return newPlainReader(pc, slots)
}

func newPlainReader(pc *net.UDPConn, slots [][]byte) (datagramReader, error) {
	r, err := udpbatch.NewReader(pc, slots, socksclient.MaxUDPHeaderLen, true)
	if err != nil {
		return nil, err
	}
	return r, nil
}

// UDPForward relays datagrams from local clients to one target: one session
// per client address, each with its own UDP ASSOCIATE.
type UDPForward struct {
	udpTable  // sessions that all send to the target they started with
	cfg       UDPForwardConfig
	pc        *net.UDPConn
	newReader func(pc *net.UDPConn, slots [][]byte) (datagramReader, error)
	stats     UDPStats
}

// NewUDPForward returns a forward serving on pc, which the caller bound.
func NewUDPForward(cfg UDPForwardConfig, pc *net.UDPConn) *UDPForward {
	sockbuf.Grow(pc)
	f := &UDPForward{cfg: cfg, pc: pc, newReader: newBatchReader}
	f.configure(udpTableConfig{
		name: cfg.Name, logger: cfg.Logger, upstreams: cfg.Upstreams, stats: &f.stats,
		endMsg: "UDP session ended", fixedTarget: true, target: cfg.Target, copyDown: f.copyDown,
		idleTimeout: cfg.IdleTimeout, maxSessions: cfg.MaxSessions, queueBytes: cfg.QueueBytes,
	})
	return f
}

// SetTarget changes where sessions started from now on send their
// datagrams; a live session keeps its target, as a reload promises.
func (f *UDPForward) SetTarget(target socksclient.Addr) {
	f.mu.Lock()
	f.target = target
	f.mu.Unlock()
}

// Stats returns the live counters.
func (f *UDPForward) Stats() *UDPStats { return &f.stats }

// Addr is the listening address.
func (f *UDPForward) Addr() net.Addr { return f.pc.LocalAddr() }

// Queued datagrams are copied into buffers of a size class, so that a
// queue of small datagrams does not hold 64 KiB each, and the byte budget
// charges what a buffer really takes.
var udpBufClasses = [...]int{2 << 10, 16 << 10, socksclient.MaxUDPHeaderLen + socksclient.MaxUDPDatagram}

var udpBufPools [len(udpBufClasses)]sync.Pool

func init() {
	for i, size := range udpBufClasses {
		udpBufPools[i].New = func() any {
			b := make([]byte, size)
			return &b
		}
	}
}

// udpBufClass is the smallest class that holds n bytes.
func udpBufClass(n int) int {
	for i, size := range udpBufClasses {
		if n <= size {
			return i
		}
	}
	return len(udpBufClasses) - 1
}

func getUDPBuf(class int) *[]byte { return udpBufPools[class].Get().(*[]byte) }

func putUDPBuf(bp *[]byte) { udpBufPools[udpBufClass(cap(*bp))].Put(bp) }

// udpReadBatch is how many client datagrams Serve takes per system call.
// Each slot can hold the largest datagram; only the pages datagrams touch
// become resident.
const udpReadBatch = 32

// Serve reads client datagrams until Close (or ctx is done) and hands each
// to its source's session. It returns nil on such a stop.
//
// Datagrams come in batches (recvmmsg). Those of sessions with a live
// association are wrapped in place and sent from here, a batch per
// session (sendmmsg, or one segmented send for a run of equal sizes): no
// copy, no hand-off, no wake-up of the session goroutine. The others are
// copied to the session, which associates first.
//
// A batch for a proxy on this host waits until the proxy's relay socket
// has room (socksclient.UDPBatch), and holds this loop meanwhile, for a
// bounded time: the sessions of one forward share that proxy, which is
// the one falling behind.
//
// A failed read is retried at once (an ICMP error a send provoked surfaces
// once, on the next read); reads that keep failing are retried after a
// growing pause, so a broken socket does not spin.
func (f *UDPForward) Serve(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() { f.Close() })
	defer stop()
	r, err := f.newReader(f.pc, newReadSlots())
	if err != nil {
		return err
	}
	d := newUDPDispatch()
	local, _ := r.(interface{ LocalDst(i int) netip.Addr })
	return f.serveBatches(r.Read, func(n int) {
		for i := range n {
			if r.Truncated(i) {
				// Over 65 507 bytes, possible on IPv6 only: it could not
				// carry a SOCKS header anyway. Never forward a cut one.
				f.dropped(&f.stats.DroppedLarge, causeOversize)
				continue
			}
			// The session sends to its own target: no destination here.
			f.dispatch(d, r.Addr(i), false, r.Slot(i), i, socksclient.Addr{})
			if local != nil && d.s != nil && d.s.local.Load() == nil {
				d.s.setLocal(local.LocalDst(i)) // the first datagram's; later ones need no parse
			}
		}
		d.flush(r)
	})
}

// deliver queues a client datagram (slot: headroom, then payload) for
// its session s, or a fresh session of src when s has ended (see
// udpTable.deliverTo).
func (f *UDPForward) deliver(s *udpSession, src netip.AddrPort, slot []byte) *udpSession {
	return f.deliverTo(s, src, slot, socksclient.Addr{})
}

// Shutdown stops the forward. UDP has no connection to drain, so it is
// Close; the context is accepted for the common service interface.
func (f *UDPForward) Shutdown(ctx context.Context) error { return f.Close() }

// Close stops reading, ends every session and waits for their goroutines.
// It is idempotent.
func (f *UDPForward) Close() error {
	f.closeSessions(f.pc)
	return nil
}

// copyDown relays the association's datagrams back to s's client, from
// the listening socket. Only replies from the session's target pass: a
// relay forwards to us whatever anyone sends to its outside port, and the
// client takes every reply for the target's.
func (f *UDPForward) copyDown(s *udpSession, a *socksclient.UDPConn) {
	bp := getUDPBuf(len(udpBufClasses) - 1)
	defer putUDPBuf(bp)
	// One slot, as much memory as a plain read; the batch types are for
	// their raw system calls (see internal/udpbatch), which keep a reply's
	// way back free of the scheduler's syscall bookkeeping.
	slots := [][]byte{*bp}
	r, err := a.NewReadBatch(slots)
	if err != nil {
		return
	}
	r.OnlyFrom(s.target)
	w, err := udpbatch.NewWriter(f.pc, len(slots)) // room for a whole read
	if err != nil {
		return
	}
	var from netip.Addr // where replies leave from; invalid: where the route says
	for {
		n, err := r.Read()
		if err != nil {
			// Reported once per ICMP, for a datagram sent earlier, while
			// the relay goes on taking others: ending the reader would leave
			// the session sending up and never again delivering a reply.
			if socksclient.IsICMPError(err) {
				f.relayICMP(err)
				continue
			}
			return
		}
		if n == 0 {
			continue // all dropped (a stranger's, say): no sign of life
		}
		s.touch()
		if l := s.local.Load(); l != nil && *l != from {
			from = *l
			w.SetSource(from)
		}
		for i := range n {
			w.Add(r.Payload(i), s.client)
		}
		sent, err := w.Flush()
		if err != nil && from.IsValid() && sourceRefused(err) {
			// The kernel will not send from that address (a directed
			// broadcast, one the host gave up, an IPv6 address it only
			// routes locally): the route chooses from now on, for this
			// session, and what did not go is sent again.
			from = netip.Addr{}
			none := from
			s.local.Store(&none) // kept: setLocal sets a session's source once
			w.SetSource(from)
			for i := sent; i < n; i++ {
				w.Add(r.Payload(i), s.client)
			}
			var more int
			more, err = w.Flush()
			sent += more
		}
		if err != nil {
			// The failed one and those after it are gone (see Flush).
			f.droppedN(&f.stats.DroppedReply, int64(n-sent), causeReply)
		}
		if sent > 0 {
			bytes := 0
			for i := range sent {
				bytes += len(r.Payload(i))
			}
			s.down.Add(int64(sent))
			f.stats.DatagramsDown.Add(int64(sent))
			f.stats.BytesDown.Add(int64(bytes))
		}
	}
}
