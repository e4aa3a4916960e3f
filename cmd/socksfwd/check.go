package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"os/signal"
	"slices"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/miekg/dns"
	"github.com/urfave/cli/v2"

	"github.com/socksfwd/socksfwd/socksclient"
)

// checkCommand is `socksfwd check`: it reads the same flags, environment
// and file as the daemon and reports, for each -S upstream, what it
// supports: reachable, handshake and authentication, CONNECT to --target,
// BIND, UDP ASSOCIATE (and a DNS query through its relay), and DNS over
// TCP through CONNECT to each --dns-upstream.
func checkCommand(stdout, stderr io.Writer, getenv func(string) string) *cli.Command {
	flags := append(optionFlagsIn(sharedOptions),
		&cli.StringFlag{Name: "target", Usage: "host:port to CONNECT to through each upstream (a name goes to the proxy, unless -S is socks5://)"},
		&cli.StringFlag{Name: "check-name", Value: ".", Usage: `the name the DNS checks ask each --dns-upstream for: NS for ".", A for any other`},
		&cli.StringSliceFlag{Name: "skip", Usage: "connect | bind | udp (UDP ASSOCIATE and DNS over it) | dns-udp | dns-tcp (a check not to run; repeatable)"},
		&cli.BoolFlag{Name: "json", Usage: "print the result as JSON"},
	)
	return &cli.Command{
		Name:  "check",
		Usage: "report what each upstream supports: CONNECT, authentication, BIND, UDP ASSOCIATE, DNS",
		UsageText: "socksfwd check -S socks5h://[user:pass@]proxy[:port] [--target host:port] [--dns-upstream resolver] [--skip bind|udp|…] [--json]\n\n" +
			"Exit status 0 when every check asked for works, 1 when one fails. A check that lacks its input\n" +
			"(no --target, no --dns-upstream) or left out with --skip is shown as skipped and does not fail.",
		Flags: flags,
		OnUsageError: func(c *cli.Context, err error, _ bool) error {
			return usageError{err}
		},
		Action: func(c *cli.Context) error {
			cc, warnings, err := checkConfigFrom(c, getenv)
			if err != nil {
				return err
			}
			for _, w := range warnings {
				fmt.Fprintf(stderr, "socksfwd check: %s\n", w)
			}
			// run() has taken SIGINT and SIGTERM for the daemon; here they
			// end the checks under way.
			ctx, stop := signal.NotifyContext(c.Context, os.Interrupt, syscall.SIGTERM)
			defer stop()
			report := runChecks(ctx, cc)
			if c.Bool("json") {
				enc := json.NewEncoder(stdout)
				enc.SetIndent("", "  ")
				if err := enc.Encode(report); err != nil {
					return err
				}
			} else if err := report.writeText(stdout); err != nil {
				return err
			}
			return report.err()
		},
	}
}

// checkConfig is what the checks need, parsed once.
type checkConfig struct {
	upstreams []checkUpstream
	target    socksclient.Addr // zero: no --target
	resolvers []socksclient.Addr
	question  dns.Question
	timeout   time.Duration // bounds each check
	skip      map[string]bool
}

// checkUpstream is one -S, with its dialer.
type checkUpstream struct {
	label  string // the -S value, password redacted
	dialer *socksclient.Dialer
	creds  bool
}

// skippable are the checks --skip names.
var skippable = []string{stepConnect, stepBind, stepUDP, stepDNSUDP, stepDNSTCP}

