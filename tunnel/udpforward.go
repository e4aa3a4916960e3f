package tunnel

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/socksfwd/socksfwd/internal/sockbuf"
	"github.com/socksfwd/socksfwd/internal/udpbatch"
	"github.com/socksfwd/socksfwd/socksclient"
)

// UDP forward defaults (DESIGN §5).
const (
	DefaultUDPIdleTimeout = 60 * time.Second
	DefaultUDPMaxSessions = 1024
	// udpQueueLen bounds the datagrams waiting for one session's
	// association; beyond it they are dropped, as a full socket would.
	udpQueueLen = 64
	// udpRetryDelay keeps a session whose upstream failed from starting a
	// handshake for every datagram.
	udpRetryDelay = time.Second
	// capWarnEvery limits the warning about a full session table.
	capWarnEvery = time.Minute
)

// udpBufPool holds datagram buffers with headroom for the SOCKS header, so
// a client's datagram is wrapped in place.
var udpBufPool = sync.Pool{New: func() any {
	b := make([]byte, socksclient.MaxUDPHeaderLen+socksclient.MaxUDPDatagram)
	return &b
}}

// UDPForwardConfig describes one -L …/udp forward.
type UDPForwardConfig struct {
	Name      string
	Target    socksclient.Addr // names are resolved by the proxy
	Upstreams *socksclient.Upstreams
	// IdleTimeout ends a session with no datagram either way for this long
	// (default DefaultUDPIdleTimeout).
	IdleTimeout time.Duration
	// MaxSessions bounds the session table (default DefaultUDPMaxSessions);
	// new sources beyond it are dropped, existing ones keep working.
	MaxSessions int
	Logger      zerolog.Logger
}

// UDPStats counts a UDP forward's sessions and datagrams.
type UDPStats struct {
	Sessions      atomic.Int64 // sessions started
	Active        atomic.Int64
	DatagramsUp   atomic.Int64 // client → target
	DatagramsDown atomic.Int64 // target → client
	DroppedFull   atomic.Int64 // new source while the table was full
	DroppedQueue  atomic.Int64 // session queue full, or no association
	DroppedLarge  atomic.Int64 // longer than a slot: only IPv6 allows it
}

// UDPForward relays datagrams from local clients to one target: one session
// per client address, each with its own UDP ASSOCIATE.
type UDPForward struct {
	cfg UDPForwardConfig
	pc  *net.UDPConn

	mu       sync.Mutex
	sessions map[netip.AddrPort]*udpSession
	closed   bool
	wg       sync.WaitGroup

	stats       UDPStats
	lastCapWarn atomic.Int64
	closeOnce   sync.Once
}

// NewUDPForward returns a forward serving on pc, which the caller bound.
func NewUDPForward(cfg UDPForwardConfig, pc *net.UDPConn) *UDPForward {
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = DefaultUDPIdleTimeout
	}
	if cfg.MaxSessions <= 0 {
		cfg.MaxSessions = DefaultUDPMaxSessions
	}
	sockbuf.Grow(pc)
	return &UDPForward{cfg: cfg, pc: pc, sessions: make(map[netip.AddrPort]*udpSession)}
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

// udpPacket is one client datagram: payload at buf[MaxUDPHeaderLen:][:n].
type udpPacket struct {
	buf *[]byte
	n   int
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
func (f *UDPForward) Serve(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() { f.Close() })
	defer stop()
	slots := make([][]byte, udpReadBatch)
	for i := range slots {
		slots[i] = make([]byte, socksclient.MaxUDPHeaderLen+socksclient.MaxUDPDatagram)
	}
	r, err := udpbatch.NewReader(f.pc, slots, socksclient.MaxUDPHeaderLen, true)
	if err != nil {
		return err
	}
	pending := make([]*udpSession, 0, udpReadBatch) // sessions with queued datagrams
	for {
		n, err := r.Read()
		if err != nil {
			if f.isClosed() || errors.Is(err, net.ErrClosed) {
				return nil
			}
			continue // e.g. ICMP errors surfacing on the socket
		}
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
			if src := r.Addr(i); s == nil || src != lastSrc {
				lastSrc, s = src, f.session(src)
				if s != nil {
					s.touch() // once per run: the batch arrived at one moment
				}
			}
			if s == nil {
				continue
			}
			if s.queueFast(r.Slot(i), i) {
				if len(s.fastSlots) == 1 {
					pending = append(pending, s)
				}
				continue
			}
			s.handOff(r.Slot(i))
		}
		for _, s := range pending {
			s.flushFast(r)
		}
		clear(pending)
		pending = pending[:0]
	}
}

func (f *UDPForward) isClosed() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.closed
}

