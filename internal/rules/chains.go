package rules

// chainKind is one of the jobs a rule set does; nft and iptables lay each
// out as one chain, with the same steps in the same order.
type chainKind int

const (
	// markOutput (scope local, TPROXY): mark this host's outgoing packets
	// so that policy routing turns them back in through lo.
	markOutput chainKind = iota
	// tproxyPrerouting (TPROXY): hand packets to the transparent
	// listeners and mark them for local delivery.
	tproxyPrerouting
	// redirect (NAT, OUTPUT or PREROUTING by scope): REDIRECT new TCP
	// connections and DNS to the listeners.
	redirect
	// tagOutput (scope gateway, TPROXY UDP): tag the flows socksfwd's
	// reply sockets start (see tagsOwnFlows); in scope local markOutput
	// does it.
	tagOutput
)

// chains lists the chains p needs, in the order they are written.
func (p *plan) chains() []chainKind {
	var cs []chainKind
	if p.tproxy() {
		if p.Scope == ScopeLocal {
			cs = append(cs, markOutput)
		} else if p.fullCone() {
			cs = append(cs, tagOutput)
		}
		cs = append(cs, tproxyPrerouting)
	}
	if p.DNSPort != 0 || (p.Mode == ModeRedirect && p.TCPPort != 0) {
		cs = append(cs, redirect)
	}
	return cs
}

// What each chain contains: the steps below are taken in this order.

// hookIsOutput reports whether k sits in OUTPUT (else PREROUTING).
func (p *plan) hookIsOutput(k chainKind) bool {
	return k == markOutput || k == tagOutput || (k == redirect && p.Scope == ScopeLocal)
}

// fullCone: TPROXY UDP answers the app from any remote through the
// association, also from one the app never sent to, or after conntrack
// forgot the app's flow. socksfwd's reply socket, bound to the remote's
// address, then sends the flow's first packet, conntrack makes the
// remote its originator, and the app's answer counts as a reply.
func (p *plan) fullCone() bool {
	return p.Mode == ModeTProxy && p.UDPPort != 0
}

// tagsOwnFlows: with fullCone, OUTPUT tags (ct mark |= RouteMark) every
// flow this host starts from an address not its own, which only a
// transparent socket (socksfwd's reply sockets) can do; first thing, as
// --mark and this host's destinations would end the chain before it.
func (p *plan) tagsOwnFlows(k chainKind) bool {
	return p.fullCone() && (k == markOutput || k == tagOutput)
}

// filtersInterfaces: gateway chains may look at the input interface only.
func (p *plan) filtersInterfaces(k chainKind) bool {
	return !p.hookIsOutput(k) && len(p.Interfaces) > 0
}

// onlyMarked: in scope local, prerouting takes just what markOutput marked;
// markOutput has already left everything else out.
func (p *plan) onlyMarked(k chainKind) bool {
	return k == tproxyPrerouting && p.Scope == ScopeLocal
}

// skipsOwnMark: socksfwd's --mark, wherever its packets can show up.
func (p *plan) skipsOwnMark(k chainKind) bool {
	return p.Mark != 0 && !p.onlyMarked(k)
}

// skipsProxyUsers: the programs of ProxyUsers, in the chains that see
// this host's own traffic.
func (p *plan) skipsProxyUsers(k chainKind) bool {
	return len(p.ProxyUsers) > 0 && p.hookIsOutput(k) && k != tagOutput
}

// ownerCaveat is what an owner match cannot do where it decides per
// packet (TPROXY's mark; NAT decides per connection): a packet sent with
// no owner, such as a closing connection's last ACK from TIME-WAIT, is
// captured, and TPROXY drops it, since no transparent socket takes it.
func (p *plan) ownerCaveat(k chainKind) []string {
	if k != markOutput {
		return nil
	}
	return []string{
		"An owner match misses packets sent with no owner: a closed connection's last ACK from",
		"TIME-WAIT is captured and dropped here, so the far end waits out its FIN retries. With a proxy",
		"on this host, --mode redirect (NAT decides per connection) or a network namespace of its own",
		"avoids that.",
	}
}

// explainsNoMark: without --mark, the chains that see socksfwd's own
// packets (OUTPUT) say how else to keep them out.
func (p *plan) explainsNoMark(k chainKind) bool {
	return p.Mark == 0 && p.hookIsOutput(k)
}

// skipsReplies: the mangle chains see every packet, replies included, and
// a reply is never new traffic to proxy: without this, in scope local the
// answers of a server on this host to a client at a captured address would
// be taken, and in scope gateway the answers to uncaptured forwarded
// connections. NAT chains see only a connection's first packet.
func (p *plan) skipsReplies(k chainKind) bool {
	return k == markOutput || (k == tproxyPrerouting && p.Scope == ScopeGateway)
}

// repliesToOwnFlows: the replies skipsReplies lets pass exclude those of
// flows tagsOwnFlows tagged: the app's answers to a remote, to proxy.
func (p *plan) repliesToOwnFlows() bool { return p.fullCone() }

// filtersDestinations: the proxies, multicast, broadcast and --exclude.
func (p *plan) filtersDestinations(k chainKind) bool {
	return !p.onlyMarked(k)
}

// capturesDNS: the redirect chain sends DNS to --dns; the TPROXY chains
// leave it alone for that.
func (p *plan) capturesDNS(k chainKind) bool {
	return p.DNSPort != 0 && k == redirect
}

func (p *plan) passesDNS(k chainKind) bool {
	return p.DNSPort != 0 && k != redirect && !p.onlyMarked(k)
}

// proxiesTraffic: the chain goes on past DNS to TCP and UDP traffic
// (loopback, this host's addresses, --include, then the action).
func (p *plan) proxiesTraffic(k chainKind) bool {
	switch k {
	case redirect:
		return p.Mode == ModeRedirect && p.TCPPort != 0
	case tagOutput:
		return false
	}
	return true
}

// filtersLocal: loopback, link-local, this host's addresses, --include.
func (p *plan) filtersLocal(k chainKind) bool {
	return p.proxiesTraffic(k) && !p.onlyMarked(k)
}

// protocols lists the transport protocols captured by TCP or UDP rules.
// dropsRelatedICMP: UDP is proxied, and socksfwd answers its flows from
// the remotes' addresses; an app whose port closed before an answer came
// sends an ICMP error about it to that remote, which conntrack relates to
// the flow. Routed as usual it would tell the remote, directly, of a flow
// it never saw. The rules tag the UDP flows they proxy in conntrack and
// drop only ICMP errors related to a tagged flow: errors about anything
// else (a forwarded TCP flow's "fragmentation needed", which path MTU
// discovery needs) go out as before.
func (p *plan) dropsRelatedICMP() bool { return p.UDPPort != 0 }

func (p *plan) protocols() []string {
	var ps []string
	if p.TCPPort != 0 {
		ps = append(ps, "tcp")
	}
	if p.UDPPort != 0 {
		ps = append(ps, "udp")
	}
	return ps
}

// port returns the listener port for proto.
func (p *plan) port(proto string) int {
	if proto == "udp" {
		return p.UDPPort
	}
	return p.TCPPort
}

// redirected names what the redirect chain takes, for its comment.
func (p *plan) redirected() string {
	switch {
	case p.Mode == ModeTProxy || p.TCPPort == 0:
		return "DNS"
	case p.DNSPort != 0:
		return "DNS and new TCP connections"
	}
	return "new TCP connections"
}
