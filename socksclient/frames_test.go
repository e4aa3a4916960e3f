package socksclient

import (
	"bytes"
	"encoding/hex"
	"errors"
	"io"
	"net/netip"
	"reflect"
	"strings"
	"testing"
)

// unhex reads golden bytes written by hand from the RFC box diagrams;
// spaces separate fields.
func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

var name255 = strings.Repeat("a", 255)

// frameCase is one golden frame: its value, its bytes, and the codec
// functions under test.
type frameCase struct {
	name   string
	value  any
	golden string
	parse  func([]byte) (any, int, error)
	read   func(io.Reader) (any, error) // nil for frames without a stream reader
}

func wrap[T any](p func([]byte) (T, int, error)) func([]byte) (any, int, error) {
	return func(b []byte) (any, int, error) { return p(b) }
}

func wrapRead[T any](r func(io.Reader) (T, error)) func(io.Reader) (any, error) {
	return func(rd io.Reader) (any, error) { return r(rd) }
}

type appender interface{ AppendTo([]byte) ([]byte, error) }

func goldenCases() []frameCase {
	v4 := netip.MustParseAddr("192.0.2.1")
	v6 := netip.MustParseAddr("2001:db8::5")
	greet, readGreet := wrap(ParseGreeting), wrapRead(ReadGreeting)
	req, readReq := wrap(ParseRequest), wrapRead(ReadRequest)
	rep, readRep := wrap(ParseReply), wrapRead(ReadReply)
	udp := wrap(ParseUDPHeader)
	return []frameCase{
		{"greeting no-auth", Greeting{Methods: []AuthMethod{MethodNoAuth}}, "05 01 00", greet, readGreet},
		{"greeting two methods", Greeting{Methods: []AuthMethod{MethodNoAuth, MethodUserPass}}, "05 02 00 02", greet, readGreet},
		{"method selection", MethodSelection{Method: MethodUserPass}, "05 02", wrap(ParseMethodSelection), wrapRead(ReadMethodSelection)},
		{"method selection 0xFF", MethodSelection{Method: MethodNoAcceptable}, "05 ff", wrap(ParseMethodSelection), wrapRead(ReadMethodSelection)},
		{"userpass request", UserPassRequest{Username: "bob", Password: "p@:/%"}, "01 03 626f62 05 70403a2f25", wrap(ParseUserPassRequest), wrapRead(ReadUserPassRequest)},
		{"userpass request 255", UserPassRequest{Username: name255, Password: name255}, "01 ff " + strings.Repeat("61", 255) + " ff " + strings.Repeat("61", 255), wrap(ParseUserPassRequest), wrapRead(ReadUserPassRequest)},
		{"userpass status ok", UserPassStatus{}, "01 00", wrap(ParseUserPassStatus), wrapRead(ReadUserPassStatus)},
		{"userpass status fail", UserPassStatus{Status: 1}, "01 01", wrap(ParseUserPassStatus), wrapRead(ReadUserPassStatus)},
		{"connect ipv4", Request{Cmd: CmdConnect, Addr: Addr{IP: v4, Port: 80}}, "05 01 00 01 c0000201 0050", req, readReq},
		{"connect ipv6", Request{Cmd: CmdConnect, Addr: Addr{IP: v6, Port: 5432}}, "05 01 00 04 20010db8000000000000000000000005 1538", req, readReq},
		{"connect name", Request{Cmd: CmdConnect, Addr: Addr{Name: "db.internal", Port: 5432}}, "05 01 00 03 0b 64622e696e7465726e616c 1538", req, readReq},
		{"connect 255-byte name", Request{Cmd: CmdConnect, Addr: Addr{Name: name255, Port: 1}}, "05 01 00 03 ff " + strings.Repeat("61", 255) + " 0001", req, readReq},
		{"bind", Request{Cmd: CmdBind, Addr: Addr{IP: netip.IPv4Unspecified()}}, "05 02 00 01 00000000 0000", req, readReq},
		{"udp associate", Request{Cmd: CmdUDPAssociate, Addr: Addr{IP: netip.IPv6Unspecified()}}, "05 03 00 04 00000000000000000000000000000000 0000", req, readReq},
		{"reply ok ipv4", Reply{Addr: Addr{IP: v4, Port: 1080}}, "05 00 00 01 c0000201 0438", rep, readRep},
		{"reply refused", Reply{Code: RepConnectionRefused, Addr: Addr{IP: netip.IPv4Unspecified()}}, "05 05 00 01 00000000 0000", rep, readRep},
		{"reply ipv6", Reply{Addr: Addr{IP: v6, Port: 65535}}, "05 00 00 04 20010db8000000000000000000000005 ffff", rep, readRep},
		{"reply name", Reply{Addr: Addr{Name: "proxy", Port: 1080}}, "05 00 00 03 05 70726f7879 0438", rep, readRep},
		{"udp header ipv4", UDPHeader{Addr: Addr{IP: v4, Port: 53}}, "0000 00 01 c0000201 0035", udp, nil},
		{"udp header frag", UDPHeader{Frag: 1, Addr: Addr{IP: v6, Port: 53}}, "0000 01 04 20010db8000000000000000000000005 0035", udp, nil},
		{"udp header name", UDPHeader{Addr: Addr{Name: "ns.internal", Port: 53}}, "0000 00 03 0b 6e732e696e7465726e616c 0035", udp, nil},
	}
}

