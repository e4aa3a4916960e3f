package tunnel

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/rs/zerolog"

	"github.com/socksfwd/socksfwd/internal/logthrottle"
	"github.com/socksfwd/socksfwd/socksclient"
)

// ReverseConfig describes one -R forward.
type ReverseConfig struct {
	// Name labels the forward in logs, e.g. the -R spec "8080:127.0.0.1:80".
	Name string
	// Remote is what BIND asks for (DST.ADDR, DST.PORT): the peer the
	// server should expect (0.0.0.0: any) and the port to listen on (0:
	// the server chooses, a new one for every BIND).
	Remote socksclient.Addr
	// Target is the local host:port each incoming connection is relayed
	// to, dialed (and resolved) here. SetTarget changes it.
	Target string
	// Upstreams issues the BINDs, with failover as for CONNECT.
	Upstreams *socksclient.Upstreams
	// IdleTimeout closes a session idle this long (0 = never).
	// SetIdleTimeout changes it for new sessions.
	IdleTimeout time.Duration
	// CopyMode chooses the relay's copy (default CopySplice).
	CopyMode CopyMode
	// TargetControl, if not nil, is applied to each socket toward the
	// local target before it connects (buffer sizes, as a -L listener's
	// connections get them).
	TargetControl func(network, address string, c syscall.RawConn) error
	// OnListen, when set, is told every address the server listens at (the
	// first reply of each BIND), and the zero Addr when the forward has
	// none any more (a failure, or the end). Called from Serve's goroutine.
	OnListen func(remote socksclient.Addr)
	// OnRearm, when set, is told how long the port was closed between two
	// callers (see Rearm). Called from Serve's goroutine.
	OnRearm func(Rearm)
	Logger  zerolog.Logger
}

// Rearm times one re-arm: from a BIND's second reply (a caller came) to
// the next BIND's first reply (the server listens again).
type Rearm struct {
	// Gap is the whole time: a caller that came meanwhile was refused.
	Gap time.Duration
	// Held is the part of Gap spent waiting for the session to end, when
	// the server cannot bind a port that a connection still uses (Dante:
	// it sets no SO_REUSEADDR). Zero when the server binds again at once.
	Held time.Duration
}

// ReverseCause is why a BIND, or the wait for its caller, failed.
type ReverseCause int

const (
	// CauseUnsupported: the server has no BIND (REP 7, or it closed the
	// connection at the request, as ssh -D does). Not retried.
	CauseUnsupported ReverseCause = iota
	// CauseRefused: the server refused the BIND with a REP code (REP 2:
	// its rules do not allow it).
	CauseRefused
	// CauseUpstream: the server could not be reached or failed the
	// handshake.
	CauseUpstream
	// CausePortBusy: the server listened on another port than asked: the
	// port is taken on its side.
	CausePortBusy
	// CauseControlLost: the control connection closed while waiting for a
	// caller.
	CauseControlLost
	// CauseSecondReply: the second reply refused the caller or was
	// malformed.
	CauseSecondReply
	// CauseTarget: the local target could not be reached; the caller was
	// closed at once.
	CauseTarget
	// NumReverseCauses counts the causes, for arrays indexed by them.
	NumReverseCauses
)

var causeNames = [NumReverseCauses]string{"unsupported", "refused", "upstream", "port_busy", "control_lost", "second_reply", "target"}

// String is the cause as a metric label: "port_busy".
func (c ReverseCause) String() string {
	if c >= 0 && c < NumReverseCauses {
		return causeNames[c]
	}
	return fmt.Sprintf("ReverseCause(%d)", int(c))
}

// ReverseStats counts a reverse forward's BINDs, sessions and bytes.
type ReverseStats struct {
	Binds    atomic.Int64 // first replies: times the server listened
	Sessions atomic.Int64 // second replies: callers that came
	Active   atomic.Int64
	// BytesUp counts caller → local target, BytesDown the way back.
	BytesUp, BytesDown atomic.Int64
	Failures           [NumReverseCauses]atomic.Int64
}

// Backoff between failed BINDs: 1 s doubling to 30 s, as for upstreams.
const (
	reverseMinBackoff = time.Second
	reverseMaxBackoff = 30 * time.Second
	// wrongCallerFloor is the shortest time between two BINDs when the
	// first ended on a wrong caller: at most ten a second.
	wrongCallerFloor = 100 * time.Millisecond
	// reverseStable is how long a BIND must wait for its caller before
	// its failure counts as a new one rather than one more in a row.
	reverseStable = 10 * time.Second
)

