package tunnel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/socksfwd/socksfwd/internal/logthrottle"
	"github.com/socksfwd/socksfwd/socksclient"
)

// SOCKSDoorConfig describes one -D listener: a SOCKS5 server for local
// programs whose every request is chained to the upstreams.
type SOCKSDoorConfig struct {
	// Forward holds what the door shares with -L: name, upstreams, idle
	// timeout, copy mode and admission (MaxSessions, Allow). Target and
	// TargetOf are unused: each request names its own target. A UDP
	// association counts as one session and lives as long as its control
	// connection, as RFC 1928 says.
	Forward TCPForwardConfig
	// Credentials, when set, are what clients must send by RFC 1929;
	// SetCredentials changes them for new connections.
	Credentials *ProxyCredentials
	// HandshakeTimeout bounds a client's greeting, authentication and
	// request (default DefaultDoorHandshakeTimeout).
	HandshakeTimeout time.Duration
}

// DefaultDoorHandshakeTimeout is how long a -D client may take to greet,
// authenticate and send its request.
const DefaultDoorHandshakeTimeout = 10 * time.Second

// SOCKSDoorStats counts what only a SOCKS door sees; sessions, failures
// and TCP bytes are in the TCPStats of its TCPForward.
type SOCKSDoorStats struct {
	// Requests by command: index 1 CONNECT, 2 BIND, 3 UDP ASSOCIATE, 0
	// any other (answered REP 7).
	Requests [4]atomic.Int64
	// UDP ASSOCIATE requests refused REP 2: the source their DST.ADDR
	// names is not in --allow.
	SourceNotAllowed atomic.Int64
	// Handshakes that ended without a request, by cause (SOCKS4: a
	// SOCKS4 or 4a client, answered SOCKS4's rejection).
	Malformed, SOCKS4, WrongCredentials, NoCommonMethod, HandshakeTimeout, ClientGone atomic.Int64
	// UDP ASSOCIATE: datagrams and payload-and-header bytes each way.
	DatagramsUp, DatagramsDown, UDPBytesUp, UDPBytesDown atomic.Int64
	// Datagrams dropped: from another source than the client, with FRAG
	// != 0, with a malformed header, or refused by the upstream's relay.
	DroppedStranger, DroppedFragment, DroppedMalformed, DroppedSendFailed atomic.Int64
	// RelayRefused counts ICMP errors about datagrams sent to the
	// upstream's relay (its port unreachable, a firewall's "prohibited"
	// on the way; socksclient.IsICMPError): each says a datagram was not
	// taken, and the association goes on.
	RelayRefused atomic.Int64
	// Upstream totals what the upstream associations dropped.
	Upstream socksclient.UDPStats
}

// SOCKSDoor is a -D listener. It is a TCPForward (accepting, admission,
// drain and the CONNECT relay are the same) whose sessions begin with the
// server side of the SOCKS5 handshake.
type SOCKSDoor struct {
	*TCPForward
	cfg   SOCKSDoorConfig
	creds atomic.Pointer[ProxyCredentials]
	stats SOCKSDoorStats
}

// NewSOCKSDoor returns a door that will serve on listeners, which the
// caller has bound.
func NewSOCKSDoor(cfg SOCKSDoorConfig, listeners ...net.Listener) *SOCKSDoor {
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = DefaultDoorHandshakeTimeout
	}
	d := &SOCKSDoor{cfg: cfg}
	d.creds.Store(cfg.Credentials)
	cfg.Forward.TargetOf = nil
	d.TCPForward = NewTCPForward(cfg.Forward, listeners...)
	d.TCPForward.door = d
	return d
}

// SetCredentials sets what clients connecting from now on must send (nil:
// no authentication).
func (d *SOCKSDoor) SetCredentials(c *ProxyCredentials) { d.creds.Store(c) }

// DoorStats returns the door's own counters.
func (d *SOCKSDoor) DoorStats() *SOCKSDoorStats { return &d.stats }

