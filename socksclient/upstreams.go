package socksclient

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// DefaultHedgeDelay is how long an upstream may take to connect and finish
// its handshake, the request's reply included, before the next one is
// started beside it, unless SetHedgeDelay says otherwise. Short enough that a black-holed primary
// costs a connection little, long enough that a working one on another
// continent is not raced on every dial.
const DefaultHedgeDelay = 300 * time.Millisecond

// Backoff bounds for an upstream that failed: it is tried last for 1 s
// after its first failure, doubling up to 30 s, so a dead primary costs no
// timeout per connection.
const (
	minBackoff = time.Second
	maxBackoff = 30 * time.Second
)

var errNoUpstreams = errors.New("socks: no upstream proxy configured")

// Upstreams dials through an ordered list of proxies, healthy ones first.
// Dials are hedged as Happy Eyeballs (RFC 8305) hedges addresses: when the
// upstream being tried has not connected and finished its handshake within
// the hedge delay (DefaultHedgeDelay, see SetHedgeDelay), the next one is
// started beside it, and the first to succeed wins; the others are
// cancelled and their connections closed before the call returns. When the
// caller's context has a deadline, each upstream not yet started is left
// its share of the time remaining, so a deadline shorter than the handshake
// timeout still reaches the next upstream.
//
// An upstream that cannot be reached, fails the handshake, rejects the
// credentials or lacks the command is marked down and tried last for a
// backoff (1 s doubling to 30 s); so is one that had not answered the
// greeting (method selection, then authentication) after the hedge delay
// when a later-started upstream completed, or when the caller's deadline
// passed. A proxy is judged on that part of the handshake only: one that has
// answered it and waits, with the request sent, for the target is never
// marked down for a lost race, the caller's deadline or the handshake
// timeout, so one slow or black-holed target does not reorder failover for
// all traffic. Nor is one marked down for a name that ResolveLocally could
// not resolve. A refusal about the target (a *ReplyError other than command
// or address type not supported) is the target's answer and is returned as
// is: no failover. A failure of an attempt that began before the upstream
// last came back up is stale and ignored. Failover only happens while
// dialing, never after payload has flowed.
//
// SetDialers replaces the list for new dials; dials in flight finish on the
// list they started with. Every method is safe for concurrent use, at any
// time.
type Upstreams struct {
	hedge    atomic.Int64 // 0: DefaultHedgeDelay; negative: none; else the delay
	onChange atomic.Pointer[func(proxy string, up bool, cause error)]
	onTry    atomic.Pointer[func(Attempt)]

	setMu sync.Mutex // serialises SetDialers
	list  atomic.Pointer[[]*upstream]

	mu       sync.Mutex // guards every upstream's health
	notifyMu sync.Mutex // keeps OnStateChange calls in the order of the changes
}

// upstream is one entry of a list. Its health outlives the entry when
// SetDialers keeps the same proxy, so a dial still running on the old list updates
// what new dials see.
type upstream struct {
	d *Dialer
	h *health
}

// health is an upstream's state, guarded by Upstreams.mu.
type health struct {
	down      bool          // from a failure until the next success
	since     time.Time     // when the last counted failure was
	upSince   time.Time     // when it last came back up; zero if it never went down
	downUntil time.Time     // tried last until then
	backoff   time.Duration // the last backoff; 0 while up
	retired   bool          // no longer in the list: changes go unreported
	noReplies int           // requests closed without a reply since the last success
	// noReplyTargets: the targets of the last noReplyLimit of those.
	noReplyTargets [noReplyLimit]Addr
}

// A proxy that closes noReplyLimit requests in a row without a reply,
// with no success between, the last noReplyLimit of them for at least
// noReplyTargetsLimit distinct targets and none for more than half,
// counts as down: one such
// close is ssh -D's answer for a target it cannot reach, and a run of
// them mostly for one target is that target being down (an app retrying
// a dead database); a run across targets with nothing carried is a proxy
// that carries nothing (ssh -D whose server forbids forwarding, a broken
// proxy).
const (
	noReplyLimit        = 10
	noReplyTargetsLimit = 3
)

