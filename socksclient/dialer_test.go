package socksclient_test

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"
	"go.uber.org/goleak"
	"golang.org/x/net/proxy"

	"github.com/socksfwd/socksfwd/internal/sockbuf"
	"github.com/socksfwd/socksfwd/internal/testnet"
	"github.com/socksfwd/socksfwd/socksclient"
	"github.com/socksfwd/socksfwd/socksclient/sockstest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// step is one turn of a transcript: bytes the client must write (expect) or
// bytes the server sends (send), in hex with spaces between fields.
type step struct{ expect, send string }

// transcriptServer plays steps against the first connection and reports
// any difference from the expected client bytes through errc.
func transcriptServer(t *testing.T, steps []step) (addr string, errc <-chan error) {
	ch := make(chan error, 1)
	ln := testnet.Serve(t, func(c net.Conn) {
		c.SetDeadline(time.Now().Add(5 * time.Second))
		for _, s := range steps {
			if s.expect != "" {
				want := hexBytes(t, s.expect)
				got := make([]byte, len(want))
				if _, err := io.ReadFull(c, got); err != nil {
					ch <- err
					return
				}
				if !bytes.Equal(got, want) {
					ch <- errors.New("client wrote " + hex.EncodeToString(got) + ", want " + hex.EncodeToString(want))
					return
				}
			}
			if s.send != "" {
				c.Write(hexBytes(t, s.send))
			}
		}
		ch <- nil
		io.Copy(io.Discard, c)
	})
	return ln.Addr().String(), ch
}

// hexBytes decodes a transcript line: hex fields, or 'quoted text'.
func hexBytes(t *testing.T, s string) []byte {
	var out []byte
	for _, f := range strings.Fields(s) {
		if strings.HasPrefix(f, "'") {
			out = append(out, strings.Trim(f, "'")...)
			continue
		}
		b, err := hex.DecodeString(f)
		if err != nil {
			t.Fatalf("bad hex %q", f)
		}
		out = append(out, b...)
	}
	return out
}

func TestDialTranscript(t *testing.T) {
	tests := []struct {
		name   string
		dialer socksclient.Dialer
		target string
		steps  []step
	}{
		{
			name:   "no auth, name goes to the proxy",
			target: "db.internal:5432",
			steps: []step{
				{expect: "05 01 00", send: "05 00"},
				{expect: "05 01 00 03 0b 'db.internal' 1538", send: "05 00 00 01 c0000201 0438 'first'"},
			},
		},
		{
			name:   "username/password offers both methods",
			dialer: socksclient.Dialer{Username: "bob", Password: "p@:/%"},
			target: "[2001:db8::5]:5432",
			steps: []step{
				{expect: "05 02 00 02", send: "05 02"},
				{expect: "01 03 'bob' 05 'p@:/%'", send: "01 00"},
				{expect: "05 01 00 04 20010db8000000000000000000000005 1538", send: "05 00 00 03 05 'proxy' 0438 'first'"},
			},
		},
		{
			name:   "server with credentials configured may still pick no-auth",
			dialer: socksclient.Dialer{Username: "bob", Password: "pw"},
			target: "192.0.2.1:80",
			steps: []step{
				{expect: "05 02 00 02", send: "05 00"},
				{expect: "05 01 00 01 c0000201 0050", send: "05 00 00 01 00000000 0000 'first'"},
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			addr, errc := transcriptServer(t, tc.steps)
			d := tc.dialer
			d.ProxyAddr = addr
			conn, err := d.DialContext(context.Background(), "tcp", tc.target)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			if err := <-errc; err != nil {
				t.Fatal(err)
			}
			// The payload sent right behind the reply belongs to the caller.
			got := make([]byte, 5)
			if _, err := io.ReadFull(conn, got); err != nil || string(got) != "first" {
				t.Fatalf("first payload = %q, %v", got, err)
			}
		})
	}
}

// dialThrough dials the echo server through a sockstest server with cfg.
func dialThrough(t *testing.T, cfg sockstest.Config, d socksclient.Dialer, target string) (net.Conn, error) {
	t.Helper()
	srv, err := sockstest.NewServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	d.ProxyAddr = srv.Addr()
	if d.HandshakeTimeout == 0 {
		d.HandshakeTimeout = 5 * time.Second
	}
	conn, err := d.DialContext(context.Background(), "tcp", target)
	if conn != nil {
		t.Cleanup(func() { conn.Close() })
	}
	return conn, err
}