// serve runs one client's session on the forward's session goroutine.
func (d *SOCKSDoor) serve(client net.Conn) {
	f := d.TCPForward
	start := time.Now()
	cfg := socksclient.ServerConfig{HandshakeTimeout: d.cfg.HandshakeTimeout}
	if creds := d.creds.Load(); creds != nil {
		cfg.Authenticate = creds.Match
	}
	req, err := socksclient.ServeConn(client, cfg, &doorSession{d: d, idle: time.Duration(f.idle.Load()), start: start})
	switch {
	case errors.Is(err, socksclient.ErrUnknownCommand):
		d.stats.Requests[0].Add(1)
		if ok, suppressed := f.refusals.Allow("command not supported"); ok {
			f.sessionEvent(f.cfg.Logger.Info(), client, req.Addr).Str("cmd", req.Cmd.String()).
				Func(logthrottle.Repeats("refused_since_last_line", suppressed)).Msg("request refused: command not supported")
		}
		client.Close()
		f.endSession(client, nil)
	case err != nil:
		d.handshakeFailed(client, err)
		client.Close() // not a reset: the refusal just written must arrive
		f.endSession(client, nil)
	}
}

// doorSession is the Handler a client's request goes to: each command is
// counted, then chained through the upstreams.
type doorSession struct {
	d     *SOCKSDoor
	idle  time.Duration
	start time.Time
}

func (s *doorSession) Connect(req *socksclient.ServerRequest) {
	s.d.stats.Requests[socksclient.CmdConnect].Add(1)
	s.d.connect(req, s.idle, s.start)
}

func (s *doorSession) Bind(req *socksclient.ServerRequest) {
	s.d.stats.Requests[socksclient.CmdBind].Add(1)
	s.d.bind(req, s.idle, s.start)
}

func (s *doorSession) Associate(req *socksclient.ServerRequest) {
	s.d.stats.Requests[socksclient.CmdUDPAssociate].Add(1)
	s.d.associate(req, s.start)
}

// handshakeFailed counts a handshake that ended without a request and logs
// one line per cause and period: anyone who can reach the door can make
// it fail.
func (d *SOCKSDoor) handshakeFailed(client net.Conn, err error) {
	var pe *socksclient.ProtocolError
	cause := "client gone"
	switch {
	case errors.Is(err, socksclient.ErrWrongCredentials):
		d.stats.WrongCredentials.Add(1)
		cause = "wrong credentials"
	case errors.Is(err, socksclient.ErrNoCommonMethod):
		d.stats.NoCommonMethod.Add(1)
		cause = "no common authentication method"
	case errors.Is(err, os.ErrDeadlineExceeded):
		d.stats.HandshakeTimeout.Add(1)
		cause = "handshake timeout"
	case errors.As(err, &pe) && pe.SOCKS4():
		d.stats.SOCKS4.Add(1)
		cause = "SOCKS4 client"
	case errors.As(err, &pe):
		d.stats.Malformed.Add(1)
		cause = "malformed handshake"
	default:
		d.stats.ClientGone.Add(1)
	}
	f := d.TCPForward
	if errors.Is(err, io.EOF) {
		// Hung up between frames, most often before a byte: a port probe
		// or a health check, not a client in trouble.
		f.cfg.Logger.Debug().Str("listener", f.cfg.Name).Str("client", client.RemoteAddr().String()).Err(err).Msg("client closed during the handshake")
		return
	}
	if ok, suppressed := f.refusals.Allow(cause); ok {
		f.cfg.Logger.Info().Str("listener", f.cfg.Name).Str("client", client.RemoteAddr().String()).
			Func(logthrottle.Repeats("refused_since_last_line", suppressed)).Str("cause", cause).Err(err).Msg("socks handshake failed")
	}
}

// replyCode is what the door answers a client whose request the upstreams
// could not carry out: the upstream's own REP when it gave one, "TTL
// expired" when the handshake timed out (most often an upstream waiting
// on a target that does not answer; Dante answers its own connect
// timeouts so, and --http answers 504), "general failure" when no
// upstream could be reached.
func replyCode(err error) socksclient.ReplyCode {
	var re *socksclient.ReplyError
	var ne net.Error
	switch {
	case errors.As(err, &re):
		return re.Code
	case errors.Is(err, socksclient.ErrCommandNotSupported):
		return socksclient.RepCommandNotSupported
	case errors.Is(err, context.DeadlineExceeded) || errors.As(err, &ne) && ne.Timeout():
		return socksclient.RepTTLExpired
	}
	return socksclient.RepGeneralFailure
}

// refuse answers a request the upstreams could not carry out, counts and
// logs it, and ends the session.
func (d *SOCKSDoor) refuse(req *socksclient.ServerRequest, dialer *socksclient.Dialer, err error, start time.Time) {
	f := d.TCPForward
	gone := peerHungUp(req.Conn)
	// Answered all the same: a FIN may be a half-close, from a client
	// that still reads.
	req.Reply(replyCode(err), socksclient.Addr{})
	if gone {
		// Most often a client that gave up during a slow dial: its
		// hang-up, not the upstream's answer, ended the session (the
		// upstreams have counted their own failure).
		d.clientGone(req, dialer, err, start)
	} else {
		f.dialFailed(req.Conn, req.Addr, dialer, err, start)
	}
	req.Conn.Close()
	f.endSession(req.Conn, nil)
}

