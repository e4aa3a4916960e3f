package tunnel

import (
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/socksfwd/socksfwd/socksclient"
)

// TCPForwardConfig describes one -L forward.
type TCPForwardConfig struct {
	// Name labels the forward in logs, e.g. "127.0.0.1:5432".
	Name string
	// Target is where connections go, resolved by the proxy when a name.
	Target socksclient.Addr
	// Upstreams dials the target through the configured proxies.
	Upstreams *socksclient.Upstreams
	// IdleTimeout closes a session idle this long (default 0 = never, like ssh -L).
	IdleTimeout time.Duration
	// CopyMode chooses the relay's copy (default CopySplice).
	CopyMode CopyMode
	Logger   zerolog.Logger
}

// TCPForward accepts local connections and relays each one to the target
// through a SOCKS5 CONNECT.
type TCPForward struct {
	cfg       TCPForwardConfig
	listeners []net.Listener

	ctx    context.Context // cancelled by Close: aborts handshakes
	cancel context.CancelFunc

	mu       sync.Mutex
	conns    map[net.Conn]struct{}
	stopping bool
	sessions sync.WaitGroup
	accepts  sync.WaitGroup

	stats TCPStats
}

// TCPStats counts a forward's sessions and bytes.
type TCPStats struct {
	Sessions  atomic.Int64 // accepted connections
	Active    atomic.Int64
	Failed    atomic.Int64 // sessions whose upstream dial failed
	BytesUp   atomic.Int64
	BytesDown atomic.Int64
}

// NewTCPForward returns a forward that will serve on listeners, which the
// caller has bound (so a bind failure surfaces before anything starts).
func NewTCPForward(cfg TCPForwardConfig, listeners ...net.Listener) *TCPForward {
	ctx, cancel := context.WithCancel(context.Background())
	return &TCPForward{cfg: cfg, listeners: listeners, ctx: ctx, cancel: cancel, conns: make(map[net.Conn]struct{})}
}

// Stats returns the live counters.
func (f *TCPForward) Stats() *TCPStats { return &f.stats }

// Addr is the first listener's address.
func (f *TCPForward) Addr() net.Addr { return f.listeners[0].Addr() }

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
			// Out of descriptors and the like: back off, keep serving.
			tempDelay = min(max(2*tempDelay, 5*time.Millisecond), time.Second)
			f.cfg.Logger.Warn().Err(err).Str("listener", f.cfg.Name).Msg("accept failed; retrying")
			select {
			case <-time.After(tempDelay):
				continue
			case <-f.ctx.Done():
				return nil
			}
		}
		tempDelay = 0
		if !f.track(c) {
			c.Close()
			continue
		}
		f.sessions.Go(func() { f.serveSession(c) })
	}
}

func (f *TCPForward) isStopping() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.stopping
}

// track registers a conn to cut on Close; false once the forward stops.
func (f *TCPForward) track(c net.Conn) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.ctx.Err() != nil {
		return false
	}
	f.conns[c] = struct{}{}
	return true
}

func (f *TCPForward) untrack(c net.Conn) {
	f.mu.Lock()
	delete(f.conns, c)
	f.mu.Unlock()
}

func (f *TCPForward) serveSession(client net.Conn) {
	defer f.untrack(client)
	f.stats.Sessions.Add(1)
	f.stats.Active.Add(1)
	defer f.stats.Active.Add(-1)
	start := time.Now()

	up, d, err := f.cfg.Upstreams.DialAddr(f.ctx, f.cfg.Target)
	if err != nil {
		f.stats.Failed.Add(1)
		ev := f.sessionEvent(f.cfg.Logger.Info(), client)
		if d != nil {
			ev = ev.Str("upstream", d.ProxyAddr)
		}
		var re *socksclient.ReplyError
		if errors.As(err, &re) {
			ev = ev.Str("rep", re.Code.String())
		}
		ev.Err(err).Dur("dur", time.Since(start)).Msg("session failed")
		reset(client)
		return
	}
	if !f.track(up) {
		up.Close()
		client.Close()
		return
	}
	defer f.untrack(up)
	res := Relay(client, up, f.cfg.IdleTimeout, f.cfg.CopyMode)
	f.stats.BytesUp.Add(res.Up)
	f.stats.BytesDown.Add(res.Down)
	ev := f.cfg.Logger.Debug()
	if res.Err != nil && !errors.Is(res.Err, net.ErrClosed) {
		ev = f.cfg.Logger.Info().Err(res.Err)
	}
	f.sessionEvent(ev, client).Str("upstream", d.ProxyAddr).Int64("bytes_up", res.Up).Int64("bytes_down", res.Down).
		Dur("dur", time.Since(start)).Msg("session ended")
}

// sessionEvent adds the session's fields to a log event. Built when the
// session ends rather than held in a per-session logger, so an idle session
// carries no log context (and a disabled level costs nothing).
func (f *TCPForward) sessionEvent(ev *zerolog.Event, client net.Conn) *zerolog.Event {
	if ev == nil {
		return nil
	}
	return ev.Str("listener", f.cfg.Name).Str("client", client.RemoteAddr().String()).Str("target", f.cfg.Target.String())
}

// reset closes a conn with RST where possible, so the local client learns at
// once that the target refused, rather than seeing a clean EOF.
func reset(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	c.Close()
}

// Shutdown stops accepting and waits for live sessions to end until ctx is
// done; then it cuts the rest (Close).
func (f *TCPForward) Shutdown(ctx context.Context) error {
	f.mu.Lock()
	f.stopping = true
	f.mu.Unlock()
	for _, ln := range f.listeners {
		ln.Close()
	}
	done := make(chan struct{})
	go func() {
		f.accepts.Wait()
		f.sessions.Wait()
		close(done)
	}()
	select {
	case <-done:
		f.Close()
		return nil
	case <-ctx.Done():
		f.Close()
		<-done
		return ctx.Err()
	}
}

// Close stops accepting and cuts every session at once. It is idempotent
// and returns after every session goroutine has ended.
func (f *TCPForward) Close() error {
	f.mu.Lock()
	f.stopping = true
	f.cancel()
	for c := range f.conns {
		c.Close()
	}
	f.mu.Unlock()
	for _, ln := range f.listeners {
		ln.Close()
	}
	f.accepts.Wait()
	f.sessions.Wait()
	return nil
}
