package socksclient

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"
)

// The server side of the protocol, on the same codec as the client: the
// handshake a SOCKS5 server runs with each client (greeting, method
// selection, RFC 1929 when configured, the request). What to do with the
// request is the caller's: the -D door chains it to the upstreams, the test
// server serves it itself or misbehaves.

// ServerConfig is what a SOCKS5 server asks of its clients.
type ServerConfig struct {
	// Authenticate, when set, makes the server require RFC 1929
	// username/password and decides each pair; nil serves clients that
	// offer "no authentication required". Either may be empty (clients
	// send an empty password, though the RFC has none): to refuse, return
	// false, and the client is answered status 1.
	Authenticate func(username, password string) bool
	// HandshakeTimeout bounds greeting, authentication and request
	// together, so a client that connects and says nothing does not hold
	// a session; 0 means no bound.
	HandshakeTimeout time.Duration
}

var (
	// ErrNoCommonMethod: the client offered none of the methods the server
	// accepts; it was answered method 0xFF.
	ErrNoCommonMethod = errors.New("socks server: the client offered no authentication method this server accepts")
	// ErrWrongCredentials: the client's username and password were
	// refused; it was answered RFC 1929 status 1.
	ErrWrongCredentials = errors.New("socks server: wrong username or password")
)

// ServerRequest is a client's request, read by Handshake and waiting for
// its reply. Conn is the client's connection, for the session after the
// reply.
type ServerRequest struct {
	Request
	// User is the RFC 1929 username, "" without authentication.
	User string
	Conn net.Conn
	// Early is what the client sent after its request in the same
	// segments, before any reply (optimistic data): it belongs at the
	// start of the session. Usually nil.
	Early []byte
}

// Reply answers the request with code and the bound address (for a
// failure, the address is all zeros as RFC 1928 §6 leaves it unused).
func (r *ServerRequest) Reply(code ReplyCode, bound Addr) error {
	if code != RepSucceeded && !bound.IP.IsValid() && bound.Name == "" {
		bound = unspecifiedAddr
	}
	var buf [maxAddrFrame]byte
	b, err := Reply{Code: code, Addr: bound}.AppendTo(buf[:0])
	if err != nil {
		return err
	}
	_, err = r.Conn.Write(b)
	return err
}

var unspecifiedAddr = Addr{IP: netip.IPv4Unspecified()}

// A Handler carries out the requests that passed the handshake, one
// method per RFC 1928 command. Each owns req.Conn from then on: it
// answers with req.Reply, serves the session and closes what it opened.
type Handler interface {
	Connect(req *ServerRequest)
	Bind(req *ServerRequest)
	Associate(req *ServerRequest)
}

// ErrUnknownCommand is ServeConn's answer to a request whose command RFC
// 1928 does not define: the client got REP 7.
var ErrUnknownCommand = errors.New("socks: unknown command (answered REP 7)")

// ServeConn is the server loop for one client, the one every SOCKS5
// server here runs (the -D door, sockstest): the handshake, then the
// request handed to h by its command. It returns the request (nil when
// the handshake failed) and Handshake's error, or ErrUnknownCommand. It
// never closes c.
func ServeConn(c net.Conn, cfg ServerConfig, h Handler) (*ServerRequest, error) {
	req, err := Handshake(c, cfg)
	if err != nil {
		return nil, err
	}
	switch req.Cmd {
	case CmdConnect:
		h.Connect(req)
	case CmdBind:
		h.Bind(req)
	case CmdUDPAssociate:
		h.Associate(req)
	default:
		req.Reply(RepCommandNotSupported, Addr{})
		return req, ErrUnknownCommand
	}
	return req, nil
}

