package tunnel

import (
	"context"
	"errors"
	"math"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/socksfwd/socksfwd/internal/logthrottle"
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
	causeAssociate = "associate"
	causeTableFull = "table full"
	causeRead      = "read"
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
	DroppedQueue  atomic.Int64 // session queue full, or no association
	DroppedLarge  atomic.Int64 // too large for a SOCKS header, or longer than a slot (IPv6)
	DroppedMemory atomic.Int64 // the forward's queued bytes were at QueueBytes
	DroppedEnded  atomic.Int64 // queued for a session evicted or closed before it sent them
	DroppedSend   atomic.Int64 // the send failed (e.g. an ICMP error on the association)
	// AssociateFailures counts UDP ASSOCIATE attempts that failed.
	AssociateFailures atomic.Int64
	// ReadErrors counts failed reads of the listening socket.
	ReadErrors atomic.Int64
}

// datagramReader is how Serve reads client datagrams: a udpbatch.Reader,
// or a fake in tests.
type datagramReader interface {
	Read() (int, error)
	Slot(i int) []byte // headroom, then the payload
	Truncated(i int) bool
	Addr(i int) netip.AddrPort
}

func newBatchReader(pc *net.UDPConn, slots [][]byte) (datagramReader, error) {
	r, err := udpbatch.NewReader(pc, slots, socksclient.MaxUDPHeaderLen, true)
	if err != nil {
		return nil, err
	}
	return r, nil
}

// UDPForward relays datagrams from local clients to one target: one session
// per client address, each with its own UDP ASSOCIATE.
type UDPForward struct {
	cfg       UDPForwardConfig
	pc        *net.UDPConn
	newReader func(pc *net.UDPConn, slots [][]byte) (datagramReader, error)
	logs      *logthrottle.Throttle
	done      chan struct{} // closed by Close

	// queued is what the buffers of queued datagrams take, charged when a
	// datagram is queued and given back when it is sent or dropped.
	queued     atomic.Int64
	queueLimit int64

	mu          sync.Mutex
	sessions    map[netip.AddrPort]*udpSession
	idleTimeout time.Duration // for sessions started from now on
	target      socksclient.Addr
	maxSessions int
	closed      bool
	wg          sync.WaitGroup

	stats     UDPStats
	closeOnce sync.Once
}

// NewUDPForward returns a forward serving on pc, which the caller bound.
func NewUDPForward(cfg UDPForwardConfig, pc *net.UDPConn) *UDPForward {
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = DefaultUDPIdleTimeout
	}
	if cfg.MaxSessions <= 0 {
		cfg.MaxSessions = DefaultUDPMaxSessions
	}
	if cfg.QueueBytes <= 0 {
		cfg.QueueBytes = DefaultUDPQueueBytes
	}
	sockbuf.Grow(pc)
	return &UDPForward{
		cfg: cfg, pc: pc, newReader: newBatchReader,
		logs:        logthrottle.New(udpLogEvery),
		done:        make(chan struct{}),
		queueLimit:  int64(cfg.QueueBytes),
		sessions:    make(map[netip.AddrPort]*udpSession),
		idleTimeout: cfg.IdleTimeout, maxSessions: cfg.MaxSessions, target: cfg.Target,
	}
}

// SetLimits changes the idle timeout of the sessions started from now on
// and the bound of the session table (a reload); zero or less means the
// default. Live sessions keep their timeout. A lower bound ends no session
// at once: the table no longer grows past it, and shrinks to it as
// sessions end.
func (f *UDPForward) SetLimits(idleTimeout time.Duration, maxSessions int) {
	if idleTimeout <= 0 {
		idleTimeout = DefaultUDPIdleTimeout
	}
	if maxSessions <= 0 {
		maxSessions = DefaultUDPMaxSessions
	}
	f.mu.Lock()
	f.idleTimeout, f.maxSessions = idleTimeout, maxSessions
	f.mu.Unlock()
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

// Sessions is the number of live sessions.
func (f *UDPForward) Sessions() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.sessions)
}

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

// udpPacket is one client datagram: payload at buf[MaxUDPHeaderLen:][:n].
type udpPacket struct {
	buf *[]byte
	n   int
}

