package tunnel

import (
	"bufio"
	"cmp"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/http/httputil"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/socksfwd/socksfwd/internal/allowlist"
	"github.com/socksfwd/socksfwd/internal/logthrottle"
	"github.com/socksfwd/socksfwd/internal/noproxy"
	"github.com/socksfwd/socksfwd/socksclient"
)

// HTTPProxyConfig describes one --http listener.
type HTTPProxyConfig struct {
	// Name labels the listener in logs, e.g. "127.0.0.1:3128".
	Name string
	// Upstreams dials every target through the configured proxies; names
	// go to the proxy to resolve.
	Upstreams *socksclient.Upstreams
	// NoProxy lists the targets reached directly, through Direct, not
	// through the upstreams. SetNoProxy changes it.
	NoProxy *noproxy.List
	// Direct dials the targets NoProxy lists (default: a net.Dialer),
	// within DirectTimeout (default DefaultDirectTimeout), which
	// SetDirectTimeout changes.
	Direct        func(ctx context.Context, network, address string) (net.Conn, error)
	DirectTimeout time.Duration
	// Credentials, when set, must come with every request, else the
	// answer is 407. SetCredentials changes them.
	Credentials *ProxyCredentials
	// IdleTimeout closes a CONNECT tunnel idle this long (default 0 =
	// never, like -L). SetIdleTimeout changes it for new tunnels.
	IdleTimeout time.Duration
	// CopyMode chooses the tunnels' relay copy (default CopySplice).
	CopyMode CopyMode
	// MaxSessions bounds the client connections open at once (0 = no
	// bound), Allow the client sources served; connections beyond them
	// are closed at once and counted. SetAdmission changes both.
	MaxSessions int
	Allow       *allowlist.List
	// ReadHeaderTimeout bounds reading a request's head (default 10 s):
	// a client that drips its headers (slowloris) loses the connection.
	ReadHeaderTimeout time.Duration
	// KeepAlive closes a client connection idle this long between
	// requests (default 2 min).
	KeepAlive time.Duration
	Logger    zerolog.Logger
	// halfCloseWait replaces defaultHalfCloseWait, in tests; afterGrace,
	// if set, runs once that wait is over and decided.
	halfCloseWait time.Duration
	afterGrace    func()
}

// DefaultDirectTimeout bounds a direct connect to a target NoProxy lists,
// as the handshake timeout bounds a dial through an upstream.
const DefaultDirectTimeout = 10 * time.Second

const (
	defaultReadHeaderTimeout = 10 * time.Second
	defaultKeepAlive         = 2 * time.Minute
	// maxRequestHead bounds a request line and its headers; a larger head
	// gets 431. Real clients send a few kilobytes.
	maxRequestHead = 64 << 10
	// maxResponseHead bounds a target's response headers.
	maxResponseHead = 256 << 10
)

// HTTPRequestKind tells CONNECT requests from forwarded ones in the
// counters, and both from those the HTTP parser refused.
type HTTPRequestKind int

const (
	HTTPConnect   HTTPRequestKind = iota // CONNECT host:port
	HTTPForward                          // absolute-form: GET http://host/path
	HTTPMalformed                        // answered by net/http itself: 400, 431, 501, 417
	// HTTPTimeout: a request head that did not arrive within
	// ReadHeaderTimeout (a slowloris, or a connection opened and never
	// used), which net/http closes without an answer; counted 4xx, as
	// the 408 it stands for.
	HTTPTimeout
	httpKinds
)

// HTTPStats counts an HTTP proxy's connections, requests and bytes.
type HTTPStats struct {
	// Sessions and Active count client connections (a keep-alive
	// connection carries many requests; a CONNECT tunnel is one);
	// Failed counts requests whose target could not be reached; the
	// bytes are CONNECT payload and the bodies of forwarded requests and
	// of answers.
	TCPStats
	// Responses counts answered requests by kind and status class:
	// Responses[HTTPConnect][2] is CONNECTs answered 2xx.
	Responses [httpKinds][6]atomic.Int64
	// AuthMissing and AuthWrong count 407s by cause: a request without
	// Proxy-Authorization (most clients' first, to learn the scheme), and
	// one whose credentials are wrong.
	AuthMissing, AuthWrong atomic.Int64
}

// defaultHalfCloseWait: a client that half-closes behind its request
// (nc -N, HTTP/1.0 scripts) gets an answer that comes within it; one that
// gave up on a slow target holds the target's connection no longer.
const defaultHalfCloseWait = 30 * time.Second

// HTTPProxy is an HTTP/1.1 forward proxy whose every request goes through
// the upstreams: CONNECT host:port becomes a SOCKS5 CONNECT and a raw
// relay; an absolute-form request is forwarded over a connection dialed
// the same way. It is built on net/http: the server parses requests, a
// ReverseProxy forwards them (dropping hop-by-hop headers both ways, RFC
// 9110 §7.6.1), and CONNECT hijacks the connection.
type HTTPProxy struct {
	cfg       HTTPProxyConfig
	ln        net.Listener
	srv       *http.Server
	forwarder *httputil.ReverseProxy
	direct    func(ctx context.Context, network, address string) (net.Conn, error)

	// transport keeps connections to targets alive for forwarded
	// requests. Redial replaces it, so that no request goes over a
	// connection dialed the old way; retired ones keep only the
	// connections still busy with a request, each closed when it ends.
	transport atomic.Pointer[targetTransport]
	retired   []*targetTransport // under mu
	directTO  atomic.Int64

	ctx    context.Context // cancelled by Close: aborts dials and requests
	cancel context.CancelFunc

	refusals *logthrottle.Throttle
	// halfCloseWait is how long a forward goes on after its client's FIN
	// (defaultHalfCloseWait; tests shorten it).
	halfCloseWait time.Duration
	admit         atomic.Pointer[admission]
	idle          atomic.Int64
	creds         atomic.Pointer[ProxyCredentials]
	noProxy       atomic.Pointer[noproxy.List]

	mu      sync.Mutex
	closed  bool
	busy    int               // requests being handled and tunnels relaying
	idleNow chan struct{}     // closed when busy drops to 0
	tunnels map[net.Conn]bool // true for a tunnel's client conn
	cut     atomic.Bool       // Close cut live tunnels
	// lingering: refused connections read until their client is done
	// (lingerClose); lingers waits for them.
	lingering map[net.Conn]struct{}
	lingers   sync.WaitGroup

	stats HTTPStats
}

