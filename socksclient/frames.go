package socksclient

import (
	"errors"
	"fmt"
	"io"
	"strings"
)

// Every frame has one AppendTo, which validates before it writes, and one
// Parse function returning (value, bytes used, error) that rejects what the
// RFCs forbid and never looks past its own frame. Read functions read exactly
// one frame from a stream, so bytes after a handshake stay in the stream for
// the relay.

// Greeting is the client's method offer (RFC 1928 §3).
//
//	+----+----------+----------+
//	|VER | NMETHODS | METHODS  |
//	+----+----------+----------+
//	| 1  |    1     | 1 to 255 |
//	+----+----------+----------+
type Greeting struct {
	Methods []AuthMethod
}

func (g Greeting) AppendTo(b []byte) ([]byte, error) {
	if len(g.Methods) == 0 || len(g.Methods) > 255 {
		return b, fmt.Errorf("socks: greeting must offer 1 to 255 methods, not %d", len(g.Methods))
	}
	b = append(b, Version, byte(len(g.Methods)))
	for _, m := range g.Methods {
		b = append(b, byte(m))
	}
	return b, nil
}

func (g Greeting) String() string {
	parts := make([]string, len(g.Methods))
	for i, m := range g.Methods {
		parts[i] = m.String()
	}
	return "greeting [" + strings.Join(parts, ", ") + "]"
}

// socks4Version opens a SOCKS4 or 4a request, which a client that was
// told the proxy speaks SOCKS4 sends where a greeting should be.
const socks4Version = 0x04

// socks4Rejected is the SOCKS4 reply "request rejected or failed" (VN 0,
// CD 91, port and address unused): what a SOCKS5 server answers a SOCKS4
// client, so that it reports a refusal rather than a closed connection.
var socks4Rejected = [8]byte{0, 91}

// ParseGreeting decodes a client's greeting from the start of b and
// returns it with the bytes it took.
func ParseGreeting(b []byte) (Greeting, int, error) {
	const frame = "greeting"
	if len(b) < 2 {
		return Greeting{}, 0, errTruncated(frame)
	}
	if b[0] == socks4Version {
		return Greeting{}, 0, &ProtocolError{Frame: frame, Msg: "version 0x04: a SOCKS4 client, and this server speaks SOCKS5 only", socks4: true}
	}
	if err := checkVersion(frame, b[0], Version); err != nil {
		return Greeting{}, 0, err
	}
	n := 2 + int(b[1])
	if b[1] == 0 {
		return Greeting{}, 0, protoErr(frame, "no methods offered")
	}
	if len(b) < n {
		return Greeting{}, 0, errTruncated(frame)
	}
	g := Greeting{Methods: make([]AuthMethod, b[1])}
	for i := range g.Methods {
		g.Methods[i] = AuthMethod(b[2+i])
	}
	return g, n, nil
}

func ReadGreeting(r io.Reader) (Greeting, error) {
	var buf [2 + 255]byte
	if _, err := io.ReadFull(r, buf[:2]); err != nil {
		return Greeting{}, err
	}
	n := 2 + int(buf[1])
	if _, err := io.ReadFull(r, buf[2:n]); err != nil {
		return Greeting{}, unexpectedEOF(err)
	}
	g, _, err := ParseGreeting(buf[:n])
	return g, err
}

// MethodSelection is the server's choice of method (RFC 1928 §3).
//
//	+----+--------+
//	|VER | METHOD |
//	+----+--------+
//	| 1  |   1    |
//	+----+--------+
type MethodSelection struct {
	Method AuthMethod
}

func (m MethodSelection) AppendTo(b []byte) ([]byte, error) {
	return append(b, Version, byte(m.Method)), nil
}

func (m MethodSelection) String() string { return "method selection: " + m.Method.String() }

func ParseMethodSelection(b []byte) (MethodSelection, int, error) {
	const frame = "method selection"
	if len(b) < 2 {
		return MethodSelection{}, 0, errTruncated(frame)
	}
	if err := checkVersion(frame, b[0], Version); err != nil {
		return MethodSelection{}, 0, err
	}
	return MethodSelection{Method: AuthMethod(b[1])}, 2, nil
}

func ReadMethodSelection(r io.Reader) (MethodSelection, error) {
	var buf [2]byte
	return readMethodSelection(r, buf[:])
}

