package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/socksfwd/socksfwd/internal/rules"
	"github.com/socksfwd/socksfwd/internal/sockbuf"
	"github.com/socksfwd/socksfwd/internal/sockmark"
	"github.com/socksfwd/socksfwd/socksclient"
)

// rulesCommand is `socksfwd rules`: it reads the same flags, environment
// and file as the daemon and prints the netfilter rules that send an
// app's traffic to its transparent listeners (and DNS to --dns).
func rulesCommand(stdout io.Writer, getenv func(string) string) *cli.Command {
	flags := append(optionFlagsIn(sharedOptions),
		&cli.StringFlag{Name: "format", Value: "nft", Usage: "nft (an nft -f script) | iptables (iptables-restore --noflush input) | ip6tables (ip6tables-restore --noflush input) | routes (the ip rule/route commands TPROXY needs)"},
		&cli.StringFlag{Name: "mode", Value: rules.ModeRedirect, Usage: "redirect (TCP, NAT) | tproxy (TCP and UDP, keeps the packets' addresses)"},
		&cli.StringFlag{Name: "scope", Value: rules.ScopeLocal, Usage: "local (this host's or pod's own programs, OUTPUT) | gateway (traffic from other hosts or containers, PREROUTING)"},
		&cli.StringSliceFlag{Name: "exclude", Usage: "destination CIDR never to capture, repeatable"},
		&cli.StringSliceFlag{Name: "include", Usage: "capture only these destination CIDRs, repeatable"},
		&cli.StringSliceFlag{Name: "interface", Usage: "gateway scope: capture only what arrives on this interface, repeatable; a trailing + matches every name that starts so (veth+)"},
		&cli.BoolFlag{Name: "ipv6", Usage: "IPv6 rules too"},
		&cli.StringSliceFlag{Name: "proxy-user", Usage: "scope local: never capture this user's programs (a proxy on this host, such as Tor), repeatable"},
		&cli.BoolFlag{Name: "remove", Usage: "print the shell commands that remove what --format loads, instead of the rules (socksfwd rules --remove … | sh)"},
		&cli.Uint64Flag{Name: "route-mark", Value: rules.DefaultRouteMark, Usage: "tproxy: the fwmark policy routing uses"},
		&cli.Uint64Flag{Name: "route-table", Value: rules.DefaultRouteTable, Usage: "tproxy: the routing table that makes every address local"},
	)
	return &cli.Command{
		Name:      "rules",
		Usage:     "print the netfilter rules for the transparent listeners",
		UsageText: "socksfwd rules [--format nft|iptables|ip6tables|routes] [--mode redirect|tproxy] [--scope local|gateway] -c socksfwd.toml | nft -f -",
		Flags:     flags,
		OnUsageError: func(c *cli.Context, err error, _ bool) error {
			return usageError{err}
		},
		Action: func(c *cli.Context) error {
			plan := planFrom
			if c.Bool("remove") {
				plan = removalPlan
			}
			cfg, err := plan(c, getenv)
			if errors.Is(err, errNothingToForward) {
				return usagef("nothing to capture: give --transparent [bind:]port (TCP; port/udp for UDP, with --mode tproxy) or --dns [bind:]port, as socksfwd will run")
			}
			if err != nil {
				return err
			}
			rc, err := rulesConfig(c, cfg.plan)
			if err != nil {
				return err
			}
			var out string
			if c.Bool("remove") {
				out, err = printRemoval(c.String("format"), rc)
			} else {
				for _, w := range rulesWarnings(rc, cfg.plan) {
					fmt.Fprintln(c.App.ErrWriter, "socksfwd rules: warning: "+w)
				}
				out, err = printRules(c.String("format"), rc)
			}
			if errors.Is(err, rules.ErrConfig) {
				return usageError{err}
			}
			if err != nil {
				return err
			}
			_, err = io.WriteString(stdout, out)
			return err
		},
	}
}

// removalPlan is planFrom for rules --remove, which names no proxy: a
// stop script that gives only the listeners gets the removal too.
func removalPlan(c *cli.Context, getenv func(string) string) (mergedConfig, error) {
	return planFromAdjusted(c, getenv, func(cfg *Config) {
		// What the removal does not use must not stop it: the proxies, the
		// resolvers, secrets in files that may be gone (documentation
		// addresses, never dialed).
		cfg.Server = []string{"192.0.2.1:1080"}
		cfg.ServerPasswordFile, cfg.HTTPAuthFile, cfg.SOCKSAuthFile = "", "", ""
		if cfg.DNS != "" {
			cfg.DNSUpstream = []string{"192.0.2.53"}
		}
	})
}