func checkConfigFrom(c *cli.Context, getenv func(string) string) (checkConfig, []string, error) {
	if c.NArg() > 0 {
		return checkConfig{}, nil, usagef("check: unexpected argument %s", quote(c.Args().First()))
	}
	m, err := mergeConfig(c, getenv)
	if err != nil {
		return checkConfig{}, nil, err
	}
	cfg := m.Config
	if len(cfg.Server) == 0 {
		return checkConfig{}, nil, usagef("check: no upstream server: give -S host:port (or server in the config file, or %s)", envName("server"))
	}
	cc := checkConfig{timeout: time.Duration(cfg.HandshakeTimeout), skip: map[string]bool{}}
	if cc.timeout <= 0 {
		cc.timeout = socksclient.DefaultHandshakeTimeout
	}
	dialers, err := buildDialers(&cfg)
	if err != nil {
		return checkConfig{}, nil, err
	}
	for i, d := range dialers {
		cc.upstreams = append(cc.upstreams, checkUpstream{label: redactURL(cfg.Server[i]), dialer: d, creds: d.Username != ""})
	}
	if t := c.String("target"); t != "" {
		a, err := socksclient.ParseAddr(t)
		if err != nil || a.Port == 0 {
			return checkConfig{}, nil, usagef("--target %s: want host:port", quote(t))
		}
		cc.target = a
	}
	for _, u := range cfg.DNSUpstream {
		a, err := dnsUpstreamAddr(u)
		if err != nil {
			return checkConfig{}, nil, err
		}
		cc.resolvers = append(cc.resolvers, a)
	}
	name := c.String("check-name")
	if _, ok := dns.IsDomainName(name); !ok {
		return checkConfig{}, nil, usagef("--check-name %s: not a domain name", quote(name))
	}
	qtype := dns.TypeA
	if name == "." {
		qtype = dns.TypeNS // every recursive resolver answers it
	}
	cc.question = dns.Question{Name: dns.Fqdn(name), Qtype: qtype, Qclass: dns.ClassINET}
	for _, s := range c.StringSlice("skip") {
		if !slices.Contains(skippable, s) {
			return checkConfig{}, nil, usagef("--skip %s: want one of %s", quote(s), strings.Join(skippable, ", "))
		}
		cc.skip[s] = true
	}
	return cc, m.warnings, nil
}

// The checks, in the order they run and print.
const (
	stepReachable = "reachable"
	stepHandshake = "handshake"
	stepAuth      = "auth"
	stepConnect   = "connect"
	stepBind      = "bind"
	stepUDP       = "udp"
	stepDNSUDP    = "dns-udp"
	stepDNSTCP    = "dns-tcp"
)

// A check's outcome. Only failed and unsupported fail the run.
const (
	statusOK          = "ok"
	statusFailed      = "failed"
	statusUnsupported = "unsupported" // the proxy said it does not implement the command
	statusSkipped     = "skipped"
)

// checkReport is the whole result; its JSON form is --json's output.
type checkReport struct {
	OK        bool             `json:"ok"`
	Upstreams []upstreamReport `json:"upstreams"`
}

// upstreamReport is one -S.
type upstreamReport struct {
	Upstream string `json:"upstream"` // the -S value, password redacted
	Proxy    string `json:"proxy"`    // host:port connected to
	OK       bool   `json:"ok"`
	// Methods offered in the greeting and the one the proxy chose, as RFC
	// 1928 numbers (0 none, 2 username/password, 255 none acceptable).
	MethodsOffered []int        `json:"methods_offered"`
	MethodChosen   *int         `json:"method_chosen,omitempty"`
	Steps          []stepReport `json:"steps"`
}

// stepReport is one check of one upstream.
type stepReport struct {
	Step       string   `json:"step"`
	Status     string   `json:"status"`
	DurationMS *float64 `json:"duration_ms,omitempty"`
	// Target is what the check asked the proxy to reach: --target, or a
	// resolver.
	Target string `json:"target,omitempty"`
	// Address is what the proxy reported: the address CONNECT connected
	// from, the address BIND listens at, the UDP relay.
	Address string `json:"address,omitempty"`
	// REP is the proxy's reply code when it refused, with its RFC 1928
	// meaning.
	REP        *int   `json:"rep,omitempty"`
	REPMeaning string `json:"rep_meaning,omitempty"`
	// Rcode and Answers describe a DNS check's response.
	Rcode   string `json:"rcode,omitempty"`
	Answers *int   `json:"answers,omitempty"`
	// Detail says in words what happened, and why when it did not work.
	Detail string `json:"detail,omitempty"`
}