// reverseUnsupportedRetry: after a server said it has no BIND, it is asked
// again this much later (restarted, or replaced by one that has BIND, at
// the same address); a reload asks at once.
var reverseUnsupportedRetry = 5 * time.Minute

// portReleaseGrace: for this long after a session on the asked port
// ended, the server listening elsewhere is taken for the proxy still
// closing that session's connection (which holds the port), and BIND is
// asked again at once rather than after a backoff.
const portReleaseGrace = time.Second

// targetDialTimeout bounds the dial of the local target for one caller.
const targetDialTimeout = 10 * time.Second

// Reverse is a remote forward over RFC 1928 BIND: the upstream listens for
// one caller per BIND; each caller is relayed to the local target, and the
// next BIND is issued as soon as the second reply arrives, before the
// relay starts, so the port is closed for as short a time as the server
// allows.
type Reverse struct {
	cfg    ReverseConfig
	name   atomic.Pointer[string] // cfg.Name, until Rename
	target atomic.Pointer[string]
	idle   atomic.Int64 // the idle timeout new sessions get

	loopCtx  context.Context // cancelled by Shutdown and Close: no more BINDs
	stopLoop context.CancelFunc
	sessCtx  context.Context // cancelled by Close: aborts target dials
	cutAll   context.CancelFunc
	wake     chan struct{} // Retry: end a backoff, or the wait after "unsupported"
	// rebind ends the current wait for a caller (Rebind); nil while none.
	// rebindAsked is a Rebind since the current BIND was asked for, which
	// the wait that follows must not miss.
	rebind      atomic.Pointer[context.CancelFunc]
	rebindAsked atomic.Bool
	rebindWake  chan struct{} // Rebind: end a wait for a session to end
	loopDone    chan struct{}
	served      atomic.Bool

	remote atomic.Pointer[socksclient.Addr] // where the server listens now; nil: nowhere
	// rearmAfterSession is learned: the server bound another port than
	// asked while a session held it, so re-arming waits for sessions.
	rearmAfterSession atomic.Bool
	targetFails       *logthrottle.Throttle

	mu        sync.Mutex
	conns     map[net.Conn]bool // true for a session's caller side
	latest    *reverseSession   // the session started last, while it lives
	latestEnd time.Time         // when the session started last ended
	cut       bool
	sessions  sync.WaitGroup

	// failedWhy is the line of the failure since the last first reply, for
	// readers other than the loop (nil: none).
	failedWhy atomic.Pointer[string]

	// The loop's own state, touched by Serve's goroutine only.
	failing   ReverseCause
	isFailing bool
	failTries int64
	logged    socksclient.Addr // the address last logged as listening

	stats ReverseStats
}

// reverseSession is one caller's session; done closes when it ends.
type reverseSession struct{ done chan struct{} }

// NewReverse returns a reverse forward; Serve runs it.
func NewReverse(cfg ReverseConfig) *Reverse {
	r := &Reverse{cfg: cfg, wake: make(chan struct{}, 1), rebindWake: make(chan struct{}, 1), loopDone: make(chan struct{}), conns: make(map[net.Conn]bool)}
	r.loopCtx, r.stopLoop = context.WithCancel(context.Background())
	r.sessCtx, r.cutAll = context.WithCancel(context.Background())
	r.name.Store(&cfg.Name)
	r.target.Store(&cfg.Target)
	r.idle.Store(int64(cfg.IdleTimeout))
	r.targetFails = logthrottle.New(refusalLogEvery)
	return r
}

// Stats returns the live counters.
func (r *Reverse) Stats() *ReverseStats { return &r.stats }

// Addr is the address BIND asks for (not where the server listens: see
// Remote).
func (r *Reverse) Addr() net.Addr { return r.cfg.Remote }

// Remote is where the server listens now, and false while it listens
// nowhere (before the first reply, after a failure).
func (r *Reverse) Remote() (socksclient.Addr, bool) {
	if a := r.remote.Load(); a != nil {
		return *a, true
	}
	return socksclient.Addr{}, false
}

// Failed says why the server listens nowhere after a failure, until the
// next first reply ("" while it has not failed since).
func (r *Reverse) Failed() string {
	if why := r.failedWhy.Load(); why != nil {
		return *why
	}
	return ""
}