// rulesConfig gathers what the rules need from the plan and the flags.
func rulesConfig(c *cli.Context, p *plan) (rules.Config, error) {
	rc := rules.Config{
		Mode: c.String("mode"), Scope: c.String("scope"), Mark: uint32(p.cfg.Mark), IPv6: c.Bool("ipv6"),
		Interfaces: c.StringSlice("interface"), ProxyUsers: c.StringSlice("proxy-user"),
	}
	for _, f := range []struct {
		name string
		to   *uint32
	}{{"route-mark", &rc.RouteMark}, {"route-table", &rc.RouteTable}} {
		v := c.Uint64(f.name)
		if v > 0xffffffff || v == 0 && c.IsSet(f.name) {
			// 0 is no mark, and no table: the rules would use the default.
			return rc, usagef("rules --%s %#x: out of range 1-0xffffffff", f.name, v)
		}
		*f.to = uint32(v)
	}
	listens, err := resolveListens(p.listens)
	if err != nil {
		return rc, err
	}
	for _, l := range listens {
		ap, err := netip.ParseAddrPort(l.addr)
		if err != nil { // an empty bind: every interface
			_, port, _ := net.SplitHostPort(l.addr)
			n, _ := strconv.Atoi(port)
			ap = netip.AddrPortFrom(netip.IPv4Unspecified(), uint16(n))
		}
		// REDIRECT on a gateway hands a connection to the address of the
		// interface it arrived on: a loopback listener never sees it.
		if rc.Scope == rules.ScopeGateway && redirected(l, rc) && ap.Addr().IsLoopback() && !c.Bool("remove") {
			return rc, usagef("rules --scope gateway: %s listens on %s, but REDIRECT on a gateway sends to the address of the interface traffic arrives on; bind it to 0.0.0.0:%d (or that interface's address)", l.spec, ap, ap.Port())
		}
		switch l.kind {
		case kindTransparent:
			if rc.TCPPort != 0 && rc.TCPPort != int(ap.Port()) {
				return rc, usagef("rules: the transparent listeners use ports %d and %d; rules send everything to one port", rc.TCPPort, ap.Port())
			}
			rc.TCPPort = int(ap.Port())
			if a := ap.Addr(); !a.IsUnspecified() && !a.IsLoopback() {
				if a.Is4() {
					rc.TProxyAddr4 = a
				} else {
					rc.TProxyAddr6 = a
				}
			}
		case kindTransparentUDP:
			if rc.UDPPort != 0 && rc.UDPPort != int(ap.Port()) {
				return rc, usagef("rules: the transparent UDP listeners use ports %d and %d; rules send everything to one port", rc.UDPPort, ap.Port())
			}
			rc.UDPPort = int(ap.Port())
			if a := ap.Addr(); !a.IsUnspecified() && !a.IsLoopback() {
				if a.Is4() {
					rc.TProxyAddr4 = a
				} else {
					rc.TProxyAddr6 = a
				}
			}
		case kindDNS:
			if rc.DNSPort != 0 && rc.DNSPort != int(ap.Port()) {
				return rc, usagef("rules: the --dns listeners use ports %d and %d; rules send DNS to one port", rc.DNSPort, ap.Port())
			}
			rc.DNSPort = int(ap.Port())
		}
	}
	if rc.TCPPort == 0 && rc.UDPPort == 0 && rc.DNSPort == 0 {
		return rc, usagef("rules: nothing to capture: give --transparent [bind:]port[/udp] (and --dns to capture DNS)")
	}
	if rc.Exclude, err = prefixes("--exclude", c.StringSlice("exclude")); err != nil {
		return rc, err
	}
	if rc.Include, err = prefixes("--include", c.StringSlice("include")); err != nil {
		return rc, err
	}
	if c.Bool("remove") {
		// What removes the rules depends on the options that shape the
		// chains (format, mode, scope, ports, interfaces, --include), not
		// on the proxies or the listeners' checks: a configuration edited
		// since they were loaded still removes them, though it would not
		// load.
		return rc, nil
	}
	if err := checkListenersTake(rc, listens); err != nil {
		return rc, err
	}
	for _, d := range p.dialers {
		addrs, err := proxyAddrs(d)
		if err != nil {
			return rc, err
		}
		// A proxy on this host makes connections of its own, which scope
		// local would take and send back to it, round and round.
		if a := onThisHost(addrs); a.IsValid() && rc.Scope == rules.ScopeLocal && len(rc.ProxyUsers) == 0 {
			return rc, usagef("rules: the proxy %s is on this host (%s): scope local would capture its own connections and send them back to it. "+
				"Run it as a user of its own and name that user with --proxy-user (or run it in another network namespace)", d.ProxyAddr, a)
		}
		rc.Proxies = append(rc.Proxies, addrs...)
	}
	return rc, nil
}