// Handshake runs the server side of the handshake on c and returns the
// client's request, which the caller answers with Reply. When the client
// fails it, Handshake has already answered as the RFCs say (method 0xFF,
// RFC 1929 status 1, REP 8 for an unknown address type) and returns the
// cause: ErrNoCommonMethod, ErrWrongCredentials, a *ProtocolError, or the
// connection's error. It never closes c.
func Handshake(c net.Conn, cfg ServerConfig) (*ServerRequest, error) {
	if cfg.HandshakeTimeout > 0 {
		c.SetDeadline(time.Now().Add(cfg.HandshakeTimeout))
		defer c.SetDeadline(time.Time{})
	}
	// Frames are read as they arrive, several per read when the client
	// sends them together, rather than a header then the rest: two reads
	// fewer per connection for the common client that sends a frame and
	// waits. What comes after the request is handed over as Early.
	r := frameReaders.Get().(*frameReader)
	r.c = c
	defer func() {
		*r = frameReader{} // it held the password, if one was sent
		frameReaders.Put(r)
	}()
	g, err := readWith(r, ParseGreeting)
	if err != nil {
		var pe *ProtocolError
		if errors.As(err, &pe) && pe.socks4 {
			c.Write(socks4Rejected[:])
		}
		return nil, fmt.Errorf("reading greeting: %w", err)
	}
	want := MethodNoAuth
	if cfg.Authenticate != nil {
		want = MethodUserPass
	}
	if !g.offers(want) {
		writeFrame(c, MethodSelection{Method: MethodNoAcceptable})
		return nil, ErrNoCommonMethod
	}
	if err := writeFrame(c, MethodSelection{Method: want}); err != nil {
		return nil, err
	}
	var user string
	if want == MethodUserPass {
		up, err := readWith(r, ParseUserPassRequest)
		if err != nil {
			return nil, fmt.Errorf("reading username/password: %w", err)
		}
		if !cfg.Authenticate(up.Username, up.Password) {
			writeFrame(c, UserPassStatus{Status: 1})
			// Not even the username: a password typed into the user
			// field would reach the log.
			return nil, ErrWrongCredentials
		}
		if err := writeFrame(c, UserPassStatus{}); err != nil {
			return nil, err
		}
		user = up.Username
	}
	req, err := readWith(r, ParseRequest)
	if err != nil {
		var pe *ProtocolError
		if errors.As(err, &pe) && pe.unknownAddrType {
			writeFrame(c, Reply{Code: RepAddrTypeNotSupported, Addr: unspecifiedAddr})
		}
		return nil, fmt.Errorf("reading request: %w", err)
	}
	sr := &ServerRequest{Request: req, User: user, Conn: c}
	if rest := r.buffered(); len(rest) > 0 {
		sr.Early = bytes.Clone(rest)
	}
	return sr, nil
}

// frameReader holds what a client sent during the handshake that has not
// been parsed yet. Its buffer fits the longest greeting, credentials and
// request together, with room for a little optimistic data.
type frameReader struct {
	c    net.Conn
	buf  [2048]byte
	r, w int
}

// frameReaders are pooled: the buffer goes to the connection's Read, so
// one made per handshake would be a 2 KiB heap allocation per client.
var frameReaders = sync.Pool{New: func() any { return new(frameReader) }}

func (f *frameReader) buffered() []byte { return f.buf[f.r:f.w] }

// readWith parses one frame from what has arrived, reading more while
// parse says the frame is cut short, and consumes it.
func readWith[T any](f *frameReader, parse func([]byte) (T, int, error)) (T, error) {
	for {
		v, n, err := parse(f.buffered())
		var pe *ProtocolError
		if err == nil {
			f.r += n
			return v, nil
		}
		if !errors.As(err, &pe) || !pe.Truncated() {
			return v, err
		}
		if f.r > 0 { // move the frame's start to the front
			f.w = copy(f.buf[:], f.buffered())
			f.r = 0
		}
		if f.w == len(f.buf) { // cannot happen: frames are shorter
			return v, err
		}
		m, rerr := f.c.Read(f.buf[f.w:])
		f.w += m
		if rerr != nil && m == 0 {
			if f.w > 0 {
				rerr = unexpectedEOF(rerr)
			}
			return v, rerr
		}
	}
}

func (g Greeting) offers(m AuthMethod) bool {
	for _, o := range g.Methods {
		if o == m {
			return true
		}
	}
	return false
}

// writeFrame sends one frame in one write.
func writeFrame(c net.Conn, f interface{ AppendTo([]byte) ([]byte, error) }) error {
	var buf [maxAddrFrame]byte
	b, err := f.AppendTo(buf[:0])
	if err != nil {
		return err
	}
	_, err = c.Write(b)
	return err
}
