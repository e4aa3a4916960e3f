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

	"github.com/socksfwd/socksfwd/internal/logthrottle"
	"github.com/socksfwd/socksfwd/internal/sockbuf"
	"github.com/socksfwd/socksfwd/socksclient"
)

// Log causes of a transparent UDP listener, besides the UDP forward's.
const (
	causeNoDest        = "no original destination"
	causeNotRedirected = "not redirected"
)

// TransparentUDP relays datagrams that TPROXY rules sent to its socket:
// one session per client address, each with its own UDP ASSOCIATE that
// carries the client's datagrams to any number of destinations (each
// datagram's original destination, as an IP address), and brings replies
// back with the remote's address as their source.
type TransparentUDP struct {
	cfg     TransparentUDPConfig
	pc      *net.UDPConn
	listen  netip.AddrPort
	logs    *logthrottle.Throttle
	replies *replyPool
	done    chan struct{} // closed by Close

	queued     atomic.Int64 // bytes of queued datagrams' buffers
	queueLimit int64

	mu       sync.Mutex
	sessions map[netip.AddrPort]*tpSession
	closed   bool
	wg       sync.WaitGroup

	stats     TransparentUDPStats
	closeOnce sync.Once
}

// NewTransparentUDP returns a listener serving on pc, which
// ListenTransparentUDP opened.
func NewTransparentUDP(cfg TransparentUDPConfig, pc *net.UDPConn) *TransparentUDP {
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = DefaultUDPIdleTimeout
	}
	if cfg.MaxSessions <= 0 {
		cfg.MaxSessions = DefaultUDPMaxSessions
	}
	if cfg.QueueBytes <= 0 {
		cfg.QueueBytes = DefaultUDPQueueBytes
	}
	if cfg.MaxReplySockets <= 0 {
		cfg.MaxReplySockets = DefaultTProxyReplySockets
	}
	sockbuf.Grow(pc)
	listen := pc.LocalAddr().(*net.UDPAddr).AddrPort()
	t := &TransparentUDP{
		cfg: cfg, pc: pc,
		listen:     netip.AddrPortFrom(listen.Addr().Unmap(), listen.Port()),
		logs:       logthrottle.New(udpLogEvery),
		done:       make(chan struct{}),
		queueLimit: int64(cfg.QueueBytes),
		sessions:   make(map[netip.AddrPort]*tpSession),
	}
	t.replies = newReplyPool(cfg.MaxReplySockets, cfg.IdleTimeout, &t.cfg, &t.stats)
	return t
}

// Stats returns the live counters.
func (t *TransparentUDP) Stats() *TransparentUDPStats { return &t.stats }

// Addr is the listening address.
func (t *TransparentUDP) Addr() net.Addr { return t.pc.LocalAddr() }

// Sessions is the number of live sessions.
func (t *TransparentUDP) Sessions() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.sessions)
}

// Shutdown stops the listener. UDP has nothing to drain, so it is Close.
func (t *TransparentUDP) Shutdown(ctx context.Context) error { return t.Close() }

// Close stops reading, ends every session, closes the reply sockets and
// waits for every goroutine. It is idempotent.
func (t *TransparentUDP) Close() error {
	t.closeOnce.Do(func() {
		t.mu.Lock()
		t.closed = true
		for _, s := range t.sessions {
			s.cancel()
		}
		t.mu.Unlock()
		close(t.done)
		t.pc.Close()
	})
	t.wg.Wait()
	t.replies.close() // after the sessions, which send through it
	return nil
}

func (t *TransparentUDP) isClosed() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.closed
}

