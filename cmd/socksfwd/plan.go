package main

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/rs/zerolog"

	"github.com/socksfwd/socksfwd/internal/allowlist"
	"github.com/socksfwd/socksfwd/internal/noproxy"
	"github.com/socksfwd/socksfwd/socksclient"
	"github.com/socksfwd/socksfwd/tunnel"
)

// plan is a configuration parsed and checked once, without touching the
// network: what the supervisor starts, and what a reload diffs against the
// running one.
type plan struct {
	cfg      Config
	dialers  []*socksclient.Dialer // -S, in failover order
	listens  []listenPlan          // one per address to bind: -L, --transparent, --admin, --dns
	copyMode tunnel.CopyMode
	logLevel zerolog.Level
	allow    *allowlist.List // --allow; nil: every source
}

// allowFor is the allow list of listener l, bound at bound (nil: not yet,
// or -R): --allow for one bound beyond loopback, none for a loopback one
// (only this host reaches it), except a transparent one: TPROXY delivers
// other hosts' traffic to a listener on 127.0.0.1 too. A loopback source
// is always allowed. The socket's own address decides when there is one:
// a socket systemd passed by name may be bound elsewhere than l says.
func (p *plan) allowFor(l listenPlan, bound net.Addr) *allowlist.List {
	addr := l.addr
	if bound != nil {
		addr = bound.String()
	}
	if l.kind == kindReverse || isLoopbackBind(addr) && l.kind != kindTransparent && l.kind != kindTransparentUDP {
		return nil
	}
	return p.allow
}

// isLoopbackBind reports whether a host:port to bind is a loopback
// address (not a wildcard, not a name).
func isLoopbackBind(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.Unmap().IsLoopback()
}

// listenKind says what a listener serves.
type listenKind string

const (
	kindTCP listenKind = "tcp"
	kindUDP listenKind = "udp"
	kindDNS listenKind = "dns"
	// kindTransparent is TCP that netfilter redirected here: each
	// connection's target is its original destination.
	kindTransparent listenKind = "transparent"
	// kindTransparentUDP is UDP that TPROXY sent here: each datagram goes
	// to its original destination.
	kindTransparentUDP listenKind = "transparent-udp"
	// kindAdmin serves /metrics, /healthz and /readyz over HTTP.
	kindAdmin listenKind = "admin"
	// kindHTTP is an HTTP proxy (--http) whose requests go through the
	// upstreams.
	kindHTTP listenKind = "http"
	// kindSOCKS is a SOCKS5 server (-D) whose requests go through the
	// upstreams.
	kindSOCKS listenKind = "socks"
	// kindReverse is a -R forward: the upstream listens (BIND), nothing
	// here does. Its addr is what BIND asks for, its target local.
	kindReverse listenKind = "reverse"
)

// listenPlan is one address to bind and what it forwards to.
type listenPlan struct {
	kind listenKind
	addr string // host:port to bind
	spec string // the option's value, for messages
	// optional: a bind failure is a warning, not fatal (::1 for
	// "localhost" on a host without IPv6, as ssh tolerates).
	optional bool
	target   socksclient.Addr // tcp and udp forwards; reverse: the local target
	dns      *dnsPlan         // kindDNS
	http     *httpPlan        // kindHTTP
	socks    *socksPlan       // kindSOCKS
}

// key identifies a listener across reloads: a listener whose key is in
// both plans stays bound and keeps its sessions (a -R keeps its BIND). A
// port-0 listener (the kernel, or for -R the proxy, picks the port) is
// told apart by what it forwards to, so that two of them are two
// listeners.
func (l listenPlan) key() string {
	k := string(l.kind) + " " + l.addr
	if strings.HasSuffix(l.addr, ":0") && l.kind != kindDNS {
		k += " → " + l.target.String()
	}
	return k
}

// dnsPlan is the DNS forwarder's configuration.
type dnsPlan struct {
	resolvers   []socksclient.Addr
	transport   string
	timeout     time.Duration
	cacheSize   int
	maxInFlight int
}

