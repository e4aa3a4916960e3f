package socksclient

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"time"
)

// DefaultHandshakeTimeout bounds connecting to the proxy plus the SOCKS
// handshake when Dialer.HandshakeTimeout is zero.
const DefaultHandshakeTimeout = 10 * time.Second

// aLongTimeAgo is a deadline in the past: setting it interrupts a blocked
// read or write and leaves the conn usable (the trick x/net's SOCKS dialer
// uses).
var aLongTimeAgo = time.Unix(1, 0)

var defaultProxyDialer = &net.Dialer{KeepAlive: -1}

// ControlKeepAlive is the keep-alive of a control connection that carries
// nothing for long stretches (BIND waiting for its peer, which may take
// hours; UDP ASSOCIATE, for as long as the association lives). Without
// probes, a proxy that vanished, or a NAT or firewall that dropped the
// connection silently, would leave it waiting on a dead socket for good;
// with them it ends within about a minute of silence. CONNECT's carry
// the session and get none, as ssh -L's do not (a BIND's keeps them once
// its peer came: harmless).
var ControlKeepAlive = net.KeepAliveConfig{Enable: true, Idle: 30 * time.Second, Interval: 10 * time.Second, Count: 3}

// KeepControlAlive turns ControlKeepAlive on for conn, when it is a TCP
// connection (ProxyDial may return another kind). The -D door uses it for
// its clients' control connections too.
func KeepControlAlive(conn net.Conn) {
	if tc, ok := conn.(*net.TCPConn); ok {
		tc.SetKeepAliveConfig(ControlKeepAlive)
	}
}

// Dialer opens SOCKS5 sessions through one proxy. The zero value of each
// optional field is a sensible default. A Dialer is safe for concurrent use.
type Dialer struct {
	// ProxyAddr is the proxy's host:port.
	ProxyAddr string
	// Username and Password enable RFC 1929 authentication when Username is
	// set. They never appear in errors.
	Username string
	Password string
	// HandshakeTimeout bounds dialing the proxy and the handshake
	// (default DefaultHandshakeTimeout).
	HandshakeTimeout time.Duration
	// ResolveLocally makes DialContext resolve target names here and send
	// IP addresses (curl's socks5://). By default names go to the proxy
	// (ATYP 3, socks5h://), so nothing leaks to the local resolver.
	ResolveLocally bool
	// Resolver looks up names here: with ResolveLocally, and a UDP relay
	// named in a reply (default net.DefaultResolver, or one whose sockets
	// get LookupControl). The proxy's own name is looked up by the
	// default resolver, or through LookupControl.
	Resolver *net.Resolver
	// ProxyDial connects to the proxy (default a net.Dialer without TCP
	// keep-alive probes: like ssh -L, sessions are not probed, which also
	// saves four setsockopt calls per connection). A caller who sets it
	// applies its own control (a socket mark, say) to the TCP connection:
	// Control is not used for it then, nor does Upstreams.IsProxyAddr
	// learn where it went.
	ProxyDial func(ctx context.Context, network, addr string) (net.Conn, error)
	// Control, if not nil, is applied to every socket the dialer opens: the
	// TCP connection to the proxy when ProxyDial is nil, and the UDP socket
	// of an association. It runs before the socket connects, as
	// net.Dialer.Control does; an error fails the dial. It is how a
	// transparent proxy marks its upstream traffic (SO_MARK) so that the
	// rules capturing traffic into it let that traffic pass.
	Control func(network, address string, c syscall.RawConn) error
	// LookupControl, if not nil, has names looked up by Go's own resolver
	// through sockets it is applied to, the system's (NSS, split DNS)
	// being unable to apply it: a transparent proxy's mark keeps its own
	// capture rules off its lookups, which would otherwise be sent to its
	// own DNS listener, itself waiting on this proxy.
	LookupControl func(network, address string, c syscall.RawConn) error

	// dialed is where the last connections to the proxy went; made on
	// first need, guarded by dialedMu.
	dialed *dialedAddrs
}

