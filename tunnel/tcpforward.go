package tunnel

import (
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/socksfwd/socksfwd/internal/allowlist"
	"github.com/socksfwd/socksfwd/internal/logthrottle"
	"github.com/socksfwd/socksfwd/socksclient"
)

// TCPForwardConfig describes one -L forward.
type TCPForwardConfig struct {
	// Name labels the forward in logs, e.g. "127.0.0.1:5432".
	Name string
	// Target is where connections go, resolved by the proxy when a name.
	Target socksclient.Addr
	// TargetOf, when set, gives each accepted connection its own target
	// (a transparent listener's original destination); Target and
	// SetTarget are then unused. An error refuses the session: the client
	// gets a reset and the log one line naming the cause.
	TargetOf func(c net.Conn) (socksclient.Addr, error)
	// Upstreams dials the target through the configured proxies.
	Upstreams *socksclient.Upstreams
	// IdleTimeout closes a session idle this long (default 0 = never, like
	// ssh -L). SetIdleTimeout changes it for new sessions.
	IdleTimeout time.Duration
	// CopyMode chooses the relay's copy (default CopySplice).
	CopyMode CopyMode
	// MaxSessions bounds the sessions open at once (0 = no bound):
	// connections beyond it are closed at once and counted. Allow, when
	// set, lists the client sources served; others are closed at once
	// and counted. SetAdmission changes both.
	MaxSessions int
	Allow       *allowlist.List
	Logger      zerolog.Logger
}

// admission is what a new connection must pass.
type admission struct {
	maxSessions int
	allow       *allowlist.List
}

// Why a connection was closed at once.
var (
	ErrTooManySessions = errors.New("too many sessions: --max-sessions reached")
	ErrNotAllowed      = errors.New("client source not in --allow")
)

// TCPForward accepts local connections and relays each one to the target
// through a SOCKS5 CONNECT.
type TCPForward struct {
	cfg       TCPForwardConfig
	listeners []net.Listener

	ctx    context.Context // cancelled by Close: aborts handshakes
	cancel context.CancelFunc

	refusals *logthrottle.Throttle            // "session refused" lines
	idle     atomic.Int64                     // the idle timeout new sessions get
	target   atomic.Pointer[socksclient.Addr] // where new sessions go
	admit    atomic.Pointer[admission]

	mu          sync.Mutex
	conns       map[net.Conn]bool // true for a session's client conn
	stopping    bool
	stopAccepts sync.Once
	acceptsStop chan struct{} // closed by StopAccepting: ends a backoff
	cut         atomic.Bool   // Close cut live sessions
	sessions    sync.WaitGroup
	accepts     sync.WaitGroup

	stats TCPStats
	door  *SOCKSDoor // set for a -D listener, which serves its own sessions
}

// TCPStats counts a forward's sessions and bytes.
type TCPStats struct {
	Sessions  atomic.Int64 // accepted connections
	Active    atomic.Int64
	Failed    atomic.Int64 // sessions without a target (TargetOf failed) or whose upstream dial failed
	BytesUp   atomic.Int64
	BytesDown atomic.Int64
	// Connections closed at once: MaxSessions were open, or the source
	// is not in Allow; on a transparent listener, no rule sent the
	// connection (ErrNotRedirected), or it was socksfwd's own to a proxy
	// (ErrCaptureLoop).
	RejectedFull, RejectedNotAllowed, RejectedNotRedirected, RejectedCaptureLoop atomic.Int64
}

// NewTCPForward returns a forward that will serve on listeners, which the
// caller has bound (so a bind failure surfaces before anything starts).
func NewTCPForward(cfg TCPForwardConfig, listeners ...net.Listener) *TCPForward {
	ctx, cancel := context.WithCancel(context.Background())
	f := &TCPForward{cfg: cfg, listeners: listeners, ctx: ctx, cancel: cancel, conns: make(map[net.Conn]bool), acceptsStop: make(chan struct{})}
	f.refusals = logthrottle.New(refusalLogEvery)
	f.idle.Store(int64(cfg.IdleTimeout))
	f.target.Store(&cfg.Target)
	f.SetAdmission(cfg.MaxSessions, cfg.Allow)
	return f
}

// SetAdmission changes MaxSessions and Allow for connections accepted from
// now on; live sessions stay. A reload calls it without rebinding.
func (f *TCPForward) SetAdmission(maxSessions int, allow *allowlist.List) {
	f.admit.Store(&admission{maxSessions: maxSessions, allow: allow})
}

// admits says why c must be closed at once, or nil.
func (f *TCPForward) admits(c net.Conn) error { return f.admit.Load().check(c, f.stats.Active.Load()) }