func TestFramesGolden(t *testing.T) {
	for _, tc := range goldenCases() {
		t.Run(tc.name, func(t *testing.T) {
			golden := unhex(t, tc.golden)
			got, err := tc.value.(appender).AppendTo([]byte{0xEE})
			if err != nil {
				t.Fatalf("AppendTo: %v", err)
			}
			if !bytes.Equal(got[1:], golden) || got[0] != 0xEE {
				t.Fatalf("AppendTo = % x, want ee % x", got, golden)
			}
			// A trailing byte is not consumed.
			v, n, err := tc.parse(append(golden, 0xAB))
			if err != nil {
				t.Fatalf("parse: %v", err)
			}
			if n != len(golden) {
				t.Fatalf("parse used %d bytes, want %d", n, len(golden))
			}
			if !reflect.DeepEqual(v, tc.value) {
				t.Fatalf("parse = %#v, want %#v", v, tc.value)
			}
			// Every truncated prefix fails as truncated.
			for i := range golden {
				_, _, err := tc.parse(golden[:i])
				var pe *ProtocolError
				if !errors.As(err, &pe) || !pe.Truncated() {
					t.Fatalf("parse of %d-byte prefix: err = %v, want truncated", i, err)
				}
			}
			if tc.read == nil {
				return
			}
			r := bytes.NewReader(append(golden, 0xAB, 0xCD))
			v, err = tc.read(r)
			if err != nil {
				t.Fatalf("read: %v", err)
			}
			if !reflect.DeepEqual(v, tc.value) {
				t.Fatalf("read = %#v, want %#v", v, tc.value)
			}
			if r.Len() != 2 {
				t.Fatalf("read left %d bytes, want the 2 after the frame", r.Len())
			}
			// A stream cut anywhere inside the frame is an error, never a value.
			for i := 1; i < len(golden); i++ {
				if _, err := tc.read(bytes.NewReader(golden[:i])); err == nil {
					t.Fatalf("read of %d-byte prefix succeeded", i)
				}
			}
			if _, err := tc.read(bytes.NewReader(nil)); err != io.EOF {
				t.Fatalf("read of empty stream: %v, want io.EOF", err)
			}
		})
	}
}