// httpPlan is the HTTP proxy's configuration.
type httpPlan struct {
	creds   *tunnel.ProxyCredentials // nil: no authentication
	noProxy *noproxy.List
}

// socksPlan is the SOCKS5 door's configuration.
type socksPlan struct {
	creds *tunnel.ProxyCredentials // nil: no authentication
}

// changesTo names each setting that differs in o, as "name old → new";
// none when they are equal.
func (d *dnsPlan) changesTo(o *dnsPlan) []string {
	var out []string
	if !slices.Equal(d.resolvers, o.resolvers) {
		out = append(out, fmt.Sprintf("dns-upstream [%s] → [%s]",
			strings.Join(addrStrings(d.resolvers), ", "), strings.Join(addrStrings(o.resolvers), ", ")))
	}
	if d.transport != o.transport {
		out = append(out, fmt.Sprintf("dns-transport %s → %s", d.transport, o.transport))
	}
	if d.timeout != o.timeout {
		out = append(out, fmt.Sprintf("dns-timeout %s → %s", d.timeout, o.timeout))
	}
	if d.cacheSize != o.cacheSize {
		out = append(out, fmt.Sprintf("dns-cache-size %d → %d", d.cacheSize, o.cacheSize))
	}
	if d.maxInFlight != o.maxInFlight {
		out = append(out, fmt.Sprintf("dns-max-inflight %d → %d", d.maxInFlight, o.maxInFlight))
	}
	return out
}

// errNothingToForward: a configuration with no listener.
var errNothingToForward = errors.New("nothing to forward: give -L [bind:]port:host:hostport, -R [bind_address:]port:host:hostport, -D [bind:]port, --http [bind:]port, --dns [bind:]port or --transparent [bind:]port")