// UpstreamStatus is one upstream's health as Status reports it.
type UpstreamStatus struct {
	Dialer *Dialer
	// Up is false from a failure until the next success.
	Up bool
	// Backoff is the current backoff (0 while up); DownUntil is when it
	// ends, until which the upstream is tried after the others.
	Backoff   time.Duration
	DownUntil time.Time
}

// NewUpstreams returns a failover group over dialers, in order of preference.
func NewUpstreams(dialers ...*Dialer) *Upstreams {
	u := &Upstreams{}
	u.SetDialers(dialers...)
	return u
}

// SetHedgeDelay sets how long an upstream may take to connect and finish
// its handshake before the next one is started beside it (default
// DefaultHedgeDelay). Zero or negative disables the fixed delay: the next
// upstream starts when the current one fails, or when the caller's
// deadline leaves it no more than its share. Dials in flight keep the delay
// they started with.
func (u *Upstreams) SetHedgeDelay(d time.Duration) {
	if d <= 0 {
		d = -1 // 0 stands for the default
	}
	u.hedge.Store(int64(d))
}

// OnStateChange sets f to be told when an upstream goes down (its first
// failure after working; cause says why) and when it comes back (its first
// success after that; cause is nil): once per change, never per failed
// dial. Calls are serialised in the order of the changes and made from a
// dialing goroutine, which waits for them, so f should be quick (a log
// line) and must not dial through the group. Upstreams that SetDialers
// removed report nothing. A nil f reports nothing.
func (u *Upstreams) OnStateChange(f func(proxy string, up bool, cause error)) {
	if f == nil {
		u.onChange.Store(nil)
		return
	}
	u.onChange.Store(&f)
}

// Attempt is one upstream's try within a dial, as OnAttempt reports it.
type Attempt struct {
	Proxy string        // the Dialer's ProxyAddr
	Took  time.Duration // from the start of the try to its result
	// Err is nil when the session was made. Else it says why: a
	// *ReplyError for the proxy's refusal, context.Canceled for a try cut
	// short because another upstream won the race, and so on.
	Err error
	// WaitedOnTarget: the proxy had answered the greeting and the try ran
	// out of time (the handshake timeout, or the caller's deadline) while
	// the proxy waited on the target: the target's silence, no fault of
	// the proxy's (as the upstreams' health sees it too).
	WaitedOnTarget bool
}

// OnAttempt sets f to be told the result of every try of every dial (for
// metrics). It is called from the try's goroutine, concurrently, so f must
// be quick and safe for concurrent use. A nil f reports nothing.
func (u *Upstreams) OnAttempt(f func(Attempt)) {
	if f == nil {
		u.onTry.Store(nil)
		return
	}
	u.onTry.Store(&f)
}

// SetDialers replaces the dialers for new dials, in order of preference.
// Dials in flight finish on the list they started with. An upstream that
// stays (same proxy address, credentials and ResolveLocally) keeps its
// health and backoff, even when other settings of its Dialer change; a new
// one starts healthy; one removed is no longer reported to OnStateChange.
func (u *Upstreams) SetDialers(dialers ...*Dialer) {
	u.setMu.Lock()
	defer u.setMu.Unlock()
	var old []*upstream
	if p := u.list.Load(); p != nil {
		old = *p
	}
	kept := make([]bool, len(old))
	next := make([]*upstream, len(dialers))
	for i, d := range dialers {
		next[i] = &upstream{d: d}
		for j, o := range old {
			if !kept[j] && sameUpstream(o.d, d) {
				kept[j] = true
				next[i].h = o.h
				d.inheritDialed(o.d)
				break
			}
		}
		if next[i].h == nil {
			next[i].h = &health{}
		}
	}
	// Under notifyMu too: a report or an attempt's callback decided before
	// the retirement is delivered before SetDialers returns, and none
	// after it.
	u.notifyMu.Lock()
	u.mu.Lock()
	for j, o := range old {
		if !kept[j] {
			o.h.retired = true
		}
	}
	u.mu.Unlock()
	u.list.Store(&next)
	u.notifyMu.Unlock()
}

