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
// source, and a TCP connection from one of the host's own addresses (a
// program on the host whose connection a transparent rule captured keeps
// its own source address).
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
			if p.Bits() < 96 { // wider than the mapped range: it would match nothing
				return nil, fmt.Errorf("%q reaches beyond the IPv4-mapped addresses (::ffff:0:0/96): write it as IPv4 or as IPv6", c)
			}
			p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
		}
		l.prefixes = append(l.prefixes, p.Masked())
	}
	return l, nil
}

// Allows reports whether a client at ip may use the listener: a loopback
// source, or one the prefixes hold.
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
// one that is not IP is allowed (a Unix socket is local). A TCP
// connection from one of the host's own addresses is the host itself: a
// handshake cannot be completed from a forged source. Link-local sources
// are left out of that (another link may use the host's address, and a
// program's connection that rules capture does not come from one), and a
// datagram's source proves nothing (IPv6 has no martian-source check), so
// UDP gets no such rule.
func (l *List) AllowsAddr(a net.Addr) bool {
	if l == nil {
		return true
	}
	switch v := a.(type) {
	case *net.TCPAddr:
		ip, _ := netip.AddrFromSlice(v.IP)
		if l.Allows(ip) {
			return true
		}
		ip = ip.Unmap().WithZone("")
		return !ip.IsLinkLocalUnicast() && thisHost.has(ip)
	case *net.UDPAddr:
		ip, _ := netip.AddrFromSlice(v.IP)
		return l.Allows(ip)
	}
	return true
}

// AllowsDatagram is Allows for a datagram, which the host itself sent
// when it arrived on the loopback interface (none from elsewhere arrives
// there), whatever its source: a local program's datagram that a TPROXY
// rule captured keeps the program's own source address.
func (l *List) AllowsDatagram(ip netip.Addr, onLoopback bool) bool {
	return onLoopback || l.Allows(ip)
}

// hostAddrs is this host's addresses as its interfaces hold them (one
// netlink dump); tests replace it.
var hostAddrs = defaultHostAddrs

func defaultHostAddrs() ([]netip.Addr, error) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil, err
	}
	out := make([]netip.Addr, 0, len(addrs))
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok {
			if ip, ok := netip.AddrFromSlice(n.IP); ok {
				out = append(out, ip.Unmap())
			}
		}
	}
	return out, nil
}

// hostRefresh is how often, at most, the host's addresses are read again:
// only a TCP source the prefixes refuse asks, so a client the list
// refuses cannot make the listener read them more often than this.
const hostRefresh = time.Second

// thisHost caches the host's own addresses.
var thisHost hostSet

type hostSet struct {
	mu      sync.Mutex
	addrs   map[netip.Addr]bool
	read    time.Time
	reading chan struct{} // closed when the read under way ends; nil: none is
}

// has reports whether ip is one of the host's addresses, from a copy at
// most about hostRefresh old: an address the host took or gave up since
// is seen within that. The read happens outside the lock, so that a slow
// one (a host with hundreds of interfaces) holds up no other accept.
func (h *hostSet) has(ip netip.Addr) bool {
	h.mu.Lock()
	if reading := h.reading; reading != nil && h.addrs == nil {
		// The first read is under way: there is no copy to answer from.
		h.mu.Unlock()
		<-reading
		h.mu.Lock()
	}
	if h.reading != nil || time.Since(h.read) < hostRefresh {
		found := h.addrs[ip]
		h.mu.Unlock()
		return found
	}
	reading := make(chan struct{})
	h.reading = reading
	h.mu.Unlock()

	addrs, err := hostAddrs()
	fresh := make(map[netip.Addr]bool, len(addrs))
	if err == nil {
		for _, a := range addrs {
			fresh[a] = true
		}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.addrs, h.read, h.reading = fresh, time.Now(), nil
	close(reading)
	return h.addrs[ip]
}

// String lists the prefixes, for log lines.
func (l *List) String() string {
	if l == nil {
		return "any"
	}
	return fmt.Sprint(l.prefixes)
}