// dialedKeep is how many addresses of its proxy a Dialer remembers: a
// name with more, dialed in turn, is matched on the most recent ones.
const dialedKeep = 8

// dialedMu guards every Dialer's dialed record: a lock inside Dialer
// would make it a value that cannot be copied, and tables of Dialers are.
var dialedMu sync.Mutex

// dialedAddrs is a small ring of the addresses connections to the proxy
// went to, its name resolved; Upstreams.IsProxyAddr asks it.
type dialedAddrs struct {
	ring [dialedKeep]netip.AddrPort
	next int
}

// noteDialed records ap, unless held already (redials to one address
// change nothing), over the oldest.
func (d *Dialer) noteDialed(ap netip.AddrPort) {
	dialedMu.Lock()
	defer dialedMu.Unlock()
	if d.dialed == nil {
		d.dialed = new(dialedAddrs)
	}
	a := d.dialed
	for _, x := range a.ring {
		if x == ap {
			return
		}
	}
	a.ring[a.next] = ap
	a.next = (a.next + 1) % len(a.ring)
}

// inheritDialed shares from's record with d, which reaches the same proxy
// (a reload kept it): a connection from before the reload, still being
// made, is still known for the proxy's.
func (d *Dialer) inheritDialed(from *Dialer) {
	if d == from {
		return
	}
	dialedMu.Lock()
	defer dialedMu.Unlock()
	if from.dialed == nil {
		from.dialed = new(dialedAddrs)
	}
	d.dialed = from.dialed
}

// wasDialed reports whether ap is among the addresses noteDialed holds.
func (d *Dialer) wasDialed(ap netip.AddrPort) bool {
	dialedMu.Lock()
	defer dialedMu.Unlock()
	if d.dialed == nil {
		return false
	}
	for _, x := range d.dialed.ring {
		if x == ap {
			return true
		}
	}
	return false
}

// Conn is a CONNECT session (or an accepted BIND): a net.Conn to the target,
// carried over the proxy connection.
type Conn struct {
	net.Conn
	bound Addr
}

// BoundAddr is BND.ADDR/PORT of the server's reply: for CONNECT the address
// the server connected from, for BIND the peer that connected.
func (c *Conn) BoundAddr() Addr { return c.bound }

// NetConn returns the connection to the proxy, which after the handshake
// carries the target's bytes unchanged; relays use it to reach the
// *net.TCPConn fast paths.
func (c *Conn) NetConn() net.Conn { return c.Conn }

// CloseWrite half-closes the session: the target sees EOF.
func (c *Conn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return errors.New("socks: underlying connection cannot half-close")
}

// DialContext connects to address ("host:port") through the proxy with
// CONNECT. Errors are *net.OpError with Op "socks connect" naming proxy and
// target; errors.As finds *ReplyError, *ProtocolError and the Err values.
func (d *Dialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	switch network {
	case "tcp", "tcp4", "tcp6":
	default:
		return nil, d.opError(CmdConnect, network, nil, fmt.Errorf("network %q is not supported", network))
	}
	target, err := ParseAddr(address)
	if err != nil {
		return nil, d.opError(CmdConnect, network, nil, err)
	}
	c, err := d.DialAddr(ctx, target)
	if err != nil {
		return nil, err // not a typed nil in the interface
	}
	return c, nil
}

// DialAddr is DialContext for an already parsed target.
func (d *Dialer) DialAddr(ctx context.Context, target Addr) (*Conn, error) {
	conn, reply, err := d.request(ctx, CmdConnect, target)
	if err != nil {
		return nil, d.opError(CmdConnect, "tcp", target, err)
	}
	return &Conn{Conn: conn, bound: reply.Addr}, nil
}

// Binding is a BIND session between its two replies: the server listens at
// Addr for one incoming connection.
type Binding struct {
	d      *Dialer
	conn   net.Conn
	addr   Addr
	target Addr
}