// connect chains a CONNECT: the name, if the client sent one, goes to the
// upstream as a name.
func (d *SOCKSDoor) connect(req *socksclient.ServerRequest, idle time.Duration, start time.Time) {
	f := d.TCPForward
	up, dialer, err := f.cfg.Upstreams.DialAddr(f.ctx, req.Addr)
	if err != nil {
		d.refuse(req, dialer, err, start)
		return
	}
	// BND is the upstream's: the address its proxy connects from.
	d.answerAndRelay(req, up, dialer, idle, start)
}

// answerAndRelay sends the client the reply that opens its session, with
// the upstream's BND (for BIND's second reply, the peer), passes on what
// the client sent behind its request, and relays the session.
func (d *SOCKSDoor) answerAndRelay(req *socksclient.ServerRequest, up *socksclient.Conn, dialer *socksclient.Dialer, idle time.Duration, start time.Time) {
	if err := req.Reply(socksclient.RepSucceeded, up.BoundAddr()); err != nil {
		d.clientGone(req, dialer, err, start)
		d.cut(req.Conn, up)
		return
	}
	early, err := sendEarly(up, req.Early, &d.TCPForward.stats.BytesUp)
	if err != nil {
		d.TCPForward.dialFailed(req.Conn, req.Addr, dialer, fmt.Errorf("sending what the client sent behind its request: %w", err), start)
		d.cut(req.Conn, up)
		return
	}
	d.TCPForward.relay(req.Conn, up, req.Addr, dialer.ProxyAddr, idle, start, early)
}

// bind chains a BIND: the first reply gives the address the upstream
// listens at, the second the peer that connected to it, and then the
// session is relayed like a CONNECT.
func (d *SOCKSDoor) bind(req *socksclient.ServerRequest, idle time.Duration, start time.Time) {
	f := d.TCPForward
	b, dialer, err := f.cfg.Upstreams.Bind(f.ctx, req.Addr)
	if err != nil {
		d.refuse(req, dialer, err, start)
		return
	}
	if !f.track(b.NetConn(), false) { // Close came during the dial
		d.cut(req.Conn, b)
		return
	}
	defer f.untrack(b.NetConn())
	// The wait for a peer may last hours with nothing sent either way:
	// probes find a client that vanished without a word (powered off,
	// moved to another network), which the upstream's control connection
	// has too. On before the reply, which starts the wait.
	keepClientAlive(req.Conn)
	if err := req.Reply(socksclient.RepSucceeded, b.Addr()); err != nil {
		d.clientGone(req, dialer, err, start)
		d.cut(req.Conn, b)
		return
	}
	// The client sends nothing until the second reply; any read result
	// (its hang-up, or bytes it had no right to send) ends the wait.
	ctx, cancel := context.WithCancel(f.ctx)
	watched := make(chan struct{})
	var early [1]byte
	var sentEarly bool
	go func() {
		defer close(watched)
		n, err := req.Conn.Read(early[:])
		sentEarly = n > 0
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			cancel()
		}
	}()
	peer, err := b.Accept(ctx)
	req.Conn.SetReadDeadline(aLongTimeAgo)
	<-watched
	clientGone := ctx.Err() != nil && f.ctx.Err() == nil
	cancel()
	req.Conn.SetReadDeadline(time.Time{})
	if err == nil && sentEarly {
		// The peer came as the client's byte did: it goes to the peer
		// rather than being lost.
		req.Early = append(req.Early, early[0])
	}
	if err != nil && (clientGone || f.ctx.Err() != nil) {
		// Not a failure: the client stopped waiting for its peer, or Close
		// cut the wait (logged, and reset, as the relayed sessions it cuts).
		ev := f.sessionEvent(f.cfg.Logger.Debug(), req.Conn, req.Addr).Str("cmd", "bind").Str("upstream", dialer.ProxyAddr).
			Dur("dur_ms", time.Since(start))
		switch {
		case clientGone && sentEarly:
			ev.Msg("session ended: the client sent data before a peer connected")
			req.Conn.Close()
		case clientGone:
			ev.Msg("session ended: the client hung up before a peer connected")
			req.Conn.Close()
		default:
			ev.Err(err).Str("cause", "cut at shutdown").Msg("session ended")
			abort(req.Conn)
		}
		f.endSession(req.Conn, nil)
		return
	}
	if err != nil {
		d.refuse(req, dialer, err, start)
		return
	}
	d.answerAndRelay(req, peer, dialer, idle, start)
}