// check says why a connection from c, with active sessions open, must be
// closed at once, or nil.
func (a *admission) check(c net.Conn, active int64) error {
	if !a.allow.AllowsAddr(c.RemoteAddr()) {
		return ErrNotAllowed
	}
	if a.maxSessions > 0 && active >= int64(a.maxSessions) {
		return ErrTooManySessions
	}
	return nil
}

// refusalLogEvery is how often a refused session's cause is logged again.
const refusalLogEvery = 10 * time.Second

// SetTarget changes where sessions accepted from now on go; live sessions
// keep theirs. A reload calls it without rebinding.
func (f *TCPForward) SetTarget(target socksclient.Addr) { f.target.Store(&target) }

// SetIdleTimeout sets the idle timeout of sessions accepted from now on
// (0 = never); live sessions keep theirs. A reload calls it without
// rebinding.
func (f *TCPForward) SetIdleTimeout(d time.Duration) { f.idle.Store(int64(d)) }

// Stats returns the live counters.
func (f *TCPForward) Stats() *TCPStats { return &f.stats }

// Addr is the first listener's address.
func (f *TCPForward) Addr() net.Addr { return f.listeners[0].Addr() }

// Listener is the first listener, for what its socket says of itself
// (IsTransparent).
func (f *TCPForward) Listener() net.Listener { return f.listeners[0] }

// Serve accepts until Shutdown or Close, or until ctx is done (which then
// closes the forward). It returns nil on such a stop.
func (f *TCPForward) Serve(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() { f.Close() })
	defer stop()
	errc := make(chan error, len(f.listeners))
	for _, ln := range f.listeners {
		f.accepts.Go(func() { errc <- f.acceptLoop(ln) })
	}
	f.accepts.Wait()
	close(errc)
	for err := range errc {
		if err != nil {
			f.Close()
			return err
		}
	}
	f.sessions.Wait()
	return nil
}

func (f *TCPForward) acceptLoop(ln net.Listener) error {
	var tempDelay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if f.isStopping() || errors.Is(err, net.ErrClosed) {
				return nil
			}
			// Out of descriptors and the like: back off, keep serving, and
			// log the cause once a period, not once a retry.
			tempDelay = min(max(2*tempDelay, 5*time.Millisecond), time.Second)
			if ok, suppressed := f.refusals.Allow("accept failed"); ok {
				f.cfg.Logger.Warn().Err(err).Str("listener", f.cfg.Name).Func(logthrottle.Repeats("repeats", suppressed)).Msg("accept failed; retrying")
			}
			select {
			case <-time.After(tempDelay):
				continue
			case <-f.acceptsStop:
				return nil
			case <-f.ctx.Done():
				return nil
			}
		}
		tempDelay = 0
		if err := f.admits(c); err != nil {
			f.reject(c, err)
			continue
		}
		if !f.track(c, true) {
			c.Close()
			continue
		}
		// Counted here, not in the session's goroutine, so that the next
		// accept already sees it against MaxSessions.
		f.stats.Sessions.Add(1)
		f.stats.Active.Add(1)
		f.sessions.Go(func() { f.serveSession(c) })
	}
}

// reject closes a connection admission refused, with a reset, and logs
// one line per cause and period.
func (f *TCPForward) reject(c net.Conn, err error) {
	rejectConn(f.cfg.Logger, f.refusals, &f.stats, f.cfg.Name, c, err)
}

// rejectConn closes a connection admission refused on listener name, with
// a reset; it counts it in stats and logs one line per cause and period.
func rejectConn(log zerolog.Logger, refusals *logthrottle.Throttle, stats *TCPStats, name string, c net.Conn, err error) {
	countRejection(log, refusals, stats, name, c, err)
	abort(c)
}

// countRejection counts and logs (once a period per cause) a connection
// refused by the admission check.
func countRejection(log zerolog.Logger, refusals *logthrottle.Throttle, stats *TCPStats, name string, c net.Conn, err error) {
	if errors.Is(err, ErrNotAllowed) {
		stats.RejectedNotAllowed.Add(1)
	} else {
		stats.RejectedFull.Add(1)
	}
	if ok, suppressed := refusals.Allow(err.Error()); ok {
		log.Warn().Str("listener", name).Str("client", c.RemoteAddr().String()).
			Func(logthrottle.Repeats("rejected_since_last_line", suppressed)).Err(err).Msg("connection rejected")
	}
}

func (f *TCPForward) isStopping() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.stopping
}

// track registers a conn to cut on Close; false once the forward stops.
func (f *TCPForward) track(c net.Conn, client bool) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.ctx.Err() != nil {
		return false
	}
	f.conns[c] = client
	return true
}