func TestDialFaults(t *testing.T) {
	echo := testnet.Echo(t).Addr().String()
	tests := []struct {
		name   string
		cfg    sockstest.Config
		dialer socksclient.Dialer
		target string
		is     error  // errors.Is target, if any
		want   string // substring of the error
	}{
		{name: "auth failure", cfg: sockstest.Config{Users: map[string]string{"u": "right"}}, dialer: socksclient.Dialer{Username: "u", Password: "wrong"}, is: socksclient.ErrAuthFailed, want: "authentication failed"},
		{name: "server wants auth, none configured", cfg: sockstest.Config{Users: map[string]string{"u": "p"}}, is: socksclient.ErrNoAcceptableMethods, want: "none of the offered"},
		{name: "0xFF method", cfg: sockstest.Config{Fault: sockstest.FaultNoAcceptable}, is: socksclient.ErrNoAcceptableMethods, want: "none of the offered"},
		{name: "wrong VER", cfg: sockstest.Config{Fault: sockstest.FaultWrongVersion}, want: "malformed method selection: version 0x04"},
		{name: "unknown ATYP", cfg: sockstest.Config{Fault: sockstest.FaultUnknownATYP}, want: "malformed reply: address: unknown address type 0x09"},
		{name: "truncated reply", cfg: sockstest.Config{Fault: sockstest.FaultTruncatedReply}, is: io.ErrUnexpectedEOF, want: "closed the connection during the reply"},
		{name: "close mid-frame", cfg: sockstest.Config{Fault: sockstest.FaultCloseMidFrame}, is: io.ErrUnexpectedEOF, want: "during the method selection"},
		{name: "hang after greeting", cfg: sockstest.Config{Fault: sockstest.FaultHangAfterGreeting}, dialer: socksclient.Dialer{HandshakeTimeout: 100 * time.Millisecond}, is: context.DeadlineExceeded, want: "handshake timed out after 100ms (connected, but no answer to the SOCKS5 greeting"},
		{name: "hang after method selection", cfg: sockstest.Config{Fault: sockstest.FaultHangAfterRequest}, dialer: socksclient.Dialer{HandshakeTimeout: 100 * time.Millisecond}, is: context.DeadlineExceeded, want: "(no reply to the request: the proxy may be waiting on its target)"},
		{name: "close after connect request", cfg: sockstest.Config{Fault: sockstest.FaultCloseAfterRequest}, want: "closed the connection without replying"},
		{name: "refused target", target: testnet.ClosedPort(t), want: "socks connect: connection refused (REP 0x05)"},
	}
	for code := socksclient.RepGeneralFailure; code <= socksclient.RepAddrTypeNotSupported; code++ {
		tests = append(tests, struct {
			name   string
			cfg    sockstest.Config
			dialer socksclient.Dialer
			target string
			is     error
			want   string
		}{name: "REP " + code.String(), cfg: sockstest.Config{Reply: code}, want: code.String()})
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			target := tc.target
			if target == "" {
				target = echo
			}
			_, err := dialThrough(t, tc.cfg, tc.dialer, target)
			if err == nil {
				t.Fatal("dial succeeded")
			}
			if tc.is != nil && !errors.Is(err, tc.is) {
				t.Errorf("err = %v, want errors.Is %v", err, tc.is)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err = %q, want it to contain %q", err, tc.want)
			}
			var op *net.OpError
			if !errors.As(err, &op) || op.Op != "socks connect" || !strings.Contains(err.Error(), target) {
				t.Errorf("err = %q, want a *net.OpError naming the target", err)
			}
			if strings.Contains(err.Error(), "wrong") {
				t.Errorf("err = %q shows the password", err)
			}
			if strings.HasPrefix(tc.name, "REP ") {
				var re *socksclient.ReplyError
				if !errors.As(err, &re) || re.Code.String() != tc.want {
					t.Errorf("err = %v, want *ReplyError", err)
				}
			}
		})
	}
}

func TestDialCancel(t *testing.T) {
	greeted := make(chan struct{}, 1)
	srv, err := sockstest.NewServer(sockstest.Config{Fault: sockstest.FaultHangAfterGreeting, Greeted: greeted})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	ctx, cancel := context.WithCancel(context.Background())
	d := socksclient.Dialer{ProxyAddr: srv.Addr()}
	done := make(chan error, 1)
	go func() {
		_, err := d.DialContext(ctx, "tcp", "192.0.2.1:80")
		done <- err
	}()
	// Cancel once the server has the greeting, so the dial is blocked in a read.
	<-greeted
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
}