// sameUpstream reports whether b reaches the same proxy as a the same way,
// so that what was learned about a holds for b.
func sameUpstream(a, b *Dialer) bool {
	return a == b || (a.ProxyAddr == b.ProxyAddr && a.Username == b.Username &&
		a.Password == b.Password && a.ResolveLocally == b.ResolveLocally)
}

func (u *Upstreams) current() []*upstream {
	if p := u.list.Load(); p != nil {
		return *p
	}
	return nil
}

// Dialers returns the current dialers in order.
func (u *Upstreams) Dialers() []*Dialer {
	list := u.current()
	ds := make([]*Dialer, len(list))
	for i, up := range list {
		ds[i] = up.d
	}
	return ds
}

// IsProxyAddr reports whether ap is where one of the current upstreams is
// reached: a proxy given as an IP address, or an address one of the last
// connections to a proxy went to (a name, resolved; not seen for a
// Dialer with ProxyDial). A transparent listener asks, so that capture
// rules taking socksfwd's own connection to its proxy are refused rather
// than relayed, which would loop until descriptors run out.
func (u *Upstreams) IsProxyAddr(ap netip.AddrPort) bool {
	if !ap.IsValid() {
		return false
	}
	ap = netip.AddrPortFrom(ap.Addr().Unmap().WithZone(""), ap.Port())
	for _, up := range u.current() {
		if pa, err := netip.ParseAddrPort(up.d.ProxyAddr); err == nil && pa.Addr().Unmap().WithZone("") == ap.Addr() && pa.Port() == ap.Port() {
			return true
		}
		if up.d.wasDialed(ap) {
			return true
		}
	}
	return false
}

// Status returns the current upstreams' health, in order.
func (u *Upstreams) Status() []UpstreamStatus {
	list := u.current()
	st := make([]UpstreamStatus, len(list))
	u.mu.Lock()
	defer u.mu.Unlock()
	for i, up := range list {
		st[i] = UpstreamStatus{Dialer: up.d, Up: !up.h.down, Backoff: up.h.backoff}
		if up.h.down {
			st[i].DownUntil = up.h.downUntil
		}
	}
	return st
}

// hedgeDelay is the delay for a dial starting now, negative for none.
func (u *Upstreams) hedgeDelay() time.Duration {
	switch d := time.Duration(u.hedge.Load()); {
	case d == 0:
		return DefaultHedgeDelay
	case d < 0:
		return -1
	default:
		return d
	}
}

// patience is how long a proxy must have gone without answering the
// greeting before a lost race or the caller's deadline counts against it:
// the hedge delay, or DefaultHedgeDelay when there is none. A shorter wait
// says nothing about the upstream: the caller gave it no time.
func patience(hedge time.Duration) time.Duration {
	if hedge > 0 {
		return hedge
	}
	return DefaultHedgeDelay
}

// notify reports a change to the OnStateChange function, if any.
func (u *Upstreams) notify(proxy string, up bool, cause error) {
	if f := u.onChange.Load(); f != nil {
		(*f)(proxy, up, cause)
	}
}

// order lists healthy upstreams first, then those in backoff (tried last
// rather than never, so a returning upstream is found again).
func (u *Upstreams) order(list []*upstream) []*upstream {
	u.mu.Lock()
	defer u.mu.Unlock()
	now := time.Now()
	out := make([]*upstream, 0, len(list))
	for _, up := range list {
		if !now.Before(up.h.downUntil) {
			out = append(out, up)
		}
	}
	for _, up := range list {
		if now.Before(up.h.downUntil) {
			out = append(out, up)
		}
	}
	return out
}