// session finds or starts the session of a client; nil when the table is
// full or the forward is closing.
func (f *UDPForward) session(client netip.AddrPort) *udpSession {
	f.mu.Lock()
	defer f.mu.Unlock()
	if s, ok := f.sessions[client]; ok {
		return s
	}
	if f.closed {
		return nil
	}
	if len(f.sessions) >= f.cfg.MaxSessions {
		f.stats.DroppedFull.Add(1)
		now := time.Now().UnixNano()
		if last := f.lastCapWarn.Load(); now-last >= int64(capWarnEvery) && f.lastCapWarn.CompareAndSwap(last, now) {
			f.cfg.Logger.Warn().Str("listener", f.cfg.Name).Str("client", client.String()).Int("max_sessions", f.cfg.MaxSessions).
				Msg("UDP session table full; dropping datagrams from new sources")
		}
		return nil
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &udpSession{f: f, client: client, in: make(chan udpPacket, udpQueueLen), ctx: ctx, cancel: cancel}
	s.touch()
	f.sessions[client] = s
	f.stats.Sessions.Add(1)
	f.stats.Active.Add(1)
	f.wg.Go(s.serve)
	return s
}

func (f *UDPForward) remove(s *udpSession) {
	s.cancel()
	f.mu.Lock()
	delete(f.sessions, s.client)
	f.mu.Unlock()
	f.stats.Active.Add(-1)
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
		f.pc.Close()
	})
	f.wg.Wait()
	return nil
}

// udpSession is one client's association with the target.
type udpSession struct {
	f      *UDPForward
	client netip.AddrPort
	in     chan udpPacket
	ctx    context.Context // cancelled by UDPForward.Close
	cancel context.CancelFunc

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
	if a == nil || !a.Alive() {
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
	if err := s.fast.Add(slot, socksclient.MaxUDPHeaderLen, s.f.cfg.Target); err != nil {
		return false // too large: the session path counts and drops it
	}
	s.fastSlots = append(s.fastSlots, idx)
	return true
}

// flushFast sends the queued datagrams. Those that found the association
// just dropped by the proxy go to the session, which associates again and
// resends them.
func (s *udpSession) flushFast(r *udpbatch.Reader) {
	sent, err := s.fast.Flush()
	s.up.Add(int64(sent))
	s.f.stats.DatagramsUp.Add(int64(sent))
	if errors.Is(err, socksclient.ErrAssociationClosed) {
		for _, idx := range s.fastSlots[sent:] {
			s.handOff(r.Slot(idx))
		}
	}
	s.fastSlots = s.fastSlots[:0]
}

// handOff copies a client datagram (slot: headroom, then payload) to the
// session goroutine. Serve only.
func (s *udpSession) handOff(slot []byte) {
	bp := udpBufPool.Get().(*[]byte)
	n := copy((*bp)[socksclient.MaxUDPHeaderLen:], slot[socksclient.MaxUDPHeaderLen:])
	select {
	case s.in <- udpPacket{bp, n}:
	default:
		s.f.stats.DroppedQueue.Add(1)
		udpBufPool.Put(bp)
	}
}

// serve owns the session: it sends the client's datagrams through an
// association, which it builds on the first datagram and builds again when
// the proxy has dropped the control connection, until the session is idle
// or the forward closes.
func (s *udpSession) serve() {
	f := s.f
	start := time.Now()
	idle := time.NewTimer(f.cfg.IdleTimeout)
	defer func() {
		idle.Stop()
		s.closeAssoc()
		f.remove(s)
		s.drain()
		ev := f.cfg.Logger.Debug()
		if s.lastErr != nil {
			ev = f.cfg.Logger.Info().Err(s.lastErr)
		}
		ev = ev.Str("listener", f.cfg.Name).Str("client", s.client.String()).Str("target", f.cfg.Target.String()).
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
			if rest := f.cfg.IdleTimeout - time.Since(time.Unix(0, s.lastIO.Load())); rest > 0 {
				idle.Reset(rest)
				continue
			}
			return
		case p := <-s.in:
			s.touch()
			s.send(p)
			udpBufPool.Put(p.buf)
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
		err := s.assoc.WritePacket((*p.buf)[:socksclient.MaxUDPHeaderLen+p.n], socksclient.MaxUDPHeaderLen, f.cfg.Target)
		if err == nil {
			s.up.Add(1)
			f.stats.DatagramsUp.Add(1)
			return
		}
		if !errors.Is(err, socksclient.ErrAssociationClosed) {
			return // e.g. too large: counted by the association
		}
		s.closeAssoc()
	}
}

// associate builds the association; false (datagram dropped) while the
// upstreams fail, retried at most every udpRetryDelay.
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
			f.cfg.Logger.Info().Err(err).Str("listener", f.cfg.Name).Str("client", s.client.String()).
				Str("upstream", s.upstream).Msg("UDP associate failed")
		}
		return false
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

// drain returns the buffers of datagrams still queued.
func (s *udpSession) drain() {
	for {
		select {
		case p := <-s.in:
			udpBufPool.Put(p.buf)
		default:
			return
		}
	}
}

// copyDown relays the association's datagrams back to the client.
func (s *udpSession) copyDown(a *socksclient.UDPConn, done chan struct{}) {
	defer close(done)
	bp := udpBufPool.Get().(*[]byte)
	defer udpBufPool.Put(bp)
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