// Bind asks the proxy to listen for one connection from expected (the peer
// the application expects; 0.0.0.0:0 when unknown). It returns after the
// first reply; the zero Addr means 0.0.0.0:0. BND.ADDR 0.0.0.0 or :: is replaced by the proxy's address.
func (d *Dialer) Bind(ctx context.Context, expected Addr) (*Binding, error) {
	if expected.Name == "" && !expected.IP.IsValid() {
		expected.IP = netip.IPv4Unspecified()
	}
	conn, reply, err := d.request(ctx, CmdBind, expected)
	if err != nil {
		return nil, d.opError(CmdBind, "tcp", expected, err)
	}
	KeepControlAlive(conn)
	return &Binding{d: d, conn: conn, addr: substituteUnspecified(reply.Addr, conn), target: expected}, nil
}

// Addr is where the remote peer must connect.
func (b *Binding) Addr() Addr { return b.addr }

// Accept waits for the second reply, sent when the peer has connected, and
// returns the session with that peer. A Binding accepts once.
func (b *Binding) Accept(ctx context.Context) (*Conn, error) {
	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		b.conn.SetReadDeadline(aLongTimeAgo)
		close(fired)
	})
	reply, err := ReadReply(b.conn)
	if !stop() {
		<-fired // its deadline is set: clearing it below must come after
		if err != nil {
			b.conn.Close()
			return nil, b.d.opError(CmdBind, "tcp", b.target, ctx.Err())
		}
		// The reply came as ctx ended: its caller has connected, and is
		// served rather than cut.
		b.conn.SetReadDeadline(time.Time{})
	}
	if err == nil && reply.Code != RepSucceeded {
		err = &ReplyError{Cmd: CmdBind, Code: reply.Code}
	}
	if err == nil && !b.allows(reply.Addr) {
		err = fmt.Errorf("%w: %s", ErrUnexpectedPeer, reply.Addr)
	}
	if err != nil {
		b.conn.Close()
		if err == io.EOF {
			err = errors.New("server closed the connection before a peer connected")
		}
		return nil, b.d.opError(CmdBind, "tcp", b.target, err)
	}
	return &Conn{Conn: b.conn, bound: reply.Addr}, nil
}

// allows reports whether peer may be the BIND's caller: any peer when the
// request named none (0.0.0.0) or a name, else one from that address (any
// port, as RFC 1928 leaves the port to the server's judgement).
func (b *Binding) allows(peer Addr) bool {
	want := b.target.IP.Unmap()
	if b.target.Name != "" || !want.IsValid() || want.IsUnspecified() || peer.Name != "" {
		return true
	}
	return peer.IP.Unmap() == want
}

// Close abandons the binding.
func (b *Binding) Close() error { return b.conn.Close() }

// NetConn returns the control connection to the proxy, for socket options
// (keep-alive probes during a long wait for the peer). Reading or writing
// it breaks the session.
func (b *Binding) NetConn() net.Conn { return b.conn }

// handshakeProgress is how far a request got through the proxy's own part
// of the handshake. Upstreams judges a proxy on that part only: once the
// proxy has answered, the wait for the reply is the wait for the target
// (connecting to it, or whatever BIND and UDP ASSOCIATE wait on), and a
// slow or black-holed target says nothing about the proxy.
type handshakeProgress struct {
	proxyAt time.Time // when connecting to the proxy began; zero if it never did (local resolution failed)
	greeted bool      // the proxy answered the method selection and, if used, authentication
	// selected: the proxy answered the method selection (its timeout,
	// until greeted, is the authentication's).
	selected bool
}

// progressKey carries a *handshakeProgress in a request's context, as
// net/http/httptrace carries its hooks: every command (DialAddr, Bind,
// Associate) reports through it without a second set of entry points, and
// a dial without one pays a context lookup, no allocation.
type progressKey struct{}

// withProgress returns ctx with p to be filled in by requests under it.
// Only the goroutine running the request writes p; read it after the
// request has returned.
func withProgress(ctx context.Context, p *handshakeProgress) context.Context {
	return context.WithValue(ctx, progressKey{}, p)
}

