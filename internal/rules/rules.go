// Package rules writes the netfilter rule sets that steer traffic into
// socksfwd's transparent listeners (`socksfwd rules`): an nft script, or
// iptables-restore and ip6tables-restore inputs, plus the policy-routing
// commands TPROXY needs. The output is text for the user to read and load;
// nothing here touches the kernel.
package rules

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// Modes and scopes accepted in Config.
const (
	// ModeRedirect captures TCP with NAT REDIRECT (the listener reads
	// SO_ORIGINAL_DST). No UDP: NAT cannot tell a UDP listener where a
	// datagram was going.
	ModeRedirect = "redirect"
	// ModeTProxy captures TCP and UDP with TPROXY (the socket's own local
	// address is the original destination); it needs policy routing.
	ModeTProxy = "tproxy"

	// ScopeLocal captures what this host's (or this pod's) own programs
	// send: the OUTPUT hook.
	ScopeLocal = "local"
	// ScopeGateway captures what arrives from other hosts or containers:
	// the PREROUTING hook.
	ScopeGateway = "gateway"
)

// Defaults for the policy routing that TPROXY needs.
const (
	DefaultRouteMark  = 0x1
	DefaultRouteTable = 100
)

// dnsPort is the port whose traffic DNS capture takes.
const dnsPort = 53

// Config describes the transparent listeners and what to capture for them.
type Config struct {
	// Mode is ModeRedirect (TCP only, NAT) or ModeTProxy (TCP and UDP).
	Mode string
	// Scope is ScopeLocal (OUTPUT) or ScopeGateway (PREROUTING).
	Scope string

	// TCPPort is the transparent TCP listener's port (0: TCP not captured).
	TCPPort int
	// UDPPort is the transparent UDP listener's port (0: UDP not
	// captured); TPROXY only.
	UDPPort int
	// DNSPort, when > 0, captures DNS (UDP and TCP port 53) into this
	// port: the --dns listener. It is captured by REDIRECT in both modes,
	// because that listener is an ordinary socket (TPROXY only hands
	// packets to IP_TRANSPARENT sockets) and NAT gives its answers the
	// address the program asked back as their source.
	DNSPort int

	// TProxyAddr4 and TProxyAddr6 are where TPROXY looks for the
	// transparent listeners (default 127.0.0.1 and ::1). A listener bound
	// to a wildcard address matches any of them; one bound elsewhere needs
	// its own address here.
	TProxyAddr4, TProxyAddr6 netip.Addr

	// Mark is socksfwd's own SO_MARK (--mark): packets carrying it are never
	// captured, which breaks any loop through socksfwd. 0: none.
	Mark uint32
	// Proxies are the upstream proxies' addresses, always left out.
	Proxies []netip.Addr
	// ProxyUsers are the users (names or numeric IDs) whose programs are
	// never captured in scope local: a proxy that runs on this host (Tor,
	// ssh -D) makes connections of its own that must not come back to it.
	ProxyUsers []string
	// Exclude lists destinations never captured, not even their DNS.
	Exclude []netip.Prefix
	// Include, when not empty, limits proxied traffic to these
	// destinations; Exclude still wins. DNS capture is not limited by it.
	Include []netip.Prefix

	// IPv6 adds rules for IPv6; without it IPv6 traffic passes untouched.
	IPv6 bool

	// RouteMark is the fwmark that sends captured packets to RouteTable
	// (default DefaultRouteMark); TPROXY only.
	RouteMark uint32
	// RouteTable is the routing table that delivers every address locally
	// (default DefaultRouteTable); TPROXY only.
	RouteTable uint32

	// Interfaces limits gateway capture to packets coming in on these
	// interfaces (exact names, or a trailing + for every name that starts
	// so); empty: every interface.
	Interfaces []string
}

// ErrConfig is wrapped by every error about an unusable Config.
var ErrConfig = errors.New("rules")

func configError(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrConfig}, args...)...)
}

