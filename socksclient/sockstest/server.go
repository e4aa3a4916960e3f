// Package sockstest is an in-process SOCKS5 server for tests, a
// fault-injecting wrapper over socksclient's server loop (ServeConn, the
// one the -D door runs) and codec. It serves CONNECT, BIND and UDP
// ASSOCIATE for real, straight to the targets, and can be told to
// misbehave in the ways real servers will not on demand: every REP code,
// authentication failure, malformed or truncated frames, slow drip, hangs,
// connections closed mid-frame, and BIND second replies withheld, malformed
// or refused.
package sockstest

import (
	"crypto/subtle"
	"errors"
	"io"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/socksfwd/socksfwd/internal/sockbuf"
	"github.com/socksfwd/socksfwd/internal/testnet"
	"github.com/socksfwd/socksfwd/socksclient"
)

// Fault selects one way for the server to misbehave.
type Fault int

const (
	FaultNone Fault = iota
	// FaultNoAcceptable answers every greeting with method 0xFF.
	FaultNoAcceptable
	// FaultWrongVersion answers the greeting with VER 0x04.
	FaultWrongVersion
	// FaultUnknownATYP answers the request with ATYP 0x09.
	FaultUnknownATYP
	// FaultTruncatedReply sends the first 6 bytes of a reply, then closes.
	FaultTruncatedReply
	// FaultDrip sends every server frame one byte per write.
	FaultDrip
	// FaultHangAfterGreeting reads the greeting and never answers.
	FaultHangAfterGreeting
	// FaultCloseMidFrame sends one byte of the method selection, then closes.
	FaultCloseMidFrame
	// FaultCloseAfterRequest reads the request and closes without a reply,
	// as OpenSSH's ssh -D does for BIND and UDP ASSOCIATE.
	FaultCloseAfterRequest
	// FaultTrailingPayload sends the reply and the first payload bytes in
	// one write, to catch clients that read past the reply.
	FaultTrailingPayload
	// FaultHangAfterRequest reads the request and never replies, as a
	// proxy waiting on a target that does not answer.
	FaultHangAfterRequest
	// FaultBindNoSecondReply makes BIND accept the peer and never send the
	// second reply: the client waits until it hangs up or Close.
	FaultBindNoSecondReply
	// FaultBindMalformedSecondReply answers BIND's peer with a malformed
	// second reply (VER 0x04), then closes.
	FaultBindMalformedSecondReply
)

// Config describes the server's behaviour. The zero value is a correct
// no-auth server.
type Config struct {
	// Users enables RFC 1929: the server selects method 0x02 and accepts
	// these username → password pairs.
	Users map[string]string
	// Reply, when not 0, is the REP every request is answered with.
	Reply socksclient.ReplyCode
	// Fault makes the server misbehave.
	Fault Fault
	// BindUnspecified makes BIND's first reply carry BND.ADDR 0.0.0.0.
	BindUnspecified bool
	// BindSecondReply, when not 0, is the REP of BIND's second reply: the
	// peer that connected is refused with it, and the server closes.
	BindSecondReply socksclient.ReplyCode
	// UDPBindUnspecified makes UDP ASSOCIATE's reply carry BND.ADDR 0.0.0.0.
	UDPBindUnspecified bool
	// UDPBindName, when set, makes UDP ASSOCIATE's reply carry this name
	// as BND.ADDR (with the relay's port), which RFC 1928 allows.
	UDPBindName string
	// UDPFragmentCopies sends, before each relayed reply, a copy with
	// FRAG = 1 that a client must drop.
	UDPFragmentCopies bool
	// UDPStrangerCopies sends, before each relayed reply, a copy from
	// another socket than the relay, which a client must ignore.
	UDPStrangerCopies bool
	// UDPCloseControlAfter, when > 0, closes the control connection (ending
	// the association) after that many datagrams from the client.
	UDPCloseControlAfter int
	// UDPSlowRelay plays a slow proxy on this host with small buffers: the
	// relay socket keeps 64 KiB (about 27 datagrams of 1200 bytes) and
	// pauses udpSlowRelayPause after each client datagram, so a burst
	// overflows it unless the client waits for room.
	UDPSlowRelay bool
	// Greeted, if not nil, receives a value (without blocking) each time the
	// server has read a greeting: a readiness signal for tests.
	Greeted chan<- struct{}
	// Requested, if not nil, receives each request the server has read
	// (without blocking: give it room), so that a test sees what a client
	// in front of it asked for, names and all.
	Requested chan<- socksclient.Request
	// TrailingPayload is what FaultTrailingPayload sends after the reply.
	TrailingPayload []byte
}

// Server is a running test server. Close stops it and waits for every
// connection handler to return.
type Server struct {
	cfg Config
	ln  net.Listener

	handshakes atomic.Int64
	requests   atomic.Int64

	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	closed bool
	wg     sync.WaitGroup
}

