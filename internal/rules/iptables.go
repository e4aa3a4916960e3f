package rules

import (
	"fmt"
	"net/netip"
	"strings"
)

// IPTables returns iptables-restore input for IPv4 and, when cfg.IPv6 is
// set, ip6tables-restore input for IPv6 (else v6 is empty). Both are meant
// for `iptables-restore --noflush`: without --noflush, iptables-restore
// first empties the whole mangle and nat tables, other programs' rules
// included. The rules live in SOCKSFWD_* chains that a load empties and
// refills; the jumps to them from the built-in chains are added on every
// load, so the header lists the commands that remove them first.
func IPTables(cfg Config) (v4, v6 string, err error) {
	p, err := newPlan(cfg)
	if err != nil {
		return "", "", err
	}
	for _, f := range p.families {
		s := p.iptables(f)
		if f.v6 {
			v6 = s
		} else {
			v4 = s
		}
	}
	return v4, v6, nil
}

// iptChain is one chain of ours with its rules (comment lines included) and
// the jumps that hook it into a built-in chain.
type iptChain struct {
	table, name string
	lines       []string
	hooks       []string // "-A PREROUTING -j SOCKSFWD_TPROXY"
}

func (c *iptChain) rule(format string, args ...any) {
	c.lines = append(c.lines, fmt.Sprintf("-A %s ", c.name)+fmt.Sprintf(format, args...))
}

func (c *iptChain) comment(format string, args ...any) {
	c.lines = append(c.lines, "# "+fmt.Sprintf(format, args...))
}

// iptRemoval is what removes chains: the jumps to them, then their rules,
// then the chains. The lines are shell commands (rules --remove | sh), so
// each word of a jump is quoted where the shell would read it otherwise: an
// interface name may hold "(" or ";".
func iptRemoval(command string, chains []*iptChain) []string {
	var lines []string
	for _, c := range chains {
		for _, h := range c.hooks {
			words := strings.Fields(h)
			words[0] = "-D"
			for i, w := range words {
				words[i] = shellWord(w)
			}
			lines = append(lines, fmt.Sprintf("%s -t %s %s", command, c.table, strings.Join(words, " ")))
		}
	}
	for _, verb := range []string{"-F", "-X"} {
		for _, c := range chains {
			lines = append(lines, fmt.Sprintf("%s -t %s %s %s", command, c.table, verb, c.name))
		}
	}
	return lines
}

// allIptChains lays out every chain of family f (see iptChains).
func (p *plan) allIptChains(f family) []*iptChain {
	var chains []*iptChain
	for _, k := range p.chains() {
		chains = append(chains, p.iptChains(f, k)...)
	}
	return chains
}

// iptables writes the restore input for one family.
func (p *plan) iptables(f family) string {
	command := "iptables"
	if f.v6 {
		command = "ip6tables"
	}
	chains := p.allIptChains(f)

	var t text
	p.header(&t, command+"-restore input", []family{f})
	t.line("# Load: %s-restore --noflush < FILE", command)
	t.line("#   (without --noflush, %s-restore first empties the whole mangle and nat tables,", command)
	t.line("#   other programs' rules included)")
	t.line("# Remove (before loading again, and before loading the other scope's rules, which use these")
	t.line("# chains too: a load adds its jumps to them and leaves any other jump in place):")
	for _, l := range iptRemoval(command, chains) {
		t.line("#   %s", l)
	}
	for _, table := range []string{"mangle", "nat"} {
		var in []*iptChain
		for _, c := range chains {
			if c.table == table {
				in = append(in, c)
			}
		}
		if len(in) == 0 {
			continue
		}
		t.line("")
		t.line("*%s", table)
		for _, c := range in {
			t.line(":%s - [0:0]", c.name)
		}
		for _, c := range in {
			for _, l := range c.lines {
				t.line("%s", l)
			}
		}
		for _, c := range in {
			for _, h := range c.hooks {
				t.line("%s", h)
			}
		}
		t.line("COMMIT")
	}
	return t.String()
}

