package rules

import (
	"net/netip"
	"strings"
)

// nftTable is the table every rule lives in: one table of our own, so the
// script replaces it whole and never touches anyone else's rules.
const nftTable = "inet socksfwd"

// NFT returns an nft script (for `nft -f`) that captures what cfg describes.
// It declares, deletes and recreates table inet socksfwd in one
// transaction, so loading it again replaces the previous rules atomically.
// With TPROXY the routes in Routes are needed too; the script's header
// lists them.
func NFT(cfg Config) (string, error) {
	p, err := newPlan(cfg)
	if err != nil {
		return "", err
	}
	var t text
	t.line("#!/usr/sbin/nft -f")
	p.header(&t, "nft script", p.families)
	t.line("# Load: nft -f FILE (again to replace it; either scope's rules replace the other's, as they")
	t.line("# share one table). Remove: nft delete table %s", nftTable)
	t.line("")
	t.line("# Declared before it is deleted, so the delete succeeds on a first load too.")
	t.line("table %s", nftTable)
	t.line("delete table %s", nftTable)
	t.line("")
	t.line("table %s {", nftTable)
	p.nftSets(&t)
	for _, k := range p.chains() {
		t.line("")
		p.nftChain(&t, k)
	}
	t.line("}")
	return t.String(), nil
}

func nftFamily(f family) (proto, addrType, suffix string) {
	if f.v6 {
		return "ip6", "ipv6_addr", "6"
	}
	return "ip", "ipv4_addr", "4"
}

// nftSets declares the address sets the chains match against.
func (p *plan) nftSets(t *text) {
	first := true
	set := func(name, addrType string, interval bool, elems []string) {
		first = false
		t.line("\tset %s {", name)
		t.line("\t\ttype %s", addrType)
		if interval {
			t.line("\t\tflags interval")
		}
		if len(elems) <= 4 {
			t.line("\t\telements = { %s }", strings.Join(elems, ", "))
		} else {
			t.line("\t\telements = {")
			for i, e := range elems {
				sep := ","
				if i == len(elems)-1 {
					sep = ""
				}
				t.line("\t\t\t%s%s", e, sep)
			}
			t.line("\t\t}")
		}
		t.line("\t}")
	}
	kinds := []struct {
		comment, name string
		interval      bool
		elems         func(family) []string
	}{
		{"The upstream proxies: socksfwd's own connections to them must never come back to it.",
			"proxy", false, func(f family) []string { return addrStrings(f.proxies) }},
		{"Never captured: multicast and broadcast cannot be proxied; the others are --exclude.",
			"skip", true, func(f family) []string { return prefixStrings(f.skip) }},
		{`Not proxied (DNS capture still takes port 53 to them): loopback, link-local, "this network".`,
			"local", true, func(f family) []string { return prefixStrings(f.local) }},
		{"--include: only these destinations are proxied.",
			"include", true, func(f family) []string { return prefixStrings(f.include) }},
	}
	for _, kind := range kinds {
		commented := false
		for _, f := range p.families {
			elems := kind.elems(f)
			if len(elems) == 0 {
				continue
			}
			if !commented {
				if !first {
					t.line("")
				}
				t.line("\t# %s", kind.comment)
				commented = true
			}
			_, addrType, sfx := nftFamily(f)
			set(kind.name+sfx, addrType, kind.interval, elems)
		}
	}
}

func addrStrings(as []netip.Addr) []string {
	s := make([]string, len(as))
	for i, a := range as {
		s[i] = a.String()
	}
	return s
}

func prefixStrings(ps []netip.Prefix) []string {
	s := make([]string, len(ps))
	for i, pr := range ps {
		s[i] = pr.String()
	}
	return s
}