// release gives a queued datagram's buffer back, and its bytes to the
// forward's budget.
func (f *UDPForward) release(p udpPacket) {
	f.queued.Add(-int64(cap(*p.buf)))
	putUDPBuf(p.buf)
}

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
	slots := make([][]byte, udpReadBatch)
	for i := range slots {
		slots[i] = make([]byte, socksclient.MaxUDPHeaderLen+socksclient.MaxUDPDatagram)
	}
	r, err := f.newReader(f.pc, slots)
	if err != nil {
		return err
	}
	pending := make([]*udpSession, 0, udpReadBatch) // sessions with queued datagrams
	failures := 0                                   // reads failed in a row
	for {
		n, err := r.Read()
		if err != nil {
			if f.isClosed() || errors.Is(err, net.ErrClosed) {
				return nil
			}
			failures++
			if !f.readBackoff(err, failures) {
				return nil
			}
			continue
		}
		failures = 0
		f.stats.Received.Add(int64(n))
		// A batch mostly comes from one client: look its session up once.
		var lastSrc netip.AddrPort
		var s *udpSession
		for i := range n {
			if r.Truncated(i) {
				// Over 65 507 bytes, possible on IPv6 only: it could not
				// carry a SOCKS header anyway. Never forward a cut one.
				f.stats.DroppedLarge.Add(1)
				continue
			}
			src := r.Addr(i)
			if s == nil || src != lastSrc {
				lastSrc, s = src, f.session(src)
				if s == nil { // the forward is closing
					f.stats.DroppedEnded.Add(1)
					continue
				}
				s.touch() // once per run: the batch arrived at one moment
			}
			if s.queueFast(r.Slot(i), i) {
				if len(s.fastSlots) == 1 {
					pending = append(pending, s)
				}
				continue
			}
			s = f.deliver(s, src, r.Slot(i))
		}
		for _, s := range pending {
			s.flushFast(r)
		}
		clear(pending)
		pending = pending[:0]
	}
}

// readBackoff counts and logs a failed read of the listening socket and
// waits before the next: not at all after a lone failure, then from
// readBackoffMin doubling up to readBackoffMax while reads keep failing.
// It reports false when the forward closed meanwhile.
func (f *UDPForward) readBackoff(err error, failures int) bool {
	f.stats.ReadErrors.Add(1)
	if ok, suppressed := f.logs.Allow(causeRead); ok {
		f.cfg.Logger.Warn().Err(err).Str("listener", f.cfg.Name).Int64("repeats", suppressed).
			Msg("UDP read failed; retrying with a pause while it keeps failing")
	}
	if failures < 2 {
		return true
	}
	pause := min(readBackoffMin<<min(failures-2, 16), readBackoffMax)
	t := time.NewTimer(pause)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-f.done:
		return false
	}
}

func (f *UDPForward) isClosed() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.closed
}

// session finds or starts the session of a client; nil once the forward
// is closing. A new source that finds the table full evicts the session
// idle the longest.
func (f *UDPForward) session(client netip.AddrPort) *udpSession {
	f.mu.Lock()
	defer f.mu.Unlock()
	if s, ok := f.sessions[client]; ok {
		return s
	}
	if f.closed {
		return nil
	}
	if len(f.sessions) >= f.maxSessions {
		f.evictIdlestLocked()
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &udpSession{f: f, client: client, idle: f.idleTimeout, target: f.target, in: make(chan udpPacket, udpQueueLen), ctx: ctx, cancel: cancel}
	s.touch()
	f.sessions[client] = s
	f.stats.Sessions.Add(1)
	f.stats.Active.Add(1)
	f.wg.Go(s.serve)
	return s
}

// evictIdlestLocked ends the session idle the longest, to make room for a
// new source as a NAT table does. The scan looks at each session once and
// only runs when a new source finds the table full, so datagrams of
// existing sessions never pay for it. Only one session goes: after a
// lower bound from SetLimits the table shrinks as sessions end.
func (f *UDPForward) evictIdlestLocked() {
	var victim *udpSession
	oldest := int64(math.MaxInt64)
	for _, s := range f.sessions {
		if t := s.lastIO.Load(); t < oldest {
			oldest, victim = t, s
		}
	}
	if victim == nil {
		return
	}
	f.retireLocked(victim, false)
	victim.cancel()
	f.stats.Evicted.Add(1)
	if ok, suppressed := f.logs.Allow(causeTableFull); ok {
		f.cfg.Logger.Warn().Str("listener", f.cfg.Name).Int("max_sessions", f.maxSessions).
			Str("evicted", victim.client.String()).Int64("evicted_before", suppressed).
			Msg("UDP session table full; evicting the session idle the longest")
	}
}

// retireLocked takes s out of the table and marks it ending, atomically
// for handOff: from here on no datagram is queued to it, and Serve's next
// lookup of its client starts a fresh session. With ifIdle, s is retired
// only if it has nothing queued and saw no datagram for its idle timeout,
// and the result says whether it was. f.mu is held.
func (f *UDPForward) retireLocked(s *udpSession, ifIdle bool) bool {
	s.mu.Lock()
	if ifIdle && (len(s.in) > 0 || time.Since(time.Unix(0, s.lastIO.Load())) < s.idle) {
		s.mu.Unlock()
		return false
	}
	s.ending.Store(true)
	s.mu.Unlock()
	if f.sessions[s.client] == s {
		delete(f.sessions, s.client)
	}
	return true
}

func (f *UDPForward) retire(s *udpSession, ifIdle bool) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.retireLocked(s, ifIdle)
}