func TestDialDeadProxy(t *testing.T) {
	dead := testnet.ClosedPort(t)
	d := socksclient.Dialer{ProxyAddr: dead}
	_, err := d.DialContext(context.Background(), "tcp", "db.internal:5432")
	var re *socksclient.ReplyError
	if err == nil || errors.As(err, &re) || !strings.Contains(err.Error(), dead) || !strings.Contains(err.Error(), "refused") {
		t.Fatalf("err = %v, want a connection error naming %s", err, dead)
	}
}

func TestDialDripAndTrailingPayload(t *testing.T) {
	echo := testnet.Echo(t).Addr().String()
	for _, cfg := range []sockstest.Config{
		{Fault: sockstest.FaultDrip, Users: map[string]string{"u": "p"}},
		{Fault: sockstest.FaultTrailingPayload, TrailingPayload: []byte("early")},
	} {
		conn, err := dialThrough(t, cfg, socksclient.Dialer{Username: "u", Password: "p"}, echo)
		if err != nil {
			t.Fatal(err)
		}
		want := string(cfg.TrailingPayload) + "ping"
		if _, err := conn.Write([]byte("ping")); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(want))
		if _, err := io.ReadFull(conn, got); err != nil || string(got) != want {
			t.Fatalf("got %q, %v; want %q", got, err, want)
		}
	}
}

func TestConnectHalfClose(t *testing.T) {
	echo := testnet.Echo(t).Addr().String()
	conn, err := dialThrough(t, sockstest.Config{}, socksclient.Dialer{}, echo)
	if err != nil {
		t.Fatal(err)
	}
	conn.Write([]byte("request"))
	if err := conn.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	// The echo server sees EOF only if the half-close crossed the proxy, and
	// only then closes its side, ending ReadAll.
	got, err := io.ReadAll(conn)
	if err != nil || string(got) != "request" {
		t.Fatalf("got %q, %v", got, err)
	}
}