// tpDatagram is one read datagram handed to the fast path: its slot in
// the reader and its original destination.
type tpDatagram struct {
	slot int
	dst  socksclient.Addr
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
	t.wg.Go(t.expireReplies)
	slots := make([][]byte, udpReadBatch)
	for i := range slots {
		slots[i] = make([]byte, socksclient.MaxUDPHeaderLen+socksclient.MaxUDPDatagram)
	}
	r, err := newOrigDstReader(t.pc, slots, socksclient.MaxUDPHeaderLen)
	if err != nil {
		return err
	}
	pending := make([]*tpSession, 0, udpReadBatch)
	failures := 0
	for {
		n, err := r.Read()
		if err != nil {
			if t.isClosed() || errors.Is(err, net.ErrClosed) {
				return nil
			}
			failures++
			if !t.readBackoff(err, failures) {
				return nil
			}
			continue
		}
		failures = 0
		t.stats.Received.Add(int64(n))
		var lastSrc netip.AddrPort
		var s *tpSession
		for i := range n {
			if r.Truncated(i) {
				t.stats.DroppedLarge.Add(1)
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
			src := r.Addr(i)
			if s == nil || src != lastSrc {
				lastSrc, s = src, t.session(src)
				if s == nil {
					t.stats.DroppedEnded.Add(1)
					continue
				}
				s.touch()
			}
			target := socksclient.AddrFromAddrPort(dst)
			if s.queueFast(r.Slot(i), i, target) {
				if len(s.fastQueued) == 1 {
					pending = append(pending, s)
				}
				continue
			}
			s = t.deliver(s, src, r.Slot(i), target)
		}
		for _, s := range pending {
			s.flushFast(r)
		}
		clear(pending)
		pending = pending[:0]
	}
}

// dropUnrouted counts a datagram no TPROXY rule sent (or one addressed to
// the listener itself) and logs the cause once a period.
func (t *TransparentUDP) dropUnrouted(cause string, counter *atomic.Int64, src, dst netip.AddrPort) {
	counter.Add(1)
	if ok, suppressed := t.logs.Allow(cause); ok {
		ev := t.cfg.Logger.Warn().Str("listener", t.cfg.Name).Str("client", src.String()).Int64("repeats", suppressed)
		if dst.IsValid() {
			ev = ev.Str("destination", dst.String())
		}
		ev.Msg("UDP datagram dropped: " + cause + " (only datagrams a TPROXY rule sent are relayed)")
	}
}

// readBackoff counts and logs a failed read and pauses as UDPForward's
// does; false when the listener closed meanwhile.
func (t *TransparentUDP) readBackoff(err error, failures int) bool {
	t.stats.ReadErrors.Add(1)
	if ok, suppressed := t.logs.Allow(causeRead); ok {
		t.cfg.Logger.Warn().Err(err).Str("listener", t.cfg.Name).Int64("repeats", suppressed).
			Msg("UDP read failed; retrying with a pause while it keeps failing")
	}
	if failures < 2 {
		return true
	}
	pause := min(readBackoffMin<<min(failures-2, 16), readBackoffMax)
	tm := time.NewTimer(pause)
	defer tm.Stop()
	select {
	case <-tm.C:
		return true
	case <-t.done:
		return false
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

// session finds or starts a client's session; nil once closing. A new
// client that finds the table full evicts the session idle the longest.
func (t *TransparentUDP) session(client netip.AddrPort) *tpSession {
	t.mu.Lock()
	defer t.mu.Unlock()
	if s, ok := t.sessions[client]; ok {
		return s
	}
	if t.closed {
		return nil
	}
	if len(t.sessions) >= t.cfg.MaxSessions {
		t.evictIdlestLocked()
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &tpSession{t: t, client: client, idle: t.cfg.IdleTimeout, in: make(chan tpPacket, udpQueueLen), ctx: ctx, cancel: cancel}
	s.touch()
	t.sessions[client] = s
	t.stats.Sessions.Add(1)
	t.stats.Active.Add(1)
	t.wg.Go(s.serve)
	return s
}

// evictIdlestLocked ends the session idle the longest (see UDPForward's).
func (t *TransparentUDP) evictIdlestLocked() {
	var victim *tpSession
	oldest := int64(math.MaxInt64)
	for _, s := range t.sessions {
		if v := s.lastIO.Load(); v < oldest {
			oldest, victim = v, s
		}
	}
	if victim == nil {
		return
	}
	t.retireLocked(victim, false)
	victim.cancel()
	t.stats.Evicted.Add(1)
	if ok, suppressed := t.logs.Allow(causeTableFull); ok {
		t.cfg.Logger.Warn().Str("listener", t.cfg.Name).Int("max_sessions", t.cfg.MaxSessions).
			Str("evicted", victim.client.String()).Int64("evicted_before", suppressed).
			Msg("UDP session table full; evicting the session idle the longest")
	}
}

// retireLocked takes s out of the table and marks it ending (see
// UDPForward's); with ifIdle only when it is idle, and says whether it was.
func (t *TransparentUDP) retireLocked(s *tpSession, ifIdle bool) bool {
	s.mu.Lock()
	if ifIdle && (len(s.in) > 0 || time.Since(time.Unix(0, s.lastIO.Load())) < s.idle) {
		s.mu.Unlock()
		return false
	}
	s.ending.Store(true)
	s.mu.Unlock()
	if t.sessions[s.client] == s {
		delete(t.sessions, s.client)
	}
	return true
}

func (t *TransparentUDP) retire(s *tpSession, ifIdle bool) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.retireLocked(s, ifIdle)
}

// deliver queues a datagram for session s, or for a fresh session of src
// when s has ended meanwhile; it returns the session serving src, nil
// when none (closing; the datagram is counted).
func (t *TransparentUDP) deliver(s *tpSession, src netip.AddrPort, slot []byte, dst socksclient.Addr) *tpSession {
	if s != nil && s.handOff(slot, dst) {
		return s
	}
	if s = t.session(src); s != nil && s.handOff(slot, dst) {
		return s
	}
	t.stats.DroppedEnded.Add(1)
	return nil
}

// tpPacket is one queued datagram: payload at buf[MaxUDPHeaderLen:][:n].
type tpPacket struct {
	buf *[]byte
	n   int
	dst socksclient.Addr
}

func (t *TransparentUDP) release(p tpPacket) {
	t.queued.Add(-int64(cap(*p.buf)))
	putUDPBuf(p.buf)
}

// tpSession is one client's association, shared by all its destinations.
type tpSession struct {
	t      *TransparentUDP
	client netip.AddrPort
	idle   time.Duration
	in     chan tpPacket
	ctx    context.Context
	cancel context.CancelFunc

	mu     sync.Mutex // orders handOff against retirement
	ending atomic.Bool

	lastIO atomic.Int64
	up     atomic.Int64
	down   atomic.Int64
	live   atomic.Pointer[socksclient.UDPConn]

	// Owned by Serve: the batch for live and the datagrams it holds.
	fast       *socksclient.UDPBatch
	fastQueued []tpDatagram

	// Owned by serve:
	assoc     *socksclient.UDPConn
	readDone  chan struct{}
	upstream  string
	lastErr   error
	failUntil time.Time
}

func (s *tpSession) touch() { s.lastIO.Store(time.Now().UnixNano()) }

// queueFast queues a datagram for the live association; false when there
// is none (or it does not fit a SOCKS header).
func (s *tpSession) queueFast(slot []byte, idx int, dst socksclient.Addr) bool {
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
		if s.fastQueued == nil {
			s.fastQueued = make([]tpDatagram, 0, udpReadBatch)
		}
	}
	if err := s.fast.Add(slot, socksclient.MaxUDPHeaderLen, dst); err != nil {
		return false
	}
	s.fastQueued = append(s.fastQueued, tpDatagram{idx, dst})
	return true
}

// flushFast sends what queueFast queued. A flush stops at the first
// failure: those before it went. When the association has ended, the rest
// go to the session (which associates again); another error is the failed
// datagram's own, which is dropped and counted, and the rest are queued
// again. Each pass settles at least one datagram.
func (s *tpSession) flushFast(r *origDstReader) {
	t := s.t
	queued := s.fastQueued
	defer func() { s.fastQueued = s.fastQueued[:0] }()
	for len(queued) > 0 {
		sent, err := s.fast.Flush()
		s.up.Add(int64(sent))
		t.stats.DatagramsUp.Add(int64(sent))
		rest := queued[min(sent, len(queued)):]
		switch {
		case err == nil || len(rest) == 0:
			return
		case errors.Is(err, socksclient.ErrAssociationClosed) || errors.Is(err, net.ErrClosed):
			to := s
			for _, d := range rest {
				to = t.deliver(to, s.client, r.Slot(d.slot), d.dst)
			}
			return
		}
		t.stats.DroppedSend.Add(1)
		next := rest[1:]
		queued = next[:0]
		for _, d := range next {
			if s.fast.Add(r.Slot(d.slot), socksclient.MaxUDPHeaderLen, d.dst) != nil {
				t.deliver(s, s.client, r.Slot(d.slot), d.dst)
				continue
			}
			queued = append(queued, d)
		}
	}
}

// handOff copies a datagram to the session goroutine, or drops and counts
// it when the queue or the byte budget is full; false, having taken
// nothing, when the session has ended.
func (s *tpSession) handOff(slot []byte, dst socksclient.Addr) bool {
	t := s.t
	payload := slot[socksclient.MaxUDPHeaderLen:]
	class := udpBufClass(socksclient.MaxUDPHeaderLen + len(payload))
	size := int64(udpBufClasses[class])
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ending.Load() {
		return false
	}
	if len(s.in) == cap(s.in) {
		t.stats.DroppedQueue.Add(1)
		return true
	}
	if t.queued.Add(size) > t.queueLimit {
		t.queued.Add(-size)
		t.stats.DroppedMemory.Add(1)
		return true
	}
	bp := getUDPBuf(class)
	n := copy((*bp)[socksclient.MaxUDPHeaderLen:], payload)
	s.in <- tpPacket{bp, n, dst}
	return true
}

// serve owns the session: it sends queued datagrams through the
// association, built on the first and again after the proxy dropped it,
// until the session idles, is evicted, or the listener closes.
func (s *tpSession) serve() {
	t := s.t
	start := time.Now()
	idle := time.NewTimer(s.idle)
	defer func() {
		idle.Stop()
		t.retire(s, false)
		s.closeAssoc()
		s.dropQueued()
		t.stats.Active.Add(-1)
		ev := t.cfg.Logger.Debug()
		if s.lastErr != nil {
			ev = ev.Err(s.lastErr)
		}
		ev.Str("listener", t.cfg.Name).Str("client", s.client.String()).Str("upstream", s.upstream).
			Int64("datagrams_up", s.up.Load()).Int64("datagrams_down", s.down.Load()).
			Dur("dur", time.Since(start)).Msg("transparent UDP session ended")
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
			if t.retire(s, true) {
				return
			}
			idle.Reset(s.idle)
		case p := <-s.in:
			s.touch()
			s.send(p)
			t.release(p)
		}
	}
}

// send relays one datagram, associating first if needed; one that finds
// the association just dropped by the proxy goes again on a new one.
func (s *tpSession) send(p tpPacket) {
	t := s.t
	for range 2 {
		if s.assoc != nil && !s.assoc.Alive() {
			s.closeAssoc()
		}
		if s.assoc == nil && !s.associate() {
			t.stats.DroppedQueue.Add(1)
			return
		}
		err := s.assoc.WritePacket((*p.buf)[:socksclient.MaxUDPHeaderLen+p.n], socksclient.MaxUDPHeaderLen, p.dst)
		switch {
		case err == nil:
			s.up.Add(1)
			t.stats.DatagramsUp.Add(1)
			return
		case errors.Is(err, socksclient.ErrDatagramTooLarge):
			t.stats.DroppedLarge.Add(1)
			return
		case !errors.Is(err, socksclient.ErrAssociationClosed):
			t.stats.DroppedSend.Add(1)
			return
		}
		s.closeAssoc()
	}
	t.stats.DroppedSend.Add(1)
}

// associate builds the association; false while the upstreams fail,
// retried at most every udpRetryDelay, logged once per state change.
func (s *tpSession) associate() bool {
	t := s.t
	if time.Now().Before(s.failUntil) {
		return false
	}
	a, d, err := t.cfg.Upstreams.Associate(s.ctx)
	if d != nil {
		s.upstream = d.ProxyAddr
	}
	if err != nil {
		if s.ctx.Err() == nil {
			s.lastErr = err
			s.failUntil = time.Now().Add(udpRetryDelay)
			t.stats.AssociateFailures.Add(1)
			if ok, suppressed := t.logs.Allow(causeAssociate); ok {
				t.cfg.Logger.Warn().Err(err).Str("listener", t.cfg.Name).Str("upstream", s.upstream).
					Int64("failures_since_last_line", suppressed).Msg("UDP associate failing")
			}
		}
		return false
	}
	if suppressed, seen := t.logs.Reset(causeAssociate); seen {
		t.cfg.Logger.Info().Str("listener", t.cfg.Name).Str("upstream", s.upstream).
			Int64("failures_since_last_line", suppressed).Msg("UDP associate works again")
	}
	s.lastErr = nil
	s.assoc = a
	s.readDone = make(chan struct{})
	go s.copyDown(a, s.readDone)
	s.live.Store(a)
	return true
}

func (s *tpSession) closeAssoc() {
	if s.assoc != nil {
		s.live.Store(nil)
		s.assoc.Close()
		<-s.readDone
		s.assoc = nil
	}
}

func (s *tpSession) dropQueued() {
	for {
		select {
		case p := <-s.in:
			s.t.stats.DroppedEnded.Add(1)
			s.t.release(p)
		default:
			return
		}
	}
}

// copyDown relays the association's datagrams to the client, each with
// its remote's address as the source.
func (s *tpSession) copyDown(a *socksclient.UDPConn, done chan struct{}) {
	defer close(done)
	bp := getUDPBuf(len(udpBufClasses) - 1)
	defer putUDPBuf(bp)
	for {
		off, n, from, err := a.ReadPacket(*bp)
		if err != nil {
			return
		}
		s.touch()
		remote, ok := from.AddrPort()
		if !ok || !s.t.replies.send((*bp)[off:n], remote, s.client) {
			s.t.stats.DroppedReply.Add(1)
			continue
		}
		s.down.Add(1)
		s.t.stats.DatagramsDown.Add(1)
	}
}