// deliver queues a client datagram (slot: headroom, then payload) for
// its session s. When s left the table after Serve looked it up (it ended
// idle, or was evicted), a fresh session takes the datagram, as it would
// have a moment later. It returns the session that now serves src, nil
// when there is none (the forward is closing; the datagram is counted).
func (f *UDPForward) deliver(s *udpSession, src netip.AddrPort, slot []byte) *udpSession {
	if s != nil && s.handOff(slot) {
		return s
	}
	if s = f.session(src); s != nil && s.handOff(slot) {
		return s
	}
	f.stats.DroppedEnded.Add(1)
	return nil
}

// Shutdown stops the forward. UDP has no connection to drain, so it is
// Close; the context is accepted for the common service interface.
func (f *UDPForward) Shutdown(ctx context.Context) error { return f.Close() }

// Close stops reading, ends every session and waits for their goroutines.
// It is idempotent.
func (f *UDPForward) Close() error {
	f.closeOnce.Do(func() {
		f.mu.Lock()
		f.closed = true
		for _, s := range f.sessions {
			s.cancel()
		}
		f.mu.Unlock()
		close(f.done)
		f.pc.Close()
	})
	f.wg.Wait()
	return nil
}

// udpSession is one client's association with the target.
type udpSession struct {
	f      *UDPForward
	client netip.AddrPort
	idle   time.Duration
	target socksclient.Addr // fixed for the session's life
	in     chan udpPacket
	ctx    context.Context // cancelled by eviction and UDPForward.Close
	cancel context.CancelFunc

	// mu orders handOff's sends on in against retirement: once ending is
	// set under it, nothing more is queued, so what serve drains then is
	// all there is. ending is also read alone by Serve's fast path.
	mu     sync.Mutex
	ending atomic.Bool

	lastIO atomic.Int64 // unix nanos of the last datagram either way
	up     atomic.Int64 // datagrams sent, by serve or Serve's fast path
	down   atomic.Int64
	// live is the association once built, for Serve's fast path.
	live atomic.Pointer[socksclient.UDPConn]

	// Owned by Serve: the batch for live, and which read slots it holds.
	fast      *socksclient.UDPBatch
	fastSlots []int

	// Owned by serve:
	assoc     *socksclient.UDPConn
	readDone  chan struct{}
	upstream  string
	lastErr   error
	failUntil time.Time
	// Batches held back for a relay on this host, over the session's
	// associations so far, and waits given up (socksclient.UDPStats).
	relayWaits, relayStalls int64
}

func (s *udpSession) touch() { s.lastIO.Store(time.Now().UnixNano()) }

// queueFast queues a client datagram (slot: headroom, then payload) for
// the live association; false when there is none. Serve only.
func (s *udpSession) queueFast(slot []byte, idx int) bool {
	a := s.live.Load()
	if a == nil || !a.Alive() || s.ending.Load() {
		return false
	}
	if s.fast == nil || s.fast.Conn() != a {
		b, err := a.NewBatch(udpReadBatch)
		if err != nil {
			return false
		}
		s.fast = b
		if s.fastSlots == nil {
			s.fastSlots = make([]int, 0, udpReadBatch)
		}
	}
	if err := s.fast.Add(slot, socksclient.MaxUDPHeaderLen, s.target); err != nil {
		return false // too large: the session path counts and drops it
	}
	s.fastSlots = append(s.fastSlots, idx)
	return true
}