// markDown counts a failure of an attempt that began at started, in a
// dial that chose its order at decided. The back-off grows only when a
// proxy fails again once its back-off is over: a failure in a dial that
// chose its order while the proxy was up or still backed off (concurrent
// dials hitting one dead proxy, or trying it last while it is backed off)
// is the same outage, already counted. One that began before the upstream
// last came back up is older than the news that it works (an attempt
// caught in the outage, failing on its handshake timeout after a later
// one succeeded): counting it would report a second "down" and back off an
// upstream that works.
func (u *Upstreams) markDown(up *upstream, decided, started time.Time, cause error) {
	u.notifyMu.Lock()
	defer u.notifyMu.Unlock()
	u.mu.Lock()
	h := up.h
	if started.Before(h.upSince) || (h.down && decided.Before(h.downUntil)) {
		u.mu.Unlock()
		return
	}
	wentDown := !h.down
	switch {
	case h.backoff == 0:
		h.backoff = minBackoff
	case h.backoff < maxBackoff:
		h.backoff = min(2*h.backoff, maxBackoff)
	}
	now := time.Now()
	h.down, h.since, h.downUntil = true, now, now.Add(h.backoff)
	report := wentDown && !h.retired
	u.mu.Unlock()
	if report {
		u.notify(up.d.ProxyAddr, false, cause)
	}
}

func (u *Upstreams) markUp(up *upstream) {
	u.mu.Lock()
	down := up.h.down
	up.h.noReplies = 0
	u.mu.Unlock()
	if !down { // the common case: no change, no notification lock
		return
	}
	u.notifyMu.Lock()
	defer u.notifyMu.Unlock()
	u.mu.Lock()
	h := up.h
	cameBack := h.down
	*h = health{retired: h.retired, upSince: time.Now()}
	report := cameBack && !h.retired
	u.mu.Unlock()
	if report {
		u.notify(up.d.ProxyAddr, true, nil)
	}
}

// DialAddr connects to target with CONNECT through the first upstream that
// works and returns the session and the dialer that made it (on failure,
// the dialer that failed when only one was tried or answered for the
// target, else nil).
func (u *Upstreams) DialAddr(ctx context.Context, target Addr) (*Conn, *Dialer, error) {
	return try(u, ctx, func(ctx context.Context, d *Dialer) (*Conn, error) { return d.DialAddr(ctx, target) })
}

// Bind asks the first upstream that works to listen (see Dialer.Bind).
func (u *Upstreams) Bind(ctx context.Context, expected Addr) (*Binding, *Dialer, error) {
	return try(u, ctx, func(ctx context.Context, d *Dialer) (*Binding, error) { return d.Bind(ctx, expected) })
}

// Associate opens a UDP association through the first upstream that works
// (see Dialer.Associate). An upstream without UDP ASSOCIATE counts as a
// failed one, so a later -S that has it is tried.
func (u *Upstreams) Associate(ctx context.Context) (*UDPConn, *Dialer, error) {
	return try(u, ctx, func(ctx context.Context, d *Dialer) (*UDPConn, error) { return d.Associate(ctx) })
}

// attempt is one upstream's try within a hedged dial. Its goroutine fills
// in progress; the dial reads it once the attempt's result has arrived.
type attempt struct {
	up       *upstream
	started  time.Time
	progress handshakeProgress
}

type attemptResult[T any] struct {
	i   int // index into the dial's attempts
	v   T
	err error
}

// hedgedDial is one call's race over an ordered list of upstreams. All its
// attempts run under one context that it cancels when the call is decided,
// and it collects every attempt before returning, so none outlives the call.
type hedgedDial[T io.Closer] struct {
	u        *Upstreams
	ctx      context.Context // the caller's
	order    []*upstream
	decided  time.Time // when order was chosen, from the upstreams' state then
	op       func(context.Context, *Dialer) (T, error)
	hedge    time.Duration   // the hedge delay, negative for none
	actx     context.Context // the attempts'
	cancel   context.CancelFunc
	results  chan attemptResult[T]
	attempts []attempt // never reallocated: attempts write their progress in place
	running  int
	timer    *time.Timer
}

