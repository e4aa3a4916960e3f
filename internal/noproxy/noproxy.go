// Package noproxy says which targets a local proxy door reaches directly
// rather than through the upstreams: a list in the NO_PROXY syntax that
// curl, wget and Go's net/http read from the environment.
package noproxy

import (
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
)

// List is a parsed NO_PROXY value. A nil *List matches nothing.
//
// Entries, separated by commas (spaces around them are ignored):
//
//   - "*" matches every target;
//   - a name ("example.com", ".example.com" or "*.example.com") matches
//     that name and every name below it, in any letter case;
//   - an address ("10.0.0.1", "::1" or "[::1]") matches that address;
//   - a prefix ("10.0.0.0/8", "fd00::/8") matches the addresses in it;
//   - any of the last three with ":port" ("example.com:8080",
//     "[::1]:443") matches that port only.
//
// A target given by name never matches an address or prefix entry: the
// name would have to be resolved here, which the proxy exists to avoid.
// Unlike Go's net/http, localhost and loopback addresses are not matched
// unless listed: through a SOCKS proxy, "localhost" is the proxy's.
type List struct {
	all     bool
	entries []entry
	text    string
}

// entry is one item of the list: a name suffix or an address prefix,
// and a port (0 for any).
type entry struct {
	name   string // lower case, without leading dot or trailing dot
	prefix netip.Prefix
	port   uint16
}

// Parse reads a NO_PROXY value. An empty value is an empty list (nil).
func Parse(s string) (*List, error) {
	l := &List{text: s}
	for raw := range strings.SplitSeq(s, ",") {
		item := strings.TrimSpace(raw)
		if item == "" {
			continue
		}
		if item == "*" {
			l.all = true
			continue
		}
		e, err := parseEntry(item)
		if err != nil {
			return nil, err
		}
		l.entries = append(l.entries, e)
	}
	if !l.all && len(l.entries) == 0 {
		return nil, nil
	}
	return l, nil
}

func parseEntry(item string) (entry, error) {
	if strings.Contains(item, "://") {
		return entry{}, fmt.Errorf("%q: want a host name, an address or a CIDR prefix, not a URL", item)
	}
	if p, ok := parsePrefix(item); ok {
		return entry{prefix: p}, nil
	}
	host, port := item, uint16(0)
	if h, ps, err := net.SplitHostPort(item); err == nil {
		n, perr := strconv.ParseUint(ps, 10, 16)
		if perr != nil || n == 0 {
			return entry{}, fmt.Errorf("%q: invalid port %q", item, ps)
		}
		host, port = h, uint16(n)
	} else if len(item) > 2 && item[0] == '[' && item[len(item)-1] == ']' {
		host = item[1 : len(item)-1]
	}
	if p, ok := parsePrefix(host); ok {
		return entry{prefix: p, port: port}, nil
	}
	name := strings.TrimPrefix(strings.TrimPrefix(host, "*."), ".")
	name = strings.ToLower(strings.TrimSuffix(name, "."))
	if !validName(name) {
		return entry{}, fmt.Errorf("%q: want a host name, an address, a CIDR prefix or *, each with an optional :port", item)
	}
	return entry{name: name, port: port}, nil
}

// parsePrefix reads an address (one host) or a CIDR prefix.
func parsePrefix(s string) (netip.Prefix, bool) {
	if p, err := netip.ParsePrefix(s); err == nil {
		if p.Addr().Is4In6() && p.Bits() >= 96 {
			p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
		}
		return p.Masked(), true
	}
	if a, err := netip.ParseAddr(s); err == nil && a.Zone() == "" {
		a = a.Unmap()
		return netip.PrefixFrom(a, a.BitLen()), true
	}
	return netip.Prefix{}, false
}

// validName accepts what a DNS name may hold (and the underscore some
// internal names carry): letters, digits, '-', '_' and dots between
// labels.
func validName(name string) bool {
	if name == "" || len(name) > 253 {
		return false
	}
	for label := range strings.SplitSeq(name, ".") {
		if label == "" || len(label) > 63 {
			return false
		}
		for _, c := range []byte(label) {
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return false
			}
		}
	}
	return true
}

// Match reports whether a target, a host (a name or an address, without
// brackets) and a port, is to be reached directly.
func (l *List) Match(host string, port uint16) bool {
	if l == nil {
		return false
	}
	if l.all {
		return true
	}
	ip, err := netip.ParseAddr(host)
	isIP := err == nil
	if isIP {
		ip = ip.Unmap().WithZone("")
	} else {
		host = strings.ToLower(strings.TrimSuffix(host, "."))
	}
	for _, e := range l.entries {
		if e.port != 0 && e.port != port {
			continue
		}
		switch {
		case isIP && e.prefix.IsValid():
			if e.prefix.Contains(ip) {
				return true
			}
		case !isIP && e.name != "":
			if host == e.name || strings.HasSuffix(host, "."+e.name) {
				return true
			}
		}
	}
	return false
}

// String is the list as it was written.
func (l *List) String() string {
	if l == nil {
		return ""
	}
	return l.text
}