// fastBatch is what Serve's fast path sends through: a
// socksclient.UDPBatch, or a fake in tests.
type fastBatch interface {
	Add(buf []byte, off int, dst socksclient.Addr) error
	// Flush stops at the first datagram that fails: those that went are
	// the first ones queued.
	Flush() (int, error)
}

// flushFast sends the datagrams queued for the live association.
func (s *udpSession) flushFast(r datagramReader) {
	s.flushBatch(s.fast, r)
	s.fastSlots = s.fastSlots[:0]
}

// flushBatch sends the datagrams of s.fastSlots queued in b (r holds
// them). A flush stops at the first datagram that fails, and those before
// it went, so the failed one and those after it are known exactly. When
// the association has ended (by the proxy, or by the session, which is
// re-associating or ending), they go to the session or its successor.
// Another error is the failed datagram's own (an ICMP error surfacing on
// it, say): that one is dropped and counted, as a lone send's would be,
// and the rest are queued again; each pass settles at least one, so the
// loop ends within len(s.fastSlots) flushes.
func (s *udpSession) flushBatch(b fastBatch, r datagramReader) {
	f := s.f
	slots := s.fastSlots
	for len(slots) > 0 {
		sent, err := b.Flush()
		s.up.Add(int64(sent))
		f.stats.DatagramsUp.Add(int64(sent))
		rest := slots[min(sent, len(slots)):]
		switch {
		case err == nil || len(rest) == 0:
			return
		case errors.Is(err, socksclient.ErrAssociationClosed) || errors.Is(err, net.ErrClosed):
			to := s
			for _, idx := range rest {
				to = f.deliver(to, s.client, r.Slot(idx))
			}
			return
		}
		f.stats.DroppedSend.Add(1)
		next := rest[1:]
		slots = next[:0]
		for _, idx := range next {
			if b.Add(r.Slot(idx), socksclient.MaxUDPHeaderLen, s.target) != nil {
				f.deliver(s, s.client, r.Slot(idx)) // as Serve does when queueFast fails
				continue
			}
			slots = append(slots, idx)
		}
	}
}

// handOff copies a client datagram (slot: headroom, then payload) to the
// session goroutine, or drops and counts it when the session's queue or
// the forward's byte budget is full. It reports false, having taken
// nothing, when the session has ended.
func (s *udpSession) handOff(slot []byte) bool {
	f := s.f
	payload := slot[socksclient.MaxUDPHeaderLen:]
	class := udpBufClass(socksclient.MaxUDPHeaderLen + len(payload))
	size := int64(udpBufClasses[class])
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ending.Load() {
		return false
	}
	if len(s.in) == cap(s.in) {
		f.stats.DroppedQueue.Add(1)
		return true
	}
	if f.queued.Add(size) > f.queueLimit {
		f.queued.Add(-size)
		f.stats.DroppedMemory.Add(1)
		return true
	}
	bp := getUDPBuf(class)
	n := copy((*bp)[socksclient.MaxUDPHeaderLen:], payload)
	s.in <- udpPacket{bp, n} // room checked above; only handOff sends, under mu
	return true
}

// serve owns the session: it sends the client's datagrams through an
// association, which it builds on the first datagram and builds again when
// the proxy has dropped the control connection, until the session is idle,
// evicted, or the forward closes.
func (s *udpSession) serve() {
	f := s.f
	start := time.Now()
	idle := time.NewTimer(s.idle)
	defer func() {
		idle.Stop()
		f.retire(s, false)
		s.closeAssoc()
		s.dropQueued()
		f.stats.Active.Add(-1)
		// Debug even after a failure: the forward logs failing
		// associations once per state change, not once per session.
		ev := f.cfg.Logger.Debug()
		if s.lastErr != nil {
			ev = ev.Err(s.lastErr)
		}
		ev = ev.Str("listener", f.cfg.Name).Str("client", s.client.String()).Str("target", s.target.String()).
			Str("upstream", s.upstream).Int64("datagrams_up", s.up.Load()).Int64("datagrams_down", s.down.Load())
		if s.relayWaits > 0 {
			ev = ev.Int64("relay_waits", s.relayWaits).Int64("relay_stalls", s.relayStalls)
		}
		ev.Dur("dur", time.Since(start)).Msg("UDP session ended")
	}()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-idle.C:
			if rest := s.idle - time.Since(time.Unix(0, s.lastIO.Load())); rest > 0 {
				idle.Reset(rest)
				continue
			}
			if f.retire(s, true) {
				return
			}
			idle.Reset(s.idle) // a datagram came meanwhile
		case p := <-s.in:
			s.touch()
			s.send(p)
			f.release(p)
		}
	}
}