// NewHTTPProxy returns a proxy that will serve on ln, which the caller
// has bound (so a bind failure surfaces before anything starts).
func NewHTTPProxy(cfg HTTPProxyConfig, ln net.Listener) *HTTPProxy {
	ctx, cancel := context.WithCancel(context.Background())
	p := &HTTPProxy{cfg: cfg, ln: ln, ctx: ctx, cancel: cancel, tunnels: make(map[net.Conn]bool), lingering: make(map[net.Conn]struct{})}
	p.refusals = logthrottle.New(refusalLogEvery)
	p.halfCloseWait = cmp.Or(cfg.halfCloseWait, defaultHalfCloseWait)
	p.idle.Store(int64(cfg.IdleTimeout))
	p.creds.Store(cfg.Credentials)
	p.noProxy.Store(cfg.NoProxy)
	p.SetAdmission(cfg.MaxSessions, cfg.Allow)
	p.direct = cfg.Direct
	if p.direct == nil {
		p.direct = (&net.Dialer{}).DialContext
	}
	p.SetDirectTimeout(cfg.DirectTimeout)
	p.transport.Store(p.newTransport())
	p.forwarder = &httputil.ReverseProxy{
		Rewrite: p.rewrite,
		Transport: roundTripper(func(r *http.Request) (*http.Response, error) {
			return p.transport.Load().RoundTrip(r)
		}),
		ModifyResponse: p.modifyResponse,
		ErrorHandler:   p.forwardFailed,
		// Bytes go to the client as they come, as over a tunnel: by
		// default ReverseProxy holds an answer with a Content-Length in
		// the server's buffer (4 KiB) until it is full or complete, so
		// a target that drips a short answer seemed silent until its end.
		FlushInterval: -1,
		ErrorLog:      log.New(io.Discard, "", 0),
	}
	readHeader, keepAlive := cfg.ReadHeaderTimeout, cfg.KeepAlive
	if readHeader <= 0 {
		readHeader = defaultReadHeaderTimeout
	}
	if keepAlive <= 0 {
		keepAlive = defaultKeepAlive
	}
	var protocols http.Protocols
	protocols.SetHTTP1(true)
	p.srv = &http.Server{
		Handler:           p,
		ReadHeaderTimeout: readHeader,
		IdleTimeout:       keepAlive,
		MaxHeaderBytes:    maxRequestHead,
		Protocols:         &protocols,
		BaseContext:       func(net.Listener) context.Context { return p.ctx },
		// A forwarded request's stream after a 101 takes the client's
		// connection over: Close must be able to cut it, and the idle
		// timeout to end it.
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(ctx, clientConnKey{}, c)
		},
		ConnState: trackConnState,
		ErrorLog:  log.New(serverLog{p}, "", 0),
	}
	return p
}

// SetAdmission changes MaxSessions and Allow for connections accepted
// from now on; open ones stay. A reload calls it without rebinding.
func (p *HTTPProxy) SetAdmission(maxSessions int, allow *allowlist.List) {
	p.admit.Store(&admission{maxSessions: maxSessions, allow: allow})
}

// SetIdleTimeout sets the idle timeout of tunnels opened from now on, and
// of forwarded requests (for those, 0 means DefaultForwardIdle).
func (p *HTTPProxy) SetIdleTimeout(d time.Duration) {
	changed := p.idle.Swap(int64(d)) != int64(d)
	if changed && p.transport.Load() != nil {
		p.Redial() // the Transport's ResponseHeaderTimeout follows it
	}
}

// DefaultForwardIdle is how long a forwarded request may wait without
// progress (its body from the client, the target's response head) when
// no idle timeout is set: squid's read_timeout. Tunnels and streams after
// a 101 have none unless one is set, as -L's sessions.
const DefaultForwardIdle = 15 * time.Minute

// forwardIdle is the wait a forwarded request is allowed without progress.
func (p *HTTPProxy) forwardIdle() time.Duration {
	if d := time.Duration(p.idle.Load()); d > 0 {
		return d
	}
	return DefaultForwardIdle
}

// SetCredentials sets what requests from now on must carry (nil: none).
func (p *HTTPProxy) SetCredentials(c *ProxyCredentials) { p.creds.Store(c) }

// SetDirectTimeout bounds direct connects from now on (0: the default).
func (p *HTTPProxy) SetDirectTimeout(d time.Duration) {
	if d <= 0 {
		d = DefaultDirectTimeout
	}
	p.directTO.Store(int64(d))
}

// SetNoProxy sets the targets that requests from now on reach directly;
// connections kept alive to targets are not used again (Redial), as they
// went the old way.
func (p *HTTPProxy) SetNoProxy(l *noproxy.List) {
	p.noProxy.Store(l)
	p.Redial()
}

// Redial makes every forwarded request from now on dial its target anew
// (through new upstreams, after a reload changed them): idle kept-alive
// connections close now, busy ones when their request ends.
func (p *HTTPProxy) Redial() {
	old := p.transport.Swap(p.newTransport())
	p.mu.Lock()
	defer p.mu.Unlock()
	p.retired = slices.DeleteFunc(append(p.retired, old), func(t *targetTransport) bool {
		// Once closed, its idle pool refuses connections that come back
		// from a request: they close instead. It gets no new requests;
		// one that loaded it just before the swap reopens its pool, whose
		// connections then close after IdleConnTimeout, or at the next
		// Redial or Close, and carry nothing new meanwhile.
		t.CloseIdleConnections()
		return t.live.Load() == 0
	})
}

// Stats returns the live counters.
func (p *HTTPProxy) Stats() *HTTPStats { return &p.stats }

// Addr is the listener's address.
func (p *HTTPProxy) Addr() net.Addr { return p.ln.Addr() }

// Serve answers requests until Shutdown or Close, or until ctx is done
// (which then closes the proxy). It returns nil on such a stop.
func (p *HTTPProxy) Serve(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() { p.Close() })
	defer stop()
	err := p.srv.Serve(admittingListener{p.ln, p})
	if errors.Is(err, http.ErrServerClosed) || p.isClosed() && errors.Is(err, net.ErrClosed) {
		return nil
	}
	p.Close()
	return err
}

// Shutdown stops accepting, lets requests in flight and open tunnels end
// until ctx is done, then cuts the rest (Close).
func (p *HTTPProxy) Shutdown(ctx context.Context) error {
	// Connections the kernel queued before the stop are clients to serve.
	waitBacklog(p.ln)
	// Closes the listener and idle keep-alive connections, and waits for
	// requests in flight; tunnels have left the server's care.
	err := p.srv.Shutdown(ctx)
	if err == nil {
		select {
		case <-p.whenIdle():
		case <-ctx.Done():
			err = ctx.Err()
		}
	}
	p.Close()
	return err
}

// Close stops accepting and cuts every connection and tunnel at once,
// tunnels with a reset toward both ends. It is idempotent and returns
// once every request and tunnel has ended.
func (p *HTTPProxy) Close() error {
	p.mu.Lock()
	p.closed = true
	p.cancel()
	// Forwarded requests in flight count as sessions too (busy holds
	// them and the tunnels, whose handlers have returned).
	if n := p.busy; n > 0 {
		p.cut.Store(true)
		p.cfg.Logger.Info().Str("listener", p.cfg.Name).Int("sessions", n).Msg("cutting sessions still open")
	}
	abortAll(p.tunnels)
	for c := range p.lingering {
		c.Close()
	}
	p.mu.Unlock()
	p.srv.Close()
	p.ln.Close() // in case Serve never ran
	<-p.whenIdle()
	p.lingers.Wait()
	p.transport.Load().CloseIdleConnections()
	p.mu.Lock()
	for _, t := range p.retired {
		t.CloseIdleConnections()
	}
	p.retired = nil
	p.mu.Unlock()
	return nil
}

