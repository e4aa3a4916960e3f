// Package allowlist says which client sources a listener serves: the
// --allow prefixes, for listeners bound beyond loopback.
package allowlist

import (
	"fmt"
	"net"
	"net/netip"
)

// List is the prefixes a listener serves clients from. A nil *List
// allows every source; the host itself (a loopback source) is always
// allowed.
type List struct {
	prefixes []netip.Prefix
}

// Parse reads CIDR prefixes (a bare address is one host), IPv4-mapped
// addresses unmapped.
func Parse(cidrs []string) (*List, error) {
	l := &List{}
	for _, c := range cidrs {
		p, err := netip.ParsePrefix(c)
		if err != nil {
			a, aerr := netip.ParseAddr(c)
			if aerr != nil {
				return nil, fmt.Errorf("want a CIDR prefix such as 10.0.0.0/8 or fd00::/8, or an address: %q", c)
			}
			p = netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen())
		}
		if p.Addr().Is4In6() {
			p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
		}
		l.prefixes = append(l.prefixes, p.Masked())
	}
	return l, nil
}

// Allows reports whether a client at ip may use the listener.
func (l *List) Allows(ip netip.Addr) bool {
	if l == nil {
		return true
	}
	ip = ip.Unmap().WithZone("")
	if ip.IsLoopback() {
		return true
	}
	for _, p := range l.prefixes {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

// AllowsAddr is Allows for a connection's or a datagram's remote address;
// one that is not IP is allowed (a Unix socket is local).
func (l *List) AllowsAddr(a net.Addr) bool {
	if l == nil {
		return true
	}
	var ip netip.Addr
	switch v := a.(type) {
	case *net.TCPAddr:
		ip, _ = netip.AddrFromSlice(v.IP)
	case *net.UDPAddr:
		ip, _ = netip.AddrFromSlice(v.IP)
	default:
		return true
	}
	return l.Allows(ip)
}

// String lists the prefixes, for log lines.
func (l *List) String() string {
	if l == nil {
		return "any"
	}
	return fmt.Sprint(l.prefixes)
}