// buildPlan checks cfg and parses everything it names, once.
func buildPlan(cfg Config) (*plan, error) {
	p := &plan{cfg: cfg}
	if len(cfg.Server) == 0 {
		return nil, usagef("no upstream server: give -S host:port (or server in the config file, or %s)", envName("server"))
	}
	if len(cfg.Local) == 0 && len(cfg.Remote) == 0 && cfg.DNS == "" && len(cfg.Transparent) == 0 && cfg.HTTP == "" && cfg.Dynamic == "" {
		return nil, usageError{errNothingToForward}
	}
	if cfg.RemoteAddrFile != "" && len(cfg.Remote) == 0 {
		return nil, usagef("--remote-addr-file needs -R")
	}
	var err error
	switch level := strings.ToLower(cfg.LogLevel); level {
	case "trace", "debug", "info", "warn", "error":
		// zerolog takes more (panic, disabled, numbers), which would
		// hide failures: not offered. Any case, and trace (more than
		// debug), as before.
		p.logLevel, _ = zerolog.ParseLevel(level)
	default:
		return nil, usagef("--log-level %s: want debug, info, warn or error", quote(cfg.LogLevel))
	}
	switch cfg.LogFormat {
	case "auto", "json", "console":
	default:
		return nil, usagef("--log-format %s: want auto, json or console", quote(cfg.LogFormat))
	}
	p.copyMode = tunnel.CopySplice
	if cfg.RelayCopy != "" {
		if p.copyMode, err = tunnel.ParseCopyMode(cfg.RelayCopy); err != nil {
			return nil, usagef("--relay-copy: %w", err)
		}
	}
	if cfg.UDPMaxSessions < 1 {
		return nil, usagef("--udp-max-sessions %d: want at least 1", cfg.UDPMaxSessions)
	}
	if cfg.UDPIdleTimeout <= 0 {
		return nil, usagef("--udp-idle-timeout must be positive")
	}
	if cfg.ShutdownTimeout <= 0 {
		return nil, usagef("--shutdown-timeout must be positive")
	}
	if cfg.HandshakeTimeout <= 0 {
		// Taken for the 10 s default before, while --print-config said 0s.
		return nil, usagef("--handshake-timeout must be positive")
	}
	if cfg.MaxSessions < 0 {
		return nil, usagef("--max-sessions %d: want 0 (no limit) or more", cfg.MaxSessions)
	}
	if len(cfg.Allow) > 0 {
		if p.allow, err = allowlist.Parse(cfg.Allow); err != nil {
			return nil, usagef("--allow: %v", err)
		}
	}
	if p.dialers, err = buildDialers(&cfg); err != nil {
		return nil, err
	}
	for _, spec := range cfg.Local {
		lf, err := parseLocal(spec)
		if err != nil {
			return nil, err
		}
		kind := kindTCP
		if lf.UDP {
			kind = kindUDP
		}
		for _, addr := range lf.Binds {
			p.listens = append(p.listens, listenPlan{kind: kind, addr: addr, spec: "-L " + spec, optional: lf.optionalBinds[addr], target: lf.Target})
		}
	}
	for _, spec := range cfg.Remote {
		rf, err := parseRemote(spec)
		if err != nil {
			return nil, err
		}
		p.listens = append(p.listens, listenPlan{kind: kindReverse, addr: rf.Remote.String(), spec: "-R " + spec, target: rf.Target})
	}
	for _, spec := range cfg.Transparent {
		kind, bare := kindTransparent, strings.TrimSuffix(spec, "/tcp")
		if rest, ok := strings.CutSuffix(spec, "/udp"); ok {
			kind, bare = kindTransparentUDP, rest
		}
		addrs, optional, err := listenAddrs("--transparent", bare)
		if err != nil {
			return nil, err
		}
		for _, addr := range addrs {
			p.listens = append(p.listens, listenPlan{kind: kind, addr: addr, spec: "--transparent " + spec, optional: optional[addr]})
		}
	}
	if cfg.Admin != "" {
		addrs, optional, err := listenAddrs("--admin", cfg.Admin)
		if err != nil {
			return nil, err
		}
		for _, addr := range addrs {
			p.listens = append(p.listens, listenPlan{kind: kindAdmin, addr: addr, spec: "--admin " + cfg.Admin, optional: optional[addr]})
		}
	} else if cfg.AdminPprof {
		return nil, usagef("--admin-pprof is for --admin, which is not set")
	}
	if cfg.HTTP != "" {
		ls, err := buildHTTP(&cfg)
		if err != nil {
			return nil, err
		}
		p.listens = append(p.listens, ls...)
	} else if cfg.HTTPAuth != "" || cfg.HTTPAuthFile != "" || cfg.NoProxy != "" {
		return nil, usagef("--http-auth, --http-auth-file and --no-proxy are for --http, which is not set")
	}
	if cfg.Dynamic != "" {
		ls, err := buildSOCKS(&cfg)
		if err != nil {
			return nil, err
		}
		p.listens = append(p.listens, ls...)
	} else if cfg.SOCKSAuth != "" || cfg.SOCKSAuthFile != "" {
		return nil, usagef("--socks-auth and --socks-auth-file are for -D, which is not set")
	}
	if cfg.DNS != "" {
		ls, err := buildDNS(&cfg)
		if err != nil {
			return nil, err
		}
		p.listens = append(p.listens, ls...)
	} else if _, err := dnsOptions(&cfg); err != nil {
		// Unused now, but checked: a reload that adds --dns must not be
		// the first to hear of a bad value, and --print-config shows them.
		return nil, err
	}
	seen := make(map[string]string, len(p.listens))
	for _, l := range p.listens {
		if other, dup := seen[l.key()]; dup {
			return nil, usagef("%s and %s both listen on %s", other, l.spec, l.key())
		}
		seen[l.key()] = l.spec
	}
	// Listeners of different kinds may not share a socket either (-L 8080
	// and --http 8080): said here, rather than "address in use" at bind.
	sockets := make(map[string]string, len(p.listens))
	for _, l := range p.listens {
		for _, s := range l.sockets() {
			if other, dup := sockets[s]; dup && other != l.spec {
				return nil, usagef("%s and %s both listen on %s", other, l.spec, s)
			}
			sockets[s] = l.spec
		}
	}
	return p, nil
}