// Destinations handled the same way by every rule set.
var (
	// Never captured: multicast and broadcast cannot be proxied.
	skipV4 = []netip.Prefix{netip.MustParsePrefix("224.0.0.0/4"), netip.MustParsePrefix("255.255.255.255/32")}
	skipV6 = []netip.Prefix{netip.MustParsePrefix("ff00::/8")}
	// Not proxied, but DNS to them is still captured: "this network",
	// loopback and link-local (a stub resolver on 127.0.0.53, a cloud
	// resolver on 169.254.169.253).
	localV4 = []netip.Prefix{
		netip.MustParsePrefix("0.0.0.0/8"),
		netip.MustParsePrefix("127.0.0.0/8"),
		netip.MustParsePrefix("169.254.0.0/16"),
	}
	localV6 = []netip.Prefix{netip.MustParsePrefix("::1/128"), netip.MustParsePrefix("fe80::/10")}
)

// plan is a validated Config with defaults applied, split by family.
type plan struct {
	Config
	families []family
}

// family holds what one address family's rules need.
type family struct {
	v6         bool
	proxies    []netip.Addr
	skip       []netip.Prefix // multicast, broadcast and --exclude
	local      []netip.Prefix // loopback, link-local, "this network"
	include    []netip.Prefix // only with Config.Include
	tproxyAddr netip.Addr
}

func (f family) name() string {
	if f.v6 {
		return "IPv6"
	}
	return "IPv4"
}

// newPlan validates cfg and applies its defaults.
func newPlan(cfg Config) (*plan, error) {
	p := &plan{Config: cfg}
	switch p.Mode {
	case ModeRedirect, ModeTProxy:
	default:
		return nil, configError("mode %q: want %q or %q", p.Mode, ModeRedirect, ModeTProxy)
	}
	switch p.Scope {
	case ScopeLocal, ScopeGateway:
	default:
		return nil, configError("scope %q: want %q or %q", p.Scope, ScopeLocal, ScopeGateway)
	}
	for _, port := range []struct {
		name string
		n    int
	}{{"TCP", p.TCPPort}, {"UDP", p.UDPPort}, {"DNS", p.DNSPort}} {
		if port.n < 0 || port.n > 65535 {
			return nil, configError("%s port %d out of range 1-65535", port.name, port.n)
		}
	}
	if p.TCPPort == 0 && p.UDPPort == 0 && p.DNSPort == 0 {
		return nil, configError("nothing to capture: no transparent TCP or UDP listener and no DNS listener")
	}
	if p.UDPPort != 0 && p.Mode != ModeTProxy {
		return nil, configError("UDP capture needs mode %q (--mode %s): REDIRECT is TCP only", ModeTProxy, ModeTProxy)
	}
	if p.RouteMark == 0 {
		p.RouteMark = DefaultRouteMark
	}
	if p.RouteTable == 0 {
		p.RouteTable = DefaultRouteTable
	}
	// 253-255 are the kernel's default, main and local tables.
	if p.RouteTable >= 253 && p.RouteTable <= 255 {
		return nil, configError("route table %d: want 1-252 or 256-0xffffffff (253-255 are the kernel's own)", p.RouteTable)
	}
	if p.Mode == ModeTProxy && p.Mark != 0 && p.Mark == p.RouteMark {
		return nil, configError("mark %#x is also the TPROXY route mark: socksfwd's own packets would be captured; pick another", p.Mark)
	}
	for _, u := range p.ProxyUsers {
		if u == "" || len(u) > 32 || strings.Trim(u, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") != "" {
			return nil, configError("proxy user %q is not a plain user name or ID", u)
		}
	}
	if p.Scope == ScopeLocal && len(p.Interfaces) > 0 {
		return nil, configError("input interfaces apply to scope %q only", ScopeGateway)
	}
	for _, name := range p.Interfaces {
		if err := checkInterface(name); err != nil {
			return nil, err
		}
	}
	if !p.TProxyAddr4.IsValid() {
		p.TProxyAddr4 = netip.AddrFrom4([4]byte{127, 0, 0, 1})
	}
	if p.TProxyAddr4 = p.TProxyAddr4.Unmap(); !p.TProxyAddr4.Is4() {
		return nil, configError("TPROXY address %s is not IPv4", p.TProxyAddr4)
	}
	if !p.TProxyAddr6.IsValid() {
		p.TProxyAddr6 = netip.IPv6Loopback()
	}
	if !p.TProxyAddr6.Is6() || p.TProxyAddr6.Is4In6() || p.TProxyAddr6.Zone() != "" {
		return nil, configError("TPROXY address %s is not a plain IPv6 address", p.TProxyAddr6)
	}

	v4 := family{skip: slices.Clone(skipV4), local: localV4, tproxyAddr: p.TProxyAddr4}
	v6 := family{v6: true, skip: slices.Clone(skipV6), local: localV6, tproxyAddr: p.TProxyAddr6}
	for _, a := range p.Proxies {
		if !a.IsValid() {
			return nil, configError("proxy address is empty")
		}
		a = a.Unmap().WithZone("")
		if a.Is4() {
			v4.proxies = append(v4.proxies, a)
		} else {
			v6.proxies = append(v6.proxies, a)
		}
	}
	for _, pr := range p.Exclude {
		pr, err := normalPrefix(pr, "exclude")
		if err != nil {
			return nil, err
		}
		if pr.Addr().Is4() {
			v4.skip = append(v4.skip, pr)
		} else {
			v6.skip = append(v6.skip, pr)
		}
	}
	for _, pr := range p.Include {
		pr, err := normalPrefix(pr, "include")
		if err != nil {
			return nil, err
		}
		if pr.Addr().Is4() {
			v4.include = append(v4.include, pr)
		} else if p.IPv6 {
			v6.include = append(v6.include, pr)
		} else {
			return nil, configError("include %s is IPv6, and IPv6 rules are off", pr)
		}
	}
	for _, f := range []*family{&v4, &v6} {
		f.proxies = uniqueAddrs(f.proxies)
		f.skip = coverPrefixes(f.skip)
		f.include = coverPrefixes(f.include)
	}
	p.families = []family{v4}
	if p.IPv6 {
		p.families = append(p.families, v6)
	}
	return p, nil
}

