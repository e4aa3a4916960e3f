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

	"github.com/socksfwd/socksfwd/internal/allowlist"
	"github.com/socksfwd/socksfwd/internal/logthrottle"
	"github.com/socksfwd/socksfwd/socksclient"
)

// udpTable is the session table of a UDP service (a -L …/udp forward, a
// transparent UDP listener): one session per client address, each with
// its own UDP ASSOCIATE, a queue under a byte budget shared by the
// service, an idle timeout, and a bound that evicts the idlest session.
// What differs between services is a parameter: whether a session sends
// to one fixed target or to each datagram's own destination, and how
// replies reach the client (copyDown).
type udpTable struct {
	name      string
	logger    zerolog.Logger
	upstreams *socksclient.Upstreams
	stats     *UDPStats
	logs      *logthrottle.Throttle
	done      chan struct{} // closed by close
	// endMsg is the debug line a session's end logs.
	endMsg string
	// fixedTarget: every datagram of a session goes to the target it was
	// started with, whatever destination Serve passes along.
	fixedTarget bool
	// copyDown relays the association's datagrams back to s's client
	// until the association is closed.
	copyDown func(s *udpSession, a *socksclient.UDPConn)
	// relays, if not nil, holds the UDP relays of the live associations.
	relays *relaySet

	// queued is what the buffers of queued datagrams take, charged when a
	// datagram is queued and given back when it is sent or dropped.
	queued     atomic.Int64
	queueLimit int64

	allow atomic.Pointer[allowlist.List] // nil: every source

	mu          sync.Mutex
	sessions    map[netip.AddrPort]*udpSession
	idleTimeout time.Duration    // for sessions started from now on
	maxSessions int              // the table's bound
	target      socksclient.Addr // for sessions started from now on, with fixedTarget
	closed      bool
	wg          sync.WaitGroup

	closeOnce sync.Once
}

// udpTableConfig is what a service gives its table.
type udpTableConfig struct {
	name        string
	logger      zerolog.Logger
	upstreams   *socksclient.Upstreams
	stats       *UDPStats
	endMsg      string
	fixedTarget bool
	target      socksclient.Addr
	copyDown    func(s *udpSession, a *socksclient.UDPConn)
	idleTimeout time.Duration
	maxSessions int
	queueBytes  int
	relays      *relaySet // kept up to date when not nil
}

// configure sets the table up; zero limits take the defaults.
func (t *udpTable) configure(c udpTableConfig) {
	if c.idleTimeout <= 0 {
		c.idleTimeout = DefaultUDPIdleTimeout
	}
	if c.maxSessions <= 0 {
		c.maxSessions = DefaultUDPMaxSessions
	}
	if c.queueBytes <= 0 {
		c.queueBytes = DefaultUDPQueueBytes
	}
	t.name, t.logger, t.upstreams, t.stats = c.name, c.logger, c.upstreams, c.stats
	t.endMsg, t.fixedTarget, t.target, t.copyDown, t.relays = c.endMsg, c.fixedTarget, c.target, c.copyDown, c.relays
	t.logs = logthrottle.New(udpLogEvery)
	t.done = make(chan struct{})
	t.queueLimit = int64(c.queueBytes)
	t.sessions = make(map[netip.AddrPort]*udpSession)
	t.idleTimeout, t.maxSessions = c.idleTimeout, c.maxSessions
}

// SetLimits changes the idle timeout of the sessions started from now on
// and the bound of the session table (a reload); zero or less means the
// default. Live sessions keep their timeout. A lower bound ends no session
// at once: the table no longer grows past it, and shrinks to it as
// sessions end.
func (t *udpTable) SetLimits(idleTimeout time.Duration, maxSessions int) {
	if idleTimeout <= 0 {
		idleTimeout = DefaultUDPIdleTimeout
	}
	if maxSessions <= 0 {
		maxSessions = DefaultUDPMaxSessions
	}
	t.mu.Lock()
	t.idleTimeout, t.maxSessions = idleTimeout, maxSessions
	t.mu.Unlock()
}

// SetAllow sets the client sources served from now on (nil: every
// source); datagrams from others are dropped and counted.
func (t *udpTable) SetAllow(l *allowlist.List) { t.allow.Store(l) }

// Sessions is the number of live sessions.
func (t *udpTable) Sessions() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.sessions)
}

func (t *udpTable) isClosed() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.closed
}