// sockets names the sockets l binds, as "tcp *:8080" with every wildcard
// written "*"; none for port 0 (the kernel picks) and for -R.
func (l listenPlan) sockets() []string {
	host, port, err := net.SplitHostPort(l.addr)
	if err != nil || port == "0" || l.kind == kindReverse {
		return nil
	}
	if ip, err := netip.ParseAddr(host); host == "" || err == nil && ip.IsUnspecified() {
		host = "*"
	}
	at := net.JoinHostPort(host, port)
	switch l.kind {
	case kindDNS:
		return []string{"tcp " + at, "udp " + at}
	case kindUDP, kindTransparentUDP:
		return []string{"udp " + at}
	}
	return []string{"tcp " + at}
}

// buildHTTP plans the HTTP proxy listeners: one per address --http
// binds, each with the same settings.
func buildHTTP(cfg *Config) ([]listenPlan, error) {
	addrs, optional, err := listenAddrs("--http", cfg.HTTP)
	if err != nil {
		return nil, err
	}
	h := &httpPlan{}
	if h.creds, err = doorCredentials("--http-auth", cfg.HTTPAuth, cfg.HTTPAuthFile, tunnel.ParseProxyCredentials); err != nil {
		return nil, err
	}
	if h.noProxy, err = noproxy.Parse(cfg.NoProxy); err != nil {
		return nil, usagef("--no-proxy: %v", err)
	}
	var ls []listenPlan
	for _, addr := range addrs {
		ls = append(ls, listenPlan{kind: kindHTTP, addr: addr, spec: "--http " + cfg.HTTP, http: h, optional: optional[addr]})
	}
	return ls, nil
}

// doorCredentials reads a door's user:password from the option named flag
// or from its -file twin, with parse (each door has its own limits); nil
// when neither is given.
func doorCredentials(flag, value, file string, parse func(string) (*tunnel.ProxyCredentials, error)) (*tunnel.ProxyCredentials, error) {
	switch {
	case value != "" && file != "":
		return nil, usagef("give %s or %s-file, not both", flag, flag)
	case file != "":
		var err error
		if value, err = readSecret(flag+"-file", file); err != nil {
			return nil, err
		}
	}
	if value == "" {
		return nil, nil
	}
	if _, pass, _ := strings.Cut(value, ":"); file == "" && pass == redactedMark {
		// Only a value given inline: --print-config writes no files.
		return nil, usagef("%s: %s", flag, redactedMarkHint)
	}
	// The error never quotes the value: it holds a password.
	creds, err := parse(value)
	if err != nil {
		if file != "" {
			flag += "-file" // the value came from the file, which is what to fix
		}
		return nil, usagef("%s: %v", flag, err)
	}
	return creds, nil
}

// readSecret reads the secret in the file an option (flag) names, with
// one trailing newline stripped. A line break left in it is refused: it is
// a blank line an editor left at the end far more often than part of a
// password, and would fail every login without a word.
func readSecret(flag, file string) (string, error) {
	b, err := readLimited(file, 64<<10)
	if err != nil {
		return "", usagef("%s: %w", flag, err)
	}
	secret := strings.TrimSuffix(strings.TrimSuffix(string(b), "\n"), "\r")
	if strings.ContainsAny(secret, "\r\n") {
		return "", usagef("%s: %s holds more than one line (a blank line at its end?); it must hold the one line", flag, file)
	}
	return secret, nil
}

// buildSOCKS plans the SOCKS5 door's listeners: one per address -D
// binds, each with the same settings.
func buildSOCKS(cfg *Config) ([]listenPlan, error) {
	addrs, optional, err := listenAddrs("-D", cfg.Dynamic)
	if err != nil {
		return nil, err
	}
	sp := &socksPlan{}
	if sp.creds, err = doorCredentials("--socks-auth", cfg.SOCKSAuth, cfg.SOCKSAuthFile, tunnel.ParseSOCKSCredentials); err != nil {
		return nil, err
	}
	var ls []listenPlan
	for _, addr := range addrs {
		ls = append(ls, listenPlan{kind: kindSOCKS, addr: addr, spec: "-D " + cfg.Dynamic, socks: sp, optional: optional[addr]})
	}
	return ls, nil
}