func (f *TCPForward) untrack(c net.Conn) {
	f.mu.Lock()
	delete(f.conns, c)
	f.mu.Unlock()
}

// serveSession dials the upstream and hands the session to a relay that
// runs on goroutines of its own: this goroutine, whose stack the dial grew,
// ends, so an idle session keeps only the relay's two small stacks.
func (f *TCPForward) serveSession(client net.Conn) {
	if f.door != nil {
		f.door.serve(client)
		return
	}
	start := time.Now()
	idle := time.Duration(f.idle.Load())
	target, err := f.targetOf(client)
	if err != nil {
		// Anyone who can reach a listener can make it refuse: one line
		// per cause and period, with a count, not one per connection
		// (nor per destination: the first one's line names it).
		cause := err.Error()
		switch {
		case errors.Is(err, ErrNotRedirected):
			f.stats.RejectedNotRedirected.Add(1)
			cause = ErrNotRedirected.Error()
		case errors.Is(err, ErrCaptureLoop):
			f.stats.RejectedCaptureLoop.Add(1)
			cause = ErrCaptureLoop.Error()
		default:
			f.stats.Failed.Add(1)
		}
		if ok, suppressed := f.refusals.Allow(cause); ok {
			f.cfg.Logger.Info().Str("listener", f.cfg.Name).Str("client", client.RemoteAddr().String()).
				Func(logthrottle.Repeats("refused_since_last_line", suppressed)).Err(err).Msg("session refused")
		}
		abort(client)
		f.endSession(client, nil)
		return
	}

	up, d, err := f.cfg.Upstreams.DialAddr(f.ctx, target)
	if err != nil {
		f.dialFailed(client, target, d, err, start)
		abort(client)
		f.endSession(client, nil)
		return
	}
	f.relay(client, up, target, d.ProxyAddr, idle, start, 0)
}

// dialFailed counts and logs a session whose upstream dial failed.
func (f *TCPForward) dialFailed(client net.Conn, target socksclient.Addr, d *socksclient.Dialer, err error, start time.Time) {
	if f.ctx.Err() != nil {
		// Close cut the dial: no failure of an upstream or a target, and
		// logged as the relayed sessions it cuts are.
		ev := f.sessionEvent(f.cfg.Logger.Debug(), client, target)
		if d != nil {
			ev = ev.Str("upstream", d.ProxyAddr)
		}
		ev.Err(err).Str("cause", "cut at shutdown").Dur("dur_ms", time.Since(start)).Msg("session ended")
		return
	}
	f.stats.Failed.Add(1)
	ev := f.sessionEvent(f.cfg.Logger.Info(), client, target)
	if d != nil {
		ev = ev.Str("upstream", d.ProxyAddr)
	}
	var re *socksclient.ReplyError
	if errors.As(err, &re) {
		ev = ev.Str("rep", re.Code.String())
	}
	ev.Err(err).Dur("dur_ms", time.Since(start)).Msg("session failed")
}

// relay hands a session whose upstream is up to a relay that runs on
// goroutines of its own, and ends the session when the relay does. early
// is what already went up before it (sendEarly), for the end line.
func (f *TCPForward) relay(client, up net.Conn, target socksclient.Addr, upstream string, idle time.Duration, start time.Time, early int64) {
	if !f.track(up, false) { // Close came during the dial: cut
		abort(up)
		abort(client)
		f.endSession(client, nil)
		return
	}
	f.sessions.Add(1) // this goroutine still counts, so Close's Wait cannot miss it
	StartRelayCounting(client, up, idle, f.cfg.CopyMode, &f.stats.BytesUp, &f.stats.BytesDown, func(res RelayResult) {
		defer f.sessions.Done()
		// Ended before the line says so: whoever reads "session ended"
		// finds the session gone from --max-sessions' count.
		f.endSession(client, up)
		res.Up += early
		f.logEnd(client, target, upstream, res, start)
	})
}

// targetOf is where the session on client goes.
func (f *TCPForward) targetOf(client net.Conn) (socksclient.Addr, error) {
	if f.cfg.TargetOf != nil {
		return f.cfg.TargetOf(client)
	}
	return *f.target.Load(), nil
}

func (f *TCPForward) endSession(client, up net.Conn) {
	f.untrack(client)
	if up != nil {
		f.untrack(up)
	}
	f.stats.Active.Add(-1)
}

// logEnd writes the session's end line: debug for a clean end, info with
// the error, the side that failed and a short cause otherwise. A session
// cut by Close stays at debug; Close says once how many it cut.
func (f *TCPForward) logEnd(client net.Conn, target socksclient.Addr, upstream string, res RelayResult, start time.Time) {
	logSessionEnd(f.cfg.Logger, f.cfg.Name, f.cut.Load(), client.RemoteAddr().String(), target, upstream, res, start)
}

