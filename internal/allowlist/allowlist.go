// Package allowlist says which client sources a listener serves: the
// --allow prefixes, for listeners bound beyond loopback.
package allowlist

import (
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"
)

// List is the prefixes a listener serves clients from. A nil *List
// allows every source; the host itself is always allowed: a loopback
// source, or one of the host's own addresses (a program on the host whose
// connection a transparent rule captured keeps its own source address,
// and one may reach a listener by the host's LAN address).
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
	return thisHost.has(ip)
}

// hostAddrs is this host's addresses as its interfaces hold them;
// tests replace it.
var hostAddrs = net.InterfaceAddrs

// hostRefresh is how often, at most, the host's addresses are read again:
// only a source the prefixes refuse asks, so a client the list refuses
// cannot make the listener read them more often than this.
const hostRefresh = time.Second

// thisHost caches the host's own addresses.
var thisHost hostSet

type hostSet struct {
	mu    sync.Mutex
	addrs map[netip.Addr]bool
	read  time.Time
}

// has reports whether ip is one of the host's addresses, reading them
// again when the copy is older than hostRefresh (an address added since).
func (h *hostSet) has(ip netip.Addr) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.addrs[ip] {
		return true
	}
	if time.Since(h.read) < hostRefresh {
		return false
	}
	h.read = time.Now()
	addrs, err := hostAddrs()
	if err != nil {
		return false
	}
	h.addrs = make(map[netip.Addr]bool, len(addrs))
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok {
			if ip, ok := netip.AddrFromSlice(n.IP); ok {
				h.addrs[ip.Unmap()] = true
			}
		}
	}
	return h.addrs[ip]
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