// closeSessions stops reading (closes pc), ends every session and waits
// for the table's goroutines. It is idempotent.
func (t *udpTable) closeSessions(pc *net.UDPConn) {
	t.closeOnce.Do(func() {
		t.mu.Lock()
		t.closed = true
		for _, s := range t.sessions {
			s.cancel()
		}
		t.mu.Unlock()
		close(t.done)
		pc.Close()
	})
	t.wg.Wait()
}

// newReadSlots makes Serve's read slots: each holds the largest datagram
// after room for a SOCKS header; only the pages datagrams touch become
// resident.
func newReadSlots() [][]byte {
	slots := make([][]byte, udpReadBatch)
	for i := range slots {
		slots[i] = make([]byte, socksclient.MaxUDPHeaderLen+socksclient.MaxUDPDatagram)
	}
	return slots
}

// serveBatches reads batches of datagrams with read, and hands each
// batch's count to handle, until the service closes; it returns nil on
// such a stop. A failed read is retried at once (an ICMP error a send
// provoked surfaces once, on the next read); reads that keep failing are
// retried after a growing pause, so a broken socket does not spin.
func (t *udpTable) serveBatches(read func() (int, error), handle func(n int)) error {
	failures := 0 // reads failed in a row
	for {
		n, err := read()
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
		handle(n)
	}
}

