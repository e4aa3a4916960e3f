package socksclient

import (
	"bytes"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"reflect"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/socksfwd/socksfwd/internal/testnet"
)

// bobAuth accepts only bob with the password of the golden userpass frame.
func bobAuth(user, password string) bool { return user == "bob" && password == "p@:/%" }

const (
	goldenUserPassBob = "01 03 626f62 05 70403a2f25"
	goldenConnectV4   = "05 01 00 01 c0000201 0050"
	goldenConnectName = "05 01 00 03 0b 64622e696e7465726e616c 1538"
	zeroReplyREP8     = "05 08 00 01 00000000 0000"
)

func TestHandshake(t *testing.T) {
	v4 := netip.MustParseAddr("192.0.2.1")
	tests := []struct {
		name string
		auth func(string, string) bool
		// in is everything the client sends; eof half-closes after it.
		in  string
		eof bool
		// out is everything the server writes.
		out       string
		want      *ServerRequest
		wantErr   error // matched with errors.Is
		wantProto bool  // a *ProtocolError
	}{
		{name: "no auth", in: "05 01 00" + goldenConnectV4, out: "05 00",
			want: &ServerRequest{Request: Request{Cmd: CmdConnect, Addr: Addr{IP: v4, Port: 80}}}},
		{name: "no auth among others", in: "05 03 01 02 00" + goldenConnectName, out: "05 00",
			want: &ServerRequest{Request: Request{Cmd: CmdConnect, Addr: Addr{Name: "db.internal", Port: 5432}}}},
		{name: "udp associate zeros", in: "05 01 00 05 03 00 01 00000000 0000", out: "05 00",
			want: &ServerRequest{Request: Request{Cmd: CmdUDPAssociate, Addr: Addr{IP: netip.IPv4Unspecified()}}}},
		{name: "unknown command is the caller's to refuse", in: "05 01 00 05 09 00 01 c0000201 0050", out: "05 00",
			want: &ServerRequest{Request: Request{Cmd: Command(9), Addr: Addr{IP: v4, Port: 80}}}},
		{name: "userpass ok", auth: bobAuth, in: "05 02 00 02" + goldenUserPassBob + goldenConnectV4, out: "05 02 01 00",
			want: &ServerRequest{Request: Request{Cmd: CmdConnect, Addr: Addr{IP: v4, Port: 80}}, User: "bob"}},
		{name: "userpass wrong password", auth: bobAuth, in: "05 01 02 01 03 626f62 01 78" + goldenConnectV4, out: "05 02 01 01",
			wantErr: ErrWrongCredentials},
		{name: "userpass wrong user", auth: bobAuth, in: "05 01 02 01 03 626f60 05 70403a2f25", out: "05 02 01 01",
			wantErr: ErrWrongCredentials},
		{name: "auth required, only no-auth offered", auth: bobAuth, in: "05 01 00" + goldenConnectV4, out: "05 ff",
			wantErr: ErrNoCommonMethod},
		{name: "no auth not offered", in: "05 02 01 02" + goldenConnectV4, out: "05 ff",
			wantErr: ErrNoCommonMethod},
		{name: "unknown atyp", in: "05 01 00 05 01 00 09 01020304 0050", out: "05 00" + zeroReplyREP8,
			wantProto: true},
		{name: "unknown atyp after auth", auth: bobAuth, in: "05 01 02" + goldenUserPassBob + "05 01 00 02 00 00", out: "05 02 01 00" + zeroReplyREP8,
			wantProto: true},
		// Not an unknown type: nothing to answer but a hang-up.
		{name: "zero-length name", in: "05 01 00 05 01 00 03 00 0050", out: "05 00", wantProto: true},
		{name: "request version 4", in: "05 01 00 04 01 00 01 c0000201 0050", out: "05 00", wantProto: true},
		// A SOCKS4 client is told so in its own protocol: "request rejected".
		{name: "greeting version 4", in: "04 01 00", out: "00 5b 0000 00000000", wantProto: true},
		{name: "socks4 connect", in: "04 01 0050 c0000201 00", out: "00 5b 0000 00000000", wantProto: true},
		{name: "greeting no methods", in: "05 00", out: "", wantProto: true},
		{name: "userpass version 5", auth: bobAuth, in: "05 01 02 05 01 61 01 62", out: "05 02", wantProto: true},
		// Fields of 0 bytes (curl -U user: sends PLEN 0) are read and
		// refused as credentials, not as bytes.
		{name: "userpass empty username", auth: bobAuth, in: "05 01 02 01 00 01 62" + goldenConnectV4, out: "05 02 01 01",
			wantErr: ErrWrongCredentials},
		{name: "userpass empty password", auth: bobAuth, in: "05 01 02 01 03 626f62 00" + goldenConnectV4, out: "05 02 01 01",
			wantErr: ErrWrongCredentials},
		{name: "userpass both empty", auth: bobAuth, in: "05 01 02 01 00 00", out: "05 02 01 01",
			wantErr: ErrWrongCredentials},
		{name: "silent client", in: "", eof: true, out: "", wantErr: io.EOF},
		{name: "truncated greeting", in: "05 02 00", eof: true, out: "", wantErr: io.ErrUnexpectedEOF},
		{name: "truncated userpass", auth: bobAuth, in: "05 01 02 01 03 626f", eof: true, out: "05 02", wantErr: io.ErrUnexpectedEOF},
		{name: "truncated request head", in: "05 01 00 05 01", eof: true, out: "05 00", wantErr: io.ErrUnexpectedEOF},
		{name: "truncated request address", in: "05 01 00 05 01 00 01 c00002", eof: true, out: "05 00", wantErr: io.ErrUnexpectedEOF},
		{name: "truncated name", in: "05 01 00 05 01 00 03 0b 6462", eof: true, out: "05 00", wantErr: io.ErrUnexpectedEOF},
		{name: "no request after greeting", in: "05 01 00", eof: true, out: "05 00", wantErr: io.EOF},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			client, server := testnet.TCPPair(t)
			if _, err := client.Write(unhex(t, tc.in)); err != nil {
				t.Fatal(err)
			}
			if tc.eof {
				client.CloseWrite()
			}
			// The bound keeps a wrong table row (a frame the server waits
			// to complete) from hanging the test.
			req, err := Handshake(server, ServerConfig{Authenticate: tc.auth, HandshakeTimeout: 10 * time.Second})
			// A FIN, not Close: closing with the client's bytes unread
			// would reset the connection.
			server.CloseWrite()
			out, rerr := io.ReadAll(client)
			if rerr != nil {
				t.Fatalf("reading what the server wrote: %v", rerr)
			}
			if want := unhex(t, tc.out); !bytes.Equal(out, want) {
				t.Errorf("server wrote % x, want % x", out, want)
			}
			switch {
			case tc.want != nil:
				if err != nil {
					t.Fatalf("Handshake: %v", err)
				}
				if req.Conn != server {
					t.Errorf("request's Conn is %v, want the handshake's conn", req.Conn)
				}
				req.Conn = nil
				if !reflect.DeepEqual(req, tc.want) {
					t.Errorf("request = %+v, want %+v", req, tc.want)
				}
			case tc.wantErr != nil:
				if !errors.Is(err, tc.wantErr) || req != nil {
					t.Fatalf("Handshake = %v, %v; want %v", req, err, tc.wantErr)
				}
				// The error is logged: no credential in it, the username
				// included (a password typed there would leak).
				if strings.Contains(err.Error(), "bob") {
					t.Fatalf("Handshake error %q shows the username sent", err)
				}
			case tc.wantProto:
				var pe *ProtocolError
				if !errors.As(err, &pe) || req != nil {
					t.Fatalf("Handshake = %v, %v; want a *ProtocolError", req, err)
				}
			}
		})
	}
}