// NewServer starts a server on 127.0.0.1 at a free port.
func NewServer(cfg Config) (*Server, error) {
	return Listen("127.0.0.1:0", cfg)
}

// Listen starts a server on addr.
func Listen(addr string, cfg Config) (*Server, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	s := &Server{cfg: cfg, ln: ln, conns: make(map[net.Conn]struct{})}
	s.wg.Go(s.acceptLoop)
	return s, nil
}

// Addr is the server's listening address, host:port.
func (s *Server) Addr() string { return s.ln.Addr().String() }

// Handshakes counts greetings the server has read.
func (s *Server) Handshakes() int64 { return s.handshakes.Load() }

// Requests counts requests the server has read.
func (s *Server) Requests() int64 { return s.requests.Load() }

// Close stops accepting, closes every connection and waits for handlers.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	err := s.ln.Close()
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
	return err
}

func (s *Server) track(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		c.Close()
		return false
	}
	s.conns[c] = struct{}{}
	return true
}

func (s *Server) untrack(c net.Conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
	c.Close()
}

func (s *Server) acceptLoop() {
	for {
		c, err := s.ln.Accept()
		if err != nil {
			return
		}
		if !s.track(c) {
			continue
		}
		s.wg.Go(func() {
			defer s.untrack(c)
			s.serveConn(c)
		})
	}
}

// write sends raw bytes as one frame would go: a byte per write under
// FaultDrip (the conn is wrapped in faultConn, which does that).
func (s *Server) write(c net.Conn, b []byte) error {
	_, err := c.Write(b)
	return err
}

func (s *Server) writeFrame(c net.Conn, f interface{ AppendTo([]byte) ([]byte, error) }) error {
	b, err := f.AppendTo(nil)
	if err != nil {
		return err
	}
	return s.write(c, b)
}

// serveConn runs socksclient's server loop, the one the -D door runs, on
// a conn that plays the configured fault.
func (s *Server) serveConn(raw net.Conn) {
	var cfg socksclient.ServerConfig
	if s.cfg.Users != nil {
		cfg.Authenticate = func(user, password string) bool {
			pw, ok := s.cfg.Users[user]
			return ok && subtle.ConstantTimeCompare([]byte(pw), []byte(password)) == 1
		}
	}
	socksclient.ServeConn(&faultConn{Conn: raw, s: s}, cfg, handler{s})
}

// handler serves each request for real, unless a fault or a configured
// REP answers it instead.
type handler struct{ s *Server }

func (h handler) Connect(req *socksclient.ServerRequest) {
	if h.s.answered(req) {
		return
	}
	h.s.serveConnect(req.Conn, req.Addr, req.Early)
}

func (h handler) Bind(req *socksclient.ServerRequest) {
	if h.s.answered(req) {
		return
	}
	h.s.serveBind(req.Conn, req.Addr)
}

func (h handler) Associate(req *socksclient.ServerRequest) {
	if h.s.answered(req) {
		return
	}
	h.s.serveAssociate(req.Conn)
}

// answered counts and reports the request, then plays the request-time
// faults and Config.Reply: true when that was the answer.
func (s *Server) answered(req *socksclient.ServerRequest) bool {
	s.requests.Add(1)
	if s.cfg.Requested != nil {
		select {
		case s.cfg.Requested <- req.Request:
		default:
		}
	}
	c := req.Conn
	switch s.cfg.Fault {
	case FaultCloseAfterRequest:
		return true
	case FaultHangAfterRequest:
		io.Copy(io.Discard, c) // until the client or Close hangs up
		return true
	case FaultUnknownATYP:
		c.Write([]byte{socksclient.Version, 0, 0, 0x09, 1, 2, 3, 4, 0, 80})
		return true
	case FaultTruncatedReply:
		c.Write([]byte{socksclient.Version, 0, 0, byte(socksclient.AddrIPv4), 127, 0})
		return true
	}
	if s.cfg.Reply != socksclient.RepSucceeded {
		req.Reply(s.cfg.Reply, socksclient.Addr{})
		return true
	}
	return false
}

// faultConn plays the handshake's faults. The handshake's first write is
// the method selection, right after the greeting was read: that is where
// the greeting is counted and the greeting-time faults replace the answer.
type faultConn struct {
	net.Conn
	s       *Server
	greeted bool
}

// errFault ends a handshake the fault has answered (or left hanging).
var errFault = errors.New("sockstest: fault played")