func try[T io.Closer](u *Upstreams, ctx context.Context, op func(context.Context, *Dialer) (T, error)) (T, *Dialer, error) {
	var zero T
	list := u.current()
	if len(list) == 0 {
		return zero, nil, errNoUpstreams
	}
	h := &hedgedDial[T]{u: u, ctx: ctx, decided: time.Now(), order: u.order(list), op: op, hedge: u.hedgeDelay()}
	h.actx, h.cancel = context.WithCancel(ctx)
	defer h.cancel()
	h.results = make(chan attemptResult[T], len(h.order))
	h.attempts = make([]attempt, 0, len(h.order))
	return h.run()
}

func (h *hedgedDial[T]) run() (T, *Dialer, error) {
	var (
		zero T
		errs []error
	)
	defer func() {
		if h.timer != nil {
			h.timer.Stop()
		}
	}()
	hedge := h.startNext()
	for h.running > 0 {
		select {
		case <-hedge:
			hedge = nil
			if h.ctx.Err() == nil {
				hedge = h.startNext()
			}
		case r := <-h.results:
			h.running--
			a := h.attempts[r.i]
			switch {
			case r.err == nil:
				h.u.markUp(a.up)
				h.settle(r.i)
				return r.v, a.up.d, nil
			case h.ctx.Err() != nil && errors.Is(r.err, h.ctx.Err()):
				// The caller gave up.
				if cause := h.fault(r.i, r.err, -1); cause != nil {
					h.u.markDown(a.up, h.decided, a.started, cause)
				}
				errs = append(errs, r.err)
				hedge = nil
			case !IsUpstreamFailure(r.err):
				// The server worked and answered for the target.
				h.u.markUp(a.up)
				h.settle(r.i)
				return zero, a.up.d, r.err
			default:
				// The next upstream is tried even when this one was not at
				// fault: it may reach the target another way.
				if cause := h.fault(r.i, r.err, -1); cause != nil {
					h.u.markDown(a.up, h.decided, a.started, cause)
				}
				errs = append(errs, r.err)
				if h.ctx.Err() == nil {
					hedge = h.startNext()
				}
			}
		}
	}
	if len(errs) == 1 {
		return zero, h.attempts[0].up.d, errs[0]
	}
	return zero, nil, &upstreamsError{tried: len(errs), total: len(h.order), errs: errs}
}

// startNext starts the next upstream in the order, if any, and returns the
// channel that says when to start the one after it (nil: only on failure).
func (h *hedgedDial[T]) startNext() <-chan time.Time {
	if len(h.attempts) == len(h.order) {
		return nil
	}
	i := len(h.attempts)
	up := h.order[i]
	h.attempts = append(h.attempts, attempt{up: up, started: time.Now()})
	h.running++
	left := len(h.order) - len(h.attempts)
	if left == 0 && h.running == 1 {
		// Nothing to race it against (one upstream, or the last one after
		// the others failed): run it on the caller's goroutine, which
		// then finds its result waiting, instead of handing it over.
		h.runAttempt(i, up.d, &h.attempts[i].progress)
		return nil
	}
	go h.runAttempt(i, up.d, &h.attempts[i].progress)
	if left == 0 {
		return nil
	}
	// The next one is started after the delay whatever this one's progress:
	// one that has answered the greeting and waits on the target is raced
	// too, since another proxy may reach the target by another route, or
	// resolve its name faster, and the one left behind is cut short without
	// counting against it.
	wait := h.hedge
	if deadline, ok := h.ctx.Deadline(); ok {
		// Leave each upstream not yet started its share of the caller's
		// time, or a deadline shorter than the handshake timeout would
		// spend it all on the first.
		share := max(time.Until(deadline)/time.Duration(left+1), 0)
		if wait < 0 || share < wait {
			wait = share
		}
	}
	if wait < 0 {
		return nil
	}
	if h.timer == nil {
		h.timer = time.NewTimer(wait)
	} else {
		h.timer.Reset(wait)
	}
	return h.timer.C
}