// err is the run's verdict: nil when every upstream passed.
func (r *checkReport) err() error {
	failed := 0
	for _, u := range r.Upstreams {
		if !u.OK {
			failed++
		}
	}
	if failed == 0 {
		return nil
	}
	return fmt.Errorf("check: %d of %d upstreams failed a check", failed, len(r.Upstreams))
}

// runChecks checks every upstream, in parallel: each one's checks are
// bounded, so the run takes as long as the slowest upstream.
func runChecks(ctx context.Context, cc checkConfig) *checkReport {
	r := &checkReport{Upstreams: make([]upstreamReport, len(cc.upstreams))}
	var wg sync.WaitGroup
	for i, u := range cc.upstreams {
		wg.Go(func() { r.Upstreams[i] = checkOne(ctx, cc, u) })
	}
	wg.Wait()
	r.OK = true
	for _, u := range r.Upstreams {
		r.OK = r.OK && u.OK
	}
	return r
}

// checkOne runs the checks against one upstream, one after another, each
// on a session of its own and bounded by the handshake timeout. When the
// proxy cannot be reached or refuses the handshake, the rest are skipped.
func checkOne(ctx context.Context, cc checkConfig, u checkUpstream) upstreamReport {
	d := u.dialer
	rep := upstreamReport{Upstream: u.label, Proxy: d.ProxyAddr}
	add := func(s ...stepReport) { rep.Steps = append(rep.Steps, s...) }

	n, err := d.Negotiate(ctx)
	for _, m := range n.Offered {
		rep.MethodsOffered = append(rep.MethodsOffered, int(m))
	}
	if n.Answered {
		m := int(n.Method)
		rep.MethodChosen = &m
	}
	add(negotiationSteps(d.ProxyAddr, n, err, u.creds)...)

	// skipWhy is why a check does not run, "" when it does.
	skipWhy := func(step string) string {
		switch {
		case err != nil:
			return "the handshake did not succeed"
		case cc.skip[step]:
			return "--skip " + step
		}
		return ""
	}
	skipped := func(step, target, why string) stepReport {
		return stepReport{Step: step, Status: statusSkipped, Target: target, Detail: why}
	}
	bounded := func(f func(ctx context.Context)) {
		sctx, cancel := context.WithTimeout(ctx, cc.timeout)
		defer cancel()
		f(sctx)
	}

	switch why := skipWhy(stepConnect); {
	case cc.target == socksclient.Addr{}:
		add(skipped(stepConnect, "", "no --target given"))
	case why != "":
		add(skipped(stepConnect, cc.target.String(), why))
	default:
		bounded(func(ctx context.Context) { add(checkConnect(ctx, d, cc.target)) })
	}

	if why := skipWhy(stepBind); why != "" {
		add(skipped(stepBind, "", why))
	} else {
		bounded(func(ctx context.Context) { add(checkBind(ctx, d)) })
	}

	if why := skipWhy(stepUDP); why != "" {
		add(skipped(stepUDP, "", why))
		for _, r := range cc.resolvers {
			add(skipped(stepDNSUDP, r.String(), why))
		}
	} else {
		add(checkUDP(ctx, d, cc)...)
	}
	if len(cc.resolvers) == 0 {
		add(skipped(stepDNSUDP, "", "no --dns-upstream given"), skipped(stepDNSTCP, "", "no --dns-upstream given"))
	}
	for _, r := range cc.resolvers {
		if why := skipWhy(stepDNSTCP); why != "" {
			add(skipped(stepDNSTCP, r.String(), why))
			continue
		}
		bounded(func(ctx context.Context) { add(checkDNSTCP(ctx, d, r, cc.question)) })
	}

	rep.OK = true
	for _, s := range rep.Steps {
		if s.Status == statusFailed || s.Status == statusUnsupported {
			rep.OK = false
		}
	}
	return rep
}