func (c *faultConn) Write(b []byte) (int, error) {
	if !c.greeted {
		c.greeted = true
		c.s.handshakes.Add(1)
		if c.s.cfg.Greeted != nil {
			select {
			case c.s.cfg.Greeted <- struct{}{}:
			default:
			}
		}
		switch c.s.cfg.Fault {
		case FaultHangAfterGreeting:
			io.Copy(io.Discard, c.Conn) // until the client or Close hangs up
			return 0, errFault
		case FaultCloseMidFrame:
			c.Conn.Write([]byte{socksclient.Version})
			return 0, errFault
		case FaultWrongVersion:
			c.Conn.Write([]byte{0x04, 0x00})
			return 0, errFault
		case FaultNoAcceptable:
			c.Conn.Write([]byte{socksclient.Version, byte(socksclient.MethodNoAcceptable)})
			return 0, errFault
		}
	}
	if c.s.cfg.Fault != FaultDrip {
		return c.Conn.Write(b)
	}
	for i := range b {
		if _, err := c.Conn.Write(b[i : i+1]); err != nil {
			return i, err
		}
	}
	return len(b), nil
}

// CloseWrite reaches the socket, for the relay's half-close.
func (c *faultConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Conn.Close()
}

var zeroAddr = socksclient.Addr{IP: netip.IPv4Unspecified()}

func (s *Server) serveConnect(c net.Conn, target socksclient.Addr, early []byte) {
	d := net.Dialer{Timeout: 5 * time.Second}
	up, err := d.Dial("tcp", target.String())
	if err != nil {
		s.writeFrame(c, socksclient.Reply{Code: replyFor(err), Addr: zeroAddr})
		return
	}
	if !s.track(up) {
		return
	}
	defer s.untrack(up)
	bound := socksclient.AddrFromAddrPort(up.LocalAddr().(*net.TCPAddr).AddrPort())
	b, err := socksclient.Reply{Addr: bound}.AppendTo(nil)
	if err != nil {
		return
	}
	if s.cfg.Fault == FaultTrailingPayload {
		b = append(b, s.cfg.TrailingPayload...)
	}
	if err := s.write(c, b); err != nil {
		return
	}
	if _, err := up.Write(early); err != nil { // what the client sent behind its request
		return
	}
	testnet.Join(c, up)
}

// serveBind listens for one peer. As Dante does, it binds the port the
// request asks for when DST.ADDR is unspecified (any peer), and any port
// when that port is taken or a peer address is given. Unlike Dante it sets
// SO_REUSEADDR (Go's default), so it can bind a port again while a
// connection accepted on it is still open.
func (s *Server) serveBind(c net.Conn, expected socksclient.Addr) {
	port := "0"
	if expected.Name == "" && expected.IP.IsUnspecified() {
		port = strconv.Itoa(int(expected.Port))
	}
	ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", port))
	if err != nil && port != "0" {
		ln, err = net.Listen("tcp", "127.0.0.1:0")
	}
	if err != nil {
		s.writeFrame(c, socksclient.Reply{Code: socksclient.RepGeneralFailure, Addr: zeroAddr})
		return
	}
	bound := socksclient.AddrFromAddrPort(ln.Addr().(*net.TCPAddr).AddrPort())
	if s.cfg.BindUnspecified {
		bound.IP = netip.IPv4Unspecified()
	}
	if err := s.writeFrame(c, socksclient.Reply{Addr: bound}); err != nil {
		ln.Close()
		return
	}
	// Stop waiting for the peer when the client hangs up or the server
	// closes (Close closes the tracked conn, which ends the read).
	watchDone := make(chan int)
	go func() {
		var b [1]byte
		n, _ := c.Read(b[:])
		ln.Close()
		watchDone <- n
	}()
	peer, err := ln.Accept()
	c.SetReadDeadline(time.Unix(1, 0))
	early := <-watchDone
	c.SetReadDeadline(time.Time{})
	ln.Close()
	if err == nil && early > 0 {
		// The client sent payload before the second reply: not SOCKS.
		peer.Close()
		return
	}
	if err != nil {
		s.writeFrame(c, socksclient.Reply{Code: socksclient.RepGeneralFailure, Addr: zeroAddr})
		return
	}
	if !s.track(peer) {
		return
	}
	defer s.untrack(peer)
	switch {
	case s.cfg.Fault == FaultBindNoSecondReply:
		io.Copy(io.Discard, c) // until the client or Close hangs up
		return
	case s.cfg.Fault == FaultBindMalformedSecondReply:
		c.Write([]byte{0x04, 0, 0, byte(socksclient.AddrIPv4), 127, 0, 0, 1, 0, 80})
		return
	case s.cfg.BindSecondReply != socksclient.RepSucceeded:
		s.writeFrame(c, socksclient.Reply{Code: s.cfg.BindSecondReply, Addr: zeroAddr})
		return
	}
	from := socksclient.AddrFromAddrPort(peer.RemoteAddr().(*net.TCPAddr).AddrPort())
	if err := s.writeFrame(c, socksclient.Reply{Addr: from}); err != nil {
		return
	}
	testnet.Join(c, peer)
}