// request connects to the proxy, negotiates, sends one request and reads
// its reply. On success the conn is positioned at the first payload byte.
func (d *Dialer) request(ctx context.Context, cmd Command, target Addr) (net.Conn, Reply, error) {
	progress, _ := ctx.Value(progressKey{}).(*handshakeProgress)
	if progress == nil {
		progress = new(handshakeProgress) // for the timeout's message
	}
	timeout := d.handshakeTimeout()
	hctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	asked := target // for ErrNoReply: a name, not the address it resolved to
	if d.ResolveLocally && target.Name != "" && cmd == CmdConnect {
		resolved, err := d.resolve(hctx, target)
		if err != nil {
			return nil, Reply{}, err
		}
		target = resolved
	}

	if progress != nil {
		progress.proxyAt = time.Now()
	}
	conn, err := d.dialProxy(hctx)
	if err != nil {
		return nil, Reply{}, timeoutCause(ctx, hctx, timeout, err, stageConnect)
	}

	stop := context.AfterFunc(hctx, func() { conn.SetDeadline(aLongTimeAgo) })
	reply, err := d.handshake(conn, cmd, target, progress)
	if nr := (*noReplyError)(nil); errors.As(err, &nr) {
		nr.target = asked
	}
	if !stop() {
		conn.Close()
		stage := stageGreeting
		switch {
		case progress.greeted && cmd == CmdConnect:
			stage = stageRequest
		case progress.greeted:
			stage = stageCommand // BIND's first reply, UDP ASSOCIATE's: no target yet
		case progress.selected:
			stage = stageAuth
		}
		return nil, Reply{}, timeoutCause(ctx, hctx, timeout, hctx.Err(), stage)
	}
	if err != nil {
		conn.Close()
		return nil, Reply{}, err
	}
	return conn, reply, nil
}

// handshakeTimeout is HandshakeTimeout or its default.
func (d *Dialer) handshakeTimeout() time.Duration {
	if d.HandshakeTimeout > 0 {
		return d.HandshakeTimeout
	}
	return DefaultHandshakeTimeout
}

// dialProxy opens the TCP connection to the proxy: through ProxyDial when
// set, else through the default dialer with controlProxy on the socket.
func (d *Dialer) dialProxy(ctx context.Context) (net.Conn, error) {
	if d.ProxyDial != nil {
		return d.ProxyDial(ctx, "tcp", d.ProxyAddr)
	}
	nd := *defaultProxyDialer
	nd.Control = d.controlProxy
	nd.Resolver = d.markedResolver()
	return nd.DialContext(ctx, "tcp", d.ProxyAddr)
}

// markedResolver is nil (the default resolver) without LookupControl,
// else ResolverVia it. Its sockets' addresses are a resolver's, not the
// proxy's: not noted.
func (d *Dialer) markedResolver() *net.Resolver {
	if d.LookupControl == nil {
		return nil
	}
	return ResolverVia(d.LookupControl)
}

// ResolverVia is Go's own resolver, whose sockets get control before they
// connect (a socket mark, say; see Dialer.LookupControl).
func ResolverVia(control func(network, address string, c syscall.RawConn) error) *net.Resolver {
	return &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, address string) (net.Conn, error) {
		rd := net.Dialer{Control: control}
		return rd.DialContext(ctx, network, address)
	}}
}

// controlProxy runs on each socket about to connect to the proxy: Control,
// then the address is noted. It runs before connect, so a transparent
// listener whose capture rules take this very connection knows it for
// the proxy's (see Upstreams.IsProxyAddr) by the time it accepts it.
func (d *Dialer) controlProxy(network, address string, c syscall.RawConn) error {
	if d.Control != nil {
		if err := d.Control(network, address, c); err != nil {
			return err
		}
	}
	if ap, err := netip.ParseAddrPort(address); err == nil {
		d.noteDialed(netip.AddrPortFrom(ap.Addr().Unmap().WithZone(""), ap.Port()))
	}
	return nil
}

// handshakeBuf is a handshake's scratch space: the greeting, credentials
// and request go out of it and the answers come into it. Frames pass
// through net.Conn's methods, so an array on the stack would escape to
// the heap on every dial; these are pooled instead.
type handshakeBuf [8 + 2*256 + maxAddrFrame]byte