// nftChain writes one base chain; the steps and their order are the ones
// chains.go describes, shared with the iptables rules.
func (p *plan) nftChain(t *text, k chainKind) {
	r := func(format string, args ...any) { t.line("\t\t"+format, args...) }
	c := func(format string, args ...any) { t.line("\t\t# "+format, args...) }
	hook := "prerouting"
	if p.hookIsOutput(k) {
		hook = "output"
	}
	switch k {
	case markOutput:
		t.line("\t# This host's programs: mark what is to be proxied. Policy routing (fwmark %#x -> table %d,", p.RouteMark, p.RouteTable)
		t.line("\t# where every address is local) turns it back in through lo, to prerouting_tproxy.")
		t.line("\tchain output_mark {")
		r("type route hook output priority mangle; policy accept;")
	case tproxyPrerouting:
		if p.Scope == ScopeLocal {
			t.line("\t# What output_mark marked comes back in through lo: TPROXY hands it to the listeners.")
		} else {
			t.line("\t# TPROXY hands what other hosts send to the listeners; the mark delivers it locally.")
		}
		t.line("\tchain prerouting_tproxy {")
		r("type filter hook prerouting priority mangle; policy accept;")
	case redirect:
		t.line("\t# REDIRECT %s to the listeners.", p.redirected())
		t.line("\tchain %s_redirect {", hook)
		if hook == "output" {
			// nft 1.0 knows the dstnat keyword for prerouting only.
			r("type nat hook output priority -100; policy accept;")
		} else {
			r("type nat hook prerouting priority dstnat; policy accept;")
		}
	case tagOutput:
		t.line("\t# This host's own packets: only the tag below (this host's programs are not captured).")
		t.line("\tchain output_tag {")
		r("type filter hook output priority mangle; policy accept;")
	}
	if p.tagsOwnFlows(k) {
		c("socksfwd answers captured UDP from the remote's address, also first (full cone); the app's")
		c("answer is then a reply to conntrack. Tag flows started from an address not this host's")
		c("(socksfwd's reply sockets): their replies are proxied.")
		r("ct state new fib saddr type != local ct mark set ct mark | %#x", p.RouteMark)
	}
	if k == tagOutput {
		t.line("\t}")
		return
	}

	if !p.IPv6 {
		c("IPv4 only: IPv6 rules are off.")
		r("meta nfproto ipv6 return")
	}
	if p.filtersInterfaces(k) {
		c("Only what comes in on these interfaces.")
		r("iifname != %s return", nftStrings(nftInterfaces(p.Interfaces)))
	}
	if p.onlyMarked(k) {
		c("Only what output_mark marked.")
		r("meta mark != %#x return", p.RouteMark)
	}
	if p.skipsOwnMark(k) {
		c("socksfwd's own sockets (--mark).")
		r("meta mark %#x return", p.Mark)
	}
	if p.skipsProxyUsers(k) {
		c("The proxies that run on this host (--proxy-user): their own connections.")
		for _, l := range p.ownerCaveat(k) {
			c("%s", l)
		}
		for _, u := range p.ProxyUsers {
			r("meta skuid %s return", nftUser(u))
		}
	}
	if p.explainsNoMark(k) {
		c("No --mark: socksfwd's own connections are left out only by the proxies' addresses below,")
		c("so a proxy name that comes to resolve elsewhere would loop, and a proxy's UDP relay on another")
		c("address or a --no-proxy connection is taken. Run socksfwd with --mark N (and these rules with")
		c("the same mark), or run it as a user of its own and uncomment:")
		c(`meta skuid "socksfwd" return`)
		if k == markOutput {
			c("(an owner match misses packets sent with no owner, such as a closing connection's last ACK)")
		}
	}
	if p.skipsReplies(k) {
		if p.repliesToOwnFlows() {
			c("Replies (of connections made to this host, or forwarded uncaptured) are not new traffic;")
			c("those to flows socksfwd started (tagged above) are.")
			r("ct direction reply ct mark & %#x == 0 return", p.RouteMark)
		} else {
			c("Replies (of connections made to this host, or forwarded uncaptured) are not new traffic.")
			r("ct direction reply return")
		}
	}
	if p.filtersDestinations(k) {
		c("Never: the proxies, multicast, broadcast, --exclude.")
		for _, f := range p.families {
			if len(f.proxies) > 0 {
				proto, _, sfx := nftFamily(f)
				r("%s daddr @proxy%s return", proto, sfx)
			}
		}
		for _, f := range p.families {
			proto, _, sfx := nftFamily(f)
			r("%s daddr @skip%s return", proto, sfx)
		}
		r("fib daddr type broadcast return")
	}
	if p.capturesDNS(k) {
		c("DNS to any other destination (loopback and --include do not limit it) goes to --dns.")
		r("meta l4proto { tcp, udp } th dport %d redirect to :%d", dnsPort, p.DNSPort)
	}
	if p.passesDNS(k) {
		c("DNS is left to %s_redirect, which sends it to --dns.", hook)
		r("meta l4proto { tcp, udp } th dport %d return", dnsPort)
	}
	if !p.proxiesTraffic(k) {
		t.line("\t}")
		return
	}
	if p.filtersLocal(k) {
		c(`Loopback, link-local, "this network", this host's own addresses.`)
		for _, f := range p.families {
			proto, _, sfx := nftFamily(f)
			r("%s daddr @local%s return", proto, sfx)
		}
		r("fib daddr type local return")
		if len(p.Include) > 0 {
			c("--include: only these destinations are proxied.")
			for _, f := range p.families {
				proto, _, sfx := nftFamily(f)
				if len(f.include) > 0 {
					r("%s daddr != @include%s return", proto, sfx)
				} else {
					c("--include names no %s destination: no %s traffic is proxied.", f.name(), f.name())
					r("meta nfproto %s return", map[bool]string{false: "ipv4", true: "ipv6"}[f.v6])
				}
			}
		}
	}
	switch k {
	case markOutput:
		nftDropRelatedICMP(p, c, r)
		c("The rest is proxied.")
		r("meta l4proto %s meta mark set %#x", nftProtocols(p.protocols()), p.RouteMark)
	case tproxyPrerouting:
		if !p.onlyMarked(k) { // scope local: output_mark has it
			nftDropRelatedICMP(p, c, r)
		}
		for _, proto := range p.protocols() {
			for _, f := range p.families {
				fp, _, _ := nftFamily(f)
				r("meta l4proto %s tproxy %s to %s meta mark set %#x accept",
					proto, fp, netip.AddrPortFrom(f.tproxyAddr, uint16(p.port(proto))), p.RouteMark)
			}
		}
		c("No listener took it (socksfwd is not running): drop it, as iptables' TPROXY does,")
		c("rather than let it go out unproxied.")
		r("meta l4proto %s drop", nftProtocols(p.protocols()))
	case redirect:
		c("The rest is proxied.")
		r("meta l4proto tcp redirect to :%d", p.TCPPort)
	}
	t.line("\t}")
}