// targetTransport is the Transport of forwarded requests, with a count of
// the connections to targets it holds.
type targetTransport struct {
	*http.Transport
	live atomic.Int64
}

func (p *HTTPProxy) newTransport() *targetTransport {
	t := &targetTransport{}
	t.Transport = &http.Transport{
		DialContext: func(ctx context.Context, network, address string) (net.Conn, error) {
			c, err := p.dialForward(ctx, network, address)
			if err != nil {
				return nil, err
			}
			t.live.Add(1)
			c.live = &t.live
			return c, nil
		},
		// The client asked for its own encoding; the bytes pass as they are.
		DisableCompression:    true,
		MaxIdleConns:          100,
		MaxIdleConnsPerHost:   8,
		IdleConnTimeout:       time.Minute,
		ExpectContinueTimeout: time.Second,
		// A target that takes a request and never answers is let go, as
		// a quiet tunnel is.
		ResponseHeaderTimeout:  p.forwardIdle(),
		MaxResponseHeaderBytes: maxResponseHead,
		// HTTP/1.1 only, as the client speaks it to us.
		TLSNextProto: map[string]func(string, *tls.Conn) http.RoundTripper{},
	}
	return t
}

// roundTripper lets the forwarder use whichever Transport is current.
type roundTripper func(*http.Request) (*http.Response, error)

func (f roundTripper) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

func (p *HTTPProxy) isClosed() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.closed
}

// enter counts a request or tunnel that Shutdown and Close wait for;
// false once the proxy is closed. With track, it also registers the
// tunnel's conns (client first) for Close to cut.
func (p *HTTPProxy) enter(track ...net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	p.busy++
	p.trackLocked(track)
	return true
}

// trackLocked registers conns (the client's first) for Close to cut; the
// caller holds mu.
func (p *HTTPProxy) trackLocked(conns []net.Conn) {
	for i, c := range conns {
		p.tunnels[c] = i == 0
	}
}

// leave ends what enter counted.
func (p *HTTPProxy) leave(untrack ...net.Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range untrack {
		delete(p.tunnels, c)
	}
	if p.busy--; p.busy == 0 && p.idleNow != nil {
		close(p.idleNow)
		p.idleNow = nil
	}
}

// whenIdle is closed once no request or tunnel is left.
func (p *HTTPProxy) whenIdle() <-chan struct{} {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.busy == 0 {
		done := make(chan struct{})
		close(done)
		return done
	}
	if p.idleNow == nil {
		p.idleNow = make(chan struct{})
	}
	return p.idleNow
}

// tooManySessionsAnswer is what a connection beyond --max-sessions gets.
var tooManySessionsAnswer = func() string {
	body := "socksfwd: too many sessions (--max-sessions); try again later\n"
	return fmt.Sprintf("HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
}()

// A refused connection's linger: how long, how much of what the client
// still sends is read and dropped, and how many linger at once (beyond,
// one is closed at once, a reset if its request was unread).
const (
	lingerTime  = 500 * time.Millisecond
	lingerBytes = 256 << 10
	maxLingers  = 64
)

// admittingListener closes at once, with a reset, connections that
// --allow refuses, and answers 503 to those beyond --max-sessions; the
// server sees only the others.
type admittingListener struct {
	net.Listener
	p *HTTPProxy
}

func (l admittingListener) Accept() (net.Conn, error) {
	p := l.p
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if err := p.admit.Load().check(c, p.stats.Active.Load()); err != nil {
			if !errors.Is(err, ErrTooManySessions) {
				rejectConn(p.cfg.Logger, p.refusals, &p.stats.TCPStats, p.cfg.Name, c, err)
				continue
			}
			// A client told 503 knows the proxy is busy (privoxy and
			// squid say so); a reset reads as a broken proxy. Written
			// at once: a fresh socket's buffer takes it.
			countRejection(p.cfg.Logger, p.refusals, &p.stats.TCPStats, p.cfg.Name, c, err)
			c.SetWriteDeadline(time.Now().Add(time.Second))
			io.WriteString(c, tooManySessionsAnswer)
			p.lingerClose(c)
			continue
		}
		// Counted here, so that the next accept sees it against
		// MaxSessions.
		p.stats.Sessions.Add(1)
		p.stats.Active.Add(1)
		return &clientConn{Conn: c, p: p}, nil
	}
}

// lingerClose ends a connection whose answer was written without reading
// its request: FIN, then what the client still sends is read and dropped
// for a while, as net/http does, since closing with the request unread
// would reset the connection, which may destroy the answer before the
// client reads it. Close cuts lingering connections and waits for them.
func (p *HTTPProxy) lingerClose(c net.Conn) {
	p.mu.Lock()
	if p.closed || len(p.lingering) >= maxLingers {
		p.mu.Unlock()
		c.Close()
		return
	}
	p.lingering[c] = struct{}{}
	p.lingers.Add(1)
	p.mu.Unlock()
	go func() {
		defer p.lingers.Done()
		if cw, ok := c.(closeWriter); ok {
			cw.CloseWrite()
		}
		c.SetReadDeadline(time.Now().Add(lingerTime))
		io.Copy(io.Discard, io.LimitReader(c, lingerBytes))
		p.mu.Lock()
		delete(p.lingering, c)
		p.mu.Unlock()
		c.Close()
	}()
}

// clientConn is an accepted connection, counted as active until it is
// closed: by the server, or by the relay once CONNECT took it over.
type clientConn struct {
	net.Conn
	p    *HTTPProxy
	once sync.Once
	// handled: the request being read or answered reached ServeHTTP.
	// What is written while it is false is net/http's own refusal of a
	// request it could not parse, which no handler sees.
	handled atomic.Bool
	// idle: between requests, waiting for the next one's first bytes;
	// a read that times out then is the keep-alive timeout, not a head
	// that did not arrive.
	idle atomic.Bool
	// reset: a read failed other than by EOF or a deadline (a reset):
	// the client is gone, not half-closed.
	reset atomic.Bool
	// began: a byte of the request being read has come.
	began atomic.Bool
}

// Read notes a request head that did not arrive within ReadHeaderTimeout,
// which net/http closes without a word; on the connection's own
// goroutine, at no cost to other reads.
func (c *clientConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if n > 0 {
		c.idle.Store(false) // the next request is arriving
		c.began.Store(true)
	}
	if err != nil && !c.handled.Load() && !c.idle.Load() && errors.Is(err, os.ErrDeadlineExceeded) {
		if c.began.Load() {
			c.p.headTimedOut(c)
		} else {
			// Opened and never used: browsers open spare connections to
			// a proxy ahead of need. No request, and nothing wrong.
			c.handled.Store(true) // once
			c.p.cfg.Logger.Debug().Str("listener", c.p.cfg.Name).Str("client", c.RemoteAddr().String()).
				Msg("connection closed: no request came")
		}
	}
	if err != nil && err != io.EOF && !errors.Is(err, os.ErrDeadlineExceeded) {
		c.reset.Store(true)
	}
	return n, err
}