// readMethodSelection is ReadMethodSelection reading into the caller's
// scratch space (len 2), which can be reused where a local array would
// escape to the heap.
func readMethodSelection(r io.Reader, buf []byte) (MethodSelection, error) {
	if err := readFrame(r, buf[:2]); err != nil {
		return MethodSelection{}, err
	}
	m, _, err := ParseMethodSelection(buf[:2])
	return m, err
}

// UserPassRequest is the username/password sub-negotiation (RFC 1929 §2).
//
//	+----+------+----------+------+----------+
//	|VER | ULEN |  UNAME   | PLEN |  PASSWD  |
//	+----+------+----------+------+----------+
//	| 1  |  1   | 1 to 255 |  1   | 1 to 255 |
//	+----+------+----------+------+----------+
//
// AppendTo keeps to the RFC's 1 to 255 bytes. The decoder also takes a
// field of 0 bytes, which real clients send for an empty password (curl
// -U user:, x/net): a server answers it status 1 instead of hanging up.
type UserPassRequest struct {
	Username string
	Password string
}

func (u UserPassRequest) AppendTo(b []byte) ([]byte, error) {
	if len(u.Username) == 0 || len(u.Username) > 255 {
		return b, fmt.Errorf("socks: username must be 1 to 255 bytes, not %d", len(u.Username))
	}
	if len(u.Password) == 0 || len(u.Password) > 255 {
		return b, fmt.Errorf("socks: password must be 1 to 255 bytes, not %d", len(u.Password))
	}
	b = append(b, userPassVersion, byte(len(u.Username)))
	b = append(b, u.Username...)
	b = append(b, byte(len(u.Password)))
	return append(b, u.Password...), nil
}

// String names the user but never shows the password.
func (u UserPassRequest) String() string {
	return fmt.Sprintf("username/password %q:[redacted]", u.Username)
}

func ParseUserPassRequest(b []byte) (UserPassRequest, int, error) {
	const frame = "username/password request"
	if len(b) < 2 {
		return UserPassRequest{}, 0, errTruncated(frame)
	}
	if err := checkVersion(frame, b[0], userPassVersion); err != nil {
		return UserPassRequest{}, 0, err
	}
	ulen := int(b[1])
	if len(b) < 2+ulen+1 {
		return UserPassRequest{}, 0, errTruncated(frame)
	}
	plen := int(b[2+ulen])
	n := 2 + ulen + 1 + plen
	if len(b) < n {
		return UserPassRequest{}, 0, errTruncated(frame)
	}
	return UserPassRequest{Username: string(b[2 : 2+ulen]), Password: string(b[3+ulen : n])}, n, nil
}

func ReadUserPassRequest(r io.Reader) (UserPassRequest, error) {
	var buf [1 + 1 + 255 + 1 + 255]byte
	if _, err := io.ReadFull(r, buf[:2]); err != nil {
		return UserPassRequest{}, err
	}
	if err := checkVersion("username/password request", buf[0], userPassVersion); err != nil {
		return UserPassRequest{}, err
	}
	ulen := int(buf[1])
	if _, err := io.ReadFull(r, buf[2:2+ulen+1]); err != nil {
		return UserPassRequest{}, unexpectedEOF(err)
	}
	n := 2 + ulen + 1 + int(buf[2+ulen])
	if _, err := io.ReadFull(r, buf[3+ulen:n]); err != nil {
		return UserPassRequest{}, unexpectedEOF(err)
	}
	u, _, err := ParseUserPassRequest(buf[:n])
	return u, err
}

// UserPassStatus is the server's answer to a UserPassRequest (RFC 1929 §2);
// any status but 0 is a failure, after which the server closes.
//
//	+----+--------+
//	|VER | STATUS |
//	+----+--------+
//	| 1  |   1    |
//	+----+--------+
type UserPassStatus struct {
	Status byte
}

func (s UserPassStatus) Success() bool { return s.Status == 0 }

func (s UserPassStatus) AppendTo(b []byte) ([]byte, error) {
	return append(b, userPassVersion, s.Status), nil
}

func (s UserPassStatus) String() string {
	if s.Success() {
		return "username/password status: success"
	}
	return fmt.Sprintf("username/password status: failure 0x%02x", s.Status)
}

func ParseUserPassStatus(b []byte) (UserPassStatus, int, error) {
	const frame = "username/password status"
	if len(b) < 2 {
		return UserPassStatus{}, 0, errTruncated(frame)
	}
	if err := checkVersion(frame, b[0], userPassVersion); err != nil {
		return UserPassStatus{}, 0, err
	}
	return UserPassStatus{Status: b[1]}, 2, nil
}