// TestHandshakeLeavesPayload: bytes the client pipelines after its request
// (the first bytes of a TLS hello, say) are handed over in Early, or stay
// in the stream, in order: nothing is lost for the relay.
func TestHandshakeLeavesPayload(t *testing.T) {
	for _, auth := range []func(string, string) bool{nil, bobAuth} {
		client, server := testnet.TCPPair(t)
		script := "05 01 00" + goldenConnectName + "16030100"
		if auth != nil {
			script = "05 01 02" + goldenUserPassBob + goldenConnectName + "16030100"
		}
		client.Write(unhex(t, script))
		client.CloseWrite()
		req, err := Handshake(server, ServerConfig{Authenticate: auth, HandshakeTimeout: 10 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		if req.Addr.Name != "db.internal" {
			t.Fatalf("request %v", req.Request)
		}
		rest, err := io.ReadAll(server)
		if got := append(req.Early, rest...); err != nil || !bytes.Equal(got, unhex(t, "16030100")) {
			t.Fatalf("after the handshake Early holds % x and the stream % x, %v; want the pipelined 16 03 01 00", req.Early, rest, err)
		}
	}
}

// pipeClient runs client on one end of a net.Pipe, inside the synctest
// bubble of t, and returns the other end for the server. At cleanup both
// ends close, which ends whatever the client still waits for, and the
// client is waited for: the bubble must end with no goroutine of its own.
func pipeClient(t *testing.T, client func(c net.Conn)) net.Conn {
	c, s := net.Pipe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		client(c)
	}()
	t.Cleanup(func() {
		c.Close()
		s.Close()
		<-done
	})
	return s
}

// TestHandshakeOneByteAtATime: a client that sends every byte in its own
// segment is served the same.
func TestHandshakeOneByteAtATime(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		script := unhex(t, "05 01 02"+goldenUserPassBob+goldenConnectV4)
		credsEnd := 2 + len(unhex(t, goldenUserPassBob))
		got := make(chan []byte, 1)
		server := pipeClient(t, func(c net.Conn) {
			var out bytes.Buffer
			for i := range script {
				c.Write(script[i : i+1])
				// The server answers right after the greeting and after
				// the credentials: read each answer as it comes.
				if i == 2 || i == credsEnd {
					var b [2]byte
					io.ReadFull(c, b[:])
					out.Write(b[:])
				}
			}
			got <- out.Bytes()
		})
		req, err := Handshake(server, ServerConfig{Authenticate: bobAuth})
		if err != nil {
			t.Fatal(err)
		}
		if req.User != "bob" || req.Addr.Port != 80 {
			t.Fatalf("request %+v", req)
		}
		if out := <-got; !bytes.Equal(out, unhex(t, "05 02 01 00")) {
			t.Fatalf("server wrote % x", out)
		}
	})
}