func (c *clientConn) Close() error {
	c.once.Do(func() { c.p.stats.Active.Add(-1) })
	return c.Conn.Close()
}

// Write counts and logs net/http's own refusals ("HTTP/1.1 400 Bad
// Request" and the like, written in one piece before it closes).
func (c *clientConn) Write(b []byte) (int, error) {
	if !c.handled.Load() {
		c.p.refusedByParser(c, b)
	}
	return c.Conn.Write(b)
}

// CloseWrite passes a tunnel's half-close on to the socket.
func (c *clientConn) CloseWrite() error {
	if cw, ok := c.Conn.(closeWriter); ok {
		return cw.CloseWrite()
	}
	return c.Conn.Close()
}

// NetConn is the socket, which the relay splices from.
func (c *clientConn) NetConn() net.Conn { return c.Conn }

// trackConnState clears handled between requests: when one has been
// answered (idle; the next may already be buffered, and then net/http
// reports no new activity) and when one starts arriving (active).
func trackConnState(c net.Conn, state http.ConnState) {
	if cc, ok := c.(*clientConn); ok && (state == http.StateIdle || state == http.StateActive) {
		cc.handled.Store(false)
		cc.idle.Store(state == http.StateIdle)
		if state == http.StateIdle {
			cc.began.Store(false)
		}
	}
}

// headTimedOut counts a request head that did not arrive in time and
// logs it, throttled as other refusals: anyone who can reach the door can
// open connections and send nothing.
func (p *HTTPProxy) headTimedOut(c *clientConn) {
	c.handled.Store(true) // once
	p.stats.Responses[HTTPTimeout][4].Add(1)
	const cause = "request head timeout"
	if ok, suppressed := p.refusals.Allow(cause); ok {
		p.cfg.Logger.Info().Str("listener", p.cfg.Name).Str("client", c.RemoteAddr().String()).
			Func(logthrottle.Repeats("refused_since_last_line", suppressed)).Str("cause", cause).
			Dur("read_header_timeout", p.srv.ReadHeaderTimeout).Msg("request head not received in time, connection closed")
	}
}

// refusedByParser counts an answer net/http wrote itself, by its status
// class, and logs its status line (throttled, as other refusals).
func (p *HTTPProxy) refusedByParser(c *clientConn, answer []byte) {
	const prefix = "HTTP/1.x "
	if len(answer) < len(prefix)+3 || string(answer[:len(prefix)-2]) != prefix[:len(prefix)-2] || answer[len(prefix)-1] != ' ' {
		return // not a status line: HTTP/1.1 or, to an HTTP/1.0 client, HTTP/1.0
	}
	class := int(answer[len(prefix)] - '0')
	if class < 1 || class > 5 {
		return
	}
	c.handled.Store(true) // one refusal per request
	p.stats.Responses[HTTPMalformed][class].Add(1)
	status, _, _ := strings.Cut(string(answer[len(prefix):min(len(answer), len(prefix)+80)]), "\r")
	cause := "request refused by the HTTP parser: " + status
	if ok, suppressed := p.refusals.Allow(cause); ok {
		p.cfg.Logger.Info().Str("listener", p.cfg.Name).Str("client", c.RemoteAddr().String()).
			Func(logthrottle.Repeats("refused_since_last_line", suppressed)).Msg(cause)
	}
}

// ServeHTTP answers one request: CONNECT, or an absolute-form request to
// forward.
func (p *HTTPProxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !p.enter() {
		w.Header().Set("Connection", "close")
		answer(w, http.StatusServiceUnavailable, "socksfwd is stopping")
		return
	}
	defer p.leave()
	if c, ok := r.Context().Value(clientConnKey{}).(*clientConn); ok {
		c.handled.Store(true)
	}
	kind := HTTPForward
	if r.Method == http.MethodConnect {
		kind = HTTPConnect
	}
	sw := &statusWriter{ResponseWriter: w, bytes: &p.stats.BytesDown}
	// Deferred: a forwarded response cut mid-body ends in a panic
	// (http.ErrAbortHandler) that the server recovers.
	defer func() { p.stats.Responses[kind][sw.class()].Add(1) }()
	if c := p.creds.Load(); c != nil && !c.allows(r) {
		p.authFailed(sw, r)
		return
	}
	switch {
	case kind == HTTPConnect:
		p.connect(sw, r)
	case r.URL.IsAbs():
		p.forward(sw, r)
	default:
		answer(sw, http.StatusBadRequest, "socksfwd is an HTTP proxy: ask it for absolute URLs (GET http://host/path) or CONNECT host:port")
	}
}

// authFailed answers 407, which asks the client for credentials, and
// logs once per period how many asked without them or with wrong ones.
func (p *HTTPProxy) authFailed(w http.ResponseWriter, r *http.Request) {
	cause := "proxy authentication missing"
	if r.Header.Get("Proxy-Authorization") != "" {
		cause = "proxy authentication failed"
		p.stats.AuthWrong.Add(1)
		if ok, suppressed := p.refusals.Allow(cause); ok {
			p.cfg.Logger.Info().Str("listener", p.cfg.Name).Str("client", r.RemoteAddr).
				Func(logthrottle.Repeats("refused_since_last_line", suppressed)).Msg(cause)
		}
	} else {
		// The challenge most clients ask for before they send credentials
		// (browsers, curl --proxy-anyauth, Java): no trouble, at debug.
		p.stats.AuthMissing.Add(1)
		p.cfg.Logger.Debug().Str("listener", p.cfg.Name).Str("client", r.RemoteAddr).Msg(cause)
	}
	if r.Method == http.MethodConnect {
		// What the client sent behind its CONNECT (a TLS ClientHello) is
		// no next request.
		w.Header().Set("Connection", "close")
	}
	w.Header().Set("Proxy-Authenticate", `Basic realm="socksfwd", charset="UTF-8"`)
	answer(w, http.StatusProxyAuthRequired, cause+": send Proxy-Authorization (Basic) with the user and password of --http-auth")
}

// answer writes a status with a one-line plain-text body.
func answer(w http.ResponseWriter, code int, msg string) {
	http.Error(w, strings.ReplaceAll(msg, "\n", " "), code)
}

// requestTarget reads a request's host[:port] (IPv6 in brackets); port
// is used when it has none ("" makes a port required).
func requestTarget(hostport, port string) (socksclient.Addr, error) {
	if _, _, err := net.SplitHostPort(hostport); err != nil && port != "" {
		host := hostport
		if len(host) > 1 && host[0] == '[' && host[len(host)-1] == ']' {
			host = host[1 : len(host)-1]
		}
		hostport = net.JoinHostPort(host, port)
	}
	a, err := socksclient.ParseAddr(hostport)
	if err != nil {
		return a, err
	}
	if a.Port == 0 {
		return a, fmt.Errorf("target %s: port 0", hostport)
	}
	return a, nil
}