// negotiationSteps turns the handshake into its three checks: reachable,
// handshake (methods offered and chosen) and auth.
func negotiationSteps(proxy string, n socksclient.Negotiation, err error, creds bool) []stepReport {
	reach := stepReport{Step: stepReachable, Status: statusSkipped, Target: proxy}
	hs := stepReport{Step: stepHandshake, Status: statusSkipped}
	auth := stepReport{Step: stepAuth, Status: statusSkipped}
	if !n.Reached {
		reach.fail(err)
		hs.Detail, auth.Detail = "not reached", "not reached"
		return []stepReport{reach, hs, auth}
	}
	reach.Status, reach.Detail = statusOK, "TCP connected"
	reach.took(n.ConnectTime)
	hs.took(n.HandshakeTime)
	if !n.Answered {
		hs.fail(err)
		auth.Detail = "no method selected"
		return []stepReport{reach, hs, auth}
	}
	hs.Status = statusOK
	hs.Detail = fmt.Sprintf("offered %s; the proxy chose %s", methodList(n.Offered), n.Method)
	switch {
	case n.Method == socksclient.MethodUserPass && err == nil:
		auth.Status, auth.Detail = statusOK, "username/password accepted (RFC 1929)"
	case n.Method == socksclient.MethodUserPass:
		auth.fail(err)
		if errors.Is(err, socksclient.ErrAuthFailed) {
			auth.Detail = "the proxy rejected the username and password (RFC 1929)"
		}
	case err != nil: // none acceptable, a method not offered, a timeout
		offered := hs.Detail
		hs.fail(err)
		hs.Detail = offered + ": " + hs.Detail
		auth.Detail = "the handshake failed"
		if n.Method == socksclient.MethodNoAcceptable && !creds {
			auth.Status = statusFailed
			auth.Detail = "the proxy may want a username and password: give user:pass@ in -S, or --server-user"
		}
	case creds:
		auth.Status, auth.Detail = statusOK, "not needed: the proxy asks for no authentication"
	default:
		auth.Detail = "no credentials given; the proxy asks for none"
	}
	return []stepReport{reach, hs, auth}
}

// checkConnect asks the proxy to CONNECT to target.
func checkConnect(ctx context.Context, d *socksclient.Dialer, target socksclient.Addr) stepReport {
	s := stepReport{Step: stepConnect, Target: target.String()}
	start := time.Now()
	c, err := d.DialAddr(ctx, target)
	s.took(time.Since(start))
	if err != nil {
		s.fail(err)
		return s
	}
	c.Close()
	s.Status, s.Address, s.Detail = statusOK, c.BoundAddr().String(), "connected"
	if a := c.BoundAddr(); a.Name != "" || !a.IP.IsUnspecified() {
		s.Detail += ", from " + s.Address // many proxies do not say (0.0.0.0:0)
	}
	return s
}

// checkBind asks the proxy to BIND and reports where it listens; no peer
// is sent there (the address is the proxy's side of the network).
func checkBind(ctx context.Context, d *socksclient.Dialer) stepReport {
	s := stepReport{Step: stepBind}
	start := time.Now()
	b, err := d.Bind(ctx, socksclient.Addr{})
	s.took(time.Since(start))
	if err != nil {
		s.fail(err)
		return s
	}
	b.Close()
	s.Status, s.Address = statusOK, b.Addr().String()
	s.Detail = "listening at " + s.Address
	return s
}

// checkUDP asks for a UDP ASSOCIATE and, through its relay, sends each
// resolver a DNS query and waits for the answer: the udp step, then one
// dns-udp step per resolver. The association and each query are bounded
// by the timeout, one after another.
func checkUDP(ctx context.Context, d *socksclient.Dialer, cc checkConfig) []stepReport {
	steps := []stepReport{{Step: stepUDP}}
	for _, r := range cc.resolvers {
		why := "no UDP relay"
		if cc.skip[stepDNSUDP] {
			why = "--skip " + stepDNSUDP
		}
		steps = append(steps, stepReport{Step: stepDNSUDP, Status: statusSkipped, Target: r.String(), Detail: why})
	}
	actx, cancel := context.WithTimeout(ctx, cc.timeout)
	defer cancel()
	start := time.Now()
	u, err := d.Associate(actx)
	steps[0].took(time.Since(start))
	if err != nil {
		steps[0].fail(err)
		return steps
	}
	defer u.Close()
	steps[0].Status, steps[0].Address = statusOK, u.Relay().String()
	steps[0].Detail = "relay at " + steps[0].Address
	if cc.skip[stepDNSUDP] {
		return steps
	}
	for i, r := range cc.resolvers {
		qctx, cancel := context.WithTimeout(ctx, cc.timeout)
		steps[1+i] = checkDNSUDP(qctx, u, r, cc.question)
		cancel()
	}
	return steps
}