// Target is where callers are relayed to.
func (r *Reverse) Target() string { return *r.target.Load() }

// SetTarget changes where callers from now on are relayed; the binding
// stays. A reload calls it.
func (r *Reverse) SetTarget(target string) { r.target.Store(&target) }

// Name is what logs call this forward; Rename changes it (a reload that
// changed its target renames it, where its name says the target).
func (r *Reverse) Name() string       { return *r.name.Load() }
func (r *Reverse) Rename(name string) { r.name.Store(&name) }

// SetIdleTimeout sets the idle timeout of sessions from now on (0 =
// never). A reload calls it.
func (r *Reverse) SetIdleTimeout(d time.Duration) { r.idle.Store(int64(d)) }

// Retry ends a backoff, or the wait after a server without BIND, at once:
// every reload calls it.
func (r *Reverse) Retry() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// Rebind gives up the BIND that waits for a caller, if one does, and
// binds again through the upstreams as they are now: a reload that
// changed them calls it, so that the forward leaves an upstream taken out
// of service at once rather than when its next caller comes. A waiting
// BIND carries no session, so nothing live is cut. Otherwise it is Retry.
func (r *Reverse) Rebind() {
	// Learned from the old server; the new one may bind the port twice.
	r.rearmAfterSession.Store(false)
	r.rebindAsked.Store(true)
	if cancel := r.rebind.Load(); cancel != nil {
		(*cancel)()
	}
	select { // a fixed port held by a session: the new upstream may bind it
	case r.rebindWake <- struct{}{}:
	default:
	}
	r.Retry()
}

// Serve issues BINDs until Shutdown or Close, or until ctx is done (which
// then closes the forward). Failures are logged and retried, never
// returned: a server without BIND must not stop the other forwards.
func (r *Reverse) Serve(ctx context.Context) error {
	if r.served.Swap(true) {
		return errors.New("tunnel: Reverse.Serve called twice")
	}
	stop := context.AfterFunc(ctx, func() { r.Close() })
	defer stop()
	defer close(r.loopDone)
	r.loop()
	r.setRemote(nil)
	return nil
}