// dial reaches target through the upstreams, or directly when NoProxy
// lists it. upstream names the way taken ("direct" or the proxy's
// address), on failure too when one proxy answered for the target.
func (p *HTTPProxy) dial(ctx context.Context, target socksclient.Addr) (c net.Conn, upstream string, err error) {
	// Close aborts dials, also those the Transport runs on its own.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(p.ctx, cancel)
	defer stop()
	if p.noProxy.Load().Match(target.Host(), target.Port) {
		ctx, cancel := context.WithTimeout(ctx, time.Duration(p.directTO.Load()))
		defer cancel()
		c, err := p.direct(ctx, "tcp", target.String())
		return c, "direct", err
	}
	up, d, err := p.cfg.Upstreams.DialAddr(ctx, target)
	if d != nil {
		upstream = d.ProxyAddr
	}
	if err != nil {
		return nil, upstream, err
	}
	return up, upstream, nil
}

// dialStatus is the status a client gets when its target could not be
// reached: 504 when the handshake (or a direct connect) timed out, else
// 502, whose body names the proxy's REP code when it refused.
func dialStatus(err error) int {
	var nerr net.Error
	if errors.Is(err, context.DeadlineExceeded) || errors.As(err, &nerr) && nerr.Timeout() {
		return http.StatusGatewayTimeout
	}
	return http.StatusBadGateway
}

// dialFailed answers a request whose target could not be reached and
// logs the failure, naming the REP code.
func (p *HTTPProxy) dialFailed(w http.ResponseWriter, r *http.Request, target socksclient.Addr, upstream string, err error, start time.Time) {
	p.stats.Failed.Add(1)
	ev := p.cfg.Logger.Info().Str("listener", p.cfg.Name).Str("client", r.RemoteAddr).Str("target", target.String()).
		Str("method", r.Method)
	if upstream != "" {
		ev = ev.Str("upstream", upstream)
	}
	var re *socksclient.ReplyError
	if errors.As(err, &re) {
		ev = ev.Str("rep", re.Code.String())
	}
	code := dialStatus(err)
	ev.Int("status", code).Err(err).Dur("dur_ms", time.Since(start)).Msg("request failed")
	answer(w, code, fmt.Sprintf("%s: %v", target, err))
}

// connect serves CONNECT host:port: a SOCKS5 CONNECT to the target (a
// name goes to the proxy as a name), 200, then a raw relay with
// half-close, as -L relays.
func (p *HTTPProxy) connect(w *statusWriter, r *http.Request) {
	start := time.Now()
	// A refusal ends the connection: what the client sent behind the
	// request (a TLS ClientHello) is no next request.
	w.Header().Set("Connection", "close")
	target, err := requestTarget(r.URL.Host, "")
	if err != nil {
		answer(w, http.StatusBadRequest, "CONNECT wants host:port: "+err.Error())
		return
	}
	// Not r's context: the server cancels that when the client
	// half-closes (it reads EOF), and a tunnel carries a half-close, also
	// one sent right behind the request. Close still aborts the dial.
	up, upstream, err := p.dial(context.WithoutCancel(r.Context()), target)
	if err != nil {
		p.dialFailed(w, r, target, upstream, err, start)
		return
	}
	client, brw, err := http.NewResponseController(w.ResponseWriter).Hijack()
	if err != nil {
		abort(up)
		answer(w, http.StatusInternalServerError, "cannot take over the connection: "+err.Error())
		return
	}
	w.code = http.StatusOK
	p.startTunnel(client, brw.Reader, up, target, upstream, start)
}

// startTunnel answers 200 on a hijacked CONNECT and relays client and up
// until both ends are done, on the relay's own goroutines.
func (p *HTTPProxy) startTunnel(client net.Conn, buffered *bufio.Reader, up net.Conn, target socksclient.Addr, upstream string, start time.Time) {
	if !p.enter(client, up) { // Close came during the dial: cut
		abort(up)
		abort(client)
		return
	}
	client.SetDeadline(time.Time{}) // the server's header deadline
	_, err := io.WriteString(client, "HTTP/1.1 200 Connection established\r\n\r\n")
	// What the client sent before it saw the 200 (a TLS ClientHello sent
	// at once) is in the server's read buffer: it goes first.
	var early int64
	if n := buffered.Buffered(); err == nil && n > 0 {
		b, _ := buffered.Peek(n)
		early, err = sendEarly(up, b, &p.stats.BytesUp)
	}
	if err != nil {
		abort(up)
		abort(client)
		p.cfg.Logger.Info().Str("listener", p.cfg.Name).Str("client", client.RemoteAddr().String()).Str("target", target.String()).
			Str("upstream", upstream).Err(err).Msg("session ended")
		p.leave(client, up)
		return
	}
	StartRelayCounting(client, up, time.Duration(p.idle.Load()), p.cfg.CopyMode, &p.stats.BytesUp, &p.stats.BytesDown, func(res RelayResult) {
		res.Up += early
		logSessionEnd(p.cfg.Logger, p.cfg.Name, p.cut.Load(), client.RemoteAddr().String(), target, upstream, res, start)
		p.leave(client, up)
	})
}

// forwardInfo is what one forwarded request learns on its way, for its
// log line: the context carries it through the ReverseProxy.
type forwardInfo struct {
	target   socksclient.Addr
	start    time.Time
	upstream atomic.Pointer[string]
	status   atomic.Int32 // the target's answer (101 too, which hijacks)
	failed   atomic.Bool  // forwardFailed answered and logged
	up       atomic.Int64 // request body bytes, and after a 101 what the client sent
	down     atomic.Int64 // after a 101, what the target sent
	conn     atomic.Pointer[viaConn]
	client   net.Conn              // the client's connection, for a stream after a 101
	streamed []net.Conn            // what a stream after a 101 registered for Close to cut
	bodyErr  atomic.Pointer[error] // why reading the request body from the client failed
	readErr  atomic.Pointer[error] // why reading the answer's body from the target failed
	// clientEnd says why whenClientEnds cancelled the forward.
	clientEnd atomic.Pointer[string]
}

type forwardInfoKey struct{}

// clientConnKey carries a request's client connection in its context.
type clientConnKey struct{}

func infoOf(r *http.Request) *forwardInfo {
	info, _ := r.Context().Value(forwardInfoKey{}).(*forwardInfo)
	return info
}