// buildDNS plans the DNS listeners: one per address --dns binds, each
// with the same settings.
func buildDNS(cfg *Config) ([]listenPlan, error) {
	addrs, optional, err := listenAddrs("--dns", cfg.DNS)
	if err != nil {
		return nil, err
	}
	if len(cfg.DNSUpstream) == 0 {
		return nil, usagef("--dns needs at least one --dns-upstream (the resolver behind the proxy, e.g. 10.0.0.53)")
	}
	d, err := dnsOptions(cfg)
	if err != nil {
		return nil, err
	}
	var ls []listenPlan
	for _, addr := range addrs {
		ls = append(ls, listenPlan{kind: kindDNS, addr: addr, spec: "--dns " + cfg.DNS, dns: d, optional: optional[addr]})
	}
	return ls, nil
}

// dnsOptions reads and checks the --dns-* options.
func dnsOptions(cfg *Config) (*dnsPlan, error) {
	d := &dnsPlan{
		transport:   cfg.DNSTransport,
		timeout:     time.Duration(cfg.DNSTimeout),
		cacheSize:   cfg.DNSCacheSize,
		maxInFlight: cfg.DNSMaxInFlight,
	}
	for _, u := range cfg.DNSUpstream {
		a, err := dnsUpstreamAddr(u)
		if err != nil {
			return nil, err
		}
		d.resolvers = append(d.resolvers, a)
	}
	if d.transport != "tcp" && d.transport != "udp" {
		return nil, usagef("--dns-transport %s: want tcp or udp", quote(d.transport))
	}
	if d.timeout <= 0 {
		return nil, usagef("--dns-timeout must be positive")
	}
	if d.cacheSize < 0 {
		return nil, usagef("--dns-cache-size %d: want 0 (off) or more", d.cacheSize)
	}
	if d.maxInFlight < 1 {
		return nil, usagef("--dns-max-inflight %d: want at least 1", d.maxInFlight)
	}
	return d, nil
}

// buildDialers turns the -S list into dialers, in failover order.
func buildDialers(cfg *Config) ([]*socksclient.Dialer, error) {
	password := ""
	if cfg.ServerPasswordFile != "" {
		var err error
		if password, err = readSecret("--server-password-file", cfg.ServerPasswordFile); err != nil {
			return nil, err
		}
	}
	var dialers []*socksclient.Dialer
	used := false // the password file's password went to a server
	for _, raw := range cfg.Server {
		d, err := parseServer(raw, cfg.ServerUser, password, cfg.Mark)
		if err != nil {
			return nil, err
		}
		d.HandshakeTimeout = time.Duration(cfg.HandshakeTimeout)
		used = used || password != "" && d.Password == password && d.Username != ""
		dialers = append(dialers, d)
	}
	if password != "" && !used && cfg.ServerUser == "" {
		return nil, usagef("--server-password-file needs a user: --server-user, or one in the -S URL (socks5h://user@proxy)")
	}
	return dialers, nil
}

// addrStrings is each of as written out.
func addrStrings(as []socksclient.Addr) []string {
	s := make([]string, len(as))
	for i, a := range as {
		s[i] = a.String()
	}
	return s
}

// checkRemoteAddrFile makes sure --remote-addr-file can be written where
// socksfwd serves (at start and on reload; not for rules or
// --print-config, which may run where the directory does not exist yet,
// before the service made it): the file is replaced through a new one
// beside it, so its directory must take one, or scripts waiting on the
// file wait for ever.
func checkRemoteAddrFile(p *plan) error {
	path := p.cfg.RemoteAddrFile
	if path == "" {
		return nil
	}
	probe, err := os.CreateTemp(filepath.Dir(path), ".socksfwd-remote-*")
	if err != nil {
		return usagef("--remote-addr-file %s: its directory does not take a new file: %v", path, err)
	}
	probe.Close()
	os.Remove(probe.Name())
	return nil
}