func (r *Reverse) loop() {
	var (
		backoff  time.Duration
		quick    time.Duration // pause while the proxy releases the port
		secondAt time.Time     // the last second reply, until the next first reply
		held     time.Duration // of the time since, spent waiting for a session
	)
	// retryLater waits out the backoff after a failure; false: stopped.
	retryLater := func() bool {
		backoff = min(max(2*backoff, reverseMinBackoff), reverseMaxBackoff)
		return r.pause(backoff)
	}
	var armedAt time.Time // the last first reply
	for r.loopCtx.Err() == nil {
		r.rebindAsked.Store(false) // this BIND goes through the upstreams as they are now
		select {
		case <-r.rebindWake:
		default:
		}
		b, d, err := r.cfg.Upstreams.Bind(r.loopCtx, r.cfg.Remote)
		if err != nil {
			if r.loopCtx.Err() != nil {
				return
			}
			cause := bindCause(err)
			r.fail(cause, err, d)
			if cause == CauseUnsupported {
				backoff = 0
				if !r.pause(reverseUnsupportedRetry) {
					return
				}
				continue
			}
			if !retryLater() {
				return
			}
			continue
		}
		addr := b.Addr()
		if want := r.cfg.Remote.Port; want != 0 && addr.Port != want {
			b.Close()
			s, ended := r.holder()
			switch {
			case s != nil:
				// Our own session still uses the port: this server cannot
				// bind it twice. From now on re-arming waits for sessions;
				// meanwhile nothing listens there.
				r.setRemote(nil)
				if !r.rearmAfterSession.Swap(true) {
					r.cfg.Logger.Info().Str("reverse", r.Name()).Str("upstream", d.ProxyAddr).
						Msgf("reverse: %s cannot listen on port %d again while a session uses it: it serves one caller at a time, the next one once the session ends", d.ProxyAddr, want)
				}
				if !r.waitSession(s, &held) {
					return
				}
				continue
			case !ended.IsZero() && time.Since(ended) < portReleaseGrace:
				// The session ended here; the proxy is still closing its
				// side of it, which holds the port for a moment.
				quick = min(max(2*quick, time.Millisecond), 100*time.Millisecond)
				start := time.Now()
				if !r.pause(quick) {
					return
				}
				held += time.Since(start)
				continue
			}
			r.fail(CausePortBusy, fmt.Errorf("asked for port %d, the server listens on %s instead", want, addr), d)
			if !retryLater() {
				return
			}
			continue
		}
		quick = 0
		armedAt = time.Now()
		// Ready for Rebind before anyone can see the forward armed.
		waitCtx, cancelWait := context.WithCancel(r.loopCtx)
		r.rebind.Store(&cancelWait)
		if r.rebindAsked.Load() {
			// Asked while this BIND went through the old upstreams: not
			// announced, and asked again through the new ones.
			r.rebind.Store(nil)
			cancelWait()
			b.Close()
			r.logRebind(d)
			continue
		}
		// Told before the log line and the counters say it listens again,
		// so that whoever waits on those finds the re-arm recorded.
		if !secondAt.IsZero() && r.cfg.OnRearm != nil {
			r.cfg.OnRearm(Rearm{Gap: time.Since(secondAt), Held: held})
		}
		secondAt, held = time.Time{}, 0
		r.armed(addr, d)

		conn, err := b.Accept(waitCtx)
		r.rebind.Store(nil)
		rebound := waitCtx.Err() != nil
		cancelWait()
		if err == nil || time.Since(armedAt) >= reverseStable {
			// A caller came, or the BIND held for a while: the proxy
			// works, and a failure from now on starts the backoff anew.
			// One that fails as soon as it is accepted waits longer each
			// time, rather than a BIND and two log lines a second.
			backoff = 0
		}
		if err != nil {
			if r.loopCtx.Err() != nil {
				return
			}
			r.setRemote(nil)
			if rebound {
				r.logRebind(d)
				continue
			}
			if r.wrongCaller(err) {
				// Someone else reached the port first: the proxy is fine,
				// listen again at once for the caller -R names. A backoff
				// would let anyone who reaches the port keep it closed;
				// the floor keeps a proxy that refuses with no caller at
				// all from spinning the loop.
				r.fail(CauseSecondReply, err, d)
				if wait := wrongCallerFloor - time.Since(armedAt); wait > 0 && !r.pause(wait) {
					return
				}
				continue
			}
			cause := CauseControlLost
			var re *socksclient.ReplyError
			var pe *socksclient.ProtocolError
			if errors.As(err, &re) || errors.As(err, &pe) {
				cause = CauseSecondReply
			}
			r.fail(cause, err, d)
			if !retryLater() {
				return
			}
			continue
		}
		secondAt = time.Now()
		r.stats.Sessions.Add(1)
		s := r.startSession(conn, d.ProxyAddr)
		if s != nil && r.cfg.Remote.Port != 0 && r.rearmAfterSession.Load() {
			r.setRemote(nil) // the BIND is spent: nothing listens until the session ends
			if !r.waitSession(s, &held) {
				return
			}
		}
	}
}

// wrongCaller reports whether a BIND's wait ended on a caller other than
// the one bind_address names: one that socksfwd turned away itself, or one
// the proxy refused (REP 2, as Dante answers a caller from another
// address when the BIND named one).
func (r *Reverse) wrongCaller(err error) bool {
	if errors.Is(err, socksclient.ErrUnexpectedPeer) {
		return true
	}
	var re *socksclient.ReplyError
	remote := r.cfg.Remote
	named := remote.Name != "" || remote.IP.IsValid() && !remote.IP.IsUnspecified()
	return named && errors.As(err, &re) && re.Code == socksclient.RepNotAllowed
}

// logRebind says a BIND through the old upstreams (d's) was given up for
// one through the new ones.
func (r *Reverse) logRebind(d *socksclient.Dialer) {
	r.cfg.Logger.Info().Str("reverse", r.Name()).Str("upstream", d.ProxyAddr).
		Msg("reverse: the upstreams changed: binding again through them")
}

// bindCause classifies a failed BIND.
func bindCause(err error) ReverseCause {
	var re *socksclient.ReplyError
	switch {
	case errors.Is(err, socksclient.ErrCommandNotSupported) && !mixedFailure(err):
		return CauseUnsupported
	case errors.As(err, &re) && !errors.Is(err, socksclient.ErrCommandNotSupported):
		return CauseRefused
	}
	return CauseUpstream
}

// mixedFailure reports whether err joins the failures of several
// upstreams not all of which lack BIND: one may be down and have it.
func mixedFailure(err error) bool {
	var multi interface{ Unwrap() []error }
	if !errors.As(err, &multi) {
		return false
	}
	for _, e := range multi.Unwrap() {
		if !errors.Is(e, socksclient.ErrCommandNotSupported) {
			return true
		}
	}
	return false
}

