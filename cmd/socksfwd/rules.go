package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/socksfwd/socksfwd/internal/rules"
)

// rulesCommand is `socksfwd rules`: it reads the same flags, environment
// and file as the daemon and prints the netfilter rules that send an
// app's traffic to its transparent listeners (and DNS to --dns).
func rulesCommand(stdout io.Writer, getenv func(string) string) *cli.Command {
	flags := append(optionFlags(),
		&cli.StringFlag{Name: "format", Value: "nft", Usage: "nft (an nft -f script) | iptables (iptables-restore --noflush input) | ip6tables (ip6tables-restore --noflush input) | routes (the ip rule/route commands TPROXY needs)"},
		&cli.StringFlag{Name: "mode", Value: rules.ModeRedirect, Usage: "redirect (TCP, NAT) | tproxy (TCP, keeps the packets' addresses)"},
		&cli.StringFlag{Name: "scope", Value: rules.ScopeLocal, Usage: "local (this host's or pod's own programs, OUTPUT) | gateway (traffic from other hosts or containers, PREROUTING)"},
		&cli.StringSliceFlag{Name: "exclude", Usage: "destination CIDR never to capture, repeatable"},
		&cli.StringSliceFlag{Name: "include", Usage: "capture only these destination CIDRs, repeatable"},
		&cli.StringSliceFlag{Name: "interface", Usage: "gateway scope: capture only what arrives on this interface, repeatable"},
		&cli.BoolFlag{Name: "ipv6", Usage: "IPv6 rules too"},
		&cli.IntFlag{Name: "route-mark", Value: rules.DefaultRouteMark, Usage: "tproxy: the fwmark policy routing uses"},
		&cli.IntFlag{Name: "route-table", Value: rules.DefaultRouteTable, Usage: "tproxy: the routing table that makes every address local"},
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
			cfg, err := planFrom(c, getenv)
			if err != nil {
				return err
			}
			rc, err := rulesConfig(c, cfg.plan)
			if err != nil {
				return err
			}
			out, err := printRules(c.String("format"), rc)
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

// rulesConfig gathers what the rules need from the plan and the flags.
func rulesConfig(c *cli.Context, p *plan) (rules.Config, error) {
	rc := rules.Config{
		Mode: c.String("mode"), Scope: c.String("scope"), Mark: int(p.cfg.Mark), IPv6: c.Bool("ipv6"),
		RouteMark: c.Int("route-mark"), RouteTable: c.Int("route-table"), Interfaces: c.StringSlice("interface"),
	}
	for _, l := range p.listens {
		ap, err := netip.ParseAddrPort(l.addr)
		if err != nil { // an empty bind: every interface
			_, port, _ := net.SplitHostPort(l.addr)
			n, _ := strconv.Atoi(port)
			ap = netip.AddrPortFrom(netip.IPv4Unspecified(), uint16(n))
		}
		// REDIRECT on a gateway hands a connection to the address of the
		// interface it arrived on: a loopback listener never sees it.
		redirected := l.kind == kindDNS || l.kind == kindTransparent && rc.Mode == rules.ModeRedirect
		if rc.Scope == rules.ScopeGateway && redirected && ap.Addr().IsLoopback() {
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
			rc.DNSPort = int(ap.Port())
		}
	}
	// With --ipv6 the rules send IPv6 to ::1 (or the listener's address):
	// something must listen there, or IPv6 is dropped or refused.
	if rc.IPv6 {
		v6 := false
		for _, l := range p.listens {
			if a, err := netip.ParseAddrPort(l.addr); err != nil || a.Addr().Is6() {
				v6 = true // an empty bind (dual-stack) or an IPv6 one takes IPv6
			}
		}
		if !v6 {
			return rc, usagef("rules --ipv6: no listener takes IPv6; bind them with localhost: (127.0.0.1 and ::1), [::1]: or *:")
		}
	}
	if rc.TCPPort == 0 && rc.UDPPort == 0 && rc.DNSPort == 0 {
		return rc, usagef("rules: nothing to capture: give --transparent [bind:]port[/udp] (and --dns to capture DNS)")
	}
	for _, d := range p.dialers {
		addrs, err := proxyAddrs(d.ProxyAddr)
		if err != nil {
			return rc, err
		}
		rc.Proxies = append(rc.Proxies, addrs...)
	}
	var err error
	if rc.Exclude, err = prefixes("--exclude", c.StringSlice("exclude")); err != nil {
		return rc, err
	}
	if rc.Include, err = prefixes("--include", c.StringSlice("include")); err != nil {
		return rc, err
	}
	return rc, nil
}

// proxyAddrs is a proxy's addresses: the rules must leave socksfwd's own
// connections to it alone. A name is resolved here, once.
func proxyAddrs(hostport string) ([]netip.Addr, error) {
	host, _, _ := net.SplitHostPort(hostport)
	if a, err := netip.ParseAddr(host); err == nil {
		return []netip.Addr{a.Unmap()}, nil
	}
	addrs, err := net.DefaultResolver.LookupNetIP(context.Background(), "ip", host)
	if err != nil {
		return nil, fmt.Errorf("rules: the proxy %s must be left out of the capture, but its name does not resolve here: %w", host, err)
	}
	for i := range addrs {
		addrs[i] = addrs[i].Unmap()
	}
	return addrs, nil
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