var handshakeBufs = sync.Pool{New: func() any { return new(handshakeBuf) }}

// handshake runs method negotiation, authentication and the request,
// marking progress (if not nil) greeted once the proxy's part is done.
func (d *Dialer) handshake(conn net.Conn, cmd Command, target Addr, progress *handshakeProgress) (Reply, error) {
	hb := handshakeBufs.Get().(*handshakeBuf)
	defer func() {
		clear(hb[:]) // it held the password, if one was sent
		handshakeBufs.Put(hb)
	}()
	buf := hb[:]
	_, selected, err := d.greet(conn, buf[:0])
	if progress != nil {
		progress.selected = selected
	}
	if err != nil {
		return Reply{}, err
	}
	if progress != nil {
		progress.greeted = true
	}

	b, err := Request{Cmd: cmd, Addr: target}.AppendTo(buf[:0])
	if err != nil {
		return Reply{}, err
	}
	if _, err := conn.Write(b); err != nil {
		return Reply{}, err
	}
	reply, err := readReplyOrRefusal(conn, (*[maxAddrFrame]byte)(buf))
	if err == io.EOF {
		if cmd == CmdConnect {
			return Reply{}, &noReplyError{target: target}
		}
		return Reply{}, unsupportedError{cmd}
	}
	if err != nil {
		return Reply{}, closedEarly(err, "reply")
	}
	if reply.Code != RepSucceeded {
		return Reply{}, &ReplyError{Cmd: cmd, Code: reply.Code}
	}
	return reply, nil
}

// Methods offered in the greeting: with credentials both, since OpenSSH
// closes silently unless 0x00 is offered.
var (
	offerNoAuth = []AuthMethod{MethodNoAuth}
	offerBoth   = []AuthMethod{MethodNoAuth, MethodUserPass}
)

// offered is what the greeting offers.
func (d *Dialer) offered() []AuthMethod {
	if d.Username != "" {
		return offerBoth
	}
	return offerNoAuth
}

// greet sends the greeting, reads the method the proxy chose and, for
// username/password, authenticates. answered says whether the proxy chose
// a method (chosen is then its choice, even when authentication failed).
// buf is scratch space.
func (d *Dialer) greet(conn net.Conn, buf []byte) (chosen AuthMethod, answered bool, err error) {
	b, err := Greeting{Methods: d.offered()}.AppendTo(buf[:0])
	if err != nil {
		return 0, false, err
	}
	if _, err := conn.Write(b); err != nil {
		return 0, false, err
	}
	sel, err := readMethodSelection(conn, buf[:2])
	if err != nil {
		return 0, false, closedEarly(err, "method selection")
	}
	switch sel.Method {
	case MethodNoAuth:
	case MethodUserPass:
		if d.Username == "" {
			return sel.Method, true, ErrCredentialsRequired
		}
		b, err := UserPassRequest{Username: d.Username, Password: d.Password}.AppendTo(buf[:0])
		if err != nil {
			return sel.Method, true, err
		}
		if _, err := conn.Write(b); err != nil {
			return sel.Method, true, err
		}
		raw := buf[:2]
		st, err := readUserPassStatus(conn, raw)
		if pe := (*ProtocolError)(nil); errors.As(err, &pe) && !pe.Truncated() && raw[0] == Version {
			// A status with VER 5 instead of 1 (some servers; curl reads
			// only the status byte): the status decides.
			st, err = UserPassStatus{Status: raw[1]}, nil
		}
		if err != nil {
			if err == io.EOF {
				// Some servers close instead of sending a failure status.
				return sel.Method, true, ErrAuthFailed
			}
			return sel.Method, true, closedEarly(err, "username/password status")
		}
		if !st.Success() {
			return sel.Method, true, ErrAuthFailed
		}
	case MethodNoAcceptable:
		return sel.Method, true, ErrNoAcceptableMethods
	default:
		return sel.Method, true, protoErr("method selection", fmt.Sprintf("server chose %s, which was not offered", sel.Method))
	}
	return sel.Method, true, nil
}