// clientGone counts and logs a client that hung up before its reply
// could reach it (a program that gave up during a slow dial).
func (d *SOCKSDoor) clientGone(req *socksclient.ServerRequest, dialer *socksclient.Dialer, err error, start time.Time) {
	d.stats.ClientGone.Add(1)
	f := d.TCPForward
	if ok, suppressed := f.refusals.Allow("client gone before its reply"); ok {
		ev := f.sessionEvent(f.cfg.Logger.Info(), req.Conn, req.Addr).Str("cmd", req.Cmd.String())
		if dialer != nil { // nil: every upstream failed
			ev = ev.Str("upstream", dialer.ProxyAddr)
		}
		ev.Func(logthrottle.Repeats("refused_since_last_line", suppressed)).Err(err).Dur("dur_ms", time.Since(start)).
			Msg("session ended: the client hung up before its reply")
	}
}

// keepClientAlive gives a client's control connection the keep-alive of
// the upstreams' (socksclient.KeepControlAlive) through its wrappers.
func keepClientAlive(c net.Conn) {
	if tc, ok := unwrapTCP(c); ok {
		socksclient.KeepControlAlive(tc)
	}
}

// cut ends a session whose client could not be answered: the client gets
// a reset, and what was opened for it is closed.
func (d *SOCKSDoor) cut(client net.Conn, opened ...io.Closer) {
	for _, c := range opened {
		if conn, ok := c.(net.Conn); ok {
			abort(conn)
		} else {
			c.Close()
		}
	}
	abort(client)
	d.TCPForward.endSession(client, nil)
}

// aLongTimeAgo is a deadline that makes a blocked read return at once.
var aLongTimeAgo = time.Unix(1, 0)

// associate chains a UDP ASSOCIATE through one upstream association. The
// door's relay socket passes datagrams on as they are, header and all, so
// names in them stay names for the upstream to resolve; it only checks
// that they come from the client and are whole.
func (d *SOCKSDoor) associate(req *socksclient.ServerRequest, start time.Time) {
	f := d.TCPForward
	client := req.Conn
	from := clientSource(client, req.Addr)
	// The source the request names becomes the one the relay serves: it
	// must pass --allow as the control connection did, or any admitted
	// client could open the relay to an address the list refuses.
	if !f.admit.Load().allow.Allows(from.Addr()) {
		d.stats.SourceNotAllowed.Add(1)
		req.Reply(socksclient.RepNotAllowed, socksclient.Addr{})
		if ok, suppressed := f.refusals.Allow("udp source not allowed"); ok {
			f.sessionEvent(f.cfg.Logger.Info(), client, req.Addr).Str("cmd", "udp associate").
				Func(logthrottle.Repeats("refused_since_last_line", suppressed)).Err(ErrNotAllowed).Msg("request refused: the UDP source it names is not allowed")
		}
		client.Close() // not a reset: the refusal just written must arrive
		f.endSession(client, nil)
		return
	}
	up, dialer, err := f.cfg.Upstreams.Associate(f.ctx)
	if err != nil {
		d.refuse(req, dialer, err, start)
		return
	}
	up.CountInto(&d.stats.Upstream)
	local := client.LocalAddr().(*net.TCPAddr)
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: local.IP, Zone: local.Zone})
	if err != nil {
		up.Close()
		d.refuse(req, dialer, err, start)
		return
	}
	a := &association{door: d, client: client, pc: pc, up: up, from: from}
	// A zone (a link-local listener's) has no place in a SOCKS address.
	relay := pc.LocalAddr().(*net.UDPAddr).AddrPort()
	bound := socksclient.AddrFromAddrPort(netip.AddrPortFrom(relay.Addr().WithZone(""), relay.Port()))
	keepClientAlive(client) // as BIND's wait; before the reply, which starts the association
	if err := req.Reply(socksclient.RepSucceeded, bound); err != nil {
		d.clientGone(req, dialer, err, start)
		d.cut(client, pc, up)
		return
	}
	a.run()
	f.endSession(client, nil)
	ev := f.cfg.Logger.Debug()
	if errors.Is(a.err, socksclient.ErrAssociationClosed) {
		ev = f.cfg.Logger.Info().Err(a.err)
	}
	sessionFields(ev, f.cfg.Name, client.RemoteAddr().String(), req.Addr).Str("cmd", "udp associate").
		Str("upstream", dialer.ProxyAddr).Int64("datagrams_up", a.up64).Int64("datagrams_down", a.down64).
		Dur("dur_ms", time.Since(start)).Msg("session ended")
}