// logSessionEnd writes the end line of a relayed session of listener
// name: debug for a clean end, info with the error, the side that failed
// and a short cause otherwise. A session cut by Close (cut) stays at
// debug; Close says once how many it cut.
func logSessionEnd(log zerolog.Logger, name string, cut bool, client string, target socksclient.Addr, upstream string, res RelayResult, start time.Time) {
	ev := log.Debug()
	var re *RelayError
	switch {
	case res.Err == nil:
	case cut && errors.Is(res.Err, net.ErrClosed):
		ev = ev.Err(res.Err).Str("cause", "cut at shutdown")
	case errors.Is(res.Err, ErrIdleTimeout):
		ev = log.Info().Err(res.Err).Str("cause", "idle timeout")
	case errors.As(res.Err, &re) && !errors.Is(res.Err, net.ErrClosed):
		ev = log.Info().Err(res.Err).Str("side", re.Side.String()).Str("cause", re.Cause())
	default:
		ev = ev.Err(res.Err)
	}
	sessionFields(ev, name, client, target).Str("upstream", upstream).Int64("bytes_up", res.Up).Int64("bytes_down", res.Down).
		Dur("dur_ms", time.Since(start)).Msg("session ended")
}

func (f *TCPForward) sessionEvent(ev *zerolog.Event, client net.Conn, target socksclient.Addr) *zerolog.Event {
	return sessionFields(ev, f.cfg.Name, client.RemoteAddr().String(), target)
}

// sessionFields adds a session's fields to a log event. Built when the
// session ends rather than held in a per-session logger, so an idle session
// carries no log context (and a disabled level costs nothing).
func sessionFields(ev *zerolog.Event, listener, client string, target socksclient.Addr) *zerolog.Event {
	if ev == nil {
		return nil
	}
	return ev.Str("listener", listener).Str("client", client).Str("target", target.String())
}

// StopAccepting closes the listeners, each once the accept loop has taken
// the connections the kernel had queued for it; live sessions go on.
// Shutdown begins with it; a caller that stops several listeners calls it
// first, so that all of them have stopped when it says they are draining.
func (f *TCPForward) StopAccepting() {
	f.stopAccepts.Do(func() {
		f.mu.Lock()
		f.stopping = true
		f.mu.Unlock()
		close(f.acceptsStop)
		for _, ln := range f.listeners {
			f.closeDrained(ln)
		}
	})
}

// Shutdown stops accepting and waits for live sessions to end until ctx is
// done; then it cuts the rest (Close), with a reset.
func (f *TCPForward) Shutdown(ctx context.Context) error {
	f.StopAccepting()
	return drain(ctx, func() {
		f.accepts.Wait()
		f.sessions.Wait()
	}, f.Close)
}

// backlogDrainMax bounds how long Shutdown lets the accept loop take the
// connections still queued in a listener: under a steady flood the queue
// never empties, and the drain must end.
const backlogDrainMax = 100 * time.Millisecond

// closeDrained closes ln once the accept loop has taken what the kernel
// had already queued for it. Closing a listener resets every connection in
// its queue, and their clients connected before the shutdown (or the
// reload that removed this forward): they are sessions to drain.
func (f *TCPForward) closeDrained(ln net.Listener) {
	waitBacklog(ln)
	ln.Close()
}

// waitBacklog returns once ln's accept loop has taken the connections the
// kernel had queued for it, or after backlogDrainMax.
func waitBacklog(ln net.Listener) {
	deadline := time.Now().Add(backlogDrainMax)
	for acceptQueued(ln) && time.Now().Before(deadline) {
		time.Sleep(100 * time.Microsecond) // the accept loop runs meanwhile
	}
}

// Close stops accepting and cuts every session at once, with a reset (RST)
// toward both ends: a clean FIN would make a cut-off download look
// complete. It is idempotent and returns after every session goroutine has
// ended.
func (f *TCPForward) Close() error {
	f.mu.Lock()
	f.stopping = true
	f.cancel()
	if sessions := sessionsIn(f.conns); sessions > 0 {
		f.cut.Store(true)
		f.cfg.Logger.Info().Str("listener", f.cfg.Name).Int("sessions", sessions).Msg("cutting sessions still open")
	}
	abortAll(f.conns)
	f.mu.Unlock()
	for _, ln := range f.listeners {
		ln.Close()
	}
	f.accepts.Wait()
	f.sessions.Wait()
	return nil
}
