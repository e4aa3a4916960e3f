package main

import (
	"context"
	"errors"
	"fmt"
	"iter"
	"maps"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/rs/zerolog"

	"github.com/socksfwd/socksfwd/dnsforward"
	"github.com/socksfwd/socksfwd/internal/allowlist"
	"github.com/socksfwd/socksfwd/internal/sockmark"
	"github.com/socksfwd/socksfwd/socksclient"
	"github.com/socksfwd/socksfwd/tunnel"
)

// service is what every listener kind provides.
type service interface {
	Addr() net.Addr
	Serve(ctx context.Context) error
	// Shutdown stops accepting at once, waits for live sessions until ctx
	// is done, then cuts the rest.
	Shutdown(ctx context.Context) error
	Close() error
}

// acceptStopper is a service that can stop accepting ahead of its
// Shutdown: the supervisor stops every such listener before it logs that
// it is draining (or that a reload removed one), so that the line is true
// when it is read.
type acceptStopper interface {
	StopAccepting()
}

// unit is one running listener.
type unit struct {
	lp  listenPlan
	svc service
	// ln is the listening socket of a plain TCP listener (-L, -D, --http,
	// --admin), which a reload may hand to another such listener on the
	// same address.
	ln net.Listener
}

// label is what log lines call u's listener, as its service's own lines
// do: the bound address, or for -R its name.
func (u *unit) label() string {
	if a := u.boundAddr(); a != nil {
		return a.String()
	}
	if r, ok := u.svc.(*tunnel.Reverse); ok {
		return r.Name()
	}
	return u.lp.addr
}

// boundAddr is where u's socket is bound; nil for -R, which has none here.
func (u *unit) boundAddr() net.Addr {
	if u.lp.kind == kindReverse {
		return nil
	}
	return u.svc.Addr()
}

// supervisor runs a plan's services: it binds them all before serving
// (nothing half-starts), reloads by diff on SIGHUP, and on SIGINT or
// SIGTERM stops every listener at once and drains them in parallel under
// one deadline.
type supervisor struct {
	log    zerolog.Logger
	reload func() (*plan, error)

	plan *plan
	ups  *socksclient.Upstreams
	// upstreamCount is the number of upstreams, for the state change
	// lines, which run on the sessions' goroutines.
	upstreamCount atomic.Int32
	// handover, during a reload's bind, maps an added listener's key to
	// a removed listener's socket on the same address (see handOver).
	handover map[string]net.Listener
	removing []*unit // the listeners the reload removes, meanwhile
	units    map[string]*unit
	sd       *systemd // notifications and passed sockets; its zero value does nothing
	// live is units as the admin endpoint reads them, published after
	// each change.
	live atomic.Pointer[[]liveUnit]
	tel  *telemetry
	// remotes is where each -R's proxy listens, for --remote-addr-file.
	remotes *remoteAddrs

	// failed receives the first error a service's Serve returned.
	failed  chan error
	serving sync.WaitGroup
	// Listeners removed by a reload drain in the background, each under
	// its own deadline; cut cuts them at once (a second signal).
	drains sync.WaitGroup
	cutCtx context.Context
	cut    context.CancelFunc
}

func newSupervisor(log zerolog.Logger, reload func() (*plan, error)) *supervisor {
	cutCtx, cut := context.WithCancel(context.Background())
	return &supervisor{log: log, reload: reload, units: make(map[string]*unit), sd: &systemd{}, tel: newTelemetry(),
		remotes: &remoteAddrs{log: log}, failed: make(chan error, 1), cutCtx: cutCtx, cut: cut}
}

// errSecondSignal ends a drain cut short by a second signal: exit 1.
var errSecondSignal = errors.New("second signal: sessions cut without drain")

// run serves p until a stop signal on sigs or a service failure.
func (s *supervisor) run(p *plan, sigs <-chan os.Signal) error {
	defer s.cut()
	if err := checkMark(p); err != nil {
		return err
	}
	s.plan = p
	s.ups = socksclient.NewUpstreams(p.dialers...)
	s.upstreamCount.Store(int32(len(p.dialers)))
	s.configureUpstreams(p)
	bound, err := s.bind(p.listens)
	if err != nil {
		return err
	}
	s.remotes.configure(p)
	s.start(bound)
	s.tel.bound.Store(true)
	s.sd.ready(s.status())

	var runErr error
	var stopSig os.Signal
loop:
	for {
		select {
		case sig := <-sigs:
			if sig == syscall.SIGHUP {
				s.sd.reloading()
				err := s.reloadNow()
				s.sd.reloaded(err, s.status())
				continue
			}
			stopSig = sig
			break loop
		case err := <-s.failed:
			s.log.Error().Err(err).Msg("a listener failed; stopping")
			runErr = err
			break loop
		case <-s.sd.watchdogDue():
			s.sd.pingWatchdog()
		}
	}
	s.sd.stopping()
	if err := s.drainAll(sigs, stopSig); err != nil && runErr == nil {
		runErr = err
	}
	s.remotes.remove()
	s.log.Info().Msg("stopped")
	return runErr
}