// readBackoff counts and logs a failed read of the listening socket and
// waits before the next: not at all after a lone failure, then from
// readBackoffMin doubling up to readBackoffMax while reads keep failing.
// It reports false when the service closed meanwhile.
func (t *udpTable) readBackoff(err error, failures int) bool {
	t.stats.ReadErrors.Add(1)
	if ok, suppressed := t.logs.Allow(causeRead); ok {
		t.logger.Warn().Err(err).Str("listener", t.name).Func(logthrottle.Repeats("repeats", suppressed)).
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

// session finds or starts the session of a client; nil once the service
// is closing. A new source that finds the table full evicts the session
// idle the longest.
func (t *udpTable) session(client netip.AddrPort) *udpSession {
	t.mu.Lock()
	defer t.mu.Unlock()
	if s, ok := t.sessions[client]; ok {
		return s
	}
	if t.closed {
		return nil
	}
	if len(t.sessions) >= t.maxSessions {
		t.evictIdlestLocked()
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &udpSession{
		t: t, client: client, idle: t.idleTimeout, fixed: t.fixedTarget, target: t.target,
		in: make(chan udpPacket, udpQueueLen), ctx: ctx, cancel: cancel,
	}
	s.touch()
	t.sessions[client] = s
	t.stats.Sessions.Add(1)
	t.stats.Active.Add(1)
	t.wg.Go(s.serve)
	return s
}

// evictIdlestLocked ends the session idle the longest, to make room for a
// new source as a NAT table does. The scan looks at each session once and
// only runs when a new source finds the table full, so datagrams of
// existing sessions never pay for it. Only one session goes: after a
// lower bound from SetLimits the table shrinks as sessions end.
func (t *udpTable) evictIdlestLocked() {
	var victim *udpSession
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
		t.logger.Warn().Str("listener", t.name).Int("max_sessions", t.maxSessions).
			Str("evicted", victim.client.String()).Func(logthrottle.Repeats("evicted_before", suppressed)).
			Msg("UDP session table full; evicting the session idle the longest")
	}
}

// retireLocked takes s out of the table and marks it ending, atomically
// for handOff: from here on no datagram is queued to it, and Serve's next
// lookup of its client starts a fresh session. With ifIdle, s is retired
// only if it has nothing queued and saw no datagram for its idle timeout,
// and the result says whether it was. t.mu is held.
func (t *udpTable) retireLocked(s *udpSession, ifIdle bool) bool {
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

func (t *udpTable) retire(s *udpSession, ifIdle bool) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.retireLocked(s, ifIdle)
}

// deliverTo queues a client datagram (slot: headroom, then payload) bound
// for dst for its session s. When s left the table after Serve looked it
// up (it ended idle, or was evicted), a fresh session takes the datagram,
// as it would have a moment later. It returns the session that now serves
// src, nil when there is none (the service is closing; the datagram is
// counted).
func (t *udpTable) deliverTo(s *udpSession, src netip.AddrPort, slot []byte, dst socksclient.Addr) *udpSession {
	if s != nil && s.handOff(slot, dst) {
		return s
	}
	if s = t.session(src); s != nil && s.handOff(slot, dst) {
		return s
	}
	t.dropped(&t.stats.DroppedEnded, causeEnded)
	return nil
}

// dropped counts a datagram dropped in counter and logs the cause once a
// period, with how many more it dropped since.
func (t *udpTable) dropped(counter *atomic.Int64, cause string) { t.droppedN(counter, 1, cause) }

// droppedN is dropped for n datagrams at once.
func (t *udpTable) droppedN(counter *atomic.Int64, n int64, cause string) {
	counter.Add(n)
	if ok, suppressed := t.logs.Allow(cause); ok {
		t.logger.Warn().Str("listener", t.name).Func(logthrottle.Repeats("repeats", suppressed)).Msg("UDP datagram dropped: " + cause)
	}
}

// relayICMP counts an ICMP error the proxy's relay (or a router or
// firewall on the way to it) sent about a datagram sent up, and logs it
// once a period: the association goes on.
func (t *udpTable) relayICMP(err error) {
	t.stats.RelayRefused.Add(1)
	if ok, suppressed := t.logs.Allow(causeRelayICMP); ok {
		t.logger.Warn().Err(err).Str("listener", t.name).Func(logthrottle.Repeats("repeats", suppressed)).
			Msg("an ICMP error came back for a datagram sent to the proxy's UDP relay; the association goes on")
	}
}

// release gives a queued datagram's buffer back, and its bytes to the
// budget.
func (t *udpTable) release(p udpPacket) {
	t.queued.Add(-int64(cap(*p.buf)))
	putUDPBuf(p.buf)
}

// udpDispatch is Serve's state over one read batch: a batch mostly comes
// from one client, whose session is looked up once per run, and the
// sessions holding datagrams for the fast path.
type udpDispatch struct {
	lastSrc netip.AddrPort
	lastLo  bool // lastSrc's datagrams arrived on the loopback interface
	s       *udpSession
	pending []*udpSession
}

func newUDPDispatch() *udpDispatch {
	return &udpDispatch{pending: make([]*udpSession, 0, udpReadBatch)}
}

// dispatch hands the read datagram idx (slot: headroom, then payload) of
// src, bound for dst, to its session: to the fast path when the session
// has a live association, else copied to the session's queue. onLoopback
// says it arrived on the loopback interface, so the host itself sent it.
func (t *udpTable) dispatch(d *udpDispatch, src netip.AddrPort, onLoopback bool, slot []byte, idx int, dst socksclient.Addr) {
	s := d.s
	if s == nil || src != d.lastSrc || onLoopback != d.lastLo {
		if !t.allow.Load().AllowsDatagram(src.Addr(), onLoopback) {
			d.s = nil
			t.stats.DroppedNotAllowed.Add(1)
			if ok, suppressed := t.logs.Allow(causeNotAllowed); ok {
				t.logger.Warn().Str("listener", t.name).Str("client", src.String()).Func(logthrottle.Repeats("repeats", suppressed)).
					Msg("datagram dropped: client source not in --allow")
			}
			return
		}
		d.lastSrc, d.lastLo, s = src, onLoopback, t.session(src)
		d.s = s
		if s == nil { // the service is closing
			t.dropped(&t.stats.DroppedEnded, causeEnded)
			return
		}
		s.touch() // once per run: the batch arrived at one moment
	}
	switch s.queueFast(slot, idx, dst) {
	case fastQueued:
		if len(s.fastSlots) == 1 {
			d.pending = append(d.pending, s)
		}
		return
	case fastTooLarge:
		// Counted here, as the association counted it in Add: the session
		// path would count it in the association a second time.
		t.dropped(&t.stats.DroppedLarge, causeOversize)
		return
	}
	d.s = t.deliverTo(s, src, slot, dst)
}

// flush sends what the batch queued for the fast path, and readies d for
// the next batch.
func (d *udpDispatch) flush(r datagramReader) {
	for _, s := range d.pending {
		s.flushFast(r)
	}
	clear(d.pending)
	d.pending = d.pending[:0]
	d.s, d.lastSrc = nil, netip.AddrPort{}
}

// udpPacket is one queued client datagram: payload at
// buf[MaxUDPHeaderLen:][:n], bound for dst.
type udpPacket struct {
	buf *[]byte
	n   int
	dst socksclient.Addr
}

// fastSlot is a datagram queued for the fast path: its read slot and
// where it goes.
type fastSlot struct {
	idx int
	dst socksclient.Addr
}

// udpSession is one client's association, carrying its datagrams to the
// session's target, or each to its own destination.
type udpSession struct {
	t      *udpTable
	client netip.AddrPort
	idle   time.Duration
	fixed  bool             // every datagram goes to target
	target socksclient.Addr // fixed for the session's life
	in     chan udpPacket
	ctx    context.Context // cancelled by eviction and the service's Close
	cancel context.CancelFunc

	// mu orders handOff's sends on in against retirement: once ending is
	// set under it, nothing more is queued, so what serve drains then is
	// all there is. ending is also read alone by Serve's fast path.
	mu     sync.Mutex
	ending atomic.Bool

	// backlog counts the datagrams handed to serve and not yet sent: while
	// there are any, Serve's fast path hands new ones over too, so that
	// none overtakes them (a session's first datagrams queue while it
	// associates, and the fast path opens as soon as the association is
	// live).
	backlog atomic.Int64

	lastIO atomic.Int64 // unix nanos of the last datagram either way
	up     atomic.Int64 // datagrams sent, by serve or Serve's fast path
	down   atomic.Int64
	// live is the association once built, for Serve's fast path.
	live atomic.Pointer[socksclient.UDPConn]
	// local is the address the client sent to, for a forward on a
	// wildcard address to answer from; nil: the route's choice.
	local atomic.Pointer[netip.Addr]

	// Owned by Serve: the batch for live, and which read slots it holds.
	fast      *socksclient.UDPBatch
	fastSlots []fastSlot

	// Owned by serve:
	assoc     *socksclient.UDPConn
	readDone  chan struct{}
	upstream  string
	lastErr   error
	failUntil time.Time
	// assocStart is when assoc was built, assocEnd when its reader
	// stopped (written by the reader before readDone closes), and
	// youngBackoff the pause after the last association the proxy ended
	// young (see noteAssocEnd).
	assocStart, assocEnd time.Time
	youngBackoff         time.Duration
	// Batches held back for a relay on this host, over the session's
	// associations so far, and waits given up (socksclient.UDPStats).
	relayWaits, relayStalls int64
}

func (s *udpSession) touch() { s.lastIO.Store(time.Now().UnixNano()) }

// setLocal records the address the client sent to, once: the first one
// stays, so that every reply leaves from one address. Not a multicast or
// broadcast address, which no reply can come from, nor an IPv6
// link-local one, which would need its interface too: for those the
// route chooses, as before.
func (s *udpSession) setLocal(a netip.Addr) {
	if !a.IsValid() || a.IsMulticast() || a == netip.AddrFrom4([4]byte{255, 255, 255, 255}) ||
		a.Is6() && a.IsLinkLocalUnicast() || s.local.Load() != nil {
		return
	}
	s.local.Store(&a)
}

// to is where a datagram Serve found bound for dst goes.
func (s *udpSession) to(dst socksclient.Addr) socksclient.Addr {
	if s.fixed {
		return s.target
	}
	return dst
}

// What queueFast did with a datagram.
const (
	fastNone     = iota // no live association: the session path takes it
	fastQueued          // queued for the live association
	fastTooLarge        // too large for a SOCKS header (counted by the association): drop it
)

// queueFast queues a client datagram (slot: headroom, then payload) for
// the live association. Serve only.
func (s *udpSession) queueFast(slot []byte, idx int, dst socksclient.Addr) int {
	a := s.live.Load()
	if a == nil || !a.Alive() || s.ending.Load() || s.backlog.Load() > 0 {
		return fastNone
	}
	if s.fast == nil || s.fast.Conn() != a {
		if len(s.fastSlots) > 0 {
			// Datagrams of this read wait in the batch of an association
			// the session has since replaced: replacing the batch would
			// lose them. They go at the flush (to the session, their
			// association being gone), and this one through the session.
			return fastNone
		}
		b, err := a.NewBatch(udpReadBatch)
		if err != nil {
			return fastNone
		}
		s.fast = b
		if s.fastSlots == nil {
			s.fastSlots = make([]fastSlot, 0, udpReadBatch)
		}
	}
	dst = s.to(dst)
	if err := s.fast.Add(slot, socksclient.MaxUDPHeaderLen, dst); err != nil {
		if errors.Is(err, socksclient.ErrDatagramTooLarge) {
			return fastTooLarge
		}
		return fastNone // an address no header can carry: the session path counts it
	}
	s.fastSlots = append(s.fastSlots, fastSlot{idx, dst})
	return fastQueued
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
	t := s.t
	slots := s.fastSlots
	for len(slots) > 0 {
		sent, err := b.Flush()
		s.up.Add(int64(sent))
		t.stats.DatagramsUp.Add(int64(sent))
		bytes := 0
		for _, q := range slots[:min(sent, len(slots))] {
			bytes += len(r.Slot(q.idx)) - socksclient.MaxUDPHeaderLen
		}
		t.stats.BytesUp.Add(int64(bytes))
		rest := slots[min(sent, len(slots)):]
		switch {
		case err == nil || len(rest) == 0:
			return
		case errors.Is(err, socksclient.ErrAssociationClosed) || errors.Is(err, net.ErrClosed):
			to := s
			for _, q := range rest {
				to = t.deliverTo(to, s.client, r.Slot(q.idx), q.dst)
			}
			return
		}
		t.dropped(&t.stats.DroppedSend, causeSend)
		next := rest[1:]
		slots = next[:0]
		for _, q := range next {
			if b.Add(r.Slot(q.idx), socksclient.MaxUDPHeaderLen, q.dst) != nil {
				t.deliverTo(s, s.client, r.Slot(q.idx), q.dst) // as Serve does when queueFast fails
				continue
			}
			slots = append(slots, q)
		}
	}
}

// handOff copies a client datagram (slot: headroom, then payload) bound
// for dst to the session goroutine, or drops and counts it when the
// session's queue or the service's byte budget is full. It reports false,
// having taken nothing, when the session has ended.
func (s *udpSession) handOff(slot []byte, dst socksclient.Addr) bool {
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
		t.dropped(&t.stats.DroppedQueue, causeQueueFull)
		return true
	}
	if t.queued.Add(size) > t.queueLimit {
		t.queued.Add(-size)
		t.dropped(&t.stats.DroppedMemory, causeMemory)
		return true
	}
	bp := getUDPBuf(class)
	n := copy((*bp)[socksclient.MaxUDPHeaderLen:], payload)
	s.backlog.Add(1)
	s.in <- udpPacket{bp, n, s.to(dst)} // room checked above; only handOff sends, under mu
	return true
}

// serve owns the session: it sends the client's datagrams through an
// association, which it builds on the first datagram and builds again when
// the proxy has dropped the control connection, until the session is idle,
// evicted, or the service closes.
func (s *udpSession) serve() {
	t := s.t
	start := time.Now()
	idle := time.NewTimer(s.idle)
	defer func() {
		idle.Stop()
		t.retire(s, false)
		s.closeAssoc()
		s.dropQueued()
		t.stats.Active.Add(-1)
		// Debug even after a failure: the service logs failing
		// associations once per state change, not once per session.
		ev := t.logger.Debug()
		if s.lastErr != nil {
			ev = ev.Err(s.lastErr)
		}
		ev = ev.Str("listener", t.name).Str("client", s.client.String())
		if s.fixed {
			ev = ev.Str("target", s.target.String())
		}
		if s.upstream != "" { // none ever associated
			ev = ev.Str("upstream", s.upstream)
		}
		ev = ev.Int64("datagrams_up", s.up.Load()).Int64("datagrams_down", s.down.Load())
		if s.relayWaits > 0 {
			ev = ev.Int64("relay_waits", s.relayWaits).Int64("relay_stalls", s.relayStalls)
		}
		ev.Dur("dur_ms", time.Since(start)).Msg(t.endMsg)
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
			idle.Reset(s.idle) // a datagram came meanwhile
		case p := <-s.in:
			s.touch()
			s.send(p)
			t.release(p)
			s.backlog.Add(-1)
		}
	}
}