// udpSends is how many times a DNS query goes out over UDP, evenly spread
// over its time: a lost datagram is not a missing feature.
const udpSends = 3

// checkDNSUDP sends a query to resolver through the relay until an answer
// comes back or ctx, which has a deadline, ends.
func checkDNSUDP(ctx context.Context, u *socksclient.UDPConn, resolver socksclient.Addr, q dns.Question) stepReport {
	s := stepReport{Step: stepDNSUDP, Target: resolver.String()}
	msg := newQuery(q)
	packed, err := msg.Pack()
	if err != nil {
		s.fail(err)
		return s
	}
	stop := context.AfterFunc(ctx, func() { u.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	defer u.SetReadDeadline(time.Time{})
	buf := make([]byte, socksclient.MaxUDPDatagram)
	wbuf := make([]byte, socksclient.MaxUDPHeaderLen+len(packed))
	copy(wbuf[socksclient.MaxUDPHeaderLen:], packed) // each send writes the header in front
	start := time.Now()
	deadline, _ := ctx.Deadline()
	window := time.Until(deadline) / udpSends
	sent := 0
	for sent < udpSends && ctx.Err() == nil {
		if err := u.WritePacket(wbuf, socksclient.MaxUDPHeaderLen, resolver); err != nil {
			s.took(time.Since(start))
			s.fail(err)
			return s
		}
		sent++
		u.SetReadDeadline(time.Now().Add(window))
		for {
			off, n, _, err := u.ReadPacket(buf)
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				break // send again, unless the time is up
			}
			if err != nil {
				s.took(time.Since(start))
				s.fail(err)
				return s
			}
			resp := new(dns.Msg)
			if resp.Unpack(buf[off:n]) != nil || !answers(resp, msg) {
				continue // not ours (a late answer to nothing we wait for)
			}
			s.took(time.Since(start))
			s.answered(resp)
			return s
		}
	}
	s.took(time.Since(start))
	s.Status = statusFailed
	s.Detail = fmt.Sprintf("no answer through the relay within %s (%d queries sent)", time.Since(start).Round(time.Millisecond), sent)
	return s
}

// checkDNSTCP sends a query to resolver over TCP through CONNECT.
func checkDNSTCP(ctx context.Context, d *socksclient.Dialer, resolver socksclient.Addr, q dns.Question) stepReport {
	s := stepReport{Step: stepDNSTCP, Target: resolver.String()}
	start := time.Now()
	c, err := d.DialAddr(ctx, resolver)
	if err != nil {
		s.took(time.Since(start))
		s.fail(err)
		return s
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	msg := newQuery(q)
	dc := &dns.Conn{Conn: c} // a stream: messages are length-prefixed
	err = dc.WriteMsg(msg)
	var resp *dns.Msg
	if err == nil {
		resp, err = dc.ReadMsg()
	}
	s.took(time.Since(start))
	if err == nil && !answers(resp, msg) {
		err = fmt.Errorf("the answer (id %d) does not match the query (id %d)", resp.Id, msg.Id)
	}
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("no answer within %s: %w", time.Since(start).Round(time.Millisecond), context.DeadlineExceeded)
		}
		s.fail(err)
		return s
	}
	s.answered(resp)
	return s
}

// newQuery is a recursive query for q with a fresh ID.
func newQuery(q dns.Question) *dns.Msg {
	m := new(dns.Msg)
	m.SetQuestion(q.Name, q.Qtype)
	m.RecursionDesired = true
	return m
}

