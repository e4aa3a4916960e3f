package socksclient

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"reflect"
	"testing"
	"testing/iotest"
	"time"
)

// fuzzRoundTrip checks a decoder: no panic on any input, n within the input,
// and whatever parses encodes to bytes that parse to the same value
// (x/net's FuzzUnpackPack idea). Seeds come from the golden frames and the
// committed corpus under testdata/fuzz.
// reserved lists the offsets of RSV bytes, which decoders ignore.
func fuzzRoundTrip[T appender](f *testing.F, parse func([]byte) (T, int, error), reserved ...int) {
	for _, tc := range goldenCases() {
		golden := unhex(f, tc.golden)
		if _, _, err := parse(golden); err == nil {
			f.Add(golden)
		}
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		v, n, err := parse(b)
		if err != nil {
			return
		}
		if n <= 0 || n > len(b) {
			t.Fatalf("parse used %d of %d bytes", n, len(b))
		}
		enc, err := v.AppendTo(nil)
		if err != nil {
			if decodesWider(v) {
				return
			}
			t.Fatalf("parsed %#v does not encode: %v", v, err)
		}
		v2, n2, err := parse(enc)
		if err != nil || n2 != len(enc) || !reflect.DeepEqual(v, v2) {
			t.Fatalf("round trip: %#v -> % x -> %#v, %d, %v", v, enc, v2, n2, err)
		}
		// Everything but the reserved bytes is carried over exactly.
		if !bytes.Equal(maskReserved(enc, reserved), maskReserved(b[:n], reserved)) {
			t.Fatalf("re-encoded % x differs from input % x", enc, b[:n])
		}
	})
}

// decodesWider reports a value a decoder takes on purpose and its encoder
// refuses: RFC 1929 fields of 0 bytes, which clients send and a server
// answers with status 1.
func decodesWider(v any) bool {
	u, ok := v.(UserPassRequest)
	return ok && (u.Username == "" || u.Password == "")
}

func maskReserved(b []byte, reserved []int) []byte {
	c := bytes.Clone(b)
	for _, i := range reserved {
		c[i] = 0
	}
	return c
}

func FuzzParseGreeting(f *testing.F)        { fuzzRoundTrip(f, ParseGreeting) }
func FuzzParseMethodSelection(f *testing.F) { fuzzRoundTrip(f, ParseMethodSelection) }
func FuzzParseUserPassRequest(f *testing.F) { fuzzRoundTrip(f, ParseUserPassRequest) }
func FuzzParseUserPassStatus(f *testing.F)  { fuzzRoundTrip(f, ParseUserPassStatus) }
func FuzzParseRequest(f *testing.F)         { fuzzRoundTrip(f, ParseRequest, 2) }
func FuzzParseReply(f *testing.F)           { fuzzRoundTrip(f, ParseReply, 2) }
func FuzzParseUDPHeader(f *testing.F)       { fuzzRoundTrip(f, ParseUDPHeader, 0, 1) }