// send relays one datagram, associating first if needed. A datagram that
// finds the association just dropped by the proxy is sent again on a new
// one.
func (s *udpSession) send(p udpPacket) {
	f := s.f
	for attempt := 0; attempt < 2; attempt++ {
		if s.assoc != nil && !s.assoc.Alive() {
			s.closeAssoc()
			f.cfg.Logger.Debug().Str("listener", f.cfg.Name).Str("client", s.client.String()).
				Msg("UDP association ended by the proxy; re-associating")
		}
		if s.assoc == nil && !s.associate() {
			f.stats.DroppedQueue.Add(1)
			return
		}
		err := s.assoc.WritePacket((*p.buf)[:socksclient.MaxUDPHeaderLen+p.n], socksclient.MaxUDPHeaderLen, s.target)
		switch {
		case err == nil:
			s.up.Add(1)
			f.stats.DatagramsUp.Add(1)
			return
		case errors.Is(err, socksclient.ErrDatagramTooLarge):
			f.stats.DroppedLarge.Add(1)
			return
		case !errors.Is(err, socksclient.ErrAssociationClosed):
			f.stats.DroppedSend.Add(1)
			return
		}
		s.closeAssoc()
	}
	f.stats.DroppedSend.Add(1) // the new association ended at once too
}

// associate builds the association; false (datagram dropped) while the
// upstreams fail, retried at most every udpRetryDelay. Failures are
// logged once per forward when they start, then once per udpLogEvery with
// a count, and once when an association works again.
func (s *udpSession) associate() bool {
	f := s.f
	if time.Now().Before(s.failUntil) {
		return false
	}
	a, d, err := f.cfg.Upstreams.Associate(s.ctx)
	if d != nil {
		s.upstream = d.ProxyAddr
	}
	if err != nil {
		if s.ctx.Err() == nil {
			s.lastErr = err
			s.failUntil = time.Now().Add(udpRetryDelay)
			f.stats.AssociateFailures.Add(1)
			if ok, suppressed := f.logs.Allow(causeAssociate); ok {
				f.cfg.Logger.Warn().Err(err).Str("listener", f.cfg.Name).Str("upstream", s.upstream).
					Int64("failures_since_last_line", suppressed).Msg("UDP associate failing")
			}
		}
		return false
	}
	if suppressed, seen := f.logs.Reset(causeAssociate); seen {
		f.cfg.Logger.Info().Str("listener", f.cfg.Name).Str("upstream", s.upstream).
			Int64("failures_since_last_line", suppressed).Msg("UDP associate works again")
	}
	s.lastErr = nil
	s.assoc = a
	s.readDone = make(chan struct{})
	go s.copyDown(a, s.readDone)
	s.live.Store(a)
	return true
}

func (s *udpSession) closeAssoc() {
	if s.assoc != nil {
		s.live.Store(nil)
		s.assoc.Close()
		<-s.readDone
		s.relayWaits += s.assoc.Stats().RelayWaits.Load()
		s.relayStalls += s.assoc.Stats().RelayStalls.Load()
		s.assoc = nil
	}
}

// dropQueued counts and releases the datagrams still queued when the
// session ends; it runs after retire, so none can follow.
func (s *udpSession) dropQueued() {
	for {
		select {
		case p := <-s.in:
			s.f.stats.DroppedEnded.Add(1)
			s.f.release(p)
		default:
			return
		}
	}
}

// copyDown relays the association's datagrams back to the client.
func (s *udpSession) copyDown(a *socksclient.UDPConn, done chan struct{}) {
	defer close(done)
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
	w, err := udpbatch.NewWriter(s.f.pc, len(slots)) // room for a whole read
	if err != nil {
		return
	}
	for {
		n, err := r.Read()
		if err != nil {
			return
		}
		s.touch()
		for i := range n {
			w.Add(r.Payload(i), s.client)
		}
		if sent, _ := w.Flush(); sent > 0 {
			s.down.Add(int64(sent))
			s.f.stats.DatagramsDown.Add(int64(sent))
		}
	}
}