func (d *Dialer) resolve(ctx context.Context, target Addr) (Addr, error) {
	ips, err := d.lookup(ctx, target.Name)
	if err != nil {
		return Addr{}, fmt.Errorf("resolving %s locally failed (socks5:// resolves names here; use socks5h:// to let the proxy resolve them): %w", target.Name, err)
	}
	ip := ips[0]
	for _, cand := range ips {
		if cand.Unmap().Is4() { // prefer IPv4, the family every proxy can reach
			ip = cand
			break
		}
	}
	return Addr{IP: ip.Unmap(), Port: target.Port}, nil
}

// lookup resolves name through Resolver (if nil, through sockets with
// Control, or net.DefaultResolver); no address at all is an error too.
func (d *Dialer) lookup(ctx context.Context, name string) ([]netip.Addr, error) {
	r := d.Resolver
	if r == nil {
		r = d.markedResolver()
	}
	if r == nil {
		r = net.DefaultResolver
	}
	ips, err := r.LookupNetIP(ctx, "ip", name)
	if err == nil && len(ips) == 0 {
		err = errors.New("no addresses")
	}
	return ips, err
}

// opError puts the dial boundary's names around err.
func (d *Dialer) opError(cmd Command, network string, target net.Addr, err error) error {
	op := &net.OpError{Op: "socks " + cmd.String(), Net: network, Source: proxyAddr(d.ProxyAddr), Err: err}
	if target != nil {
		op.Addr = target
	}
	return op
}

// proxyAddr names the proxy in a *net.OpError.
type proxyAddr string

func (p proxyAddr) Network() string { return "tcp" }
func (p proxyAddr) String() string  { return string(p) }

// closedEarly names the frame a server hung up before sending.
func closedEarly(err error, frame string) error {
	if err == io.EOF || err == io.ErrUnexpectedEOF {
		return fmt.Errorf("server closed the connection during the %s: %w", frame, io.ErrUnexpectedEOF)
	}
	return err
}

// What a handshake timed out waiting for, in its error.
const (
	stageConnect  = "no TCP connection to the proxy"
	stageGreeting = "connected, but no answer to the SOCKS5 greeting: is it a SOCKS5 server? an HTTP proxy waits in silence for more"
	stageAuth     = "no answer to the authentication"
	stageRequest  = "no reply to the request: the proxy may be waiting on its target"
	stageCommand  = "no reply to the request"
)

// timeoutCause turns the handshake context's expiry into words: which limit
// hit, or the caller's cancellation.
func timeoutCause(parent, hctx context.Context, timeout time.Duration, err error, stage string) error {
	if perr := parent.Err(); perr != nil || expired(parent, err) {
		if perr == nil || errors.Is(perr, context.DeadlineExceeded) {
			return &DeadlineError{AtProxy: stage != stageRequest, stage: stage}
		}
		return perr
	}
	if hctx.Err() != nil || expired(hctx, err) {
		return fmt.Errorf("handshake timed out after %s (%s): %w", timeout, stage, context.DeadlineExceeded)
	}
	return err
}

// expired: err is a timeout and ctx's deadline has passed, though its
// Done may not be closed yet: a connect bounded by the same deadline
// fails with "i/o timeout" a moment before the context's own timer fires.
func expired(ctx context.Context, err error) bool {
	var ne net.Error
	d, ok := ctx.Deadline()
	return ok && !time.Now().Before(d) && errors.As(err, &ne) && ne.Timeout()
}

// substituteUnspecified applies RFC 1928's convention that BND.ADDR 0.0.0.0
// or :: means "the address you reached me at".
func substituteUnspecified(a Addr, conn net.Conn) Addr {
	if a.Name != "" || !a.IP.IsUnspecified() {
		return a
	}
	if ap, err := netip.ParseAddrPort(conn.RemoteAddr().String()); err == nil {
		a.IP = ap.Addr().Unmap()
	}
	return a
}