// TestUserPassRequestEmptyFields: the decoders take a username or password
// of 0 bytes, which clients send (curl -U user:, x/net with an empty
// password) though RFC 1929 has none, so that a server can answer status
// 1; the encoder still refuses them (TestAppendValidates).
func TestUserPassRequestEmptyFields(t *testing.T) {
	tests := []struct {
		name, in string
		want     UserPassRequest
	}{
		{"empty password", "01 01 61 00", UserPassRequest{Username: "a"}},
		{"empty username", "01 00 01 62", UserPassRequest{Password: "b"}},
		{"both empty", "01 00 00", UserPassRequest{}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			in := unhex(t, tc.in)
			got, n, err := ParseUserPassRequest(append(in, 0xAB))
			if err != nil || n != len(in) || got != tc.want {
				t.Fatalf("ParseUserPassRequest = %#v, %d, %v; want %#v, %d", got, n, err, tc.want, len(in))
			}
			r := bytes.NewReader(append(in, 0xAB))
			if got, err := ReadUserPassRequest(r); err != nil || got != tc.want || r.Len() != 1 {
				t.Fatalf("ReadUserPassRequest = %#v, %v, %d bytes left; want %#v, 1 left", got, err, r.Len(), tc.want)
			}
			for i := 1; i < len(in); i++ {
				if _, _, err := ParseUserPassRequest(in[:i]); err == nil {
					t.Fatalf("%d-byte prefix parsed", i)
				}
			}
		})
	}
}

func TestFramesRejected(t *testing.T) {
	tests := []struct {
		name  string
		parse func([]byte) (any, int, error)
		in    string
		want  string
	}{
		{"greeting version 4", wrap(ParseGreeting), "04 01 00", "version 0x04"},
		{"greeting no methods", wrap(ParseGreeting), "05 00", "no methods"},
		{"selection version", wrap(ParseMethodSelection), "01 00", "version 0x01"},
		{"userpass version", wrap(ParseUserPassRequest), "05 01 61 01 62", "version 0x05"},
		{"status version", wrap(ParseUserPassStatus), "05 00", "version 0x05"},
		{"request unknown atyp", wrap(ParseRequest), "05 01 00 02 00 00", "unknown address type 0x02"},
		{"request empty name", wrap(ParseRequest), "05 01 00 03 00 00 50", "zero-length domain name"},
		{"reply version", wrap(ParseReply), "04 00 00 01 00000000 0000", "version 0x04"},
		{"reply atyp 9", wrap(ParseReply), "05 00 00 09 01020304 0050", "unknown address type 0x09"},
		{"udp atyp 0", wrap(ParseUDPHeader), "0000 00 00 01020304 0050", "unknown address type 0x00"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := tc.parse(unhex(t, tc.in))
			var pe *ProtocolError
			if !errors.As(err, &pe) || pe.Truncated() {
				t.Fatalf("err = %v, want a ProtocolError", err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %q, want it to mention %q", err, tc.want)
			}
		})
	}
}

func TestAppendValidates(t *testing.T) {
	tests := []struct {
		name string
		f    appender
	}{
		{"256-byte name", Request{Cmd: CmdConnect, Addr: Addr{Name: name255 + "a", Port: 1}}},
		{"empty address", Request{Cmd: CmdConnect}},
		{"no methods", Greeting{}},
		{"256 methods", Greeting{Methods: make([]AuthMethod, 256)}},
		{"empty username", UserPassRequest{Password: "x"}},
		{"empty password", UserPassRequest{Username: "x"}},
		{"256-byte password", UserPassRequest{Username: "x", Password: name255 + "a"}},
		{"udp 256-byte name", UDPHeader{Addr: Addr{Name: name255 + "a"}}},
		{"udp empty address", UDPHeader{Frag: 1}},
		{"reply 256-byte name", Reply{Addr: Addr{Name: name255 + "a", Port: 1}}},
		{"reply empty address", Reply{Code: RepGeneralFailure}},
		{"bind empty address", Request{Cmd: CmdBind}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			// The caller's bytes, with spare capacity that must stay
			// untouched too: a failed append writes nothing anywhere.
			buf := bytes.Repeat([]byte{0xEE}, 64)
			buf[0], buf[1] = 1, 2
			got, err := tc.f.AppendTo(buf[:2])
			if err == nil {
				t.Fatalf("AppendTo succeeded: % x", got)
			}
			if !bytes.Equal(got, []byte{1, 2}) {
				t.Fatalf("AppendTo returned % x on error, want the input 01 02", got)
			}
			if want := append([]byte{1, 2}, bytes.Repeat([]byte{0xEE}, 62)...); !bytes.Equal(buf, want) {
				t.Fatalf("AppendTo wrote % x past the input on error", buf[2:8])
			}
		})
	}
}

