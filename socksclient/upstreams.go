package socksclient

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"
)

// Backoff bounds for an upstream that failed: it is skipped for 1 s after
// its first failure, doubling up to 30 s, so a dead primary costs no
// timeout per connection.
const (
	minBackoff = time.Second
	maxBackoff = 30 * time.Second
)

// Upstreams dials through the first healthy proxy of an ordered list. A proxy
// that cannot be reached, fails the handshake or rejects the credentials is
// skipped and the next one tried; a refusal about the target (a
// *ReplyError) is the target's answer and is returned as is. Failover only
// happens while dialing, never after payload has flowed.
type Upstreams struct {
	dialers []*Dialer
	now     func() time.Time

	mu    sync.Mutex
	state []upstreamState
}

type upstreamState struct {
	downUntil time.Time
	backoff   time.Duration
}

// NewUpstreams returns a failover group over dialers, in order of preference.
func NewUpstreams(dialers ...*Dialer) *Upstreams {
	return &Upstreams{dialers: dialers, now: time.Now, state: make([]upstreamState, len(dialers))}
}

// Dialers returns the group's dialers in order.
func (u *Upstreams) Dialers() []*Dialer { return u.dialers }

// order lists healthy upstreams first, then those in backoff (tried last
// rather than never, so a returning upstream is found again).
func (u *Upstreams) order() []int {
	u.mu.Lock()
	defer u.mu.Unlock()
	now := u.now()
	idx := make([]int, 0, len(u.dialers))
	for i := range u.dialers {
		if !now.Before(u.state[i].downUntil) {
			idx = append(idx, i)
		}
	}
	for i := range u.dialers {
		if now.Before(u.state[i].downUntil) {
			idx = append(idx, i)
		}
	}
	return idx
}

func (u *Upstreams) markDown(i int) {
	u.mu.Lock()
	defer u.mu.Unlock()
	s := &u.state[i]
	switch {
	case s.backoff == 0:
		s.backoff = minBackoff
	case s.backoff < maxBackoff:
		s.backoff = min(2*s.backoff, maxBackoff)
	}
	s.downUntil = u.now().Add(s.backoff)
}

func (u *Upstreams) markUp(i int) {
	u.mu.Lock()
	u.state[i] = upstreamState{}
	u.mu.Unlock()
}

// DialAddr connects to target with CONNECT through the first upstream that
// works and returns the session and the dialer that made it (on failure,
// the dialer that failed when there was one, else nil).
func (u *Upstreams) DialAddr(ctx context.Context, target Addr) (*Conn, *Dialer, error) {
	return try(u, ctx, func(d *Dialer) (*Conn, error) { return d.DialAddr(ctx, target) })
}

// Bind asks the first upstream that works to listen (see Dialer.Bind).
func (u *Upstreams) Bind(ctx context.Context, expected Addr) (*Binding, *Dialer, error) {
	return try(u, ctx, func(d *Dialer) (*Binding, error) { return d.Bind(ctx, expected) })
}

// Associate opens a UDP association through the first upstream that works
// (see Dialer.Associate). An upstream without UDP ASSOCIATE counts as a
// failed one, so a later -S that has it is tried.
func (u *Upstreams) Associate(ctx context.Context) (*UDPConn, *Dialer, error) {
	return try(u, ctx, func(d *Dialer) (*UDPConn, error) { return d.Associate(ctx) })
}

func try[T any](u *Upstreams, ctx context.Context, op func(*Dialer) (T, error)) (T, *Dialer, error) {
	var (
		zero T
		errs []error
		d    *Dialer
	)
	for _, i := range u.order() {
		d = u.dialers[i]
		v, err := op(d)
		if err == nil {
			u.markUp(i)
			return v, d, nil
		}
		if !IsUpstreamFailure(err) || ctx.Err() != nil {
			// The server worked and answered for the target, or the caller gave up.
			u.markUp(i)
			return zero, d, err
		}
		u.markDown(i)
		errs = append(errs, err)
	}
	if len(errs) == 1 {
		return zero, d, errs[0]
	}
	msgs := make([]string, len(errs))
	for i, e := range errs {
		msgs[i] = e.Error()
	}
	return zero, nil, fmt.Errorf("all %d upstreams failed: %s: %w", len(errs), strings.Join(msgs, "; "), errors.Join(errs...))
}

// IsUpstreamFailure reports whether err is the proxy's fault (unreachable,
// broken handshake, rejected credentials, unsupported command) rather than
// the server's answer about the target.
func IsUpstreamFailure(err error) bool {
	var re *ReplyError
	if errors.As(err, &re) {
		return re.Code == RepCommandNotSupported || re.Code == RepAddrTypeNotSupported
	}
	return !errors.Is(err, context.Canceled)
}