// fuzzReader checks a stream reader against its Parse
// function: whatever the bytes and however the stream splits them, the
// reader never panics, returns what Parse returns, reads exactly the
// frame when there is one (the bytes after it are the relay's), and
// fails, with an EOF when the bytes run out, when Parse finds none.
func fuzzReader[T any](f *testing.F, parse func([]byte) (T, int, error), read func(io.Reader) (T, error)) {
	for _, tc := range goldenCases() {
		golden := unhex(f, tc.golden)
		if _, _, err := parse(golden); err == nil {
			f.Add(golden)
			f.Add(append(golden, 0xAB)) // pipelined payload
		}
	}
	streams := []struct {
		name string
		wrap func(io.Reader) io.Reader
	}{
		{"whole", func(r io.Reader) io.Reader { return r }},
		{"one byte a read", iotest.OneByteReader},
		{"EOF with the last data", iotest.DataErrReader},
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		want, n, perr := parse(b)
		var pe *ProtocolError
		parseTruncated := errors.As(perr, &pe) && pe.Truncated()
		for _, s := range streams {
			r := &countingReader{r: s.wrap(bytes.NewReader(b))}
			got, err := read(r)
			used := r.n
			switch {
			case perr == nil:
				if err != nil {
					t.Fatalf("%s: read failed (%v) where parse found %#v in % x", s.name, err, want, b)
				}
				if !reflect.DeepEqual(got, want) {
					t.Fatalf("%s: read %#v, parse %#v from % x", s.name, got, want, b)
				}
				if used != n {
					t.Fatalf("%s: read used %d bytes of % x, the frame is %d", s.name, used, b, n)
				}
			case err == nil:
				t.Fatalf("%s: read %#v where parse failed (%v) on % x", s.name, got, perr, b)
			case parseTruncated:
				if err != io.EOF && err != io.ErrUnexpectedEOF {
					t.Fatalf("%s: read of truncated % x: %v, want an EOF", s.name, b, err)
				}
				if err == io.EOF && used != 0 {
					t.Fatalf("%s: io.EOF after %d bytes of a frame, want io.ErrUnexpectedEOF", s.name, used)
				}
			case errors.As(err, &pe):
				// The reader checks what it can as soon as it has it, so it
				// may also stop at an EOF first; when it does name the
				// fault, it names Parse's.
				if err.Error() != perr.Error() {
					t.Fatalf("%s: read says %q, parse %q of % x", s.name, err, perr, b)
				}
			}
		}
	})
}

// countingReader counts the bytes its reader has handed on, which a
// stream wrapper that reads ahead (DataErrReader) would hide from the
// bytes.Reader below it.
type countingReader struct {
	r io.Reader
	n int
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}

func FuzzReadGreeting(f *testing.F)        { fuzzReader(f, ParseGreeting, ReadGreeting) }
func FuzzReadUserPassRequest(f *testing.F) { fuzzReader(f, ParseUserPassRequest, ReadUserPassRequest) }
func FuzzReadRequest(f *testing.F)         { fuzzReader(f, ParseRequest, ReadRequest) }

// The client's readers of a server's answers, on the same terms.
func FuzzReadMethodSelection(f *testing.F) { fuzzReader(f, ParseMethodSelection, ReadMethodSelection) }
func FuzzReadUserPassStatus(f *testing.F)  { fuzzReader(f, ParseUserPassStatus, ReadUserPassStatus) }
func FuzzReadReply(f *testing.F)           { fuzzReader(f, ParseReply, ReadReply) }

// FuzzHandshake plays arbitrary client bytes against the server side of
// the handshake, without and with RFC 1929: it never panics, never closes
// or reads past the request, and what it writes back is a sequence of
// well-formed frames in the order RFC 1928 and RFC 1929 allow, one that
// agrees with the outcome: method 0xFF alone for ErrNoCommonMethod, status
// 1 last for ErrWrongCredentials, REP 8 with a zero address only after the
// method was agreed, for a request nothing after the method and status,
// and for a SOCKS4 client the SOCKS4 rejection alone.
func FuzzHandshake(f *testing.F) {
	for _, seed := range []string{
		"05 01 00" + goldenConnectV4 + "16030100",
		"05 02 00 02" + goldenUserPassBob + goldenConnectName,
		"05 01 02 01 03 626f62 01 78" + goldenConnectV4,
		"05 01 00 05 01 00 09 01020304 0050",
		"05 01 02" + goldenUserPassBob + "05 01 00 02 00 00",
		"05 01 02 01 00 01 62",
		"05 01 02 01 03 626f62 00" + goldenConnectV4,
		"05 02 01 02",
		"04 01 00",
	} {
		f.Add(unhex(f, seed))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		for _, auth := range []func(string, string) bool{nil, bobAuth} {
			c := &recordConn{r: bytes.NewReader(b)}
			req, err := Handshake(c, ServerConfig{Authenticate: auth})
			checkHandshakeWrites(t, b, auth != nil, c, req, err)
		}
	})
}