// TestHandshakeTimeout: HandshakeTimeout bounds the whole handshake, not
// each read, so a client that says nothing, or dribbles, is cut; and a
// handshake that finished in time leaves no deadline behind for the
// session. The clock is synctest's: minutes pass at once.
func TestHandshakeTimeout(t *testing.T) {
	const timeout = 10 * time.Second
	cfg := ServerConfig{HandshakeTimeout: timeout}
	cutAfter := func(t *testing.T, client func(c net.Conn)) {
		synctest.Test(t, func(t *testing.T) {
			server := pipeClient(t, client)
			start := time.Now()
			_, err := Handshake(server, cfg)
			if !errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("err = %v, want os.ErrDeadlineExceeded", err)
			}
			if took := time.Since(start); took != timeout {
				t.Fatalf("gave up after %v, want %v", took, timeout)
			}
		})
	}
	t.Run("silent", func(t *testing.T) {
		cutAfter(t, func(net.Conn) {})
	})
	t.Run("dribbling", func(t *testing.T) {
		// Each frame in time for a per-read bound, too slow for the
		// whole: the greeting at 4 s, the request's head at 8 s.
		cutAfter(t, func(c net.Conn) {
			time.Sleep(4 * time.Second)
			c.Write([]byte{5, 1, 0})
			io.ReadFull(c, make([]byte, 2))
			time.Sleep(4 * time.Second)
			c.Write([]byte{5, 1, 0, 1})
			time.Sleep(4 * time.Second)
			c.Write([]byte{192, 0, 2, 1, 0, 80})
		})
	})
	t.Run("deadline cleared", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			connect := unhex(t, goldenConnectV4)
			server := pipeClient(t, func(c net.Conn) {
				c.Write([]byte{5, 1, 0})
				io.ReadFull(c, make([]byte, 2))
				c.Write(connect)
				// An idle session, long past the handshake's bound.
				time.Sleep(2 * timeout)
				c.Write([]byte("late"))
			})
			req, err := Handshake(server, cfg)
			if err != nil {
				t.Fatal(err)
			}
			b := make([]byte, 4)
			if _, err := io.ReadFull(req.Conn, b); err != nil || string(b) != "late" {
				t.Fatalf("read after the handshake: %q, %v", b, err)
			}
		})
	})
}