// send relays one datagram, associating first if needed. A datagram that
// finds the association just dropped by the proxy is sent again on a new
// one.
func (s *udpSession) send(p udpPacket) {
	t := s.t
	for range 2 {
		if s.assoc != nil && !s.assoc.Alive() {
			s.closeAssoc()
			t.logger.Debug().Str("listener", t.name).Str("client", s.client.String()).
				Dur("pause_ms", max(time.Until(s.failUntil), 0).Round(time.Millisecond)).
				Msg("UDP association ended by the proxy; re-associating")
		}
		if s.assoc == nil && !s.associate() {
			t.dropped(&t.stats.DroppedNoAssoc, causeNoAssoc)
			return
		}
		err := s.assoc.WritePacket((*p.buf)[:socksclient.MaxUDPHeaderLen+p.n], socksclient.MaxUDPHeaderLen, p.dst)
		switch {
		case err == nil:
			s.up.Add(1)
			t.stats.DatagramsUp.Add(1)
			t.stats.BytesUp.Add(int64(p.n))
			return
		case errors.Is(err, socksclient.ErrDatagramTooLarge):
			t.dropped(&t.stats.DroppedLarge, causeOversize)
			return
		case !errors.Is(err, socksclient.ErrAssociationClosed):
			t.dropped(&t.stats.DroppedSend, causeSend)
			return
		}
		s.closeAssoc()
	}
	t.dropped(&t.stats.DroppedSend, causeSend) // the new association ended at once too
}