func ReadUserPassStatus(r io.Reader) (UserPassStatus, error) {
	var buf [2]byte
	return readUserPassStatus(r, buf[:])
}

// readUserPassStatus is ReadUserPassStatus reading into the caller's
// scratch space (len 2).
func readUserPassStatus(r io.Reader, buf []byte) (UserPassStatus, error) {
	if err := readFrame(r, buf[:2]); err != nil {
		return UserPassStatus{}, err
	}
	s, _, err := ParseUserPassStatus(buf[:2])
	return s, err
}

// Request is the client's command (RFC 1928 §4). RSV is written as 0 and
// ignored when read.
//
//	+----+-----+-------+------+----------+----------+
//	|VER | CMD |  RSV  | ATYP | DST.ADDR | DST.PORT |
//	+----+-----+-------+------+----------+----------+
//	| 1  |  1  | X'00' |  1   | Variable |    2     |
//	+----+-----+-------+------+----------+----------+
type Request struct {
	Cmd  Command
	Addr Addr
}

func (q Request) AppendTo(b []byte) ([]byte, error) {
	return appendAddrFrame(b, [3]byte{Version, byte(q.Cmd), 0}, q.Addr)
}

func (q Request) String() string { return fmt.Sprintf("request %s %s", q.Cmd, q.Addr) }

func ParseRequest(b []byte) (Request, int, error) {
	cmd, a, n, err := parseAddrFrame("request", b)
	return Request{Cmd: Command(cmd), Addr: a}, n, err
}

func ReadRequest(r io.Reader) (Request, error) {
	var buf [maxAddrFrame]byte
	n, err := readAddrFrame(r, "request", &buf)
	if err != nil {
		return Request{}, err
	}
	q, _, err := ParseRequest(buf[:n])
	return q, err
}

// Reply is the server's answer to a Request (RFC 1928 §6). Its ATYP need not
// match the request's.
//
//	+----+-----+-------+------+----------+----------+
//	|VER | REP |  RSV  | ATYP | BND.ADDR | BND.PORT |
//	+----+-----+-------+------+----------+----------+
//	| 1  |  1  | X'00' |  1   | Variable |    2     |
//	+----+-----+-------+------+----------+----------+
type Reply struct {
	Code ReplyCode
	Addr Addr
}

func (p Reply) AppendTo(b []byte) ([]byte, error) {
	return appendAddrFrame(b, [3]byte{Version, byte(p.Code), 0}, p.Addr)
}

func (p Reply) String() string { return fmt.Sprintf("reply %s %s", p.Code, p.Addr) }

func ParseReply(b []byte) (Reply, int, error) {
	code, a, n, err := parseAddrFrame("reply", b)
	return Reply{Code: ReplyCode(code), Addr: a}, n, err
}

func ReadReply(r io.Reader) (Reply, error) {
	var buf [maxAddrFrame]byte
	return readReply(r, &buf)
}

// readReply is ReadReply reading into the caller's scratch space.
func readReply(r io.Reader, buf *[maxAddrFrame]byte) (Reply, error) {
	n, err := readAddrFrame(r, "reply", buf)
	if err != nil {
		return Reply{}, err
	}
	p, _, err := ParseReply(buf[:n])
	return p, err
}

// UDPHeader precedes every datagram to and from a UDP relay (RFC 1928 §7).
// On datagrams from the relay, Addr names the remote peer that sent it.
//
//	+----+------+------+----------+----------+----------+
//	|RSV | FRAG | ATYP | DST.ADDR | DST.PORT |   DATA   |
//	+----+------+------+----------+----------+----------+
//	| 2  |  1   |  1   | Variable |    2     | Variable |
//	+----+------+------+----------+----------+----------+
type UDPHeader struct {
	Frag byte
	Addr Addr
}

func (h UDPHeader) AppendTo(b []byte) ([]byte, error) {
	return appendAddrFrame(b, [3]byte{0, 0, h.Frag}, h.Addr)
}

func (h UDPHeader) String() string { return fmt.Sprintf("udp header frag=%d %s", h.Frag, h.Addr) }