// nftDropRelatedICMP writes the rule that keeps ICMP errors about proxied
// UDP flows from going out (see dropsRelatedICMP).
func nftDropRelatedICMP(p *plan, c, r func(string, ...any)) {
	if !p.dropsRelatedICMP() {
		return
	}
	c("Proxied UDP flows are tagged (ct mark, the route mark's bits): an app's ICMP error about one")
	c("(its port closed before socksfwd's answer came) would reach the remote, which never saw the")
	c("flow, directly; it is dropped. Errors about other flows go out as usual.")
	r("meta l4proto udp ct mark set ct mark | %#x", p.RouteMark)
	r("meta l4proto { icmp, ipv6-icmp } ct state related ct mark & %#x == %#x drop", p.RouteMark, p.RouteMark)
}

// nftUser is a user for meta skuid: a number as it is, a name quoted.
func nftUser(u string) string {
	if strings.Trim(u, "0123456789") == "" {
		return u
	}
	return `"` + u + `"`
}

// nftStrings quotes names as one nft value or an anonymous set.
// nftInterfaces writes the interfaces' trailing-+ wildcards nft's way.
func nftInterfaces(names []string) []string {
	out := make([]string, len(names))
	for i, n := range names {
		if base, wild := strings.CutSuffix(n, "+"); wild {
			n = base + "*"
		}
		out[i] = n
	}
	return out
}

func nftStrings(names []string) string {
	q := make([]string, len(names))
	for i, n := range names {
		q[i] = `"` + n + `"`
	}
	if len(q) == 1 {
		return q[0]
	}
	return "{ " + strings.Join(q, ", ") + " }"
}

func nftProtocols(ps []string) string {
	if len(ps) == 1 {
		return ps[0]
	}
	return "{ " + strings.Join(ps, ", ") + " }"
}