// configureUpstreams applies what the plan says of failover.
func (s *supervisor) configureUpstreams(p *plan) {
	s.ups.SetHedgeDelay(time.Duration(p.cfg.HedgeDelay))
	s.observeUpstreams(p)
	s.ups.OnStateChange(func(proxy string, up bool, cause error) {
		if up {
			s.log.Info().Str("upstream", proxy).Msg("upstream is back")
			return
		}
		// Warn: at --log-level warn an outage must still leave a trace.
		msg := "upstream is down"
		if s.upstreamCount.Load() > 1 {
			msg += "; the others are tried first"
		}
		s.log.Warn().Str("upstream", proxy).Err(cause).Msg(msg)
	})
}

// observeUpstreams records every upstream try for /metrics and /readyz
// while an admin listener is configured, and costs nothing otherwise.
func (s *supervisor) observeUpstreams(p *plan) {
	if p.cfg.Admin == "" {
		s.ups.OnAttempt(nil)
		return
	}
	s.ups.OnAttempt(s.tel.observe)
	addrs := make([]string, len(p.dialers))
	for i, d := range p.dialers {
		addrs[i] = d.ProxyAddr
	}
	s.tel.keepUpstreams(addrs)
}

// publish makes the current units what the admin endpoint reads, in the
// order of their keys.
func (s *supervisor) publish() {
	keys := make([]string, 0, len(s.units))
	for k := range s.units {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	live := make([]liveUnit, 0, len(keys))
	for _, k := range keys {
		u := s.units[k]
		name := u.svc.Addr().String()
		if u.lp.kind == kindReverse {
			name = reverseName(u.lp)
		}
		live = append(live, liveUnit{kind: u.lp.kind, name: name, svc: u.svc})
	}
	s.live.Store(&live)
}

func (s *supervisor) liveUnits() []liveUnit {
	if l := s.live.Load(); l != nil {
		return *l
	}
	return nil
}

// bind opens every listener of ls, in order, or none: on a failure it
// closes what it bound and returns the error, naming the option.
func (s *supervisor) bind(ls []listenPlan) ([]*unit, error) {
	bound := make([]*unit, 0, len(ls))
	for _, l := range ls {
		svc, ln, err := s.listen(l)
		if err != nil {
			if l.optional {
				s.log.Warn().Err(err).Str("listener", l.addr).Msg("skipping optional bind")
				continue
			}
			for _, u := range bound {
				u.svc.Close()
			}
			return nil, fmt.Errorf("%s: cannot listen: %w", l.spec, s.heldByRemoved(l, err))
		}
		bound = append(bound, &unit{lp: l, svc: svc, ln: ln})
	}
	return bound, nil
}

// warnExposed logs one line naming the listeners of bound that anyone on
// their network can use: bound beyond loopback, with no --allow.
func (s *supervisor) warnExposed(bound []*unit) {
	if s.plan.allow != nil {
		return
	}
	var open []string
	for _, u := range bound {
		if u.lp.kind != kindReverse && !isLoopbackBind(u.svc.Addr().String()) {
			open = append(open, u.svc.Addr().String())
		}
	}
	if len(open) > 0 {
		s.log.Warn().Strs("listeners", open).Msg("listening beyond loopback without --allow: anyone who can reach " +
			strings.Join(open, ", ") + " can use the proxy through it; give --allow CIDR to say who may")
	}
}

// start serves bound units and logs one line for each, in the order of
// the options, once all are bound.
func (s *supervisor) start(bound []*unit) {
	s.warnExposed(bound)
	for _, u := range bound {
		s.units[u.lp.key()] = u
		s.logListening(u)
		s.serving.Go(func() {
			if err := u.svc.Serve(context.Background()); err != nil {
				select {
				case s.failed <- fmt.Errorf("%s: %w", u.lp.spec, err):
				default:
				}
			}
		})
	}
	s.publish()
}

func (s *supervisor) via() string {
	via := make([]string, len(s.plan.dialers))
	for i, d := range s.plan.dialers {
		via[i] = d.ProxyAddr
	}
	return strings.Join(via, ", ")
}

func (s *supervisor) logListening(u *unit) {
	name := u.svc.Addr().String()
	ev := s.log.Info()
	if u.lp.kind != kindReverse { // the proxy listens for -R, nothing here
		ev.Str("listener", name)
	}
	ev.Str("proto", string(u.lp.kind)).Str("upstream", s.via())
	if len(s.sd.passedFor(u.lp.key())) > 0 {
		ev.Bool("systemd_socket", true)
	}
	if u.lp.kind == kindDNS {
		resolvers := addrStrings(u.lp.dns.resolvers)
		ev.Strs("resolvers", resolvers).Msgf("DNS on %s (udp+tcp) → %s over %s via %s", name, strings.Join(resolvers, ", "), u.lp.dns.transport, s.via())
		return
	}
	if u.lp.kind == kindAdmin {
		paths := "/metrics /healthz /readyz"
		if s.plan.cfg.AdminPprof { // worth seeing: it exposes the process's internals
			paths += " /debug/pprof/"
		}
		ev.Msgf("admin on http://%s: %s", name, paths)
		return
	}
	if u.lp.kind == kindHTTP {
		ev.Bool("auth", u.lp.http.creds != nil).Str("no_proxy", u.lp.http.noProxy.String()).
			Msgf("HTTP proxy on http://%s (CONNECT and absolute-form) via %s", name, s.via())
		return
	}
	if u.lp.kind == kindSOCKS {
		ev.Bool("auth", u.lp.socks.creds != nil).
			Msgf("SOCKS5 server on %s (CONNECT, BIND, UDP ASSOCIATE) via %s", name, s.via())
		return
	}
	if u.lp.kind == kindReverse {
		ev.Str("reverse", reverseName(u.lp)).Str("target", u.lp.target.String()).
			Msgf("reverse: asking %s to listen %s → %s", s.via(), reverseAsk(u.lp.addr), u.lp.target)
		return
	}
	if u.lp.kind == kindTransparentUDP {
		ev.Msgf("transparent %s/udp (TPROXY) → original destinations via %s", name, s.via())
		for _, limit := range tunnel.TransparentUDPReplyLimits() {
			s.log.Warn().Str("listener", name).Msg("transparent UDP: " + limit)
		}
		return
	}
	if u.lp.kind == kindTransparent {
		how := "REDIRECT only: no IP_TRANSPARENT without CAP_NET_ADMIN"
		if f, ok := u.svc.(*tunnel.TCPForward); ok && tunnel.IsTransparent(f.Listener()) {
			how = "REDIRECT and TPROXY"
		}
		ev.Msgf("transparent %s (%s) → original destinations via %s", name, how, s.via())
		return
	}
	suffix := ""
	if u.lp.kind == kindUDP {
		suffix = "/udp"
	}
	ev.Str("target", u.lp.target.String()).Msgf("forwarding %s → %s via %s", name+suffix, u.lp.target, s.via())
	if a, ok := u.svc.Addr().(*net.UDPAddr); ok && a.IP.IsUnspecified() && !tunnel.UDPRepliesFromDestination {
		// Replies leave by the wildcard socket, from the address the
		// route back to the client picks, which a client that sent to
		// another of the host's addresses (and connected its socket, as
		// resolvers do) does not take.
		s.log.Warn().Str("listener", name).Msg("a /udp forward on a wildcard address answers from the address of the route back to each client: " +
			"on a host with several addresses, a client that sent to another one may drop the answer; bind the address clients use")
	}
}

// listen opens one listener's sockets (binds them, or takes those systemd
// passed) and makes its service.
func (s *supervisor) listen(l listenPlan) (service, net.Listener, error) {
	if l.kind == kindReverse { // the upstream listens: nothing to open here
		r, err := s.newReverse(l)
		if err != nil {
			return nil, nil, err
		}
		return r, nil, nil
	}
	socks, err := s.open(l)
	if err != nil {
		return nil, nil, err
	}
	svc, err := s.build(l, socks)
	if err != nil {
		socks.close()
		return nil, nil, err
	}
	// Services without sessions to admit take their allow list here; TCP
	// ones got it with MaxSessions.
	if a, ok := svc.(allowSetter); ok {
		a.SetAllow(s.plan.allowFor(l, socks.addr()))
	}
	var ln net.Listener
	if plainTCP(l.kind) {
		ln = socks.ln
	}
	return svc, ln, nil
}

// allowSetter is a service whose client sources --allow bounds apart from
// session admission.
type allowSetter interface{ SetAllow(*allowlist.List) }

// build makes l's service on the sockets open gave it.
func (s *supervisor) build(l listenPlan, socks sockets) (service, error) {
	cfg := s.plan.cfg
	switch l.kind {
	case kindAdmin:
		return newAdminServer(socks.ln, s, cfg.AdminPprof), nil
	case kindUDP:
		return tunnel.NewUDPForward(tunnel.UDPForwardConfig{
			Name:        socks.pc.LocalAddr().String(),
			Target:      l.target,
			Upstreams:   s.ups,
			IdleTimeout: time.Duration(cfg.UDPIdleTimeout),
			MaxSessions: cfg.UDPMaxSessions,
			Logger:      s.log,
		}, socks.pc), nil
	case kindTransparentUDP:
		control := cfg.Mark.control() // reply sockets must not be captured again either
		return tunnel.NewTransparentUDP(tunnel.TransparentUDPConfig{
			Name:        socks.pc.LocalAddr().String(),
			Upstreams:   s.ups,
			IdleTimeout: time.Duration(cfg.UDPIdleTimeout),
			MaxSessions: cfg.UDPMaxSessions,
			Control:     control,
			Logger:      s.log,
		}, socks.pc), nil
	case kindHTTP:
		return tunnel.NewHTTPProxy(tunnel.HTTPProxyConfig{
			Name:      socks.ln.Addr().String(),
			Upstreams: s.ups,
			NoProxy:   l.http.noProxy,
			Direct:    directDialer(cfg.Mark).DialContext,
			// A direct connect gets the time a dial through an upstream gets.
			DirectTimeout: time.Duration(cfg.HandshakeTimeout),
			Credentials:   l.http.creds,
			IdleTimeout:   time.Duration(cfg.IdleTimeout),
			CopyMode:      s.plan.copyMode,
			MaxSessions:   cfg.MaxSessions,
			Allow:         s.plan.allowFor(l, socks.addr()),
			Logger:        s.log,
		}, socks.ln), nil
	case kindDNS:
		fwd, err := s.newForwarder(l.dns, nil)
		if err != nil {
			return nil, err
		}
		return dnsforward.NewServer(fwd, socks.pc, socks.ln), nil
	}
	// -L, --transparent and -D: a transparent listener's sessions each go
	// to their original destination, the door's where their requests say.
	fc := tunnel.TCPForwardConfig{
		Name:        socks.ln.Addr().String(),
		Target:      l.target,
		Upstreams:   s.ups,
		IdleTimeout: time.Duration(cfg.IdleTimeout),
		CopyMode:    s.plan.copyMode,
		MaxSessions: cfg.MaxSessions,
		Allow:       s.plan.allowFor(l, socks.addr()),
		Logger:      s.log,
	}
	if l.kind == kindSOCKS {
		return tunnel.NewSOCKSDoor(tunnel.SOCKSDoorConfig{Forward: fc, Credentials: l.socks.creds}, socks.ln), nil
	}
	if l.kind == kindTransparent {
		fc.TargetOf = s.notToUpstream(tunnel.TransparentTarget(socks.ln.Addr().(*net.TCPAddr).AddrPort()))
	}
	return tunnel.NewTCPForward(fc, socks.ln), nil
}

// directDialer dials the targets --no-proxy lists, with the mark the
// upstream sockets get, and looks their names up through sockets with it:
// the capture rules must leave both alone too.
func directDialer(mark Mark) *net.Dialer {
	d := &net.Dialer{}
	if control := mark.control(); control != nil {
		d.Control = control
		// The name's lookup too, as the upstreams' (Dialer.LookupControl).
		d.Resolver = socksclient.ResolverVia(control)
	}
	return d
}

// notToUpstream wraps a transparent listener's target so that a
// connection to one of the upstream proxies is refused instead of relayed:
// a proxy given as an address, or one socksfwd dialed lately (a name, as
// -S proxy.corp:1080, matches the addresses it resolved to).
func (s *supervisor) notToUpstream(targetOf func(net.Conn) (socksclient.Addr, error)) func(net.Conn) (socksclient.Addr, error) {
	return func(c net.Conn) (socksclient.Addr, error) {
		a, err := targetOf(c)
		if err != nil || !a.IP.IsValid() {
			return a, err
		}
		if s.ups.IsProxyAddr(netip.AddrPortFrom(a.IP, a.Port)) {
			return a, fmt.Errorf("original destination %s: %w", a, tunnel.ErrCaptureLoop)
		}
		return a, nil
	}
}

// newForwarder makes a DNS listener's forwarder; a reload passes the
// running one's stats, so that its counts run on.
func (s *supervisor) newForwarder(d *dnsPlan, stats *dnsforward.Stats) (*dnsforward.Forwarder, error) {
	return dnsforward.New(dnsforward.Config{
		Stats:         stats,
		Resolvers:     d.resolvers,
		Upstreams:     s.ups,
		Timeout:       d.timeout,
		CacheSize:     d.cacheSize,
		Transport:     d.transport,
		MaxConcurrent: d.maxInFlight,
		Logger:        s.log,
	})
}

// reloadNow loads the configuration again and applies the difference. The
// new plan is checked whole and its new listeners bound before anything
// changes: on any error the running plan stays untouched. Listeners in
// both plans stay bound with their sessions; removed ones drain; settings
// apply to new sessions. It returns why the reload failed.
func (s *supervisor) reloadNow() error {
	p, err := s.reload()
	if err == nil {
		err = s.checkFixed(p)
	}
	if err == nil {
		err = checkMark(p)
	}
	if err != nil {
		s.reloaded(false)
		s.log.Error().Err(err).Msg("reload failed; the running configuration stays")
		return err
	}
	want := make(map[string]listenPlan, len(p.listens))
	var added []listenPlan
	for _, l := range p.listens {
		want[l.key()] = l
		if _, ok := s.units[l.key()]; !ok {
			added = append(added, l)
		}
	}
	old := s.plan
	s.plan = p // new listeners are made with the new settings
	s.handOver(added, want)
	bound, err := s.bind(added)
	s.handover, s.removing = nil, nil
	if err != nil {
		s.plan = old
		s.reloaded(false)
		s.log.Error().Err(err).Msg("reload failed; the running configuration stays")
		return err
	}

	// From here on nothing fails.
	var changes []string
	// New dialers every time: an upstream that did not change keeps its
	// health (SetDialers matches them), and credentials read from a
	// password file are taken afresh.
	s.ups.SetDialers(p.dialers...)
	s.upstreamCount.Store(int32(len(p.dialers)))
	s.observeUpstreams(p)
	if !slices.Equal(old.cfg.Server, p.cfg.Server) {
		changes = append(changes, fmt.Sprintf("upstreams [%s] → [%s]", redactedServers(old.cfg.Server), redactedServers(p.cfg.Server)))
		if p.cfg.Mark == 0 && newProxyHost(old.dialers, p.dialers) && hasTransparent(p) {
			// Without a mark, the capture rules leave socksfwd's own
			// connections alone by the proxies' addresses, the old ones.
			s.log.Warn().Msg("the upstreams changed and there is no --mark: capture rules printed for the old ones leave only their addresses out, " +
				"so connections to a new proxy are captured and refused; print and load the rules again (socksfwd rules)")
		}
	} else if !sameCredentials(old.dialers, p.dialers) {
		// --server-user, or a password file read afresh: named, never shown.
		changes = append(changes, "upstream credentials")
	}
	if old.cfg.HandshakeTimeout != p.cfg.HandshakeTimeout {
		changes = append(changes, fmt.Sprintf("handshake-timeout %s → %s", time.Duration(old.cfg.HandshakeTimeout), time.Duration(p.cfg.HandshakeTimeout)))
	}
	if old.cfg.HedgeDelay != p.cfg.HedgeDelay {
		s.ups.SetHedgeDelay(time.Duration(p.cfg.HedgeDelay))
		changes = append(changes, fmt.Sprintf("hedge-delay %s → %s", time.Duration(old.cfg.HedgeDelay), time.Duration(p.cfg.HedgeDelay)))
	}
	if old.logLevel != p.logLevel {
		zerolog.SetGlobalLevel(p.logLevel)
		changes = append(changes, fmt.Sprintf("log-level %s → %s", old.logLevel, p.logLevel))
	}
	if old.cfg.ShutdownTimeout != p.cfg.ShutdownTimeout {
		changes = append(changes, fmt.Sprintf("shutdown-timeout %s → %s", time.Duration(old.cfg.ShutdownTimeout), time.Duration(p.cfg.ShutdownTimeout)))
	}
	keys := make([]string, 0, len(s.units))
	for k := range s.units {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var removed []*unit
	for _, k := range keys {
		u := s.units[k]
		l, keep := want[k]
		if !keep {
			delete(s.units, k)
			removed = append(removed, u)
			changes = append(changes, "-"+k)
			continue
		}
		changes = append(changes, s.update(u, l, old, p)...)
	}
	stopAccepting(slices.Values(removed))
	for _, u := range removed {
		if rev, ok := u.svc.(*tunnel.Reverse); ok {
			// Its loop has ended: no re-arm makes the series anew.
			s.tel.rearms.UnregisterMetric(rearmSeries(rev.Name()))
		}
		s.drainRemoved(u, time.Duration(old.cfg.ShutdownTimeout))
	}
	for _, u := range bound {
		changes = append(changes, "+"+u.lp.key())
	}
	if old.cfg.RemoteAddrFile != p.cfg.RemoteAddrFile {
		changes = append(changes, fmt.Sprintf("remote-addr-file %q → %q", old.cfg.RemoteAddrFile, p.cfg.RemoteAddrFile))
	}
	if was, now := captureTargets(old), captureTargets(p); !slices.Equal(was, now) && (hasTransparent(old) || hasTransparent(p)) {
		s.log.Warn().Strs("before", was).Strs("now", now).Msg("the listeners the capture rules send to changed: rules printed for the old ones send " +
			"connections where nothing may listen now, and they are refused or dropped; print and load the rules again (socksfwd rules)")
	}
	s.remotes.configure(p)
	s.start(bound)
	s.reloaded(true)
	if len(changes) == 0 {
		s.log.Info().Msg("reloaded: nothing changed")
		return nil
	}
	s.log.Info().Strs("changes", changes).Msg("reloaded: " + strings.Join(changes, "; "))
	return nil
}

// captureTargets are where capture rules send for p's listeners
// (transparent TCP and UDP, and --dns), sorted: the port, and the address
// when rules name it (REDIRECT and TPROXY send to 127.0.0.1 or ::1 unless
// told another, and a wildcard listener takes those too).
func captureTargets(p *plan) []string {
	var out []string
	for _, l := range p.listens {
		if l.kind != kindTransparent && l.kind != kindTransparentUDP && l.kind != kindDNS {
			continue
		}
		host, port, _ := net.SplitHostPort(l.addr)
		if a, err := netip.ParseAddr(host); err != nil || a.IsUnspecified() || a == netip.IPv6Loopback() || a == netip.AddrFrom4([4]byte{127, 0, 0, 1}) {
			host = "*"
		}
		out = append(out, fmt.Sprintf("%s %s", l.kind, net.JoinHostPort(host, port)))
	}
	slices.Sort(out)
	return slices.Compact(out)
}

func hasTransparent(p *plan) bool {
	return slices.ContainsFunc(p.listens, func(l listenPlan) bool {
		return l.kind == kindTransparent || l.kind == kindTransparentUDP
	})
}

// reloaded counts a reload's result for /metrics.
func (s *supervisor) reloaded(ok bool) {
	if ok {
		s.tel.reloadsOK.Add(1)
	} else {
		s.tel.reloadsFailed.Add(1)
	}
	s.tel.lastReloadOK.Store(ok)
	s.tel.lastReloadAt.Store(time.Now().Unix())
}

// checkMark makes sure the process may mark its sockets before any is
// opened: without CAP_NET_ADMIN every upstream dial would fail.
func checkMark(p *plan) error {
	if p.cfg.Mark == 0 {
		return nil
	}
	return sockmark.Check(uint32(p.cfg.Mark))
}

// checkFixed refuses changes a running process cannot make.
func (s *supervisor) checkFixed(p *plan) error {
	if p.cfg.LogFormat != s.plan.cfg.LogFormat {
		return usagef("--log-format changes only on restart (running %s, new %s)", s.plan.cfg.LogFormat, p.cfg.LogFormat)
	}
	if p.copyMode != s.plan.copyMode {
		return usagef("--relay-copy changes only on restart")
	}
	if p.cfg.Mark != s.plan.cfg.Mark {
		// Transparent UDP reply sockets carry the mark they were made with.
		return usagef("--mark changes only on restart (running %#x, new %#x)", uint32(s.plan.cfg.Mark), uint32(p.cfg.Mark))
	}
	return nil
}

// update applies a new plan's settings to a listener that stays bound;
// they take effect for new sessions. It returns the changes made.
func (s *supervisor) update(u *unit, l listenPlan, old, p *plan) []string {
	var changes []string
	key := l.key()
	bound := u.boundAddr()
	if allow, was := p.allowFor(l, bound), old.allowFor(l, bound); allow.String() != was.String() {
		changes = append(changes, fmt.Sprintf("%s allow %s", key, allow))
	}
	if a, ok := u.svc.(allowSetter); ok {
		a.SetAllow(p.allowFor(l, bound))
	}
	// TCP sessions: -L, --transparent and --http.
	if svc, ok := u.svc.(interface {
		SetAdmission(int, *allowlist.List)
		SetIdleTimeout(time.Duration)
	}); ok {
		svc.SetAdmission(p.cfg.MaxSessions, p.allowFor(l, bound))
		if old.cfg.MaxSessions != p.cfg.MaxSessions {
			changes = append(changes, fmt.Sprintf("%s max-sessions %d → %d", key, old.cfg.MaxSessions, p.cfg.MaxSessions))
		}
		if old.cfg.IdleTimeout != p.cfg.IdleTimeout {
			svc.SetIdleTimeout(time.Duration(p.cfg.IdleTimeout))
			changes = append(changes, fmt.Sprintf("%s idle-timeout %s → %s", key, time.Duration(old.cfg.IdleTimeout), time.Duration(p.cfg.IdleTimeout)))
		}
	}
	// UDP sessions: /udp forwards and transparent UDP.
	if svc, ok := u.svc.(interface{ SetLimits(time.Duration, int) }); ok &&
		(old.cfg.UDPIdleTimeout != p.cfg.UDPIdleTimeout || old.cfg.UDPMaxSessions != p.cfg.UDPMaxSessions) {
		svc.SetLimits(time.Duration(p.cfg.UDPIdleTimeout), p.cfg.UDPMaxSessions)
		changes = append(changes, fmt.Sprintf("%s udp-idle-timeout %s, udp-max-sessions %d", key, time.Duration(p.cfg.UDPIdleTimeout), p.cfg.UDPMaxSessions))
	}
	switch svc := u.svc.(type) {
	case *tunnel.TCPForward:
		if l.target != u.lp.target {
			svc.SetTarget(l.target)
			changes = append(changes, fmt.Sprintf("%s target %s → %s", key, u.lp.target, l.target))
		}
	case *tunnel.HTTPProxy:
		svc.SetDirectTimeout(time.Duration(p.cfg.HandshakeTimeout))
		if !l.http.creds.Equal(u.lp.http.creds) {
			svc.SetCredentials(l.http.creds)
			changes = append(changes, key+" http-auth")
		}
		if l.http.noProxy.String() != u.lp.http.noProxy.String() {
			svc.SetNoProxy(l.http.noProxy)
			changes = append(changes, fmt.Sprintf("%s no-proxy %q", key, l.http.noProxy))
		} else if upstreamsChanged(old, p) {
			// Kept-alive connections to targets went through the old ones.
			svc.Redial()
		}
	case *tunnel.SOCKSDoor:
		if !l.socks.creds.Equal(u.lp.socks.creds) {
			svc.SetCredentials(l.socks.creds)
			changes = append(changes, key+" socks-auth")
		}
	case *tunnel.UDPForward:
		if l.target != u.lp.target {
			svc.SetTarget(l.target)
			changes = append(changes, fmt.Sprintf("%s target %s → %s", key, u.lp.target, l.target))
		}
	case *tunnel.Reverse:
		if l.target != u.lp.target {
			svc.SetTarget(l.target.String())
			changes = append(changes, fmt.Sprintf("%s target %s → %s", key, u.lp.target, l.target))
		}
		if name := reverseName(l); name != svc.Name() {
			// Its metrics and log lines are labelled by the spec, which
			// names the target: the old series go.
			s.tel.renameReverse(svc, name)
		}
		if old.cfg.IdleTimeout != p.cfg.IdleTimeout {
			svc.SetIdleTimeout(time.Duration(p.cfg.IdleTimeout))
			changes = append(changes, fmt.Sprintf("%s idle-timeout %s → %s", key, time.Duration(old.cfg.IdleTimeout), time.Duration(p.cfg.IdleTimeout)))
		}
		// A reload is how a user says "try again": other upstreams, or the
		// same ones restarted, fixed or given new credentials. With other
		// upstreams, a BIND waiting at an old one is given up for one
		// through the new ones.
		if upstreamsChanged(old, p) {
			svc.Rebind()
		} else {
			svc.Retry()
		}
	case *adminServer:
		if old.cfg.AdminPprof != p.cfg.AdminPprof {
			svc.SetPprof(p.cfg.AdminPprof)
			changes = append(changes, fmt.Sprintf("admin-pprof %t", p.cfg.AdminPprof))
		}
	case *dnsforward.Server:
		// Other upstreams: the forwarder's pooled tunnels (or its UDP
		// association) still lead through the old ones, and a busy pool
		// never idles out, so a new forwarder takes over.
		dnsChanges := u.lp.dns.changesTo(l.dns)
		if len(dnsChanges) > 0 || upstreamsChanged(old, p) {
			fwd, err := s.newForwarder(l.dns, svc.Forwarder().Stats())
			if err != nil {
				// New only fails on what buildPlan checked; keep the old one.
				s.log.Error().Err(err).Str("listener", u.label()).Msg("reload: DNS settings not applied")
				return changes
			}
			svc.SetForwarder(fwd)
			if len(dnsChanges) == 0 {
				changes = append(changes, key+" reconnects through the new upstreams")
			} else {
				changes = append(changes, key+" "+strings.Join(dnsChanges, ", "))
			}
		}
	}
	u.lp = l
	return changes
}

// drainRemoved drains a listener a reload removed, in the background.
func (s *supervisor) drainRemoved(u *unit, timeout time.Duration) {
	s.drains.Go(func() {
		ctx, cancel := context.WithTimeout(s.cutCtx, timeout)
		defer cancel()
		if err := u.svc.Shutdown(ctx); err != nil {
			if errors.Is(err, context.DeadlineExceeded) {
				s.log.Warn().Str("listener", u.label()).Msg("removed listener: shutdown timeout reached; cutting remaining sessions")
			}
			u.svc.Close() // the admin server's Shutdown leaves what it could not drain open
		}
		s.log.Info().Str("listener", u.label()).Msg("removed listener drained")
	})
}

// stopAccepting stops those of units that can stop accepting ahead of
// their drain, all at once, and returns when they have (each within
// about 100 ms: the connections the kernel had queued are taken first).
func stopAccepting(units iter.Seq[*unit]) {
	var wg sync.WaitGroup
	for u := range units {
		if st, ok := u.svc.(acceptStopper); ok {
			wg.Go(st.StopAccepting)
		}
	}
	wg.Wait()
}

// drainAll stops accepting on every listener at once and drains them in
// parallel under one deadline; a second signal cuts what is left. The
// "draining sessions" line, for a stop by stopSig (nil: a listener
// failed), comes once the listeners that can stop ahead have stopped;
// /readyz says draining before they refuse.
func (s *supervisor) drainAll(sigs <-chan os.Signal, stopSig os.Signal) error {
	s.tel.draining.Store(true)
	stopAccepting(maps.Values(s.units))
	if stopSig != nil {
		s.log.Info().Str("signal", stopSig.String()).Dur("timeout_ms", time.Duration(s.plan.cfg.ShutdownTimeout)).Msg("draining sessions")
	}
	ctx, cancel := context.WithTimeout(s.cutCtx, time.Duration(s.plan.cfg.ShutdownTimeout))
	defer cancel()
	// Listeners an earlier reload removed may still drain under that
	// reload's (longer) timeout: this one's deadline ends them too.
	stop := context.AfterFunc(ctx, func() {
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			s.cut()
		}
	})
	defer stop()
	var wg sync.WaitGroup
	var timedOut sync.Once
	var admins []*unit
	for _, u := range s.units {
		if u.lp.kind == kindAdmin {
			// It answers to the end, so that /readyz says "draining".
			admins = append(admins, u)
			continue
		}
		wg.Go(func() {
			if err := u.svc.Shutdown(ctx); errors.Is(err, context.DeadlineExceeded) {
				timedOut.Do(func() { s.log.Warn().Msg("shutdown timeout reached; cutting remaining sessions") })
			}
		})
	}
	done := make(chan struct{})
	go func() {
		wg.Wait()
		s.drains.Wait()
		for _, u := range admins {
			if u.svc.Shutdown(ctx) != nil {
				u.svc.Close()
			}
		}
		s.serving.Wait()
		close(done)
	}()
	for {
		select {
		case <-done:
			return nil
		case <-s.sd.watchdogDue():
			s.sd.pingWatchdog()
		case sig := <-sigs:
			if sig == syscall.SIGHUP {
				continue // no reload while stopping
			}
			s.log.Warn().Str("signal", sig.String()).Msg("second signal; cutting sessions without drain")
			s.cut()
			<-done
			return errSecondSignal
		}
	}
}

// upstreamsChanged reports whether a reload from old to p changed the
// upstream servers or their credentials.
func upstreamsChanged(old, p *plan) bool {
	return !slices.Equal(old.cfg.Server, p.cfg.Server) || !sameCredentials(old.dialers, p.dialers)
}

// sameCredentials reports whether two lists of the same upstreams carry
// the same user names and passwords.
func sameCredentials(a, b []*socksclient.Dialer) bool {
	return slices.EqualFunc(a, b, func(x, y *socksclient.Dialer) bool {
		return x.Username == y.Username && x.Password == y.Password
	})
}

// newProxyHost reports whether now names a proxy host that before did not,
// other than loopback. The capture rules leave the proxies out by address
// alone, loopback never captured, so a new order, a proxy dropped or a new
// port leaves rules printed for before still right.
func newProxyHost(before, now []*socksclient.Dialer) bool {
	host := func(d *socksclient.Dialer) string {
		h, _, err := net.SplitHostPort(d.ProxyAddr)
		if err != nil {
			return d.ProxyAddr
		}
		return h
	}
	known := make(map[string]bool, len(before))
	for _, d := range before {
		known[host(d)] = true
	}
	for _, d := range now {
		h := host(d)
		if a, err := netip.ParseAddr(h); (err == nil && a.IsLoopback()) || strings.EqualFold(h, "localhost") {
			continue
		}
		if !known[h] {
			return true
		}
	}
	return false
}

func redactedServers(servers []string) string {
	red := make([]string, len(servers))
	for i, s := range servers {
		red[i] = redactURL(s)
	}
	return strings.Join(red, ", ")
}