// ParseUDPHeader decodes the header; the payload is b[n:].
func ParseUDPHeader(b []byte) (UDPHeader, int, error) {
	if len(b) < 3 {
		return UDPHeader{}, 0, errTruncated("udp header")
	}
	a, n, err := parseAddr(b[3:])
	if err != nil {
		return UDPHeader{}, 0, relabel(err, "udp header")
	}
	return UDPHeader{Frag: b[2], Addr: a}, 3 + n, nil
}

// appendAddrFrame appends three head bytes and the address. The address is
// encoded on the stack first, so an address that cannot be sent leaves b
// untouched, spare capacity included: a UDP header is written into the
// headroom right before the payload, which a failed append must not touch.
func appendAddrFrame(b []byte, head [3]byte, a Addr) ([]byte, error) {
	var tmp [1 + 1 + MaxNameLen + 2]byte
	enc, err := appendAddr(tmp[:0], a)
	if err != nil {
		return b, err
	}
	b = append(b, head[:]...)
	return append(b, enc...), nil
}

// maxAddrFrame is the longest request or reply: VER CMD RSV, ATYP, a 255-byte
// name with its length, and the port.
const maxAddrFrame = 3 + 1 + 1 + MaxNameLen + 2

// parseAddrFrame decodes the layout shared by requests and replies.
func parseAddrFrame(frame string, b []byte) (code byte, a Addr, n int, err error) {
	if len(b) < 3 {
		return 0, Addr{}, 0, errTruncated(frame)
	}
	if err := checkVersion(frame, b[0], Version); err != nil {
		return 0, Addr{}, 0, err
	}
	a, n, err = parseAddr(b[3:])
	if err != nil {
		return 0, Addr{}, 0, relabel(err, frame)
	}
	return b[1], a, 3 + n, nil
}

// readAddrFrame reads one request or reply into buf and returns its length.
// It reads the fixed head and the first two address bytes, which tell the
// rest's length, then exactly the rest.
func readAddrFrame(r io.Reader, frame string, buf *[maxAddrFrame]byte) (int, error) {
	n, _, err := readAddrFrameGot(r, frame, buf)
	return n, err
}

// readAddrFrameGot is readAddrFrame that also says how many bytes it got,
// when it failed too.
func readAddrFrameGot(r io.Reader, frame string, buf *[maxAddrFrame]byte) (n, got int, err error) {
	if got, err = io.ReadFull(r, buf[:5]); err != nil {
		return 0, got, err
	}
	if err := checkVersion(frame, buf[0], Version); err != nil {
		return 0, got, err
	}
	alen, err := addrLen(buf[3], buf[4])
	if err != nil {
		return 0, got, relabel(err, frame)
	}
	n = 3 + alen
	m, err := io.ReadFull(r, buf[5:n])
	if err != nil {
		return 0, got + m, unexpectedEOF(err)
	}
	return n, n, nil
}

// readReplyOrRefusal is readReply for a client waiting on its proxy: a
// refusal is the refusal it says, whatever follows VER and REP: cut short
// (ss-local answers BIND with 05 07 00 01 and closes) or with an address
// that does not parse (RFC 1928 leaves it unused on failure, and clients
// such as curl read REP first). ReadReply stays strict.
func readReplyOrRefusal(r io.Reader, buf *[maxAddrFrame]byte) (Reply, error) {
	n, got, err := readAddrFrameGot(r, "reply", buf)
	var p Reply
	if err == nil {
		p, _, err = ParseReply(buf[:n])
	}
	var perr *ProtocolError
	if err != nil && got >= 2 && buf[0] == Version && buf[1] != byte(RepSucceeded) &&
		(err == io.EOF || err == io.ErrUnexpectedEOF || errors.As(err, &perr)) {
		return Reply{Code: ReplyCode(buf[1]), Addr: unspecifiedAddr}, nil
	}
	return p, err
}

func readFrame(r io.Reader, buf []byte) error {
	_, err := io.ReadFull(r, buf)
	return err
}

// unexpectedEOF: once part of a frame has arrived, a clean EOF is a cut frame.
func unexpectedEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

func checkVersion(frame string, got, want byte) error {
	if got != want {
		return protoErr(frame, fmt.Sprintf("version 0x%02x, want 0x%02x", got, want))
	}
	return nil
}

// relabel names the enclosing frame in an address error.
func relabel(err error, frame string) error {
	if pe, ok := err.(*ProtocolError); ok {
		c := *pe
		c.Frame = frame
		if !c.truncated {
			c.Msg = "address: " + c.Msg
		}
		return &c
	}
	return err
}