// checkInterface accepts a Linux interface name, matched exactly, or one
// with a trailing "+" (iptables' wildcard, "veth+": every name that starts
// so; nft writes it "veth*"). No other wildcard is let in: nft and iptables
// give different characters that meaning.
func checkInterface(name string) error {
	// IFNAMSIZ (16) holds the name and its NUL; iptables and nft count
	// the + (or *) in it.
	base := strings.TrimSuffix(name, "+")
	if base == "" || len(name) > 15 || base == "." || base == ".." ||
		strings.ContainsAny(base, " \t\n/\"'\\*+:") {
		return configError("interface name %q is not a Linux interface name, or one with a trailing + (veth+: every name that starts so)", name)
	}
	return nil
}

// normalPrefix masks pr and turns an IPv4-mapped IPv6 prefix into IPv4.
func normalPrefix(pr netip.Prefix, what string) (netip.Prefix, error) {
	if !pr.IsValid() {
		return netip.Prefix{}, configError("%s: invalid prefix %s", what, pr)
	}
	a := pr.Addr()
	if a.Zone() != "" {
		return netip.Prefix{}, configError("%s %s: a zone has no meaning in a rule", what, pr)
	}
	if a.Is4In6() {
		if pr.Bits() < 96 {
			return netip.Prefix{}, configError("%s %s mixes IPv4-mapped and other IPv6 addresses", what, pr)
		}
		pr = netip.PrefixFrom(a.Unmap(), pr.Bits()-96)
	}
	return pr.Masked(), nil
}

func uniqueAddrs(as []netip.Addr) []netip.Addr {
	slices.SortFunc(as, netip.Addr.Compare)
	return slices.Compact(as)
}