func TestReadReplyRejectsBadATYPEarly(t *testing.T) {
	// The stream reader must not wait for bytes an unknown ATYP cannot describe.
	_, err := ReadReply(bytes.NewReader(unhex(t, "05 00 00 09 01")))
	var pe *ProtocolError
	if !errors.As(err, &pe) || !strings.Contains(err.Error(), "unknown address type") {
		t.Fatalf("err = %v", err)
	}
}

func TestParseAddr(t *testing.T) {
	tests := []struct {
		in   string
		want Addr
		err  bool
	}{
		{"db.internal:5432", Addr{Name: "db.internal", Port: 5432}, false},
		{"192.0.2.1:80", Addr{IP: netip.MustParseAddr("192.0.2.1"), Port: 80}, false},
		{"[2001:db8::5]:5432", Addr{IP: netip.MustParseAddr("2001:db8::5"), Port: 5432}, false},
		{"[::ffff:192.0.2.1]:1", Addr{IP: netip.MustParseAddr("192.0.2.1"), Port: 1}, false},
		{"host:99999", Addr{}, true},
		{"host", Addr{}, true},
		{":80", Addr{}, true},
		{"[fe80::1%eth0]:80", Addr{}, true},
		{name255 + "a:80", Addr{}, true},
		// Internationalized names travel in their ASCII form, as curl
		// sends them; a space or a control byte is no host's.
		{"bücher.example:443", Addr{Name: "xn--bcher-kva.example", Port: 443}, false},
		{"_sip._tcp.example:5060", Addr{Name: "_sip._tcp.example", Port: 5060}, false},
		{"_dmarc.bücher.example:53", Addr{Name: "_dmarc.xn--bcher-kva.example", Port: 53}, false},
		{"bü\u3000cher.example:80", Addr{}, true}, // an ideographic space maps to a space
		{"bü/cher.example:80", Addr{}, true},
		{"bad host:80", Addr{}, true},
		{"bad\x00host:80", Addr{}, true},
		{"\u00ad:80", Addr{}, true}, // maps to nothing: an empty name
	}
	for _, tc := range tests {
		got, err := ParseAddr(tc.in)
		if (err != nil) != tc.err || got != tc.want {
			t.Errorf("ParseAddr(%.30q) = %v, %v; want %v, err=%v", tc.in, got, err, tc.want, tc.err)
		}
	}
	if s := (Addr{IP: netip.MustParseAddr("2001:db8::5"), Port: 53}).String(); s != "[2001:db8::5]:53" {
		t.Errorf("String = %s", s)
	}
}

func TestStrings(t *testing.T) {
	if s := RepConnectionRefused.String(); s != "connection refused" {
		t.Errorf("RepConnectionRefused = %q", s)
	}
	if s := ReplyCode(0x42).String(); s != "unassigned reply code" {
		t.Errorf("0x42 = %q", s)
	}
	if s := (&ReplyError{Cmd: CmdConnect, Code: RepConnectionRefused}).Error(); s != "socks connect: connection refused (REP 0x05)" {
		t.Errorf("ReplyError = %q", s)
	}
	if s := (UserPassRequest{Username: "u", Password: "hunter2"}).String(); strings.Contains(s, "hunter2") {
		t.Errorf("UserPassRequest.String leaks the password: %q", s)
	}
	if !errors.Is(&ReplyError{Cmd: CmdUDPAssociate, Code: RepCommandNotSupported}, ErrCommandNotSupported) {
		t.Error("REP 7 is not ErrCommandNotSupported")
	}
}

// TestZonedAddressRefused: an address with a zone cannot be encoded: the
// proxy would get another address than the one asked for.
func TestZonedAddressRefused(t *testing.T) {
	a := AddrFromAddrPort(netip.MustParseAddrPort("[fe80::1%eth0]:80"))
	if _, err := (Request{Cmd: CmdConnect, Addr: a}).AppendTo(nil); err == nil {
		t.Error("a zoned address was encoded")
	}
}