// resolveListens returns listens with each bind given as a host name
// replaced by the address socksfwd binds for it (net.Listen takes the
// name's first IPv4 address, else its first): the rules must send to the
// address the listener is on, and check that address, not the name.
func resolveListens(listens []listenPlan) ([]listenPlan, error) {
	return resolveListensWith(net.ResolveTCPAddr, listens)
}

// resolveListensWith is resolveListens with resolveBind resolving names.
func resolveListensWith(resolveBind func(network, addr string) (*net.TCPAddr, error), listens []listenPlan) ([]listenPlan, error) {
	out := slices.Clone(listens)
	for i, l := range out {
		host, _, err := net.SplitHostPort(l.addr)
		if err != nil || host == "" {
			continue
		}
		if _, err := netip.ParseAddr(host); err == nil {
			continue
		}
		a, err := resolveBind("tcp", l.addr) // UDP's choice is the same
		if err != nil {
			return nil, fmt.Errorf("rules: %s binds %s, whose name does not resolve here: %w", l.spec, host, err)
		}
		ap := a.AddrPort()
		out[i].addr = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()).String()
	}
	return out, nil
}

// checkListenersTake refuses rules that send a family's TCP, UDP or DNS
// where no listener of that kind is: the rules would drop it (TPROXY) or
// have it refused (REDIRECT), with nothing to say why.
func checkListenersTake(rc rules.Config, listens []listenPlan) error {
	type capture struct {
		what, option string
		kind         listenKind
		port         int
		tproxy       bool
	}
	var captures []capture
	if rc.TCPPort != 0 {
		captures = append(captures, capture{"TCP", "--transparent", kindTransparent, rc.TCPPort, rc.Mode == rules.ModeTProxy})
	}
	if rc.UDPPort != 0 {
		captures = append(captures, capture{"UDP", "--transparent", kindTransparentUDP, rc.UDPPort, true})
	}
	if rc.DNSPort != 0 {
		captures = append(captures, capture{"DNS", "--dns", kindDNS, rc.DNSPort, false})
	}
	families := []bool{false}
	if rc.IPv6 {
		families = append(families, true)
	}
	for _, c := range captures {
		for _, v6 := range families {
			// Where the rules send it; invalid: the address of the
			// interface it came in on (REDIRECT on a gateway).
			dst, how := netip.AddrFrom4([4]byte{127, 0, 0, 1}), "REDIRECT in scope local"
			if v6 {
				dst = netip.IPv6Loopback()
			}
			switch {
			case c.tproxy:
				how = "TPROXY"
				a := rc.TProxyAddr4
				if v6 {
					a = rc.TProxyAddr6
				}
				if a.IsValid() {
					dst = a
				}
			case rc.Scope == rules.ScopeGateway:
				dst, how = netip.Addr{}, "REDIRECT on a gateway"
			}
			var at []string
			taken := false
			for _, l := range listens {
				if l.kind == c.kind {
					at = append(at, l.addr)
					taken = taken || listenerTakes(l.addr, v6, dst)
				}
			}
			if taken {
				continue
			}
			family, to := "IPv4", "the address of the interface it comes in on"
			if v6 {
				family = "IPv6"
			}
			if dst.IsValid() {
				to = netip.AddrPortFrom(dst, uint16(c.port)).String()
			}
			return usagef("rules: %s sends %s %s to %s, and no %s listener is there (%s); bind one to that address or to *:%d",
				how, family, c.what, to, c.option, strings.Join(at, ", "), c.port)
		}
	}
	return nil
}

// listenerTakes reports whether a listener bound at addr gets what the
// rules send to dst (invalid: any address of the family but loopback).
func listenerTakes(addr string, v6 bool, dst netip.Addr) bool {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return true // an empty bind: every address, both families
	}
	a := ap.Addr().Unmap()
	if a.IsUnspecified() {
		return a.Is6() || !v6 // [::] is dual-stack; 0.0.0.0 IPv4 only
	}
	if a.Is6() != v6 {
		return false
	}
	if !dst.IsValid() {
		return !a.IsLoopback()
	}
	return a == dst
}

// onThisHost returns the first of addrs that is this host's (loopback or
// an interface's), or an invalid address.
func onThisHost(addrs []netip.Addr) netip.Addr {
	var local []net.Addr
	for _, a := range addrs {
		if a.IsLoopback() {
			return a
		}
		if local == nil {
			local, _ = net.InterfaceAddrs()
		}
		for _, l := range local {
			if n, ok := l.(*net.IPNet); ok {
				if ip, ok := netip.AddrFromSlice(n.IP); ok && ip.Unmap() == a {
					return a
				}
			}
		}
	}
	return netip.Addr{}
}