// pause waits d (forever when negative) or until Retry; false once the
// loop is stopped.
func (r *Reverse) pause(d time.Duration) bool {
	var timeout <-chan time.Time
	if d >= 0 {
		t := time.NewTimer(d)
		defer t.Stop()
		timeout = t.C
	}
	select {
	case <-timeout:
	case <-r.wake:
	case <-r.loopCtx.Done():
		return false
	}
	return true
}

// holder is the session that may hold the asked port, if it still runs;
// else when the last one ended (zero: none yet).
func (r *Reverse) holder() (*reverseSession, time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.latest, r.latestEnd
}

// waitSession waits until s ends, adding the wait to held; false once the
// loop is stopped.
func (r *Reverse) waitSession(s *reverseSession, held *time.Duration) bool {
	start := time.Now()
	select {
	case <-s.done:
		*held += time.Since(start)
		return true
	case <-r.rebindWake:
		// Other upstreams: one of them may listen on the port while the
		// old one's session goes on.
		return true
	case <-r.loopCtx.Done():
		return false
	}
}

// armed records a first reply: the server listens at addr. The address is
// logged when it is news: the first one, one after a failure, and every
// one when the server chooses the port.
func (r *Reverse) armed(addr socksclient.Addr, d *socksclient.Dialer) {
	r.stats.Binds.Add(1)
	r.setRemote(&addr)
	recovered, tries := r.isFailing, r.failTries
	r.isFailing, r.failTries = false, 0
	r.failedWhy.Store(nil)
	// Logged when the address changes, not each time a fixed port is
	// listened on again after a session.
	if r.logged == addr && !recovered {
		return
	}
	r.logged = addr
	ev := r.cfg.Logger.Info().Str("reverse", r.Name()).Str("remote_listen", addr.String()).
		Str("upstream", d.ProxyAddr).Str("target", r.Target())
	if recovered {
		ev = ev.Int64("failed_tries", tries)
	}
	ev.Msgf("reverse %s listens on %s → %s", d.ProxyAddr, addr, r.Target())
}

func (r *Reverse) setRemote(a *socksclient.Addr) {
	old := r.remote.Swap(a)
	if r.cfg.OnListen == nil || (old == nil && a == nil) {
		return
	}
	if a == nil {
		r.cfg.OnListen(socksclient.Addr{})
		return
	}
	r.cfg.OnListen(*a)
}

// fail counts a failure and logs it once per state change: the first
// failure, and a failure of another cause; repeats are counted and the
// count given when the forward works again.
func (r *Reverse) fail(cause ReverseCause, err error, d *socksclient.Dialer) {
	r.stats.Failures[cause].Add(1)
	r.setRemote(nil)
	r.failTries++
	text := r.failureText(cause, err, d)
	why := cause.String() + ": " + strings.TrimPrefix(text, "reverse "+r.Name()+": ")
	r.failedWhy.Store(&why)
	if r.isFailing && r.failing == cause {
		return
	}
	r.isFailing, r.failing = true, cause
	ev := r.cfg.Logger.Warn()
	if cause == CauseUnsupported {
		ev = r.cfg.Logger.Error()
	}
	ev = ev.Str("reverse", r.Name()).Str("cause", cause.String()).Err(err)
	if d != nil {
		ev = ev.Str("upstream", d.ProxyAddr)
	}
	ev.Msg(text)
}

