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
// handshake cannot be completed from a forged source, except from a
// link-local address on another link, so a link-local source must have
// come in on the interface that holds it. A datagram's source proves
// nothing (IPv6 has no martian-source check), so UDP gets no such rule.
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
		if ip.IsLinkLocalUnicast() {
			ip = ip.WithZone(v.Zone)
		}
		return thisHost.has(ip)
	case *net.UDPAddr:
		ip, _ := netip.AddrFromSlice(v.IP)
		return l.Allows(ip)
	}
	return true
}

// hostAddrs is this host's addresses as its interfaces hold them, a
// link-local one with its interface as its zone; tests replace it.
var hostAddrs = defaultHostAddrs

func defaultHostAddrs() ([]netip.Addr, error) {
	ifs, err := net.Interfaces()
	if err != nil {
		return nil, err
	}
	var out []netip.Addr
	for _, ifc := range ifs {
		addrs, err := ifc.Addrs()
		if err != nil {
			continue
		}
		for _, a := range addrs {
			n, ok := a.(*net.IPNet)
			if !ok {
				continue
			}
			if ip, ok := netip.AddrFromSlice(n.IP); ok {
				ip = ip.Unmap()
				if ip.IsLinkLocalUnicast() {
					ip = ip.WithZone(ifc.Name)
				}
				out = append(out, ip)
			}
		}
	}
	return out, nil
}

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

// has reports whether ip (zoned when link-local) is one of the host's
// addresses, from a copy at most hostRefresh old: an address the host
// took or gave up since is seen within that.
func (h *hostSet) has(ip netip.Addr) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if time.Since(h.read) >= hostRefresh {
		h.read = time.Now()
		addrs, err := hostAddrs()
		h.addrs = make(map[netip.Addr]bool, len(addrs))
		if err == nil {
			for _, a := range addrs {
				h.addrs[a] = true
			}
		}
	}
	return h.addrs[ip]
}

// String lists the prefixes, for log lines.
func (l *List) String() string {
	if l == nil {
		return "any"
	}
	return fmt.Sprint(l.prefixes)
}