// forward serves an absolute-form request (GET http://host/path): over a
// kept-alive connection to the target, dialed through the upstreams.
func (p *HTTPProxy) forward(w *statusWriter, r *http.Request) {
	start := time.Now()
	if r.URL.Scheme != "http" {
		answer(w, http.StatusBadRequest, fmt.Sprintf("cannot forward %s:// URLs: send https through CONNECT (set HTTPS_PROXY)", r.URL.Scheme))
		return
	}
	target, err := requestTarget(r.URL.Host, "80")
	if err != nil {
		answer(w, http.StatusBadRequest, "bad target: "+err.Error())
		return
	}
	if looped(r.Header) {
		answer(w, http.StatusLoopDetected, "the request came back to this proxy (its Via holds "+viaToken+"): the target is the proxy itself")
		return
	}
	if hops, ok := maxForwards(r); ok && hops == 0 {
		answerAsRecipient(w, r)
		return
	}
	client, _ := r.Context().Value(clientConnKey{}).(net.Conn)
	info := &forwardInfo{target: target, start: start, client: client}
	// Not r's context: the server cancels that when the client
	// half-closes (it reads EOF), as nc -N, HTTP/1.0 clients and
	// `Connection: close` scripts do right behind their request, while
	// they still read the answer; the target may have carried out the
	// request already. Close still aborts the forward, and so does the
	// client's end (whenClientEnds).
	ctx, cancel := context.WithCancel(context.WithoutCancel(r.Context()))
	defer cancel()
	defer context.AfterFunc(p.ctx, cancel)()
	defer p.whenClientEnds(r.Context(), client, info, cancel)()
	r = r.WithContext(context.WithValue(ctx, forwardInfoKey{}, info))
	idle := p.forwardIdle()
	if r.Body != nil && r.Body != http.NoBody {
		// A client that stops sending its body is let go after idle, as
		// a quiet tunnel is; the server sets its own deadlines again for
		// the next request.
		rc := http.NewResponseController(w)
		r.Body = &countingBody{ReadCloser: r.Body, total: &p.stats.BytesUp, n: &info.up, failed: &info.bodyErr,
			progress: func(ended bool) {
				// Cleared at the body's end: the server's own read, which
				// watches for the client's hang-up, must not time out
				// while the response streams. After a failed read it
				// stays, so that the server gives up on the connection.
				deadline := time.Now().Add(idle)
				if ended {
					deadline = time.Time{}
				}
				rc.SetReadDeadline(deadline)
			}}
	}
	defer p.untrackStream(info)
	defer func() {
		// ReverseProxy ends a response it could not copy whole with
		// http.ErrAbortHandler, which the server recovers: the cause is
		// logged here on its way.
		v := recover()
		p.forwardEnded(w, r, info)
		if w.failed == SideUpstream {
			// What arrived goes out before the server closes the
			// connection (a small answer was still in its buffer), so
			// the client sees the truncation rather than no answer.
			http.NewResponseController(w.ResponseWriter).Flush()
		}
		if v != nil {
			panic(v)
		}
	}()
	p.forwarder.ServeHTTP(w, r)
}

// whenClientEnds cancels a forward once the server has read its client's
// end (rctx is the request's context): at once for a reset; for a FIN,
// which may be a half-close from a client that still reads its answer,
// only if the answer has not begun within halfCloseWait (a client that
// gave up on a slow target, a long poll, whose target connection and
// --max-sessions slot must not be held for the whole idle timeout). It
// returns what stops it.
func (p *HTTPProxy) whenClientEnds(rctx context.Context, client net.Conn, info *forwardInfo, cancel context.CancelFunc) (stop func()) {
	end := func(why string) {
		info.clientEnd.Store(&why)
		cancel()
	}
	var grace atomic.Pointer[time.Timer]
	stopWatch := context.AfterFunc(rctx, func() {
		if cc, ok := client.(*clientConn); ok && cc.reset.Load() {
			end("client reset")
			return
		}
		grace.Store(time.AfterFunc(p.halfCloseWait, func() {
			if info.status.Load() == 0 { // an answer under way goes on: a client gone fails its writes
				end(fmt.Sprintf("client closed, and no answer within %s of it", p.halfCloseWait))
			}
			if p.cfg.afterGrace != nil {
				p.cfg.afterGrace()
			}
		}))
	})
	return func() {
		stopWatch()
		if t := grace.Load(); t != nil {
			t.Stop() // one stored after this Load cancels a forward already ended
		}
	}
}

// forwardEnded writes a forwarded request's end line: debug, or info
// naming the side that failed and why when the client went away before
// its answer was written whole (counted 4xx, the client's doing, as
// nginx's 499) or the target ended its answer early, before its
// Content-Length or last chunk (counted 5xx, a failure on the target's
// side). forwardFailed wrote the line of a request that got no answer.
func (p *HTTPProxy) forwardEnded(w *statusWriter, r *http.Request, info *forwardInfo) {
	if info.failed.Load() {
		return
	}
	if s := int(info.status.Load()); s == http.StatusSwitchingProtocols {
		w.code = s // counted as 1xx: the stream bypassed w
	}
	ev := p.cfg.Logger.Debug()
	var re *RelayError
	if w.err != nil {
		re = &RelayError{Side: SideClient, Op: "write", Err: bareErr(w.err)}
	} else if err := info.readErr.Load(); err != nil {
		re = &RelayError{Side: SideUpstream, Op: "read", Err: bareErr(*err)}
	}
	// A read of the answer cut by whenClientEnds (a client's reset while
	// the answer came) is the client's doing, not the target's.
	why := info.clientEnd.Load()
	if re != nil && re.Side == SideUpstream && why != nil && errors.Is(re.Err, context.Canceled) {
		re = &RelayError{Side: SideClient, Op: "read", Err: errors.New(*why)}
	}
	switch {
	case re == nil:
	case p.ctx.Err() != nil:
		ev = ev.Err(re.Err).Str("cause", "cut at shutdown")
	default:
		w.failed = re.Side
		cause := re.Cause()
		if errors.Is(re.Err, io.ErrUnexpectedEOF) {
			cause = "target closed early (truncated response)"
		} else if why != nil && re.Side == SideClient {
			cause = *why
		}
		ev = p.cfg.Logger.Info().Err(re).Str("side", re.Side.String()).Str("cause", cause)
	}
	ev = ev.Str("listener", p.cfg.Name).Str("client", r.RemoteAddr).Str("target", info.target.String())
	if up := info.upstream.Load(); up != nil {
		ev = ev.Str("upstream", *up)
	}
	ev.Str("method", r.Method).Int("status", w.code).Int64("bytes_up", info.up.Load()).Int64("bytes_down", w.n+info.down.Load()).
		Dur("dur_ms", time.Since(info.start)).Msg("request ended")
}

// forwardingHeaders are end-to-end headers that ReverseProxy drops in
// Rewrite mode (it is built for reverse proxies): a forward proxy passes
// what the client sent, and adds nothing that would name the client.
var forwardingHeaders = []string{"Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto"}