// failureText says what went wrong and what to do, in one line.
func (r *Reverse) failureText(cause ReverseCause, err error, d *socksclient.Dialer) string {
	server := "the upstream"
	if d != nil {
		server = d.ProxyAddr
	} else if ds := r.cfg.Upstreams.Dialers(); len(ds) > 0 {
		names := make([]string, len(ds))
		for i, d := range ds {
			names[i] = d.ProxyAddr
		}
		server = strings.Join(names, ", ")
	}
	name := "reverse " + r.Name() + ": "
	var re *socksclient.ReplyError
	switch cause {
	case CauseUnsupported:
		return name + server + " has no BIND, which -R needs: use a SOCKS5 server that supports it, such as Dante (ssh -D and microsocks do not); the other forwards keep running"
	case CauseRefused:
		if errors.As(err, &re) && re.Code == socksclient.RepNotAllowed {
			return name + server + " refused BIND by its rules (REP 2); on Dante, a socks pass rule with \"command: bind\" must match this client, and one with \"command: bindreply\" the peers that connect; retrying with backoff"
		}
		return name + server + " refused BIND; retrying with backoff"
	case CausePortBusy:
		if remote := r.cfg.Remote; remote.Name != "" || remote.IP.IsValid() && !remote.IP.IsUnspecified() {
			// Dante's case, whatever the port's state: the likelier cause.
			return name + server + " did not listen on port " + strconv.Itoa(int(remote.Port)) + ": Dante binds an asked port only when bind_address is 0.0.0.0 (bind_address " + remote.Host() +
				" only says which caller to expect; the proxy picks its own listening address), so give -R " + strconv.Itoa(int(remote.Port)) + ":… without it, or port 0; retrying with backoff"
		}
		return name + "the port is taken on " + server + "'s side (another program, or one of its connections closing there in TIME_WAIT for up to a minute after a session; -R 0:… has the proxy pick a free port); retrying with backoff"
	case CauseControlLost:
		return name + "the connection to " + server + " closed while waiting for a caller; retrying with backoff"
	case CauseSecondReply:
		if errors.Is(err, socksclient.ErrUnexpectedPeer) {
			return name + server + " let through a caller from another address than bind_address " + r.cfg.Remote.Host() + ", closed here; listening again at once"
		}
		if r.wrongCaller(err) {
			return name + server + " refused a caller (REP 2): one from another address than bind_address " + r.cfg.Remote.Host() +
				", or that address itself if no socks pass rule with \"command: bindreply\" matches it (Dante); listening again at once"
		}
		if errors.As(err, &re) && re.Code == socksclient.RepNotAllowed {
			return name + server + " refused the caller by its rules (REP 2); on Dante, a socks pass rule with \"command: bindreply\" must match the caller's address; retrying with backoff"
		}
		return name + server + " failed the caller (second reply); retrying with backoff"
	}
	return name + "BIND through " + server + " failed; retrying with backoff"
}

// startSession hands a caller to a goroutine that dials the local target
// and relays; it returns the session, or nil when Close came first.
func (r *Reverse) startSession(peer *socksclient.Conn, upstream string) *reverseSession {
	s := &reverseSession{done: make(chan struct{})}
	r.mu.Lock()
	if r.cut {
		r.mu.Unlock()
		abort(peer)
		return nil
	}
	r.conns[peer] = true
	r.latest = s
	r.sessions.Add(1)
	r.mu.Unlock()
	r.stats.Active.Add(1)
	go r.serveSession(s, peer, upstream)
	return s
}

// serveSession dials the target and relays; a target that cannot be
// reached closes the caller at once, with a reset.
func (r *Reverse) serveSession(s *reverseSession, peer *socksclient.Conn, upstream string) {
	start := time.Now()
	target := r.Target()
	d := net.Dialer{Timeout: targetDialTimeout, KeepAlive: -1, Control: r.cfg.TargetControl}
	local, err := d.DialContext(r.sessCtx, "tcp", target)
	if err == nil && !r.track(local) {
		local.Close()
		err = net.ErrClosed
	}
	if err != nil && r.sessCtx.Err() != nil {
		// Close cut the dial: the target is not to blame, and the line is
		// the one a relayed session cut at shutdown gets.
		abort(peer)
		r.cfg.Logger.Debug().Str("reverse", r.Name()).Str("client", peer.BoundAddr().String()).Str("target", target).
			Str("upstream", upstream).Err(err).Str("cause", "cut at shutdown").Dur("dur_ms", time.Since(start)).Msg("session ended")
		r.endSession(s, peer, nil)
		return
	}
	if err != nil {
		r.stats.Failures[CauseTarget].Add(1)
		abort(peer)
		// Any caller can make it happen: one line per period, with a count.
		if ok, suppressed := r.targetFails.Allow(target); ok {
			r.cfg.Logger.Info().Str("reverse", r.Name()).Str("client", peer.BoundAddr().String()).Str("target", target).
				Str("upstream", upstream).Func(logthrottle.Repeats("failed_since_last_line", suppressed)).Err(err).
				Dur("dur_ms", time.Since(start)).Msg("reverse session failed: local target unreachable; caller closed")
		}
		r.endSession(s, peer, nil)
		return
	}
	StartRelayCounting(peer, local, time.Duration(r.idle.Load()), r.cfg.CopyMode, &r.stats.BytesUp, &r.stats.BytesDown, func(res RelayResult) {
		r.logEnd(peer, target, upstream, res, start)
		r.endSession(s, peer, local)
	})
}