// iptChains lays out chain k for family f: the chain itself and, with
// --include, the one the included destinations jump to. The steps and their
// order are the ones chains.go describes, shared with the nft script.
func (p *plan) iptChains(f family, k chainKind) []*iptChain {
	c := &iptChain{table: "mangle"}
	builtin := "PREROUTING"
	if p.hookIsOutput(k) {
		builtin = "OUTPUT"
	}
	switch k {
	case markOutput:
		c.name = "SOCKSFWD_MARK"
		c.comment("This host's programs: mark what is to be proxied. Policy routing (fwmark %#x -> table %d,", p.RouteMark, p.RouteTable)
		c.comment("where every address is local) turns it back in through lo, to SOCKSFWD_TPROXY.")
	case tproxyPrerouting:
		c.name = "SOCKSFWD_TPROXY"
		if p.Scope == ScopeLocal {
			c.comment("What SOCKSFWD_MARK marked comes back in through lo: TPROXY hands it to the listeners.")
		} else {
			c.comment("TPROXY hands what other hosts send to the listeners; the mark delivers it locally.")
		}
	case redirect:
		c.table, c.name = "nat", "SOCKSFWD_REDIRECT"
		c.comment("REDIRECT %s to the listeners.", p.redirected())
	case tagOutput:
		c.name = "SOCKSFWD_TAG"
		c.comment("This host's own packets: only the tag below (this host's programs are not captured).")
	}
	if p.filtersInterfaces(k) {
		for _, name := range p.Interfaces {
			c.hooks = append(c.hooks, fmt.Sprintf("-A %s -i %s -j %s", builtin, name, c.name))
		}
	} else {
		c.hooks = []string{fmt.Sprintf("-A %s -j %s", builtin, c.name)}
	}

	if p.tagsOwnFlows(k) {
		c.comment("socksfwd answers captured UDP from the remote's address, also first (full cone); the app's")
		c.comment("answer is then a reply to conntrack. Tag flows started from an address not this host's")
		c.comment("(socksfwd's reply sockets): their replies are proxied.")
		c.rule("-m conntrack --ctstate NEW -m addrtype ! --src-type LOCAL -j CONNMARK --or-mark %#x", p.RouteMark)
	}
	if k == tagOutput {
		return []*iptChain{c}
	}
	if p.onlyMarked(k) {
		c.comment("Only what SOCKSFWD_MARK marked.")
		c.rule("-m mark ! --mark %#x -j RETURN", p.RouteMark)
	}
	if p.skipsOwnMark(k) {
		c.comment("socksfwd's own sockets (--mark).")
		c.rule("-m mark --mark %#x -j RETURN", p.Mark)
	}
	if p.skipsProxyUsers(k) {
		c.comment("The proxies that run on this host (--proxy-user): their own connections.")
		for _, l := range p.ownerCaveat(k) {
			c.comment("%s", l)
		}
		for _, u := range p.ProxyUsers {
			c.rule("-m owner --uid-owner %s -j RETURN", u)
		}
	}
	if p.explainsNoMark(k) {
		c.comment("No --mark: socksfwd's own connections are left out only by the proxies' addresses below,")
		c.comment("so a proxy name that comes to resolve elsewhere would loop, and a proxy's UDP relay on another")
		c.comment("address or a --no-proxy connection is taken. Run socksfwd with --mark N (and these rules with")
		c.comment("the same mark), or run it as a user of its own and uncomment:")
		c.comment("-A %s -m owner --uid-owner socksfwd -j RETURN", c.name)
		if k == markOutput {
			c.comment("(an owner match misses packets sent with no owner, such as a closing connection's last ACK)")
		}
	}
	if p.skipsReplies(k) {
		if p.repliesToOwnFlows() {
			c.comment("Replies (of connections made to this host, or forwarded uncaptured) are not new traffic;")
			c.comment("those to flows socksfwd started (tagged above) are.")
			c.rule("-m conntrack --ctdir REPLY -m connmark --mark 0/%#x -j RETURN", p.RouteMark)
		} else {
			c.comment("Replies (of connections made to this host, or forwarded uncaptured) are not new traffic.")
			c.rule("-m conntrack --ctdir REPLY -j RETURN")
		}
	}
	if p.filtersDestinations(k) {
		c.comment("Never: the proxies, multicast, broadcast, --exclude.")
		for _, a := range f.proxies {
			c.rule("-d %s -j RETURN", netip.PrefixFrom(a, a.BitLen()))
		}
		for _, pr := range f.skip {
			c.rule("-d %s -j RETURN", pr)
		}
		if !f.v6 { // IPv6 has no broadcast
			c.rule("-m addrtype --dst-type BROADCAST -j RETURN")
		}
	}
	if p.capturesDNS(k) {
		c.comment("DNS to any other destination (loopback and --include do not limit it) goes to --dns.")
		for _, proto := range []string{"udp", "tcp"} {
			c.rule("-p %s --dport %d -j REDIRECT --to-ports %d", proto, dnsPort, p.DNSPort)
		}
	}
	if p.passesDNS(k) {
		c.comment("DNS is left to SOCKSFWD_REDIRECT, which sends it to --dns.")
		for _, proto := range []string{"udp", "tcp"} {
			c.rule("-p %s --dport %d -j RETURN", proto, dnsPort)
		}
	}
	if !p.proxiesTraffic(k) {
		return []*iptChain{c}
	}
	chains := []*iptChain{c}
	action := c
	if p.filtersLocal(k) {
		c.comment(`Loopback, link-local, "this network", this host's own addresses.`)
		for _, pr := range f.local {
			c.rule("-d %s -j RETURN", pr)
		}
		c.rule("-m addrtype --dst-type LOCAL -j RETURN")
		if len(p.Include) > 0 {
			if len(f.include) == 0 {
				c.comment("--include names no %s destination: no %s traffic is proxied.", f.name(), f.name())
				return chains
			}
			action = &iptChain{table: c.table, name: c.name + "_INCLUDED"}
			chains = append(chains, action)
			c.comment("--include: only these destinations are proxied.")
			for _, pr := range f.include {
				c.rule("-d %s -j %s", pr, action.name)
			}
		}
	}
	switch k {
	case markOutput:
		iptDropRelatedICMP(p, f, action)
		action.comment("The rest is proxied.")
		for _, proto := range p.protocols() {
			action.rule("-p %s -j MARK --set-mark %#x", proto, p.RouteMark)
		}
	case tproxyPrerouting:
		if !p.onlyMarked(k) { // scope local: the mark chain has it
			iptDropRelatedICMP(p, f, action)
		}
		action.comment("TPROXY drops what no listener takes (socksfwd is not running): nothing goes out unproxied.")
		for _, proto := range p.protocols() {
			action.rule("-p %s -j TPROXY --on-port %d --on-ip %s --tproxy-mark %#x",
				proto, p.port(proto), f.tproxyAddr, p.RouteMark)
		}
	case redirect:
		action.comment("The rest is proxied.")
		action.rule("-p tcp -j REDIRECT --to-ports %d", p.TCPPort)
	}
	return chains
}

// iptDropRelatedICMP writes the rule that keeps ICMP errors about proxied
// UDP flows from going out (see dropsRelatedICMP).
func iptDropRelatedICMP(p *plan, f family, c *iptChain) {
	if !p.dropsRelatedICMP() {
		return
	}
	proto := "icmp"
	if f.v6 {
		proto = "ipv6-icmp"
	}
	c.comment("Proxied UDP flows are tagged (connmark, the route mark's bits): an app's ICMP error about one (its port closed before socksfwd's answer came) would reach the remote, which never saw the flow, directly; it is dropped. Errors about other flows go out as usual.")
	c.rule("-p udp -j CONNMARK --or-mark %#x", p.RouteMark)
	c.rule("-p %s -m conntrack --ctstate RELATED -m connmark --mark %#x/%#x -j DROP", proto, p.RouteMark, p.RouteMark)
}

// shellWord is w as one word of a POSIX shell command line: as it is when
// it holds nothing the shell reads specially, else in single quotes.
func shellWord(w string) string {
	if w != "" && strings.Trim(w, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.+@%=:,/") == "" {
		return w
	}
	return "'" + strings.ReplaceAll(w, "'", `'\''`) + "'"
}