func (h *hedgedDial[T]) runAttempt(i int, d *Dialer, progress *handshakeProgress) {
	start := time.Now()
	v, err := h.op(withProgress(h.actx, progress), d)
	if f := h.u.onTry.Load(); f != nil {
		a := Attempt{Proxy: d.ProxyAddr, Took: time.Since(start), Err: err}
		a.WaitedOnTarget = progress.greeted && (errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled))
		h.u.reportAttempt(*f, h.attempts[i].up, a)
	}
	h.results <- attemptResult[T]{i: i, v: v, err: err}
}

// reportAttempt hands a to OnAttempt's f unless a reload has removed its
// upstream: the series kept for it were dropped then (notifyMu orders
// this against SetDialers).
func (u *Upstreams) reportAttempt(f func(Attempt), up *upstream, a Attempt) {
	u.notifyMu.Lock()
	defer u.notifyMu.Unlock()
	u.mu.Lock()
	retired := up.h.retired
	u.mu.Unlock()
	if !retired {
		f(a)
	}
}

// settle ends the race that attempt w decided: it cancels the others and
// waits for them, closing what they opened meanwhile. One started before w
// whose proxy had not answered the greeting within the hedge delay lost to
// a later upstream: it counts as failed, which is how a black-holed
// upstream is found out without waiting for its handshake timeout. One
// whose proxy had answered was only waiting on the target: no fault.
// Letting the others run on to their timeout instead would keep a
// connection and a goroutine per dial alive for seconds after the call,
// and for CONNECT would have a slow proxy open a connection to the target
// only to drop it.
func (h *hedgedDial[T]) settle(w int) {
	h.cancel()
	for h.running > 0 {
		r := <-h.results
		h.running--
		a := h.attempts[r.i]
		switch {
		case r.err == nil:
			r.v.Close()
		case errors.Is(r.err, context.Canceled) || IsUpstreamFailure(r.err):
			// Cut short by the win, or failed on its own meanwhile.
			if cause := h.fault(r.i, r.err, w); cause != nil {
				h.u.markDown(a.up, h.decided, a.started, cause)
			}
		}
	}
}

// fault returns why attempt i's failure err counts against its proxy, or
// nil when it says nothing about the proxy. won is the attempt that
// decided the race, -1 while none has.
func (h *hedgedDial[T]) fault(i int, err error, won int) error {
	p := &h.attempts[i].progress
	waited := errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
	switch {
	case p.proxyAt.IsZero():
		// It never reached the proxy: local resolution failed, or was cut
		// short.
		return nil
	case p.greeted && waited:
		// The proxy had done its part and was waiting on the target (the
		// lost race, the caller's deadline or the handshake timeout alike).
		return nil
	case !waited && errors.Is(err, ErrNoReply):
		return h.u.noReply(h.attempts[i].up, err)
	case !waited:
		if IsUpstreamFailure(err) && !lacksOnly(err) && !generalFailure(err) && !localShortage(err) {
			return err
		}
		return nil
	}
	ran := time.Since(p.proxyAt)
	if h.ctx.Err() == nil && errors.Is(err, context.Canceled) {
		// Cut short by the win. Started after the winner, or too recently,
		// it had no fair chance: nothing learned.
		if won < 0 || i > won || ran < patience(h.hedge) {
			return nil
		}
		return fmt.Errorf("no reply to the handshake within %s, while %s, started after it, completed one",
			ran.Round(time.Millisecond), h.attempts[won].up.d.ProxyAddr)
	}
	if _, late := errors.AsType[*DeadlineError](err); late || h.ctx.Err() != nil && errors.Is(err, h.ctx.Err()) {
		// The caller's deadline (also when the caller's context had not
		// said so yet: DeadlineError) counts against a proxy that had been
		// given time; a cancel says nothing.
		if !errors.Is(err, context.DeadlineExceeded) || ran < patience(h.hedge) {
			return nil
		}
		return fmt.Errorf("no reply to the handshake within %s, the caller's deadline: %w", ran.Round(time.Millisecond), err)
	}
	return err // its own handshake timeout, before the proxy answered
}