// rewrite makes the outgoing request: the client's, minus hop-by-hop
// headers (ReverseProxy removed them, those named in Connection and
// Proxy-Authorization included), with a trace that learns which upstream
// carried it.
func (p *HTTPProxy) rewrite(pr *httputil.ProxyRequest) {
	// ReverseProxy drops the query's unparsable parts; a proxy passes the
	// target exactly as the client wrote it.
	pr.Out.URL.RawQuery = pr.In.URL.RawQuery
	for _, h := range forwardingHeaders {
		if v, ok := pr.In.Header[h]; ok && !namedInConnection(pr.In.Header, h) {
			pr.Out.Header[h] = v
		}
	}
	// Via, as RFC 9110 §7.6.3 asks of a proxy: with this process's own
	// token, which is how a request that comes back here is told. The
	// client's entries go on unless Connection named Via (a hop's own).
	var via []string
	if !namedInConnection(pr.In.Header, "Via") {
		via = slices.Clone(pr.In.Header["Via"])
	}
	pr.Out.Header["Via"] = append(via, viaToken)
	if hops, ok := maxForwards(pr.In); ok {
		pr.Out.Header.Set("Max-Forwards", strconv.FormatUint(hops-1, 10))
	}
	info := infoOf(pr.In)
	if info == nil {
		return
	}
	trace := &httptrace.ClientTrace{GotConn: func(ci httptrace.GotConnInfo) {
		if v, ok := ci.Conn.(*viaConn); ok {
			info.upstream.Store(&v.upstream)
			info.conn.Store(v)
		}
	}}
	pr.Out = pr.Out.WithContext(httptrace.WithClientTrace(pr.Out.Context(), trace))
}

// maxForwards reads the hops an OPTIONS or TRACE request may still make
// (RFC 9110 §7.6.2); other methods, and a value that is no number, have
// none to count, and go on unchanged.
func maxForwards(r *http.Request) (uint64, bool) {
	if r.Method != http.MethodOptions && r.Method != http.MethodTrace {
		return 0, false
	}
	v := r.Header.Values("Max-Forwards")
	if len(v) == 0 {
		return 0, false
	}
	hops, err := strconv.ParseUint(strings.TrimSpace(v[0]), 10, 63)
	return hops, err == nil
}

// sensitiveInTrace are the fields a TRACE answer leaves out (RFC 9110
// §9.3.8): credentials, which a page could otherwise read back.
var sensitiveInTrace = []string{"Authorization", "Proxy-Authorization", "Cookie"}

// answerAsRecipient answers an OPTIONS or TRACE whose Max-Forwards
// reached 0 here, as its final recipient: OPTIONS with what this proxy
// serves, TRACE with the request it received (message/http).
func answerAsRecipient(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodOptions {
		w.Header().Set("Allow", "CONNECT, DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT, TRACE")
		w.Header().Set("Content-Length", "0")
		w.WriteHeader(http.StatusOK)
		return
	}
	h := r.Header.Clone()
	for _, k := range sensitiveInTrace {
		h.Del(k)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s %s\r\nHost: %s\r\n", r.Method, r.RequestURI, r.Proto, r.Host)
	h.Write(&b)
	b.WriteString("\r\n")
	w.Header().Set("Content-Type", "message/http")
	w.Header().Set("Content-Length", strconv.Itoa(b.Len()))
	w.WriteHeader(http.StatusOK)
	io.WriteString(w, b.String())
}

// viaToken is the Via entry this process adds, unique to it.
var viaToken = func() string {
	var b [6]byte
	rand.Read(b[:])
	return "1.1 socksfwd-" + hex.EncodeToString(b[:])
}()

// looped reports whether a request already passed through this process:
// a chain of proxies brought it back, and forwarding it again would send
// it round the loop once more.
func looped(h http.Header) bool {
	for _, v := range h["Via"] {
		for e := range strings.SplitSeq(v, ",") {
			if strings.TrimSpace(e) == viaToken {
				return true
			}
		}
	}
	return false
}

// namedInConnection reports whether the Connection header lists name:
// such a header is hop-by-hop (RFC 9110 §7.6.1) whatever it is.
func namedInConnection(h http.Header, name string) bool {
	for _, v := range h["Connection"] {
		for t := range strings.SplitSeq(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), name) {
				return true
			}
		}
	}
	return false
}

// recordStatus notes the target's status for the request's log line. A
// status below 100 is no status: net/http would panic writing it.
func recordStatus(res *http.Response) error {
	if res.StatusCode < 100 {
		return fmt.Errorf("the target answered status %d", res.StatusCode)
	}
	if info := infoOf(res.Request); info != nil {
		info.status.Store(int32(res.StatusCode))
	}
	return nil
}

// modifyResponse notes the target's status and, when it switches
// protocols (101: a WebSocket, say), has the stream that follows counted,
// cut by Close and subject to the idle timeout as a CONNECT tunnel is:
// ReverseProxy copies it itself, through the body it is given here.
func (p *HTTPProxy) modifyResponse(res *http.Response) error {
	if err := recordStatus(res); err != nil {
		return err
	}
	// Via on the way back too (RFC 9110 §7.6.3: every forwarded message).
	res.Header["Via"] = append(res.Header["Via"], viaToken)
	info := infoOf(res.Request)
	if info == nil {
		return nil
	}
	if res.StatusCode != http.StatusSwitchingProtocols {
		res.Body = &targetBody{ReadCloser: res.Body, failed: &info.readErr}
		return nil
	}
	rwc, ok := res.Body.(io.ReadWriteCloser)
	if !ok {
		return nil
	}
	stream := &upgradedStream{ReadWriteCloser: rwc, target: info.conn.Load(), idle: time.Duration(p.idle.Load()),
		up: &p.stats.BytesUp, down: &p.stats.BytesDown, info: info}
	if info.client != nil {
		stream.conns = append(stream.conns, info.client)
	}
	if stream.target != nil {
		stream.conns = append(stream.conns, stream.target)
	}
	if !p.trackStream(stream.conns) {
		return errors.New("socksfwd is stopping")
	}
	info.streamed = stream.conns
	res.Body = stream
	return nil
}

// trackStream registers a stream's connections (the client's first) for
// Close to cut, as a tunnel's are; false once the proxy is closed.
func (p *HTTPProxy) trackStream(conns []net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	p.trackLocked(conns)
	return true
}

