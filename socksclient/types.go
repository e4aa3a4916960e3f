// Package socksclient owns the SOCKS5 protocol (RFC 1928, RFC 1929): the frame
// codec, the client sessions built on it (CONNECT, BIND, UDP ASSOCIATE), and
// the server side of the handshake (Handshake), which the -D door and the
// test server in sockstest both run.
//
// It knows nothing of listeners, flags or logs: callers pass typed options and
// receive typed errors.
package socksclient

import "fmt"

// Version is the protocol version byte of every RFC 1928 frame.
const Version = 0x05

// userPassVersion is the sub-negotiation version of RFC 1929.
const userPassVersion = 0x01

// Command is the CMD field of a request (RFC 1928 §4).
type Command byte

const (
	CmdConnect      Command = 0x01
	CmdBind         Command = 0x02
	CmdUDPAssociate Command = 0x03
)

func (c Command) String() string {
	switch c {
	case CmdConnect:
		return "connect"
	case CmdBind:
		return "bind"
	case CmdUDPAssociate:
		return "udp associate"
	}
	return fmt.Sprintf("command 0x%02x", byte(c))
}

// AuthMethod is one METHOD byte of the method negotiation (RFC 1928 §3).
type AuthMethod byte

const (
	MethodNoAuth       AuthMethod = 0x00
	MethodGSSAPI       AuthMethod = 0x01
	MethodUserPass     AuthMethod = 0x02
	MethodNoAcceptable AuthMethod = 0xFF
)

func (m AuthMethod) String() string {
	switch m {
	case MethodNoAuth:
		return "no authentication required"
	case MethodGSSAPI:
		return "GSSAPI"
	case MethodUserPass:
		return "username/password"
	case MethodNoAcceptable:
		return "no acceptable methods"
	}
	return fmt.Sprintf("method 0x%02x", byte(m))
}

// AddrType is the ATYP field (RFC 1928 §4, §5).
type AddrType byte

const (
	AddrIPv4   AddrType = 0x01
	AddrDomain AddrType = 0x03
	AddrIPv6   AddrType = 0x04
)

func (t AddrType) String() string {
	switch t {
	case AddrIPv4:
		return "IPv4"
	case AddrDomain:
		return "domain name"
	case AddrIPv6:
		return "IPv6"
	}
	return fmt.Sprintf("address type 0x%02x", byte(t))
}

// ReplyCode is the REP field of a server reply (RFC 1928 §6).
type ReplyCode byte

const (
	RepSucceeded            ReplyCode = 0x00
	RepGeneralFailure       ReplyCode = 0x01
	RepNotAllowed           ReplyCode = 0x02
	RepNetworkUnreachable   ReplyCode = 0x03
	RepHostUnreachable      ReplyCode = 0x04
	RepConnectionRefused    ReplyCode = 0x05
	RepTTLExpired           ReplyCode = 0x06
	RepCommandNotSupported  ReplyCode = 0x07
	RepAddrTypeNotSupported ReplyCode = 0x08
)

// String gives the words RFC 1928 §6 uses for the code.
func (c ReplyCode) String() string {
	switch c {
	case RepSucceeded:
		return "succeeded"
	case RepGeneralFailure:
		return "general SOCKS server failure"
	case RepNotAllowed:
		return "connection not allowed by ruleset"
	case RepNetworkUnreachable:
		return "network unreachable"
	case RepHostUnreachable:
		return "host unreachable"
	case RepConnectionRefused:
		return "connection refused"
	case RepTTLExpired:
		return "TTL expired"
	case RepCommandNotSupported:
		return "command not supported"
	case RepAddrTypeNotSupported:
		return "address type not supported"
	}
	return "unassigned reply code"
}