// noReply counts a request up closed without a reply, and returns why
// it is down once noReplyLimit came in a row.
func (u *Upstreams) noReply(up *upstream, err error) error {
	var nr *noReplyError
	errors.As(err, &nr)
	u.mu.Lock()
	h := up.h
	if nr != nil {
		h.noReplyTargets[h.noReplies%noReplyLimit] = nr.target
	}
	h.noReplies++
	n := h.noReplies
	var targets, most int
	if n >= noReplyLimit {
		targets, most = spread(h.noReplyTargets[:])
	}
	u.mu.Unlock()
	if n < noReplyLimit || targets < noReplyTargetsLimit || most > noReplyLimit/2 {
		return nil
	}
	return fmt.Errorf("%d requests in a row, to %d or more targets, closed without a reply, none carried: %w", n, targets, err)
}

// spread counts the different addresses in as, and how often the most
// frequent one is there.
func spread(as []Addr) (distinct, most int) {
	for i, a := range as {
		if slices.Contains(as[:i], a) {
			continue
		}
		distinct++
		most = max(most, countOf(as[i:], a))
	}
	return distinct, most
}

func countOf(as []Addr, a Addr) (n int) {
	for _, b := range as {
		if b == a {
			n++
		}
	}
	return n
}

// localShortage reports whether err is this host running out of something
// (descriptors, memory, buffers, local ports) rather than anything the
// proxy did: every proxy would fail alike, and none is to blame.
func localShortage(err error) bool { return isErrno(err, shortageErrnos[:]) }

var shortageErrnos = [...]syscall.Errno{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM, syscall.EADDRNOTAVAIL}

// lacksOnly reports whether err is a working proxy's refusal of what it
// lacks, not of everything: an address type (REP 8: IPv6, or names), or
// BIND or UDP ASSOCIATE (REP 7, or ssh -D closing at the request) while it
// serves CONNECT. The next upstream is tried, and this one stays up.
func lacksOnly(err error) bool {
	if re := (*ReplyError)(nil); errors.As(err, &re) && re.Code == RepAddrTypeNotSupported {
		return true
	}
	cmd, ok := unsupportedCommand(err)
	return ok && cmd != CmdConnect
}

// generalFailure reports whether err is REP 1, "general SOCKS server
// failure": the server's own trouble by RFC 1928 (Tor's internal
// failures; a -D door, socksfwd's own, whose upstreams are all down), so
// the next upstream is tried; but servers also send it for a target
// failure they have no better code for (microsocks, for an errno it does
// not map), so it does not mark the server down. A CONNECT closed
// without a reply is the same: ssh -D's answer for an unreachable
// target, and for a server that forbids forwarding.
func generalFailure(err error) bool {
	re := (*ReplyError)(nil)
	return errors.As(err, &re) && re.Code == RepGeneralFailure || errors.Is(err, ErrNoReply)
}

// upstreamsError is the failure of every upstream tried, on one line, each
// cause once; errors.Is and errors.As see each cause.
type upstreamsError struct {
	tried, total int
	errs         []error
}

func (e *upstreamsError) Error() string {
	var b strings.Builder
	if e.tried == e.total {
		fmt.Fprintf(&b, "all %d upstreams failed: ", e.total)
	} else {
		fmt.Fprintf(&b, "%d of %d upstreams tried, none worked: ", e.tried, e.total)
	}
	for i, err := range e.errs {
		if i > 0 {
			b.WriteString("; ")
		}
		b.WriteString(err.Error())
	}
	return b.String()
}

func (e *upstreamsError) Unwrap() []error { return e.errs }

// IsUpstreamFailure reports whether err is the proxy's fault (unreachable,
// broken handshake, rejected credentials, unsupported command, REP 1's
// general failure) rather than the server's answer about the target.
func IsUpstreamFailure(err error) bool {
	var re *ReplyError
	if errors.As(err, &re) {
		return re.Code == RepCommandNotSupported || re.Code == RepAddrTypeNotSupported || re.Code == RepGeneralFailure
	}
	return !errors.Is(err, context.Canceled)
}