// untrackStream forgets what trackStream registered for a request, and
// nothing else: the target connection of a request without a 101 went back
// to the pool, and may be another request's stream by now.
func (p *HTTPProxy) untrackStream(info *forwardInfo) {
	if len(info.streamed) == 0 {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range info.streamed {
		delete(p.tunnels, c)
	}
}

// upgradedStream is the target's side of a stream after a 101: what it
// reads is the target's (down), what it writes the client's (up). With an
// idle timeout, each read or write moves both connections' deadlines on,
// so the stream ends once neither side has sent anything for that long.
type upgradedStream struct {
	io.ReadWriteCloser
	target   *viaConn   // nil if the trace did not see it
	conns    []net.Conn // the client's and the target's, as known
	idle     time.Duration
	up, down *atomic.Int64
	info     *forwardInfo
}

func (s *upgradedStream) touch() {
	if s.idle <= 0 {
		return
	}
	deadline := time.Now().Add(s.idle)
	for _, c := range s.conns {
		c.SetDeadline(deadline)
	}
}

// CloseWrite passes the client's half-close on to the target, as a
// tunnel does (a protocol that ends its input with a FIN, Docker's
// attach): without it ReverseProxy would close both ways at once and
// lose what the target still had to send.
func (s *upgradedStream) CloseWrite() error {
	if s.target != nil {
		if cw, ok := s.target.Conn.(closeWriter); ok {
			return cw.CloseWrite()
		}
	}
	return s.ReadWriteCloser.Close()
}

func (s *upgradedStream) Read(b []byte) (int, error) {
	s.touch()
	n, err := s.ReadWriteCloser.Read(b)
	s.down.Add(int64(n))
	s.info.down.Add(int64(n))
	return n, err
}

func (s *upgradedStream) Write(b []byte) (int, error) {
	s.touch()
	n, err := s.ReadWriteCloser.Write(b)
	s.up.Add(int64(n))
	s.info.up.Add(int64(n))
	return n, err
}

// forwardFailed answers a forwarded request that got no response.
func (p *HTTPProxy) forwardFailed(w http.ResponseWriter, r *http.Request, err error) {
	info := infoOf(r)
	if info == nil {
		answer(w, http.StatusBadGateway, err.Error())
		return
	}
	info.failed.Store(true)
	if why := info.clientEnd.Load(); why != nil && errors.Is(err, context.Canceled) && p.ctx.Err() == nil {
		// The client's end cut it: the client's doing, counted 4xx.
		if sw, ok := w.(*statusWriter); ok {
			sw.failed = SideClient
		}
		p.cfg.Logger.Info().Str("listener", p.cfg.Name).Str("client", r.RemoteAddr).Str("target", info.target.String()).
			Str("method", r.Method).Str("side", SideClient.String()).Str("cause", *why).Dur("dur_ms", time.Since(info.start)).
			Msg("request ended")
		answer(w, http.StatusGatewayTimeout, fmt.Sprintf("%s: %s", info.target, *why))
		return
	}
	var de *dialError
	if errors.As(err, &de) {
		p.dialFailed(w, r, info.target, de.upstream, de.err, info.start)
		return
	}
	code := dialStatus(err) // 504 for a target that took too long to answer
	if be := info.bodyErr.Load(); be != nil {
		// The client stopped sending its body (or broke off): that, not
		// the cancel it caused, is the cause.
		err, code = fmt.Errorf("reading the request body from the client: %w", *be), http.StatusBadRequest
		if dialStatus(*be) == http.StatusGatewayTimeout {
			code = http.StatusRequestTimeout
		}
	}
	if errors.Is(err, context.Canceled) && p.ctx.Err() != nil {
		// Close cut it: nobody reads the answer.
		p.cfg.Logger.Debug().Str("listener", p.cfg.Name).Str("client", r.RemoteAddr).Str("target", info.target.String()).
			Err(err).Str("cause", "cut at shutdown").Msg("request ended")
	} else {
		ev := p.cfg.Logger.Info().Str("listener", p.cfg.Name).Str("client", r.RemoteAddr).Str("target", info.target.String())
		if up := info.upstream.Load(); up != nil {
			ev = ev.Str("upstream", *up)
		}
		ev.Str("method", r.Method).Int("status", code).Err(err).Msg("request failed")
	}
	answer(w, code, fmt.Sprintf("%s: %v", info.target, err))
}

// dialForward is the Transport's dialer: every connection to a target
// goes through dial, and says which way it went.
func (p *HTTPProxy) dialForward(ctx context.Context, _, address string) (*viaConn, error) {
	target, err := socksclient.ParseAddr(address)
	if err != nil {
		return nil, err
	}
	c, upstream, err := p.dial(ctx, target)
	if err != nil {
		return nil, &dialError{upstream: upstream, err: err}
	}
	return &viaConn{Conn: c, upstream: upstream}, nil
}

// dialError is a failed dial of a forwarded request, with the upstream
// that answered for the target.
type dialError struct {
	upstream string
	err      error
}

func (e *dialError) Error() string { return e.err.Error() }
func (e *dialError) Unwrap() error { return e.err }

// viaConn is a connection to a target, with the way it went, counted in
// its Transport's live connections until it is closed.
type viaConn struct {
	net.Conn
	upstream string
	live     *atomic.Int64
	once     sync.Once
}

func (c *viaConn) Close() error {
	c.once.Do(func() {
		if c.live != nil {
			c.live.Add(-1)
		}
	})
	return c.Conn.Close()
}

// statusWriter notes the status and counts the body bytes of a response,
// and the first error writing or flushing it to the client. Unwrap lets
// http.ResponseController reach Hijack beneath it.
type statusWriter struct {
	http.ResponseWriter
	code  int
	n     int64
	bytes *atomic.Int64
	err   error
	// failed names the side that cut a response short: its class in
	// the counters is then 4xx (the client's doing) or 5xx (the target's).
	failed Side
}

func (w *statusWriter) WriteHeader(code int) {
	if w.code == 0 && code >= 200 {
		w.code = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.code == 0 {
		w.code = http.StatusOK
	}
	n, err := w.ResponseWriter.Write(b)
	w.n += int64(n)
	w.bytes.Add(int64(n))
	if err != nil && w.err == nil {
		w.err = err
	}
	return n, err
}

// FlushError is what http.ResponseController (ReverseProxy's flushes)
// calls: a client gone may show first there.
func (w *statusWriter) FlushError() error {
	err := http.NewResponseController(w.ResponseWriter).Flush()
	if err != nil && w.err == nil {
		w.err = err
	}
	return err
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// class is the status class for the counters, 1 to 5; a handler that
// wrote nothing answered 200.
func (w *statusWriter) class() int {
	switch {
	case w.failed == SideClient:
		return 4
	case w.failed == SideUpstream:
		return 5
	case w.code == 0:
		return 2
	case w.code >= 100 && w.code < 600:
		return w.code / 100
	}
	return 0
}

// countingBody counts a request body's bytes as the target reads them.
type countingBody struct {
	io.ReadCloser
	total, n *atomic.Int64
	progress func(ended bool) // before each read (false) and at the body's end (true)
	failed   *atomic.Pointer[error]
}

func (b *countingBody) Read(p []byte) (int, error) {
	if b.progress != nil {
		b.progress(false)
	}
	n, err := b.ReadCloser.Read(p)
	if err == io.EOF && b.progress != nil {
		b.progress(true)
	}
	if err != nil && err != io.EOF && b.failed != nil {
		b.failed.CompareAndSwap(nil, &err)
	}
	b.total.Add(int64(n))
	b.n.Add(int64(n))
	return n, err
}

// targetBody is a target's answer body; it keeps the first error reading
// it (io.ErrUnexpectedEOF: the target closed before its Content-Length
// or last chunk), which ReverseProxy only turns into an aborted answer.
type targetBody struct {
	io.ReadCloser
	failed *atomic.Pointer[error]
}

func (b *targetBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err != nil && err != io.EOF {
		b.failed.CompareAndSwap(nil, &err)
	}
	return n, err
}

// serverLog takes what net/http's server logs (a panic it recovered, a
// malformed exchange) as debug lines.
type serverLog struct{ p *HTTPProxy }

func (l serverLog) Write(b []byte) (int, error) {
	l.p.cfg.Logger.Debug().Str("listener", l.p.cfg.Name).Msg(strings.TrimSpace(string(b)))
	return len(b), nil
}