// rulesWarnings are what the rules will do that the user may not expect,
// though it can be right.
func rulesWarnings(rc rules.Config, p *plan) []string {
	var warnings []string
	if w := resolverCaptureWarning(rc, p); w != "" {
		warnings = append(warnings, w)
	}
	if rc.Scope == rules.ScopeGateway && len(rc.Interfaces) == 0 {
		warnings = append(warnings, "--scope gateway without --interface captures what arrives on every interface, "+
			"also new connections from the far side toward the hosts behind this one (a port forwarded to them): "+
			"give --interface for the side the clients are on")
	}
	if rc.Scope == rules.ScopeGateway && rc.Mode == rules.ModeTProxy {
		// A loopback listener's sockets ask for small buffers (sockbuf),
		// right for peers on this host; on a gateway they are other
		// hosts, whose window the small buffer caps from the SYN-ACK on.
		for _, l := range p.listens {
			if ap, err := netip.ParseAddrPort(l.addr); err == nil && l.kind == kindTransparent && ap.Addr().IsLoopback() {
				warnings = append(warnings, fmt.Sprintf("%s listens on %s: its connections get the small buffers of loopback ones "+
					"(%d KiB), and on a gateway they come from other hosts, whose throughput that caps (about 40 Mbit/s at 50 ms): "+
					"bind *:%d (TPROXY reaches it there too)", l.spec, ap.Addr(), sockbuf.LoopbackTCPSize>>10, ap.Port()))
			}
		}
	}
	if rc.Scope == rules.ScopeGateway {
		// REDIRECT on a gateway sends to the primary address of the
		// interface traffic came in on (for IPv6 often its link-local
		// one), which a listener on one address may not be.
		for _, l := range p.listens {
			if ap, err := netip.ParseAddrPort(l.addr); err == nil && redirected(l, rc) && !ap.Addr().IsUnspecified() &&
				!primaryOfInterfaces(ap.Addr(), rc.Interfaces) {
				warnings = append(warnings, fmt.Sprintf("%s listens on %s only, and REDIRECT on a gateway sends to the primary address "+
					"of the interface traffic comes in on (for IPv6 often its link-local one): unless that is %s, bind *:%d",
					l.spec, ap.Addr(), ap.Addr(), ap.Port()))
			}
		}
	}
	return warnings
}

// primaryOfInterfaces reports whether a is the primary (first) IPv4
// address of every one of names, as this host has them now: where REDIRECT
// on a gateway sends what comes in on them. False for IPv6, whose REDIRECT
// picks an address by source selection, for no names, and for a wildcard.
func primaryOfInterfaces(a netip.Addr, names []string) bool {
	if !a.Is4() || len(names) == 0 {
		return false
	}
	for _, name := range names {
		ifi, err := net.InterfaceByName(name)
		if err != nil {
			return false
		}
		addrs, err := ifi.Addrs()
		if err != nil {
			return false
		}
		first := netip.Addr{}
		for _, ad := range addrs {
			if n, ok := ad.(*net.IPNet); ok {
				if ip, ok := netip.AddrFromSlice(n.IP); ok && ip.Unmap().Is4() {
					first = ip.Unmap()
					break
				}
			}
		}
		if first != a {
			return false
		}
	}
	return true
}

// redirected reports whether the rules send l's traffic by REDIRECT:
// DNS always, transparent TCP in redirect mode.
func redirected(l listenPlan, rc rules.Config) bool {
	return l.kind == kindDNS || l.kind == kindTransparent && rc.Mode == rules.ModeRedirect
}