func (r *Reverse) track(c net.Conn) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cut {
		return false
	}
	r.conns[c] = false
	return true
}

func (r *Reverse) endSession(s *reverseSession, peer, local net.Conn) {
	r.mu.Lock()
	delete(r.conns, peer)
	if local != nil {
		delete(r.conns, local)
	}
	if r.latest == s {
		r.latest, r.latestEnd = nil, time.Now()
	}
	r.mu.Unlock()
	r.stats.Active.Add(-1)
	close(s.done)
	r.sessions.Done()
}

// logEnd writes the session's end line, as a -L session's: debug for a
// clean end, info with the cause otherwise. client is the caller that
// connected to the server.
func (r *Reverse) logEnd(peer *socksclient.Conn, target, upstream string, res RelayResult, start time.Time) {
	ev := r.cfg.Logger.Debug()
	var re *RelayError
	switch {
	case res.Err == nil:
	case r.isCut() && errors.Is(res.Err, net.ErrClosed):
		ev = ev.Err(res.Err).Str("cause", "cut at shutdown")
	case errors.Is(res.Err, ErrIdleTimeout):
		ev = r.cfg.Logger.Info().Err(res.Err).Str("cause", "idle timeout")
	case errors.As(res.Err, &re) && !errors.Is(res.Err, net.ErrClosed):
		// The relay's client is the caller, its upstream the local target.
		side := "caller"
		if re.Side == SideUpstream {
			side = "target"
		}
		ev = r.cfg.Logger.Info().Err(res.Err).Str("side", side).Str("cause", re.Cause())
	default:
		ev = ev.Err(res.Err)
	}
	ev.Str("reverse", r.Name()).Str("client", peer.BoundAddr().String()).Str("target", target).Str("upstream", upstream).
		Int64("bytes_up", res.Up).Int64("bytes_down", res.Down).Dur("dur_ms", time.Since(start)).Msg("session ended")
}

func (r *Reverse) isCut() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.cut
}

// Shutdown stops issuing BINDs (the waiting one is abandoned: the server
// stops listening) and waits for live sessions to end until ctx is done;
// then it cuts the rest (Close).
func (r *Reverse) Shutdown(ctx context.Context) error {
	r.StopAccepting()
	return drain(ctx, r.sessions.Wait, r.Close)
}

// StopAccepting stops issuing BINDs and returns once the loop that issues
// them has ended (no re-arm comes after it); live sessions go on.
// Shutdown begins with it.
func (r *Reverse) StopAccepting() {
	r.stopLoop()
	r.waitLoop()
}

// drain waits for wait to return until ctx is done, then calls cut (which
// must make wait return) and waits for it; cut is called either way, to
// release the rest. It returns ctx's error when cut had to cut.
func drain(ctx context.Context, wait func(), cut func() error) error {
	done := make(chan struct{})
	go func() {
		wait()
		close(done)
	}()
	select {
	case <-done:
		cut()
		return nil
	case <-ctx.Done():
		cut()
		<-done
		return ctx.Err()
	}
}

// waitLoop waits for Serve's loop to end, if Serve was called.
func (r *Reverse) waitLoop() {
	if r.served.Load() {
		<-r.loopDone
	}
}

// Close stops issuing BINDs and cuts every session at once, with a reset
// toward both ends. It is idempotent and returns after Serve's loop and
// every session goroutine have ended.
func (r *Reverse) Close() error {
	r.stopLoop()
	r.mu.Lock()
	if !r.cut {
		r.cut = true
		r.cutAll()
		if n := sessionsIn(r.conns); n > 0 {
			r.cfg.Logger.Info().Str("reverse", r.Name()).Int("sessions", n).Msg("cutting reverse sessions still open")
		}
		abortAll(r.conns)
	}
	r.mu.Unlock()
	r.waitLoop()
	r.sessions.Wait()
	return nil
}

// sessionsIn counts the sessions among tracked conns (true marks a
// session's client side).
func sessionsIn(conns map[net.Conn]bool) int {
	n := 0
	for _, client := range conns {
		if client {
			n++
		}
	}
	return n
}

// abortAll resets every tracked conn.
func abortAll(conns map[net.Conn]bool) {
	for c := range conns {
		abort(c)
	}
}