// associate builds the association; false (datagram dropped) while the
// upstreams fail, retried at most every udpRetryDelay. Failures are
// logged once per service when they start, then once per udpLogEvery with
// a count, and once when an association works again.
func (s *udpSession) associate() bool {
	t := s.t
	if time.Now().Before(s.failUntil) {
		return false
	}
	a, d, err := t.upstreams.Associate(s.ctx)
	s.upstream = "" // none when every upstream failed, not the one before
	if d != nil {
		s.upstream = d.ProxyAddr
	}
	if err != nil {
		if s.ctx.Err() == nil {
			s.lastErr = err
			s.failUntil = time.Now().Add(udpRetryDelay)
			t.stats.AssociateFailures.Add(1)
			if ok, suppressed := t.logs.Allow(causeAssociate); ok {
				ev := t.logger.Warn().Err(err).Str("listener", t.name)
				if s.upstream != "" { // none when every upstream failed: the error names them
					ev = ev.Str("upstream", s.upstream)
				}
				ev.Func(logthrottle.Repeats("failures_since_last_line", suppressed)).Msg("UDP associate failing")
			}
		}
		return false
	}
	if suppressed, seen := t.logs.Reset(causeAssociate); seen {
		t.logger.Info().Str("listener", t.name).Str("upstream", s.upstream).
			Func(logthrottle.Repeats("failures_since_last_line", suppressed)).Msg("UDP associate works again")
	}
	s.lastErr = nil
	a.CountInto(&t.stats.Association)
	t.relays.add(a.Relay())
	s.assoc = a
	s.assocStart = time.Now()
	done := make(chan struct{})
	s.readDone = done
	go func() {
		defer close(done)
		t.copyDown(s, a)
		s.assocEnd = time.Now() // the reader stops when the proxy ends it
	}()
	s.live.Store(a)
	return true
}