// coverPrefixes sorts prefixes and drops those inside another: nft refuses
// overlapping elements in an interval set, and a covered prefix is a wasted
// iptables rule.
func coverPrefixes(ps []netip.Prefix) []netip.Prefix {
	slices.SortFunc(ps, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	var out []netip.Prefix
	for _, pr := range ps {
		// Sorted by address, a covering prefix starts at or before pr, and
		// only the last kept one can still reach it.
		if n := len(out); n > 0 && out[n-1].Bits() <= pr.Bits() && out[n-1].Contains(pr.Addr()) {
			continue
		}
		out = append(out, pr)
	}
	return out
}

// tproxy reports whether TCP or UDP goes through TPROXY (DNS never does).
func (p *plan) tproxy() bool {
	return p.Mode == ModeTProxy && (p.TCPPort != 0 || p.UDPPort != 0)
}

// Routes returns the policy-routing commands TPROXY needs, one `ip` command
// line each: packets carrying RouteMark look up RouteTable, where every
// address is local, so they are delivered to this host (to the listener
// TPROXY chose) instead of being forwarded. nil when nothing goes through
// TPROXY or cfg is invalid (NFT and IPTables report why).
func Routes(cfg Config) []string {
	p, err := newPlan(cfg)
	if err != nil || !p.tproxy() {
		return nil
	}
	return p.routes(p.families)
}

// Removal returns the commands, one shell command line each, that remove
// what format's output for cfg loads: format is "nft", "iptables"
// (IPv4), "ip6tables" or "routes" (nil when nothing goes through TPROXY).
func Removal(cfg Config, format string) ([]string, error) {
	p, err := newPlan(cfg)
	if err != nil {
		return nil, err
	}
	switch format {
	case "nft":
		return []string{"nft delete table " + nftTable}, nil
	case "iptables", "ip6tables":
		f := p.families[0]
		if format == "ip6tables" {
			if len(p.families) < 2 {
				return nil, configError("ip6tables removal: the rules have no IPv6 part")
			}
			f = p.families[1]
		}
		return iptRemoval(format, p.allIptChains(f)), nil
	case "routes":
		if !p.tproxy() {
			return nil, nil
		}
		return p.routesRemoval(p.families), nil
	}
	return nil, configError("format %q: want nft, iptables, ip6tables or routes", format)
}

func (p *plan) routes(fams []family) []string {
	var lines []string
	for _, f := range fams {
		flag, all := "", "0.0.0.0/0"
		if f.v6 {
			flag, all = " -6", "::/0"
		}
		lines = append(lines,
			fmt.Sprintf("ip%s rule add fwmark %#x lookup %d", flag, p.RouteMark, p.RouteTable),
			fmt.Sprintf("ip%s route add local %s dev lo table %d", flag, all, p.RouteTable))
	}
	return lines
}

// text accumulates the lines of a rule set.
type text struct{ strings.Builder }

func (t *text) line(format string, args ...any) {
	fmt.Fprintf(&t.Builder, format, args...)
	t.WriteByte('\n')
}

// header writes the comment block every rule set starts with: what is
// captured, where it goes, and the routing TPROXY needs for fams, the
// families this rule set covers.
func (p *plan) header(t *text, title string, fams []family) {
	t.line("# socksfwd transparent capture (%s): mode %s, scope %s.", title, p.Mode, p.Scope)
	what := "# Captures what this host's (or this pod's) own programs send (OUTPUT)"
	if p.Scope == ScopeGateway {
		what = "# Captures what other hosts and containers send through this one (PREROUTING)"
		if len(p.Interfaces) > 0 {
			what += ", coming in on " + strings.Join(p.Interfaces, ", ")
		}
		what += ".\n# Not this host's own programs' traffic: that is scope local"
	}
	t.line("%s.", what)
	switch {
	case len(fams) == 2:
		t.line("# IPv4 and IPv6.")
	case !p.IPv6:
		t.line("# IPv4 only: IPv6 passes untouched.")
	case fams[0].v6:
		t.line("# IPv6 here; the IPv4 rules are the iptables-restore input.")
	default:
		t.line("# IPv4 here; the IPv6 rules are the ip6tables-restore input.")
	}
	if p.Mark != 0 {
		t.line("# socksfwd's own traffic is never captured: its --mark %#x and the upstream proxies' addresses", p.Mark)
		t.line("# are left out.")
	} else {
		t.line("# socksfwd's own traffic is left out by the upstream proxies' addresses; without --mark,")
		t.line("# see the comment in the rules for the other ways.")
	}
	if p.TCPPort != 0 {
		t.line("#   TCP: %s", p.target(p.TCPPort))
		t.line("#        socksfwd %s", p.listenFlags("--transparent", p.TCPPort, "", p.Mode == ModeTProxy))
	}
	if p.UDPPort != 0 {
		t.line("#   UDP: %s", p.target(p.UDPPort))
		t.line("#        socksfwd %s", p.listenFlags("--transparent", p.UDPPort, "/udp", true))
	}
	if p.Mode == ModeRedirect && p.TCPPort != 0 {
		t.line("#   UDP other than DNS (QUIC, say) is not captured: REDIRECT cannot say where a datagram")
		t.line("#        was going. --mode tproxy proxies it; or reject it here, and most apps fall back to TCP.")
	}
	if p.DNSPort != 0 {
		t.line("#   DNS (UDP and TCP port 53): REDIRECT %s", p.redirectTarget(p.DNSPort))
		t.line("#        socksfwd %s", p.listenFlags("--dns", p.DNSPort, "", false))
	}
	if p.tproxy() {
		t.line("# socksfwd needs CAP_NET_ADMIN for TPROXY (IP_TRANSPARENT; CAP_NET_RAW also does): without it,")
		if p.UDPPort != 0 {
			t.line("# the /udp listener cannot open and socksfwd does not start.")
		} else {
			t.line("# its start line says \"REDIRECT only\" and what these rules send it is dropped.")
		}
		t.line("# TPROXY needs policy routing too; run once as root (it does not survive a reboot):")
		for _, r := range p.routes(fams) {
			t.line("#   %s", r)
		}
		t.line("# and to remove it (a second add would stack a second rule):")
		for _, r := range p.routesRemoval(fams) {
			t.line("#   %s", r)
		}
	}
}

// routesRemoval is the commands that take routes(fams) away again.
func (p *plan) routesRemoval(fams []family) []string {
	var lines []string
	for _, r := range p.routes(fams) {
		lines = append(lines, strings.Replace(r, " add ", " del ", 1))
	}
	return lines
}

// target says where TCP or UDP capture sends packets.
func (p *plan) target(port int) string {
	if p.Mode == ModeRedirect {
		return "REDIRECT " + p.redirectTarget(port)
	}
	to := fmt.Sprintf("TPROXY to %s", netip.AddrPortFrom(p.TProxyAddr4, uint16(port)))
	if p.IPv6 {
		to += fmt.Sprintf(" and %s", netip.AddrPortFrom(p.TProxyAddr6, uint16(port)))
	}
	return to + " (or a listener on a wildcard address)"
}

// redirectTarget says where REDIRECT sends a connection: OUTPUT's goes to
// loopback, PREROUTING's to the address of the interface it came in on.
func (p *plan) redirectTarget(port int) string {
	if p.Scope == ScopeGateway {
		return fmt.Sprintf("to port %d of the address of the interface it came in on", port)
	}
	if p.IPv6 {
		return fmt.Sprintf("to 127.0.0.1:%d and [::1]:%d", port, port)
	}
	return fmt.Sprintf("to 127.0.0.1:%d", port)
}

// listenFlags is the listener option, in socksfwd's [bind:]port grammar,
// that receives what the rules send to port.
func (p *plan) listenFlags(flag string, port int, suffix string, tproxy bool) string {
	spec := func(bind string) string { return fmt.Sprintf("%s %s%d%s", flag, bind, port, suffix) }
	switch {
	case tproxy && (p.TProxyAddr4 != netip.AddrFrom4([4]byte{127, 0, 0, 1}) || p.TProxyAddr6 != netip.IPv6Loopback()):
		s := spec(p.TProxyAddr4.String() + ":")
		if p.IPv6 {
			s += " " + spec("["+p.TProxyAddr6.String()+"]:")
		}
		return s
	case p.Scope == ScopeGateway && (!tproxy || suffix == ""):
		// REDIRECT sends to the interface's address; and a TCP listener
		// on loopback, which TPROXY would reach too, gives other hosts'
		// connections loopback-sized buffers (socksfwd's sockbuf).
		if p.IPv6 {
			return fmt.Sprintf("%s '*:%d%s'", flag, port, suffix)
		}
		return spec("0.0.0.0:")
	case p.IPv6:
		return spec("localhost:")
	}
	return spec("")
}