// recordConn is a net.Conn that reads a script and records what is
// written to it. Any other method panics (the embedded nil Conn): a
// handshake must not close the caller's conn or ask its addresses.
type recordConn struct {
	net.Conn
	r io.Reader
	w bytes.Buffer
}

func (c *recordConn) Read(b []byte) (int, error)       { return c.r.Read(b) }
func (c *recordConn) Write(b []byte) (int, error)      { return c.w.Write(b) }
func (c *recordConn) SetDeadline(time.Time) error      { return nil }
func (c *recordConn) SetReadDeadline(time.Time) error  { return nil }
func (c *recordConn) SetWriteDeadline(time.Time) error { return nil }

// TestServerReply: Reply encodes each address type, and a failure with no
// address gets the all-zero IPv4 one RFC 1928 leaves unused.
func TestServerReply(t *testing.T) {
	n := 0
	for _, tc := range goldenCases() {
		rep, ok := tc.value.(Reply)
		if !ok {
			continue
		}
		n++
		c := &recordConn{}
		if err := (&ServerRequest{Conn: c}).Reply(rep.Code, rep.Addr); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if want := unhex(t, tc.golden); !bytes.Equal(c.w.Bytes(), want) {
			t.Errorf("%s: Reply wrote % x, want % x", tc.name, c.w.Bytes(), want)
		}
	}
	if n < 4 {
		t.Fatalf("only %d reply golden cases", n)
	}
	for _, code := range []ReplyCode{RepGeneralFailure, RepConnectionRefused, RepCommandNotSupported, RepAddrTypeNotSupported} {
		c := &recordConn{}
		if err := (&ServerRequest{Conn: c}).Reply(code, Addr{}); err != nil {
			t.Fatal(err)
		}
		if want := []byte{Version, byte(code), 0, byte(AddrIPv4), 0, 0, 0, 0, 0, 0}; !bytes.Equal(c.w.Bytes(), want) {
			t.Errorf("Reply(%v, no address) wrote % x, want % x", code, c.w.Bytes(), want)
		}
	}
	// A success must say where: no address is an error, and nothing is sent.
	c := &recordConn{}
	if err := (&ServerRequest{Conn: c}).Reply(RepSucceeded, Addr{}); err == nil || c.w.Len() != 0 {
		t.Fatalf("Reply(succeeded, no address) = %v, wrote % x; want an error and nothing", err, c.w.Bytes())
	}
}

// commandRecorder is a Handler that notes which method got the request.
type commandRecorder struct{ got []string }

func (h *commandRecorder) Connect(*ServerRequest)   { h.got = append(h.got, "connect") }
func (h *commandRecorder) Bind(*ServerRequest)      { h.got = append(h.got, "bind") }
func (h *commandRecorder) Associate(*ServerRequest) { h.got = append(h.got, "associate") }

// TestServeConn: the server loop hands each RFC 1928 command to its
// Handler method, answers any other command REP 7 itself, and passes a
// failed handshake's error on without calling the Handler.
func TestServeConn(t *testing.T) {
	for _, tc := range []struct {
		name, in, out string
		want          []string
		wantErr       error
	}{
		{"connect", "05 01 00  05 01 00 01 c0000201 0050", "05 00", []string{"connect"}, nil},
		{"bind", "05 01 00  05 02 00 01 c0000201 0050", "05 00", []string{"bind"}, nil},
		{"udp associate", "05 01 00  05 03 00 01 00000000 0000", "05 00", []string{"associate"}, nil},
		{"unknown command", "05 01 00  05 09 00 01 c0000201 0050", "05 00  05 07 00 01 00000000 0000", nil, ErrUnknownCommand},
		{"no common method", "05 01 02", "05 ff", nil, ErrNoCommonMethod},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := &recordConn{r: bytes.NewReader(unhex(t, tc.in))}
			h := &commandRecorder{}
			_, err := ServeConn(c, ServerConfig{}, h)
			if !errors.Is(err, tc.wantErr) || (tc.wantErr == nil) != (err == nil) {
				t.Fatalf("ServeConn: %v, want %v", err, tc.wantErr)
			}
			if !reflect.DeepEqual(h.got, tc.want) {
				t.Errorf("the Handler got %q, want %q", h.got, tc.want)
			}
			if want := unhex(t, tc.out); !bytes.Equal(c.w.Bytes(), want) {
				t.Errorf("the server wrote % x, want % x", c.w.Bytes(), want)
			}
		})
	}
}
