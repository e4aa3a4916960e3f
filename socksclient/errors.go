package socksclient

import (
	"context"
	"errors"
	"fmt"
)

var (
	// ErrAuthFailed: the server rejected the username and password (RFC 1929
	// STATUS != 0).
	ErrAuthFailed = errors.New("socks: username/password authentication failed")
	// ErrNoAcceptableMethods: the server answered method 0xFF.
	ErrNoAcceptableMethods = errors.New("socks: server accepted none of the offered authentication methods")
	// ErrCommandNotSupported: the server does not implement the command,
	// either by REP 7 or by closing the connection right after the request
	// (what OpenSSH's ssh -D does for BIND and UDP ASSOCIATE).
	ErrCommandNotSupported = errors.New("socks: command not supported by the server")
	// ErrUnexpectedPeer: BIND's second reply names a peer other than the
	// address the request asked for (a server that does not hold its
	// callers to DST.ADDR): that connection is closed, not accepted.
	ErrUnexpectedPeer = errors.New("socks: the peer that connected is not the one asked for")
	// ErrFragmented: a UDP datagram with FRAG != 0, which we do not reassemble
	// (RFC 1928 §7 allows dropping them).
	ErrFragmented = errors.New("socks: fragmented UDP datagram")
	// ErrCredentialsRequired: the server chose username/password but the
	// dialer has none.
	ErrCredentialsRequired = errors.New("socks: server requires username/password but none is configured")
	// ErrNoReply: the server took a CONNECT request and closed the
	// connection without a reply. OpenSSH's ssh -D does so whenever it
	// cannot reach the target, so it is not taken for a broken server.
	ErrNoReply = errors.New("socks: server closed the connection without replying to the request (ssh -D does so when it cannot reach the target)")
)

// A DeadlineError is a handshake cut by the caller's deadline (not the
// dialer's own HandshakeTimeout), with what it was waiting for: a caller
// that gives each try a share of its time (a DNS query) tells the proxy's
// silence from its target's by it. errors.Is finds
// context.DeadlineExceeded.
type DeadlineError struct {
	// AtProxy: the proxy itself had not answered (no TCP connection, or
	// no answer to the greeting or the authentication); else it had taken
	// the request and was waiting on its target.
	AtProxy bool
	stage   string
}

func (e *DeadlineError) Error() string {
	return "deadline passed during the handshake (" + e.stage + ")"
}
func (e *DeadlineError) Unwrap() error { return context.DeadlineExceeded }

// noReplyError is ErrNoReply for one target.
type noReplyError struct{ target Addr }

func (e *noReplyError) Error() string        { return ErrNoReply.Error() }
func (e *noReplyError) Is(target error) bool { return target == ErrNoReply }

// ReplyError is a server's refusal: a reply whose REP is not 0.
type ReplyError struct {
	Cmd  Command
	Code ReplyCode
}

func (e *ReplyError) Error() string {
	return fmt.Sprintf("socks %s: %s (REP 0x%02x)", e.Cmd, e.Code, byte(e.Code))
}

// Is makes errors.Is(err, ErrCommandNotSupported) true for REP 7.
func (e *ReplyError) Is(target error) bool {
	return target == ErrCommandNotSupported && e.Code == RepCommandNotSupported
}

// ProtocolError reports bytes that break RFC 1928 or RFC 1929: the peer is
// not speaking SOCKS5 correctly.
type ProtocolError struct {
	Frame string // which frame was being decoded, e.g. "reply"
	Msg   string

	truncated       bool
	unknownAddrType bool // a server answers it with REP 8
	socks4          bool // a SOCKS4 request where a greeting should be
}

// SOCKS4 reports whether the peer spoke SOCKS4 (or 4a) where a SOCKS5
// greeting should have been.
func (e *ProtocolError) SOCKS4() bool { return e.socks4 }

func (e *ProtocolError) Error() string {
	return fmt.Sprintf("socks: malformed %s: %s", e.Frame, e.Msg)
}

// Truncated reports whether the frame ended early (more bytes were needed).
func (e *ProtocolError) Truncated() bool { return e.truncated }

func protoErr(frame, msg string) *ProtocolError { return &ProtocolError{Frame: frame, Msg: msg} }

func errTruncated(frame string) *ProtocolError {
	return &ProtocolError{Frame: frame, Msg: "truncated", truncated: true}
}

// unsupportedError is ErrCommandNotSupported with the command named; it
// comes from a server that closed the connection instead of replying.
type unsupportedError struct{ cmd Command }

func (e unsupportedError) Error() string {
	return fmt.Sprintf("socks %s: the server does not support %s (it closed the connection without replying)", e.cmd, e.cmd)
}

func (e unsupportedError) Is(target error) bool { return target == ErrCommandNotSupported }

// unsupportedCommand returns the command err says the server does not
// support (REP 7, or a close instead of a reply), if it says so.
func unsupportedCommand(err error) (Command, bool) {
	var re *ReplyError
	if errors.As(err, &re) && re.Code == RepCommandNotSupported {
		return re.Cmd, true
	}
	var ue unsupportedError
	if errors.As(err, &ue) {
		return ue.cmd, true
	}
	return 0, false
}
