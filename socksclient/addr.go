package socksclient

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"

	"golang.org/x/net/idna"
)

// MaxNameLen is the longest domain name a SOCKS5 address can carry: its
// length travels in one byte.
const MaxNameLen = 255

// Addr is a SOCKS5 address: an IP address or a domain name, and a port.
// Exactly one of IP and Name is set. It implements net.Addr.
type Addr struct {
	IP   netip.Addr
	Name string
	Port uint16
}

// AddrFromAddrPort returns the Addr of an IP address and port. IPv4-mapped
// IPv6 addresses are unmapped, so they travel as ATYP 1.
func AddrFromAddrPort(ap netip.AddrPort) Addr {
	return Addr{IP: ap.Addr().Unmap(), Port: ap.Port()}
}

// ParseAddr parses "host:port" where host is an IP literal (IPv6 in
// brackets) or a domain name. Names are kept as names: they are for the proxy
// to resolve.
func ParseAddr(hostport string) (Addr, error) {
	host, portStr, err := net.SplitHostPort(hostport)
	if err != nil {
		return Addr{}, err
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil {
		return Addr{}, fmt.Errorf("address %q: invalid port %q", hostport, portStr)
	}
	if ip, err := netip.ParseAddr(host); err == nil {
		if ip.Zone() != "" {
			return Addr{}, fmt.Errorf("address %q: a zone cannot be sent to a SOCKS server", hostport)
		}
		return Addr{IP: ip.Unmap(), Port: uint16(port)}, nil
	}
	host, err = asciiName(host)
	if err != nil {
		return Addr{}, fmt.Errorf("address %q: %w", hostport, err)
	}
	if len(host) == 0 || len(host) > MaxNameLen {
		return Addr{}, fmt.Errorf("address %q: host name must be 1 to %d bytes", hostport, MaxNameLen)
	}
	return Addr{Name: host, Port: uint16(port)}, nil
}

// idnaLookup is IDNA's lookup profile without its host-name rules (STD3),
// which refuse '_': DNS names hold it (_dmarc.bücher.example).
var idnaLookup = idna.New(idna.MapForLookup(), idna.BidiRule(), idna.Transitional(false), idna.StrictDomainName(false))

// asciiName is the name as DNS carries it: an internationalized one in
// its ASCII form (bücher.example → xn--bcher-kva.example), as curl sends
// it to a proxy, which would otherwise look up the raw UTF-8 bytes and
// find nothing. Spaces and control bytes are refused: no host has them.
func asciiName(name string) (string, error) {
	wide := false
	for i := 0; i < len(name); i++ {
		switch c := name[i]; {
		case c <= ' ' || c == 0x7f:
			return "", fmt.Errorf("host name %q holds a space or a control character", name)
		case c >= 0x80:
			wide = true
		}
	}
	if !wide {
		return name, nil
	}
	ascii, err := idnaLookup.ToASCII(name)
	if err == nil {
		// Without STD3's rules the mapping may yield what no host name
		// holds (an ideographic space maps to a space): letters, digits,
		// '-', '_' and '.' only.
		for i := 0; i < len(ascii); i++ {
			if c := ascii[i] | 0x20; !(c >= 'a' && c <= 'z' || ascii[i] >= '0' && ascii[i] <= '9' || strings.IndexByte("-_.", ascii[i]) >= 0) {
				err = fmt.Errorf("it maps to %q", ascii)
				break
			}
		}
	}
	if err != nil {
		return "", fmt.Errorf("host name %q is not a valid internationalized name: %w", name, err)
	}
	return ascii, nil
}

// Type is the ATYP that the address travels as.
func (a Addr) Type() AddrType {
	switch {
	case a.Name != "":
		return AddrDomain
	case a.IP.Is4():
		return AddrIPv4
	default:
		return AddrIPv6
	}
}

// Host is the IP literal or the name, without the port.
func (a Addr) Host() string {
	if a.Name != "" {
		return a.Name
	}
	if !a.IP.IsValid() {
		return ""
	}
	return a.IP.String()
}

// AddrPort returns the address as a netip.AddrPort; ok is false for names.
func (a Addr) AddrPort() (ap netip.AddrPort, ok bool) {
	if a.Name != "" || !a.IP.IsValid() {
		return netip.AddrPort{}, false
	}
	return netip.AddrPortFrom(a.IP, a.Port), true
}

// Network implements net.Addr.
func (a Addr) Network() string { return "tcp" }

// String gives host:port, with IPv6 in brackets.
func (a Addr) String() string {
	return net.JoinHostPort(a.Host(), strconv.Itoa(int(a.Port)))
}

// appendAddr appends ATYP, the address and the port, the layout shared by
// requests, replies and UDP headers:
//
//	+------+----------+----------+
//	| ATYP | DST.ADDR | DST.PORT |
//	+------+----------+----------+
//	|  1   | Variable |    2     |
//	+------+----------+----------+
func appendAddr(b []byte, a Addr) ([]byte, error) {
	switch {
	case a.Name != "":
		if len(a.Name) > MaxNameLen {
			return b, fmt.Errorf("socks: host name is %d bytes, longer than %d", len(a.Name), MaxNameLen)
		}
		b = append(b, byte(AddrDomain), byte(len(a.Name)))
		b = append(b, a.Name...)
	case a.IP.Is4():
		ip := a.IP.As4()
		b = append(b, byte(AddrIPv4))
		b = append(b, ip[:]...)
	case a.IP.Is6():
		if a.IP.Zone() != "" {
			// The proxy has no such interface: sent without the zone, it
			// would reach another address than the one asked for.
			return b, fmt.Errorf("socks: %s has a zone, which cannot be sent to a proxy", a.IP)
		}
		ip := a.IP.As16()
		b = append(b, byte(AddrIPv6))
		b = append(b, ip[:]...)
	default:
		return b, fmt.Errorf("socks: address has neither an IP nor a name")
	}
	return binary.BigEndian.AppendUint16(b, a.Port), nil
}

// addrLen returns the encoded length of ATYP+ADDR+PORT from its first two
// bytes (ATYP, and the name length for ATYP 3). It is what lets stream readers
// read exactly one frame.
func addrLen(atyp, next byte) (int, error) {
	switch AddrType(atyp) {
	case AddrIPv4:
		return 1 + 4 + 2, nil
	case AddrIPv6:
		return 1 + 16 + 2, nil
	case AddrDomain:
		if next == 0 {
			return 0, protoErr("address", "zero-length domain name")
		}
		return 1 + 1 + int(next) + 2, nil
	}
	err := protoErr("address", fmt.Sprintf("unknown address type 0x%02x", atyp))
	err.unknownAddrType = true
	return 0, err
}

// parseAddr decodes ATYP+ADDR+PORT at the start of b.
func parseAddr(b []byte) (Addr, int, error) {
	if len(b) < 2 {
		return Addr{}, 0, errTruncated("address")
	}
	n, err := addrLen(b[0], b[1])
	if err != nil {
		return Addr{}, 0, err
	}
	if len(b) < n {
		return Addr{}, 0, errTruncated("address")
	}
	var a Addr
	switch AddrType(b[0]) {
	case AddrIPv4:
		a.IP = netip.AddrFrom4([4]byte(b[1:5]))
	case AddrIPv6:
		a.IP = netip.AddrFrom16([16]byte(b[1:17]))
	case AddrDomain:
		a.Name = string(b[2 : 2+int(b[1])])
	}
	a.Port = binary.BigEndian.Uint16(b[n-2:])
	return a, n, nil
}