// resolverCaptureWarning: in scope local, a proxy given by name is looked
// up through this host's resolver, and the rules capture that resolver's
// own queries to its upstream servers (a stub such as 127.0.0.53 sends
// them unmarked), which then need the proxy: nothing resolves. An empty
// string when that cannot happen.
func resolverCaptureWarning(rc rules.Config, p *plan) string {
	if rc.Scope != rules.ScopeLocal {
		return ""
	}
	var captured []string
	if rc.DNSPort != 0 {
		captured = append(captured, "DNS into --dns")
	}
	if rc.UDPPort != 0 {
		captured = append(captured, "UDP (port 53 too) into the transparent UDP listener")
	}
	if rc.TCPPort != 0 {
		captured = append(captured, "TCP (DNS over TCP and TLS too) into the transparent listener")
	}
	for _, d := range p.dialers {
		host, _, _ := net.SplitHostPort(d.ProxyAddr)
		if _, err := netip.ParseAddr(host); err != nil && len(captured) > 0 {
			if rc.Mark == 0 && len(rc.ProxyUsers) == 0 {
				// Nothing tells socksfwd's own traffic apart but the
				// proxies' addresses, and a lookup goes to a resolver.
				return fmt.Sprintf("the proxy %s is a name, and without --mark or --proxy-user the rules capture socksfwd's own lookups of it too "+
					"(they capture %s): the lookup would need the proxy to reach the proxy, and nothing would connect. "+
					"Give --mark N (the same to socksfwd) or --proxy-user, or the proxy by address (or its name in /etc/hosts).",
					host, strings.Join(captured, " and "))
			}
			return fmt.Sprintf("the proxy %s is a name: socksfwd looks it up through this host's resolver, and the rules capture %s, "+
				"so a local stub resolver's own queries (127.0.0.53's) would need the proxy to resolve the proxy. "+
				"Give the proxy by address, or --exclude the stub's upstream resolvers.", host, strings.Join(captured, " and "))
		}
	}
	return ""
}

// proxyAddrs is a proxy's addresses: the rules must leave socksfwd's own
// connections to it alone. A name is resolved here, once.
func proxyAddrs(d *socksclient.Dialer) ([]netip.Addr, error) {
	host, _, _ := net.SplitHostPort(d.ProxyAddr)
	if a, err := netip.ParseAddr(host); err == nil {
		return []netip.Addr{a.Unmap()}, nil
	}
	addrs, err := rulesResolver(d).LookupNetIP(context.Background(), "ip", host)
	if err != nil {
		return nil, fmt.Errorf("rules: the proxy %s must be left out of the capture, but its name does not resolve here: %w "+
			"(capture rules already loaded take this lookup unless it carries their --mark, which needs root: remove them first)", host, err)
	}
	for i := range addrs {
		addrs[i] = addrs[i].Unmap()
	}
	return addrs, nil
}

// rulesResolver looks the proxy's name up as the running socksfwd does:
// with --mark through marked sockets, so that the capture rules of an
// earlier run, DNS capture among them, leave the lookup alone. A process
// that may not set marks (rules only prints) uses the default resolver.
func rulesResolver(d *socksclient.Dialer) *net.Resolver {
	if d.LookupControl == nil || sockmark.Check(0) != nil {
		return net.DefaultResolver
	}
	return socksclient.ResolverVia(d.LookupControl)
}

func prefixes(option string, vals []string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, v := range vals {
		if a, err := netip.ParseAddr(v); err == nil {
			out = append(out, netip.PrefixFrom(a, a.BitLen()))
			continue
		}
		pfx, err := netip.ParsePrefix(v)
		if err != nil {
			return nil, usagef("%s %s: want a CIDR such as 10.0.0.0/8", option, quote(v))
		}
		out = append(out, pfx)
	}
	return out, nil
}

// printRules renders rc in format.
// printRemoval is a shell script that removes what format's rules load.
// sh goes on past a command that fails, so a part already gone (a jump
// removed by hand, routes never added) does not keep the rest.
func printRemoval(format string, rc rules.Config) (string, error) {
	switch format {
	case "nft", "iptables", "ip6tables", "routes":
	default:
		return "", usagef("--format %s: want nft, iptables, ip6tables or routes", quote(format))
	}
	if format == "ip6tables" && !rc.IPv6 {
		return "", usagef("--format ip6tables needs --ipv6")
	}
	lines, err := rules.Removal(rc, format)
	if err != nil {
		return "", err
	}
	if len(lines) == 0 {
		return "", nil
	}
	return "#!/bin/sh\n# Removes what socksfwd rules --format " + format + " loads, with the same options.\n" +
		strings.Join(lines, "\n") + "\n", nil
}

func printRules(format string, rc rules.Config) (string, error) {
	switch format {
	case "nft":
		return rules.NFT(rc)
	case "iptables", "ip6tables":
		v4, v6, err := rules.IPTables(rc)
		if err != nil {
			return "", err
		}
		if format == "iptables" {
			return v4, nil
		}
		if !rc.IPv6 {
			return "", usagef("--format ip6tables needs --ipv6")
		}
		return v6, nil
	case "routes":
		if _, err := rules.NFT(rc); err != nil { // the same checks
			return "", err
		}
		lines := rules.Routes(rc)
		if len(lines) == 0 {
			return "", nil
		}
		return strings.Join(lines, "\n") + "\n", nil
	}
	return "", usagef("--format %s: want nft, iptables, ip6tables or routes", quote(format))
}