var (
	errConnRefused = syscall.ECONNREFUSED
	errNetUnreach  = syscall.ENETUNREACH
	errHostUnreach = syscall.EHOSTUNREACH
)

func replyFor(err error) socksclient.ReplyCode {
	switch {
	case errors.Is(err, errConnRefused):
		return socksclient.RepConnectionRefused
	case errors.Is(err, errNetUnreach):
		return socksclient.RepNetworkUnreachable
	case errors.Is(err, errHostUnreach):
		return socksclient.RepHostUnreachable
	}
	var dnsErr *net.DNSError
	if errors.As(err, &dnsErr) {
		return socksclient.RepHostUnreachable
	}
	return socksclient.RepGeneralFailure
}

// serveAssociate runs a UDP relay for as long as the control connection
// lasts (RFC 1928 §7). One socket serves both sides: datagrams from the
// client carry a header and go to their target; datagrams from anyone else
// are replies and go back to the client with the sender in the header.
func (s *Server) serveAssociate(c net.Conn) {
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		s.writeFrame(c, socksclient.Reply{Code: socksclient.RepGeneralFailure, Addr: zeroAddr})
		return
	}
	defer pc.Close()
	if s.cfg.UDPSlowRelay {
		pc.SetReadBuffer(32 << 10) // the kernel doubles it
	} else {
		sockbuf.Grow(pc) // as a real relay would: tests send bursts
	}
	bound := socksclient.AddrFromAddrPort(pc.LocalAddr().(*net.UDPAddr).AddrPort())
	if s.cfg.UDPBindUnspecified {
		bound.IP = netip.IPv4Unspecified()
	}
	if s.cfg.UDPBindName != "" {
		bound = socksclient.Addr{Name: s.cfg.UDPBindName, Port: bound.Port}
	}
	if err := s.writeFrame(c, socksclient.Reply{Addr: bound}); err != nil {
		return
	}
	var stranger *net.UDPConn
	if s.cfg.UDPStrangerCopies {
		if stranger, err = net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}); err != nil {
			return
		}
		defer stranger.Close()
	}
	relayDone := make(chan struct{})
	go func() {
		defer close(relayDone)
		s.relayUDP(pc, stranger, c)
	}()
	io.Copy(io.Discard, c) // the association lives as long as this connection
	pc.Close()
	<-relayDone
}

// udpSlowRelayPause is what UDPSlowRelay spends on each datagram: about
// 25 000 datagrams a second at most, far below a burst's pace.
const udpSlowRelayPause = 40 * time.Microsecond

func (s *Server) relayUDP(pc, stranger *net.UDPConn, ctrl net.Conn) {
	buf := make([]byte, socksclient.MaxUDPHeaderLen+65536)
	var (
		client   netip.AddrPort
		requests int
	)
	for {
		n, src, err := pc.ReadFromUDPAddrPort(buf[socksclient.MaxUDPHeaderLen:])
		if err != nil {
			return
		}
		src = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
		pkt := buf[socksclient.MaxUDPHeaderLen : socksclient.MaxUDPHeaderLen+n]
		if !client.IsValid() || src == client {
			h, hlen, err := socksclient.ParseUDPHeader(pkt)
			if err != nil || h.Frag != 0 {
				continue
			}
			client = src
			dst, ok := h.Addr.AddrPort()
			if !ok { // a name: the proxy resolves it
				ua, err := net.ResolveUDPAddr("udp4", h.Addr.String())
				if err != nil {
					continue
				}
				dst = ua.AddrPort()
			}
			pc.WriteToUDPAddrPort(pkt[hlen:], dst)
			if s.cfg.UDPSlowRelay {
				testnet.Nap(udpSlowRelayPause)
			}
			requests++
			if s.cfg.UDPCloseControlAfter > 0 && requests >= s.cfg.UDPCloseControlAfter {
				ctrl.Close()
			}
			continue
		}
		// A reply: put the header in the headroom before the payload
		// (without allocating, so tests can count the client's allocations).
		var hdr [socksclient.MaxUDPHeaderLen]byte
		hb, _ := socksclient.UDPHeader{Addr: socksclient.AddrFromAddrPort(src)}.AppendTo(hdr[:0])
		start := socksclient.MaxUDPHeaderLen - len(hb)
		copy(buf[start:], hb)
		out := buf[start : socksclient.MaxUDPHeaderLen+n]
		if s.cfg.UDPStrangerCopies {
			stranger.WriteToUDPAddrPort(out, client)
		}
		if s.cfg.UDPFragmentCopies {
			out[2] = 1
			pc.WriteToUDPAddrPort(out, client)
			out[2] = 0
		}
		pc.WriteToUDPAddrPort(out, client)
	}
}