// clientSource is where the client's datagrams may come from: the IP of
// its control connection, and the port its request names if it names one
// (RFC 1928 §7: DST is the address the client will send from, zeros when
// it does not know). An unknown port is learnt from the first datagram.
// associate holds the address to --allow, as admission held the control
// connection's.
func clientSource(ctrl net.Conn, dst socksclient.Addr) netip.AddrPort {
	ip := ctrl.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
	if dst.Name == "" && dst.IP.IsValid() && !dst.IP.IsUnspecified() {
		ip = dst.IP.Unmap()
	}
	return netip.AddrPortFrom(ip, dst.Port)
}

// association is one client's UDP ASSOCIATE through the door.
type association struct {
	door   *SOCKSDoor
	client net.Conn
	pc     *net.UDPConn
	up     *socksclient.UDPConn
	// from is the client's source; its port is 0 until the first
	// datagram tells it, and the reply path reads it concurrently.
	from   netip.AddrPort
	peer   atomic.Pointer[netip.AddrPort]
	err    error // why the association ended, when the upstream ended it
	up64   int64
	down64 int64
}

// run relays until the client hangs up its control connection or the
// upstream ends its association.
func (a *association) run() {
	var wg sync.WaitGroup
	var upErr error
	wg.Go(a.clientToUpstream)
	wg.Go(func() {
		upErr = a.upstreamToClient()
		a.client.Close() // the upstream association is gone: so is ours
	})
	io.Copy(io.Discard, a.client) // the association lives as long as this connection
	a.client.Close()
	a.pc.Close()
	a.up.Close()
	wg.Wait()
	if errors.Is(upErr, socksclient.ErrAssociationClosed) {
		a.err = upErr
	}
}

func (a *association) clientToUpstream() {
	st := &a.door.stats
	buf := make([]byte, 65536)
	for {
		n, src, err := a.pc.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		src = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
		if src.Addr() != a.from.Addr() || (a.from.Port() != 0 && src.Port() != a.from.Port()) {
			st.DroppedStranger.Add(1)
			continue
		}
		if a.from.Port() == 0 {
			a.from = src
		}
		if a.peer.Load() == nil {
			a.peer.Store(&src)
		}
		if _, err := socksclient.CheckUDPHeader(buf[:n]); err != nil {
			if errors.Is(err, socksclient.ErrFragmented) {
				st.DroppedFragment.Add(1)
			} else {
				st.DroppedMalformed.Add(1)
			}
			continue
		}
		if err := a.up.WriteDatagram(buf[:n]); err != nil {
			if errors.Is(err, net.ErrClosed) || errors.Is(err, socksclient.ErrAssociationClosed) {
				return
			}
			st.DroppedSendFailed.Add(1)
			continue
		}
		a.up64++
		st.DatagramsUp.Add(1)
		st.UDPBytesUp.Add(int64(n))
	}
}

func (a *association) upstreamToClient() error {
	st := &a.door.stats
	buf := make([]byte, 65536)
	for {
		n, err := a.up.ReadDatagram(buf)
		if socksclient.IsICMPError(err) {
			// Reported once per ICMP on this connected socket, and the
			// relay may take the next datagram: not the end of the
			// association (dnsforward's reader reads on too).
			st.RelayRefused.Add(1)
			f := a.door.TCPForward
			if ok, suppressed := f.refusals.Allow(causeRelayICMP); ok {
				f.cfg.Logger.Warn().Str("listener", f.cfg.Name).Func(logthrottle.Repeats("repeats", suppressed)).Err(err).
					Msg("an ICMP error came back for a datagram sent to the upstream's UDP relay; the association goes on")
			}
			continue
		}
		if err != nil {
			return err
		}
		peer := a.peer.Load()
		if peer == nil { // nothing sent yet, so nothing can be an answer
			st.DroppedStranger.Add(1)
			continue
		}
		if _, err := a.pc.WriteToUDPAddrPort(buf[:n], *peer); err != nil {
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			continue
		}
		a.down64++
		st.DatagramsDown.Add(1)
		st.UDPBytesDown.Add(int64(n))
	}
}