func TestBind(t *testing.T) {
	for _, unspecified := range []bool{false, true} {
		srv, err := sockstest.NewServer(sockstest.Config{BindUnspecified: unspecified})
		if err != nil {
			t.Fatal(err)
		}
		d := socksclient.Dialer{ProxyAddr: srv.Addr()}
		b, err := d.Bind(context.Background(), socksclient.Addr{})
		if err != nil {
			t.Fatal(err)
		}
		if !b.Addr().IP.IsLoopback() {
			t.Fatalf("bound address %v, want the proxy's loopback address", b.Addr())
		}
		peer, err := net.Dial("tcp", b.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		conn, err := b.Accept(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if got := conn.BoundAddr().String(); got != peer.LocalAddr().String() {
			t.Errorf("second reply names %s, want the peer %s", got, peer.LocalAddr())
		}
		peer.Write([]byte("hi"))
		buf := make([]byte, 2)
		if _, err := io.ReadFull(conn, buf); err != nil || string(buf) != "hi" {
			t.Fatalf("got %q, %v", buf, err)
		}
		peer.Close()
		conn.Close()
		srv.Close()
	}
}

func TestBindUnsupported(t *testing.T) {
	srv, err := sockstest.NewServer(sockstest.Config{Fault: sockstest.FaultCloseAfterRequest})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	d := socksclient.Dialer{ProxyAddr: srv.Addr()}
	_, err = d.Bind(context.Background(), socksclient.Addr{})
	if !errors.Is(err, socksclient.ErrCommandNotSupported) || !strings.Contains(err.Error(), "does not support bind") {
		t.Fatalf("err = %v, want the server does not support bind", err)
	}
}

func TestBindAcceptCancel(t *testing.T) {
	srv, err := sockstest.NewServer(sockstest.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	d := socksclient.Dialer{ProxyAddr: srv.Addr()}
	b, err := d.Bind(context.Background(), socksclient.Addr{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := b.Accept(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v", err)
	}
}

// TestXNetProxyAgainstSockstest checks the test server with an independent
// client, so that our codec cannot merely agree with itself.
func TestXNetProxyAgainstSockstest(t *testing.T) {
	echo := testnet.Echo(t).Addr().String()
	for _, users := range []map[string]string{nil, {"user": "p@ss:w/rd"}} {
		srv, err := sockstest.NewServer(sockstest.Config{Users: users})
		if err != nil {
			t.Fatal(err)
		}
		var auth *proxy.Auth
		if users != nil {
			auth = &proxy.Auth{User: "user", Password: "p@ss:w/rd"}
		}
		d, err := proxy.SOCKS5("tcp", srv.Addr(), auth, proxy.Direct)
		if err != nil {
			t.Fatal(err)
		}
		conn, err := d.Dial("tcp", echo)
		if err != nil {
			t.Fatal(err)
		}
		conn.Write([]byte("x/net"))
		buf := make([]byte, 5)
		if _, err := io.ReadFull(conn, buf); err != nil || string(buf) != "x/net" {
			t.Fatalf("got %q, %v", buf, err)
		}
		conn.Close()
		srv.Close()
	}
}

func TestResolveLocallyFailure(t *testing.T) {
	d := socksclient.Dialer{
		ProxyAddr:      testnet.ClosedPort(t),
		ResolveLocally: true,
		Resolver: &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, address string) (net.Conn, error) {
			return nil, errors.New("no resolver here")
		}},
	}
	_, err := d.DialContext(context.Background(), "tcp", "db.internal:5432")
	if err == nil || !strings.Contains(err.Error(), "resolving db.internal locally failed") || !strings.Contains(err.Error(), "socks5h://") {
		t.Fatalf("err = %v", err)
	}
}

// controlLog records the sockets a Control hook saw, as "network address".
type controlLog struct {
	mu    sync.Mutex
	calls []string
	fail  func(network string) error // if set, its error for a network fails the socket
}

func (l *controlLog) control(network, address string, c syscall.RawConn) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.calls = append(l.calls, network+" "+address)
	if l.fail != nil {
		return l.fail(network)
	}
	return nil
}

func (l *controlLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.calls, ", ")
}

// TestDialAppliesControl: without ProxyDial, the TCP connection to the
// proxy goes through Control (where a socket mark is set).
func TestDialAppliesControl(t *testing.T) {
	var log controlLog
	conn, err := dialThrough(t, sockstest.Config{}, socksclient.Dialer{Control: log.control}, testnet.Echo(t).Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	proxy := conn.(*socksclient.Conn).NetConn().RemoteAddr().String()
	if got, want := log.String(), "tcp4 "+proxy; got != want {
		t.Fatalf("Control saw %q, want %q", got, want)
	}
}

// TestProxyDialOwnsTCPControl: a caller's ProxyDial applies its own
// control; Dialer.Control does not run for the TCP connection.
func TestProxyDialOwnsTCPControl(t *testing.T) {
	var log controlLog
	d := socksclient.Dialer{Control: log.control, ProxyDial: (&net.Dialer{}).DialContext}
	if _, err := dialThrough(t, sockstest.Config{}, d, testnet.Echo(t).Addr().String()); err != nil {
		t.Fatal(err)
	}
	if got := log.String(); got != "" {
		t.Fatalf("Control saw %q with ProxyDial set, want nothing", got)
	}
}

// TestDialControlErrorFails: a socket Control refuses (a mark the process
// may not set) is never used.
func TestDialControlErrorFails(t *testing.T) {
	refused := errors.New("refused by control")
	log := controlLog{fail: func(string) error { return refused }}
	_, err := dialThrough(t, sockstest.Config{}, socksclient.Dialer{Control: log.control}, testnet.Echo(t).Addr().String())
	if !errors.Is(err, refused) {
		t.Fatalf("err = %v, want the control's error", err)
	}
}

// TestShortRefusal: a server that answers with VER and REP only and
// closes (ss-local answers BIND with 05 07 00 01) still refused with that
// REP: the client reports the command as unsupported, not a cut frame.
func TestShortRefusal(t *testing.T) {
	ln := testnet.Serve(t, func(c net.Conn) {
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(c, make([]byte, 3)); err != nil {
			return
		}
		c.Write([]byte{5, 0})
		if _, err := socksclient.ReadRequest(c); err != nil {
			return
		}
		c.Write([]byte{5, 7, 0, 1})
	})
	d := socksclient.Dialer{ProxyAddr: ln.Addr().String()}
	_, err := d.Bind(context.Background(), socksclient.Addr{})
	var re *socksclient.ReplyError
	if !errors.Is(err, socksclient.ErrCommandNotSupported) || !errors.As(err, &re) || re.Code != socksclient.RepCommandNotSupported {
		t.Fatalf("Bind: %v; want REP 7", err)
	}
}

// TestRefusalWithOddAddress: a refusal's address is unused (RFC 1928), so
// one that does not parse leaves the refusal what its REP says; a
// success's must parse.
func TestRefusalWithOddAddress(t *testing.T) {
	for _, tc := range []struct {
		reply string
		rep   socksclient.ReplyCode // 0: a malformed reply
	}{
		{"05 05 00 00 00000000 0000", socksclient.RepConnectionRefused}, // ATYP 0
		{"05 04 00 03 00 0000", socksclient.RepHostUnreachable},         // an empty name
		{"05 00 00 00 00000000 0000", 0},
	} {
		addr, _ := transcriptServer(t, []step{
			{expect: "05 01 00", send: "05 00"},
			{expect: "05 01 00 01 c0000201 0050", send: tc.reply},
		})
		d := socksclient.Dialer{ProxyAddr: addr}
		conn, err := d.DialContext(context.Background(), "tcp", "192.0.2.1:80")
		if err == nil {
			conn.Close()
		}
		var re *socksclient.ReplyError
		var pe *socksclient.ProtocolError
		switch {
		case tc.rep != 0 && (!errors.As(err, &re) || re.Code != tc.rep):
			t.Errorf("reply %s: %v; want REP %d", tc.reply, err, tc.rep)
		case tc.rep == 0 && !errors.As(err, &pe):
			t.Errorf("reply %s: %v; want a malformed reply", tc.reply, err)
		}
	}
}

// TestUserPassStatusVersion5: a server that answers RFC 1929 with VER 5
// instead of 1 is read by its status byte, as curl reads it.
func TestUserPassStatusVersion5(t *testing.T) {
	for _, tc := range []struct {
		status string
		ok     bool
	}{{"05 01", false}, {"05 00", true}} {
		steps := []step{
			{expect: "05 02 00 02", send: "05 02"},
			{expect: "01 03 'bob' 02 'pw'", send: tc.status},
		}
		if tc.ok {
			steps = append(steps, step{expect: "05 01 00 01 c0000201 0050", send: "05 00 00 01 00000000 0000"})
		}
		addr, errc := transcriptServer(t, steps)
		d := socksclient.Dialer{ProxyAddr: addr, Username: "bob", Password: "pw"}
		conn, err := d.DialContext(context.Background(), "tcp", "192.0.2.1:80")
		if tc.ok {
			if err != nil {
				t.Fatalf("status %s: %v", tc.status, err)
			}
			conn.Close()
			if err := <-errc; err != nil {
				t.Fatal(err)
			}
			continue
		}
		if !errors.Is(err, socksclient.ErrAuthFailed) {
			t.Errorf("status %s: %v; want ErrAuthFailed", tc.status, err)
		}
	}
}

// TestLocalResolutionUsesDefaultResolver: a socks5:// dialer with a
// Control but no LookupControl (cmd/socksfwd's without --mark) resolves
// target names through the process's default resolver (here standing
// for the system's: split DNS, NSS, macOS scoped resolvers).
func TestLocalResolutionUsesDefaultResolver(t *testing.T) {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &dns.Server{PacketConn: pc, Handler: dns.HandlerFunc(func(w dns.ResponseWriter, q *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(q)
		if q.Question[0].Qtype == dns.TypeA {
			rr, _ := dns.NewRR(q.Question[0].Name + " 60 IN A 127.0.0.1")
			m.Answer = append(m.Answer, rr)
		}
		w.WriteMsg(m)
	})}
	go srv.ActivateAndServe()
	defer srv.Shutdown()
	saved := net.DefaultResolver
	net.DefaultResolver = &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "udp", pc.LocalAddr().String())
	}}
	defer func() { net.DefaultResolver = saved }()

	echo := testnet.Echo(t).Addr().(*net.TCPAddr)
	proxy, err := sockstest.NewServer(sockstest.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer proxy.Close()
	d := socksclient.Dialer{ProxyAddr: proxy.Addr(), ResolveLocally: true, Control: sockbuf.CapLoopbackTCP, HandshakeTimeout: 5 * time.Second}
	c, err := d.DialContext(context.Background(), "tcp", net.JoinHostPort("corp-only.internal", strconv.Itoa(echo.Port)))
	if err != nil {
		t.Fatalf("socks5:// target known to the default resolver: %v", err)
	}
	c.Close()
}

// TestHandshakeTimeoutInAuthentication: a proxy that picks
// username/password and never answers it is said to have hung on the
// authentication, not on the greeting.
func TestHandshakeTimeoutInAuthentication(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	done := make(chan struct{})
	defer close(done)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		buf := make([]byte, 4)
		io.ReadFull(c, buf) // 05 02 00 02
		c.Write([]byte{5, 2})
		<-done
	}()
	d := socksclient.Dialer{ProxyAddr: ln.Addr().String(), Username: "u", Password: "p", HandshakeTimeout: 300 * time.Millisecond}
	_, err = d.DialContext(context.Background(), "tcp", "example.com:80")
	if err == nil {
		t.Fatal("no error")
	}
	if !strings.Contains(err.Error(), "(no answer to the authentication)") {
		t.Errorf("the proxy answered the greeting and hung on the authentication; error: %v", err)
	}
}