// checkHandshakeWrites checks what Handshake wrote to c, given the bytes b
// the client sent and the outcome.
func checkHandshakeWrites(t *testing.T, b []byte, auth bool, c *recordConn, req *ServerRequest, err error) {
	t.Helper()
	if (req == nil) == (err == nil) {
		t.Fatalf("Handshake returned %v and %v", req, err)
	}
	out := c.w.Bytes()
	fail := func(why string) {
		t.Helper()
		t.Fatalf("auth=%v, client % x: server wrote % x (err %v): %s", auth, b, out, err, why)
	}
	if len(out) == 0 {
		if err == nil || errors.Is(err, ErrNoCommonMethod) || errors.Is(err, ErrWrongCredentials) {
			fail("a refusal or a request without the method selection")
		}
		return
	}
	if pe := (*ProtocolError)(nil); errors.As(err, &pe) && pe.SOCKS4() {
		if !bytes.Equal(out, socks4Rejected[:]) || b[0] != socks4Version {
			fail("a SOCKS4 client gets the SOCKS4 rejection, alone")
		}
		return
	}
	sel, n, perr := ParseMethodSelection(out)
	if perr != nil {
		fail("no method selection first: " + perr.Error())
	}
	out = out[n:]
	want := MethodNoAuth
	if auth {
		want = MethodUserPass
	}
	switch sel.Method {
	case MethodNoAcceptable:
		if len(out) != 0 || !errors.Is(err, ErrNoCommonMethod) {
			fail("method 0xFF must be all, and ErrNoCommonMethod")
		}
		return
	case want:
	default:
		fail("a method the server does not accept")
	}
	if errors.Is(err, ErrNoCommonMethod) {
		fail("ErrNoCommonMethod after a method was selected")
	}
	if auth {
		if len(out) == 0 {
			if err == nil || errors.Is(err, ErrWrongCredentials) {
				fail("no status after a username/password")
			}
			return
		}
		st, n, perr := ParseUserPassStatus(out)
		if perr != nil || st.Status > 1 {
			fail(fmt.Sprintf("no username/password status 0 or 1 after the selection: %v", perr))
		}
		out = out[n:]
		if !st.Success() {
			if len(out) != 0 || !errors.Is(err, ErrWrongCredentials) {
				fail("status 1 must be last, and ErrWrongCredentials")
			}
			return
		}
	}
	if errors.Is(err, ErrWrongCredentials) {
		fail("ErrWrongCredentials without status 1")
	}
	if req != nil {
		if len(out) != 0 {
			fail("bytes after the handshake's answers for a request to reply to")
		}
		// The request is the frame right after the greeting and the
		// credentials, and what follows it is in Early or still unread,
		// in order.
		_, gn, _ := ParseGreeting(b)
		rest := b[gn:]
		if auth {
			up, un, _ := ParseUserPassRequest(rest)
			if req.User != up.Username {
				fail("User is not the username sent")
			}
			rest = rest[un:]
		}
		q, qn, perr := ParseRequest(rest)
		if perr != nil || !reflect.DeepEqual(q, req.Request) {
			fail(fmt.Sprintf("request %v is not the one sent (%v, %v)", req.Request, q, perr))
		}
		after := rest[qn:]
		if !bytes.HasPrefix(after, req.Early) || (req.Early != nil && len(req.Early) == 0) {
			fail(fmt.Sprintf("Early % x is not what followed the request", req.Early))
		}
		if unread := c.r.(*bytes.Reader).Len(); unread != len(after)-len(req.Early) {
			fail(fmt.Sprintf("%d bytes left unread and %d in Early, want the %d after the request", unread, len(req.Early), len(after)))
		}
		return
	}
	if len(out) == 0 {
		return
	}
	rep, n, perr := ParseReply(out)
	if perr != nil || n != len(out) {
		fail(fmt.Sprintf("not one reply after the method: %v", perr))
	}
	var pe *ProtocolError
	if rep.Code != RepAddrTypeNotSupported || rep.Addr != unspecifiedAddr || !errors.As(err, &pe) {
		fail("the only reply Handshake sends is REP 8 with a zero address, for a malformed request")
	}
}