// answers reports whether resp is the response to query: its ID and
// question, or its ID and no question at all with an error RCODE, as
// unbound refuses a client its access control does not allow (REFUSED,
// QDCOUNT 0) and servers answer a query they cannot read (FORMERR).
func answers(resp, query *dns.Msg) bool {
	if !resp.Response || resp.Id != query.Id {
		return false
	}
	if len(resp.Question) == 0 {
		return resp.Rcode != dns.RcodeSuccess && resp.Rcode != dns.RcodeNameError
	}
	return len(resp.Question) == 1 &&
		strings.EqualFold(resp.Question[0].Name, query.Question[0].Name) && resp.Question[0].Qtype == query.Question[0].Qtype
}

// answered records a DNS response: any response shows the path works,
// whatever the resolver made of the question, but for REFUSED: the
// resolver will not serve the proxy (unbound's default access control
// allows only localhost; dnsmasq refuses when it has nowhere to forward),
// so DNS through this proxy would not work either.
func (s *stepReport) answered(resp *dns.Msg) {
	n := len(resp.Answer)
	s.Status, s.Rcode, s.Answers = statusOK, dns.RcodeToString[resp.Rcode], &n
	bare := ""
	if len(resp.Question) == 0 {
		bare = " without the question"
	}
	s.Detail = fmt.Sprintf("%s answered %s%s, %d answer record(s)", s.Target, s.Rcode, bare, n)
	switch resp.Rcode {
	case dns.RcodeSuccess, dns.RcodeNameError:
	case dns.RcodeRefused:
		s.Status = statusFailed
		s.Detail += "; the query went through, but the resolver refuses it: check its access control " +
			"for the proxy's address (unbound: access-control; dnsmasq: listen-address, interface, local-service), " +
			"or, for an internal-only resolver, ask it a name it serves (--check-name db.internal)"
	default:
		s.Detail += "; the query went through, the resolver declined it"
	}
}

// took records a step's duration, in milliseconds to the microsecond.
func (s *stepReport) took(d time.Duration) {
	ms := math.Round(float64(d.Microseconds())) / 1000
	s.DurationMS = &ms
}

// fail records err as the step's outcome: unsupported when the proxy does
// not implement the command (REP 7, or it closed the connection, as
// OpenSSH does), failed otherwise, with the REP code when there is one.
func (s *stepReport) fail(err error) {
	s.Status = statusFailed
	if errors.Is(err, socksclient.ErrCommandNotSupported) {
		s.Status = statusUnsupported
	}
	var re *socksclient.ReplyError
	if errors.As(err, &re) {
		code := int(re.Code)
		s.REP, s.REPMeaning = &code, re.Code.String()
	}
	// The session's error names the proxy and target around the cause;
	// the report names them already.
	var op *net.OpError
	if errors.As(err, &op) && strings.HasPrefix(op.Op, "socks ") {
		err = op.Err
	}
	s.Detail = err.Error()
}

// methodList names methods for the table.
func methodList(ms []socksclient.AuthMethod) string {
	names := make([]string, len(ms))
	for i, m := range ms {
		names[i] = m.String()
	}
	return strings.Join(names, ", ")
}

// writeText prints a table per upstream.
func (r *checkReport) writeText(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for i, u := range r.Upstreams {
		if i > 0 {
			fmt.Fprintln(tw)
		}
		verdict := "ok"
		if !u.OK {
			verdict = "FAILED"
		}
		fmt.Fprintf(tw, "upstream %s: %s\n", u.Upstream, verdict)
		for _, s := range u.Steps {
			dur := ""
			if s.DurationMS != nil {
				dur = fmt.Sprintf("%.1f ms", *s.DurationMS)
			}
			detail := s.Detail
			if s.Target != "" && !strings.Contains(detail, s.Target) {
				detail = s.Target + ": " + detail
			}
			fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\n", s.Step, s.Status, dur, detail)
		}
	}
	return tw.Flush()
}