// closeAssoc closes the association, if any, and waits for its reader.
func (s *udpSession) closeAssoc() {
	if s.assoc != nil {
		byProxy := !s.assoc.Alive()
		s.live.Store(nil)
		s.assoc.Close()
		s.t.relays.remove(s.assoc.Relay())
		<-s.readDone
		s.relayWaits += s.assoc.Stats().RelayWaits.Load()
		s.relayStalls += s.assoc.Stats().RelayStalls.Load()
		s.assoc = nil
		if byProxy {
			s.noteAssocEnd(s.assocEnd.Sub(s.assocStart))
		}
	}
}

// An association the proxy ends within assocYoung makes the session wait
// before the next, from assocBackoffMin doubling up to assocBackoffMax
// while they keep dying young: a proxy that accepts UDP ASSOCIATE and
// drops the control connection at once would otherwise cost a handshake
// per client datagram. Datagrams meanwhile are dropped and counted, as
// while an association cannot be had.
const (
	assocYoung      = time.Second
	assocBackoffMin = 100 * time.Millisecond
	assocBackoffMax = 5 * time.Second
)

// noteAssocEnd sets the pause before the next association after one the
// proxy ended when it had lived for lived.
func (s *udpSession) noteAssocEnd(lived time.Duration) {
	if lived >= assocYoung {
		s.youngBackoff = 0
		return
	}
	s.youngBackoff = min(max(2*s.youngBackoff, assocBackoffMin), assocBackoffMax)
	s.failUntil = time.Now().Add(s.youngBackoff)
}

// dropQueued counts and releases the datagrams still queued when the
// session ends; it runs after retire, so none can follow.
func (s *udpSession) dropQueued() {
	for {
		select {
		case p := <-s.in:
			s.t.dropped(&s.t.stats.DroppedEnded, causeEnded)
			s.t.release(p)
			s.backlog.Add(-1)
		default:
			return
		}
	}
}