// FuzzCheckUDPHeader: the allocation-free check a relay runs on every
// datagram agrees with ParseUDPHeader: the same header length for a whole
// header, ErrFragmented for FRAG != 0, an error for whatever does not parse.
func FuzzCheckUDPHeader(f *testing.F) {
	for _, tc := range goldenCases() {
		golden := unhex(f, tc.golden)
		if _, _, err := ParseUDPHeader(golden); err == nil {
			f.Add(append(golden, "payload"...))
		}
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		n, err := CheckUDPHeader(b)
		h, pn, perr := ParseUDPHeader(b)
		switch {
		case perr != nil:
			if err == nil {
				t.Fatalf("% x: CheckUDPHeader took %d bytes of what ParseUDPHeader refuses (%v)", b, n, perr)
			}
		case h.Frag != 0:
			if !errors.Is(err, ErrFragmented) {
				t.Fatalf("% x: FRAG %d gave %v, want ErrFragmented", b, h.Frag, err)
			}
		case err != nil || n != pn:
			t.Fatalf("% x: CheckUDPHeader %d, %v; ParseUDPHeader %d", b, n, err, pn)
		}
	})
}

// FuzzDialHandshake plays arbitrary proxy bytes against the client's side
// of the handshake, with and without credentials, for each command: it
// never panics, and a success is a reply that parses and succeeded.
func FuzzDialHandshake(f *testing.F) {
	for _, seed := range []string{
		"05 00  05 00 00 01 c0000201 0050",
		"05 02 01 00  05 00 00 03 05 'proxy' 0438",
		"05 02 05 01",
		"05 02 05 00  05 00 00 04 20010db8000000000000000000000005 0050",
		"05 00  05 07 00 01",
		"05 ff",
		"05 02 01",
	} {
		f.Add(unhexQuoted(f, seed))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		target := Addr{IP: netip.MustParseAddr("192.0.2.1"), Port: 80}
		for _, creds := range [][2]string{{"", ""}, {"bob", "pw"}} {
			for _, cmd := range []Command{CmdConnect, CmdBind, CmdUDPAssociate} {
				d := &Dialer{ProxyAddr: "fuzz:1080", Username: creds[0], Password: creds[1], HandshakeTimeout: time.Second,
					ProxyDial: func(context.Context, string, string) (net.Conn, error) {
						return &scriptConn{r: bytes.NewReader(b)}, nil
					}}
				conn, reply, err := d.request(context.Background(), cmd, target)
				if err != nil {
					continue
				}
				conn.Close()
				if reply.Code != RepSucceeded {
					t.Fatalf("%s: a failed reply %v came back without an error from % x", cmd, reply, b)
				}
			}
		}
	})
}

// scriptConn is a proxy connection that sends a script and takes
// whatever the client writes.
type scriptConn struct{ r io.Reader }

func (c *scriptConn) Read(b []byte) (int, error)  { return c.r.Read(b) }
func (c *scriptConn) Write(b []byte) (int, error) { return len(b), nil }
func (c *scriptConn) Close() error                { return nil }
func (c *scriptConn) LocalAddr() net.Addr         { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1} }
func (c *scriptConn) RemoteAddr() net.Addr {
	return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1080}
}
func (c *scriptConn) SetDeadline(time.Time) error      { return nil }
func (c *scriptConn) SetReadDeadline(time.Time) error  { return nil }
func (c *scriptConn) SetWriteDeadline(time.Time) error { return nil }

// unhexQuoted decodes hex fields and 'quoted text', as the dialer's
// transcripts are written.
func unhexQuoted(t testing.TB, s string) []byte {
	var out []byte
	for _, field := range bytes.Fields([]byte(s)) {
		if field[0] == '\'' {
			out = append(out, bytes.Trim(field, "'")...)
			continue
		}
		out = append(out, unhex(t, string(field))...)
	}
	return out
}
