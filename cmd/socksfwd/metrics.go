package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/miekg/dns"

	"github.com/socksfwd/socksfwd/dnsforward"
	"github.com/socksfwd/socksfwd/socksclient"
	"github.com/socksfwd/socksfwd/tunnel"
)

// telemetry holds what the supervisor itself counts for /metrics and
// /readyz; the services count their own sessions and drops (their Stats),
// read at scrape time, so a scrape costs the hot paths nothing.
type telemetry struct {
	// handshakes holds one latency histogram per upstream, rearms one
	// re-arm gap histogram per -R; their families are written by the
	// metrics package.
	handshakes *metrics.Set
	rearms     *metrics.Set
	// rearmMu orders a re-arm's observation against a reload's rename of
	// its -R: an observation under the old name after the old series was
	// unregistered would make it anew.
	rearmMu   sync.Mutex
	upstreams sync.Map // proxy address → *upstreamTelemetry

	reloadsOK, reloadsFailed atomic.Int64
	lastReloadOK             atomic.Bool
	lastReloadAt             atomic.Int64 // unix seconds; 0: none yet

	bound    atomic.Bool // every listener of the first plan is bound
	draining atomic.Bool
}

// upstreamTelemetry is one upstream's handshake record.
type upstreamTelemetry struct {
	latency  *metrics.PrometheusHistogram
	lastOK   atomic.Int64 // unix nanos of the last handshake that worked
	failures sync.Map     // failureCause → *atomic.Int64
}

// handshakeBuckets are the latency histogram's upper bounds, in seconds:
// a loopback proxy answers in well under a millisecond, one across an
// ocean in a few hundred.
var handshakeBuckets = []float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10}

func newTelemetry() *telemetry {
	return &telemetry{handshakes: metrics.NewSet(), rearms: metrics.NewSet()}
}

func (t *telemetry) upstream(proxy string) *upstreamTelemetry {
	if u, ok := t.upstreams.Load(proxy); ok {
		return u.(*upstreamTelemetry)
	}
	name := "socksfwd_upstream_handshake_seconds{upstream=" + labelValue(proxy) + "}"
	u, _ := t.upstreams.LoadOrStore(proxy, &upstreamTelemetry{
		latency: t.handshakes.GetOrCreatePrometheusHistogramExt(name, handshakeBuckets),
	})
	return u.(*upstreamTelemetry)
}

// keepUpstreams forgets the records of upstreams not in addrs, which a
// reload removed: their series leave /metrics.
func (t *telemetry) keepUpstreams(addrs []string) {
	t.upstreams.Range(func(k, _ any) bool {
		if proxy := k.(string); !slices.Contains(addrs, proxy) {
			t.handshakes.UnregisterMetric("socksfwd_upstream_handshake_seconds{upstream=" + labelValue(proxy) + "}")
			t.upstreams.Delete(proxy)
		}
		return true
	})
}

// observe records one try of one upstream (socksclient.Upstreams'
// OnAttempt): its latency when it worked, its cause when it failed. A try
// cut short because another upstream won says nothing of either.
func (t *telemetry) observe(a socksclient.Attempt) {
	if errors.Is(a.Err, context.Canceled) {
		return // cut short: another upstream won the race, or the client left
	}
	u := t.upstream(a.Proxy)
	if a.Err == nil {
		u.latency.Update(a.Took.Seconds())
		u.lastOK.Store(time.Now().UnixNano())
		return
	}
	c := classify(a.Err)
	if a.WaitedOnTarget {
		// Apart from the proxy's own timeouts, which an alert may page
		// on: a dead target behind a healthy proxy is no proxy outage.
		c = failureCause{cause: "target_timeout"}
	}
	n, ok := u.failures.Load(c)
	if !ok {
		n, _ = u.failures.LoadOrStore(c, new(atomic.Int64))
	}
	n.(*atomic.Int64).Add(1)
}

// failureCause is a handshake failure's label values: a bounded set.
type failureCause struct {
	cause string
	code  string // the REP code, for cause "reply"
}

// classify names why a try failed, in a few words fit for a label.
func classify(err error) failureCause {
	var rep *socksclient.ReplyError
	var perr *socksclient.ProtocolError
	var nerr net.Error
	switch {
	case errors.As(err, &rep):
		return failureCause{cause: "reply", code: strconv.Itoa(int(rep.Code))}
	case errors.Is(err, socksclient.ErrAuthFailed), errors.Is(err, socksclient.ErrCredentialsRequired):
		return failureCause{cause: "auth"}
	case errors.Is(err, socksclient.ErrNoAcceptableMethods):
		return failureCause{cause: "no_acceptable_method"}
	case errors.Is(err, socksclient.ErrCommandNotSupported):
		return failureCause{cause: "command_not_supported"}
	case errors.As(err, &perr):
		return failureCause{cause: "protocol"}
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &nerr) && nerr.Timeout():
		return failureCause{cause: "timeout"}
	case errors.Is(err, syscall.ECONNREFUSED):
		return failureCause{cause: "connect_refused"}
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		return failureCause{cause: "reset"}
	}
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" {
		return failureCause{cause: "connect"}
	}
	return failureCause{cause: "other"}
}

// liveUnit is a listener as the admin endpoint sees it: fixed when it is
// published, so a scrape never reads what a reload is changing.
type liveUnit struct {
	kind listenKind
	name string // its bound address
	svc  service
}

// promWriter writes the Prometheus text format: each family once, with
// its HELP and TYPE, then its samples.
type promWriter struct {
	w   io.Writer
	buf []byte
}

func (p *promWriter) family(name, typ, help string) {
	fmt.Fprintf(p.w, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, typ)
}

// sample writes one line; labels are name, value pairs.
func (p *promWriter) sample(name string, value float64, labels ...string) {
	b := append(p.buf[:0], name...)
	if len(labels) > 0 {
		b = append(b, '{')
		for i := 0; i+1 < len(labels); i += 2 {
			if i > 0 {
				b = append(b, ',')
			}
			b = append(b, labels[i]...)
			b = append(b, '=')
			b = append(b, labelValue(labels[i+1])...)
		}
		b = append(b, '}')
	}
	b = append(b, ' ')
	b = strconv.AppendFloat(b, value, 'g', -1, 64)
	b = append(b, '\n')
	p.w.Write(b)
	p.buf = b
}

// labelValue quotes a label value as the text format wants: backslash,
// double quote and newline escaped.
func labelValue(v string) string {
	return `"` + labelEscaper.Replace(v) + `"`
}

var labelEscaper = strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`)

// writeMetrics writes every socksfwd_ family, then the process's.
func (s *supervisor) writeMetrics(w io.Writer) {
	p := &promWriter{w: w}
	units := s.liveUnits()
	t := s.tel

	var tcp []liveUnit
	var udp []liveUnit
	var dnsUnits []liveUnit
	var reverse []liveUnit
	for _, u := range units {
		switch u.svc.(type) {
		case *tunnel.Reverse:
			reverse = append(reverse, u)
		case *tunnel.TCPForward, *tunnel.HTTPProxy, *tunnel.SOCKSDoor:
			tcp = append(tcp, u)
		case *tunnel.UDPForward, *tunnel.TransparentUDP:
			udp = append(udp, u)
		case *dnsforward.Server:
			dnsUnits = append(dnsUnits, u)
		}
	}

	p.family("socksfwd_build_info", "gauge", "Version of socksfwd and of the Go that built it.")
	p.sample("socksfwd_build_info", 1, "version", buildVersion(), "goversion", runtime.Version())
	p.family("socksfwd_listeners", "gauge", "Listeners bound and serving.")
	p.sample("socksfwd_listeners", float64(len(units)))
	p.family("socksfwd_draining", "gauge", "1 while a stop signal's drain runs.")
	p.sample("socksfwd_draining", b2f(t.draining.Load()))
	p.family("socksfwd_reloads_total", "counter", "SIGHUP reloads, by result.")
	p.sample("socksfwd_reloads_total", float64(t.reloadsOK.Load()), "result", "ok")
	p.sample("socksfwd_reloads_total", float64(t.reloadsFailed.Load()), "result", "error")
	p.family("socksfwd_last_reload_success", "gauge", "1 if the last reload applied, 0 if it failed (1 before any).")
	p.sample("socksfwd_last_reload_success", b2f(t.lastReloadAt.Load() == 0 || t.lastReloadOK.Load()))
	p.family("socksfwd_last_reload_timestamp_seconds", "gauge", "When the last reload ran (0: none yet).")
	p.sample("socksfwd_last_reload_timestamp_seconds", float64(t.lastReloadAt.Load()))

	writeTCP(p, tcp)
	writeHTTP(p, tcp)
	writeSOCKS(p, tcp)
	writeUDP(p, udp)
	writeDNS(p, dnsUnits)
	s.writeReverse(p, reverse)
	s.writeUpstreams(p)

	metrics.WriteProcessMetrics(w)
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// buildVersion is the stamped version, else the main module's version as
// the build recorded it.
func buildVersion() string {
	if version != "dev" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return version
}

func writeTCP(p *promWriter, units []liveUnit) {
	if len(units) == 0 {
		return
	}
	type st = *tunnel.TCPStats
	fams := []struct {
		name, typ, help string
		v               func(st) int64
	}{
		{"socksfwd_sessions_total", "counter", "TCP sessions accepted (for proto http: client connections).", func(s st) int64 { return s.Sessions.Load() }},
		{"socksfwd_sessions_active", "gauge", "TCP sessions open now.", func(s st) int64 { return s.Active.Load() }},
		{"socksfwd_sessions_failed_total", "counter", "TCP sessions whose target could not be read or whose upstream dial failed.", func(s st) int64 { return s.Failed.Load() }},
	}
	for _, f := range fams {
		p.family(f.name, f.typ, f.help)
		for _, u := range units {
			p.sample(f.name, float64(f.v(tcpStats(u.svc))), "listener", u.name, "proto", string(u.kind))
		}
	}
	p.family("socksfwd_sessions_rejected_total", "counter", "TCP connections closed at once, by reason: max_sessions (--max-sessions were open) or not_allowed (source not in --allow); "+
		"on transparent listeners also not_redirected (no rule sent the connection) or capture_loop (socksfwd's own connection to a proxy, captured).")
	for _, u := range units {
		s := tcpStats(u.svc)
		p.sample("socksfwd_sessions_rejected_total", float64(s.RejectedFull.Load()), "listener", u.name, "proto", string(u.kind), "reason", "max_sessions")
		p.sample("socksfwd_sessions_rejected_total", float64(s.RejectedNotAllowed.Load()), "listener", u.name, "proto", string(u.kind), "reason", "not_allowed")
		if u.kind == kindTransparent {
			p.sample("socksfwd_sessions_rejected_total", float64(s.RejectedNotRedirected.Load()), "listener", u.name, "proto", string(u.kind), "reason", "not_redirected")
			p.sample("socksfwd_sessions_rejected_total", float64(s.RejectedCaptureLoop.Load()), "listener", u.name, "proto", string(u.kind), "reason", "capture_loop")
		}
	}
	p.family("socksfwd_bytes_total", "counter", "Payload bytes relayed, by direction (up: client to target).")
	for _, u := range units {
		s := tcpStats(u.svc)
		p.sample("socksfwd_bytes_total", float64(s.BytesUp.Load()), "listener", u.name, "proto", string(u.kind), "direction", "up")
		p.sample("socksfwd_bytes_total", float64(s.BytesDown.Load()), "listener", u.name, "proto", string(u.kind), "direction", "down")
	}
}

// tcpStats returns a TCP listener's session counters.
func tcpStats(svc service) *tunnel.TCPStats {
	switch v := svc.(type) {
	case *tunnel.HTTPProxy:
		return &v.Stats().TCPStats
	case *tunnel.SOCKSDoor:
		return v.Stats()
	}
	return svc.(*tunnel.TCPForward).Stats()
}

// writeHTTP writes what only the HTTP proxies of units count: requests
// by kind and status class, and 407s by reason.
func writeHTTP(p *promWriter, units []liveUnit) {
	var proxies []liveUnit
	for _, u := range units {
		if _, ok := u.svc.(*tunnel.HTTPProxy); ok {
			proxies = append(proxies, u)
		}
	}
	if len(proxies) == 0 {
		return
	}
	p.family("socksfwd_http_requests_total", "counter", "Requests the HTTP proxy answered, by kind (connect, forward: absolute-form, malformed: refused by the HTTP parser, or timeout: a request head begun but not received within 10 s, closed without an answer and counted 4xx as a 408; a connection that sends nothing is no request) and status class; a forwarded answer whose write failed because the client went away counts as 4xx (nginx's 499), one the target ended early (before its Content-Length or last chunk) as 5xx.")
	for _, u := range proxies {
		st := u.svc.(*tunnel.HTTPProxy).Stats()
		for kind, name := range []string{tunnel.HTTPConnect: "connect", tunnel.HTTPForward: "forward", tunnel.HTTPMalformed: "malformed", tunnel.HTTPTimeout: "timeout"} {
			for class := 1; class <= 5; class++ {
				p.sample("socksfwd_http_requests_total", float64(st.Responses[kind][class].Load()),
					"listener", u.name, "kind", name, "code", strconv.Itoa(class)+"xx")
			}
		}
	}
	p.family("socksfwd_http_auth_failures_total", "counter", "Requests answered 407, by reason: missing (no Proxy-Authorization: most clients' first request, to learn the scheme) or wrong_credentials.")
	for _, u := range proxies {
		st := u.svc.(*tunnel.HTTPProxy).Stats()
		p.sample("socksfwd_http_auth_failures_total", float64(st.AuthMissing.Load()), "listener", u.name, "reason", "missing")
		p.sample("socksfwd_http_auth_failures_total", float64(st.AuthWrong.Load()), "listener", u.name, "reason", "wrong_credentials")
	}
}

// writeSOCKS writes what only the SOCKS5 doors of units count: requests
// by command, failed handshakes by reason, and UDP ASSOCIATE's datagrams.
func writeSOCKS(p *promWriter, units []liveUnit) {
	var doors []liveUnit
	for _, u := range units {
		if _, ok := u.svc.(*tunnel.SOCKSDoor); ok {
			doors = append(doors, u)
		}
	}
	if len(doors) == 0 {
		return
	}
	type st = *tunnel.SOCKSDoorStats
	type labelled struct {
		label string
		v     func(st) *atomic.Int64
	}
	fams := []struct {
		name, help, label string
		values            []labelled
	}{
		{"socksfwd_socks_requests_total", "Requests the SOCKS5 door read, by command (other: answered REP 7).", "command", []labelled{
			{"connect", func(s st) *atomic.Int64 { return &s.Requests[1] }},
			{"bind", func(s st) *atomic.Int64 { return &s.Requests[2] }},
			{"udp_associate", func(s st) *atomic.Int64 { return &s.Requests[3] }},
			{"other", func(s st) *atomic.Int64 { return &s.Requests[0] }},
		}},
		{"socksfwd_socks_requests_refused_total", "Requests the SOCKS5 door refused itself, by reason (udp_source_not_allowed: a UDP ASSOCIATE naming a source --allow refuses, answered REP 2).", "reason", []labelled{
			{"udp_source_not_allowed", func(s st) *atomic.Int64 { return &s.SourceNotAllowed }},
		}},
		{"socksfwd_socks_handshake_failures_total", "SOCKS5 door handshakes that failed before the session began, by reason (client_gone: the client hung up before its request or its reply; socks4: a SOCKS4 or 4a client, answered SOCKS4's rejection).", "reason", []labelled{
			{"malformed", func(s st) *atomic.Int64 { return &s.Malformed }},
			{"socks4", func(s st) *atomic.Int64 { return &s.SOCKS4 }},
			{"wrong_credentials", func(s st) *atomic.Int64 { return &s.WrongCredentials }},
			{"no_common_method", func(s st) *atomic.Int64 { return &s.NoCommonMethod }},
			{"timeout", func(s st) *atomic.Int64 { return &s.HandshakeTimeout }},
			{"client_gone", func(s st) *atomic.Int64 { return &s.ClientGone }},
		}},
		{"socksfwd_socks_udp_datagrams_total", "Datagrams the SOCKS5 door's UDP ASSOCIATE relayed, by direction (up: client to target).", "direction", []labelled{
			{"up", func(s st) *atomic.Int64 { return &s.DatagramsUp }},
			{"down", func(s st) *atomic.Int64 { return &s.DatagramsDown }},
		}},
		{"socksfwd_socks_udp_bytes_total", "Bytes (SOCKS header included) the SOCKS5 door's UDP ASSOCIATE relayed, by direction.", "direction", []labelled{
			{"up", func(s st) *atomic.Int64 { return &s.UDPBytesUp }},
			{"down", func(s st) *atomic.Int64 { return &s.UDPBytesDown }},
		}},
		{"socksfwd_socks_udp_dropped_total", "Datagrams the SOCKS5 door dropped, by reason: stranger (not from the client), fragment (FRAG != 0), malformed header, send_failed; upstream_fragment and upstream_malformed came from the upstream's relay, upstream_refused is one it refused (ICMP port unreachable).", "reason", []labelled{
			{"stranger", func(s st) *atomic.Int64 { return &s.DroppedStranger }},
			{"fragment", func(s st) *atomic.Int64 { return &s.DroppedFragment }},
			{"malformed", func(s st) *atomic.Int64 { return &s.DroppedMalformed }},
			{"send_failed", func(s st) *atomic.Int64 { return &s.DroppedSendFailed }},
			{"upstream_fragment", func(s st) *atomic.Int64 { return &s.Upstream.Fragmented }},
			{"upstream_malformed", func(s st) *atomic.Int64 { return &s.Upstream.Malformed }},
			{"upstream_refused", func(s st) *atomic.Int64 { return &s.RelayRefused }},
		}},
	}
	for _, f := range fams {
		p.family(f.name, "counter", f.help)
		for _, u := range doors {
			s := u.svc.(*tunnel.SOCKSDoor).DoorStats()
			for _, l := range f.values {
				p.sample(f.name, float64(l.v(s).Load()), "listener", u.name, f.label, l.label)
			}
		}
	}
}

// udpStats returns a UDP listener's counters, and the transparent ones'
// extra counters (nil for a forward).
func udpStats(svc service) (*tunnel.UDPStats, *tunnel.TransparentUDPStats) {
	switch v := svc.(type) {
	case *tunnel.UDPForward:
		return v.Stats(), nil
	case *tunnel.TransparentUDP:
		st := v.Stats()
		return &st.UDPStats, st
	}
	return nil, nil
}

func writeUDP(p *promWriter, units []liveUnit) {
	if len(units) == 0 {
		return
	}
	lab := func(u liveUnit, more ...string) []string {
		return append([]string{"listener", u.name, "proto", string(u.kind)}, more...)
	}
	type st = *tunnel.UDPStats
	simple := []struct {
		name, typ, help string
		v               func(st) int64
	}{
		{"socksfwd_udp_sessions_total", "counter", "UDP sessions (client addresses) started.", func(s st) int64 { return s.Sessions.Load() }},
		{"socksfwd_udp_sessions_active", "gauge", "UDP sessions open now.", func(s st) int64 { return s.Active.Load() }},
		{"socksfwd_udp_sessions_evicted_total", "counter", "UDP sessions ended to make room under --udp-max-sessions.", func(s st) int64 { return s.Evicted.Load() }},
		{"socksfwd_udp_received_total", "counter", "Datagrams read from clients.", func(s st) int64 { return s.Received.Load() }},
		{"socksfwd_udp_associate_failures_total", "counter", "UDP ASSOCIATE attempts that failed.", func(s st) int64 { return s.AssociateFailures.Load() }},
		{"socksfwd_udp_read_errors_total", "counter", "Failed reads of the listening socket.", func(s st) int64 { return s.ReadErrors.Load() }},
		{"socksfwd_udp_relay_waits_total", "counter", "Batches held until the proxy's relay on this host had room.", func(s st) int64 { return s.Association.RelayWaits.Load() }},
	}
	for _, f := range simple {
		p.family(f.name, f.typ, f.help)
		for _, u := range units {
			s, _ := udpStats(u.svc)
			p.sample(f.name, float64(f.v(s)), lab(u)...)
		}
	}
	p.family("socksfwd_udp_datagrams_total", "counter", "Datagrams relayed, by direction (up: client to target).")
	for _, u := range units {
		s, _ := udpStats(u.svc)
		p.sample("socksfwd_udp_datagrams_total", float64(s.DatagramsUp.Load()), lab(u, "direction", "up")...)
		p.sample("socksfwd_udp_datagrams_total", float64(s.DatagramsDown.Load()), lab(u, "direction", "down")...)
	}
	p.family("socksfwd_udp_bytes_total", "counter", "Payload bytes of the datagrams relayed, by direction.")
	for _, u := range units {
		s, _ := udpStats(u.svc)
		p.sample("socksfwd_udp_bytes_total", float64(s.BytesUp.Load()), lab(u, "direction", "up")...)
		p.sample("socksfwd_udp_bytes_total", float64(s.BytesDown.Load()), lab(u, "direction", "down")...)
	}
	p.family("socksfwd_udp_dropped_total", "counter", "Datagrams dropped, by reason; no_association while no UDP association can be had (the upstreams fail), reply and wrong_peer (from another sender than a forward's target) are replies toward clients, upstream_refused counts ICMP errors from the proxy's relay for datagrams sent up.")
	for _, u := range units {
		s, ts := udpStats(u.svc)
		type drop struct {
			reason string
			n      int64
		}
		drops := []drop{
			{"queue", s.DroppedQueue.Load()},
			{"no_association", s.DroppedNoAssoc.Load()},
			// Every oversize drop is in DroppedLarge; the association's
			// TooLarge counts the same datagrams where it refused them.
			{"oversize", s.DroppedLarge.Load()},
			{"memory", s.DroppedMemory.Load()},
			{"session_ended", s.DroppedEnded.Load()},
			{"send", s.DroppedSend.Load()},
			{"fragment", s.Association.Fragmented.Load()},
			{"malformed", s.Association.Malformed.Load()},
			{"relay_stall", s.Association.RelayStalls.Load()},
			{"not_allowed", s.DroppedNotAllowed.Load()},
			{"reply", s.DroppedReply.Load()},
			{"wrong_peer", s.Association.WrongPeer.Load()},
			{"upstream_refused", s.RelayRefused.Load()},
		}
		if ts != nil {
			drops = append(drops,
				drop{"no_destination", ts.DroppedNoDest.Load()},
				drop{"not_redirected", ts.DroppedNotRedirected.Load()},
				drop{"own_relay", ts.DroppedOwnRelay.Load()})
		}
		for _, d := range drops {
			p.sample("socksfwd_udp_dropped_total", float64(d.n), lab(u, "reason", d.reason)...)
		}
	}
	var transparent []liveUnit
	for _, u := range units {
		if _, ts := udpStats(u.svc); ts != nil {
			transparent = append(transparent, u)
		}
	}
	if len(transparent) == 0 {
		return
	}
	type tst = *tunnel.TransparentUDPStats
	for _, f := range []struct {
		name, typ, help string
		v               func(tst) int64
	}{
		{"socksfwd_udp_reply_sockets", "gauge", "Transparent reply sockets open now (one per remote address).", func(s tst) int64 { return s.ReplySockets.Load() }},
		{"socksfwd_udp_reply_bind_failures_total", "counter", "Remotes whose reply socket could not bind (a local service holds the port, or descriptors ran out); counted once until a retry binds it.", func(s tst) int64 { return s.ReplyBindFailures.Load() }},
		{"socksfwd_udp_raw_replies_total", "counter", "Replies sent through the raw IP socket instead.", func(s tst) int64 { return s.RawReplies.Load() }},
	} {
		p.family(f.name, f.typ, f.help)
		for _, u := range transparent {
			_, ts := udpStats(u.svc)
			p.sample(f.name, float64(f.v(ts)), lab(u)...)
		}
	}
}

func writeDNS(p *promWriter, units []liveUnit) {
	if len(units) == 0 {
		return
	}
	stats := func(u liveUnit) *dnsforward.Stats { return u.svc.(*dnsforward.Server).Forwarder().Stats() }
	p.family("socksfwd_dns_queries_total", "counter", "DNS queries from clients, by the transport they came on.")
	for _, u := range units {
		s := stats(u)
		p.sample("socksfwd_dns_queries_total", float64(s.QueriesUDP.Load()), "listener", u.name, "transport", "udp")
		p.sample("socksfwd_dns_queries_total", float64(s.QueriesTCP.Load()), "listener", u.name, "transport", "tcp")
	}
	p.family("socksfwd_dns_responses_total", "counter", "DNS responses sent to clients, by RCODE.")
	for _, u := range units {
		s := stats(u)
		for rc := range s.Responses {
			if n := s.Responses[rc].Load(); n > 0 || rc == dns.RcodeSuccess || rc == dns.RcodeServerFailure {
				p.sample("socksfwd_dns_responses_total", float64(n), "listener", u.name, "rcode", rcodeName(rc))
			}
		}
	}
	type st = *dnsforward.Stats
	for _, f := range []struct {
		name, help string
		v          func(st) int64
	}{
		{"socksfwd_dns_cache_hits_total", "Queries answered from the cache.", func(s st) int64 { return s.CacheHits.Load() }},
		{"socksfwd_dns_cache_misses_total", "Cacheable queries the cache could not answer.", func(s st) int64 { return s.CacheMisses.Load() }},
		{"socksfwd_dns_cache_evictions_total", "Answers pushed out of the full cache.", func(s st) int64 { return s.CacheEvictions.Load() }},
		{"socksfwd_dns_refused_total", "Queries answered REFUSED because --dns-max-inflight were in flight.", func(s st) int64 { return s.Refused.Load() }},
		{"socksfwd_dns_servfail_total", "Queries answered SERVFAIL because every resolver failed in time.", func(s st) int64 { return s.ServFail.Load() }},
		{"socksfwd_dns_failovers_total", "Attempts that failed and passed the query to the next resolver.", func(s st) int64 { return s.Failovers.Load() }},
		{"socksfwd_dns_resent_total", "Queries sent again after a resolver closed their TCP connection.", func(s st) int64 { return s.Resent.Load() }},
		{"socksfwd_dns_retransmits_total", "UDP transport: datagrams sent again.", func(s st) int64 { return s.Retransmits.Load() }},
		{"socksfwd_dns_udp_read_errors_total", "UDP transport: read errors that did not end the association.", func(s st) int64 { return s.UDPReadErrors.Load() }},
		{"socksfwd_dns_mismatched_answers_total", "Answers dropped as not their query's (TCP: another question under its ID; UDP: another source than the resolver).", func(s st) int64 { return s.Mismatched.Load() }},
		{"socksfwd_dns_ignored_total", "DNS messages answered nothing: responses (QR=1) and messages shorter than a header (not in socksfwd_dns_queries_total).", func(s st) int64 { return s.Ignored.Load() }},
		{"socksfwd_dns_malformed_answers_total", "Answers from the resolvers that do not parse (UDP transport: dropped; TCP: failing their attempt, or dropped when too short to match).", func(s st) int64 { return s.MalformedAnswers.Load() }},
		{"socksfwd_dns_not_allowed_total", "Queries from sources not in --allow, answered REFUSED (not in socksfwd_dns_queries_total).", func(s st) int64 { return s.NotAllowed.Load() }},
	} {
		p.family(f.name, "counter", f.help)
		for _, u := range units {
			p.sample(f.name, float64(f.v(stats(u))), "listener", u.name)
		}
	}
	p.family("socksfwd_dns_udp_dropped_total", "counter", "UDP transport: datagrams from the relay dropped, by reason.")
	for _, u := range units {
		a := &stats(u).Association
		p.sample("socksfwd_dns_udp_dropped_total", float64(a.Fragmented.Load()), "listener", u.name, "reason", "fragment")
		p.sample("socksfwd_dns_udp_dropped_total", float64(a.Malformed.Load()), "listener", u.name, "reason", "malformed")
		p.sample("socksfwd_dns_udp_dropped_total", float64(a.TooLarge.Load()), "listener", u.name, "reason", "oversize")
	}
	p.family("socksfwd_dns_inflight", "gauge", "Queries waiting on the resolvers now.")
	for _, u := range units {
		p.sample("socksfwd_dns_inflight", float64(u.svc.(*dnsforward.Server).Forwarder().InFlight()), "listener", u.name)
	}
	p.family("socksfwd_dns_cache_entries", "gauge", "Answers in the cache now.")
	for _, u := range units {
		p.sample("socksfwd_dns_cache_entries", float64(u.svc.(*dnsforward.Server).Forwarder().CacheLen()), "listener", u.name)
	}
}

// writeReverse writes the -R forwards' families, labelled by the -R spec
// (one series set per -R).
func (s *supervisor) writeReverse(p *promWriter, units []liveUnit) {
	if len(units) == 0 {
		return
	}
	type st = *tunnel.ReverseStats
	stats := func(u liveUnit) st { return u.svc.(*tunnel.Reverse).Stats() }
	for _, f := range []struct {
		name, typ, help string
		v               func(st) int64
	}{
		{"socksfwd_reverse_binds_total", "counter", "BINDs the proxy answered by listening: the first and every re-arm.", func(s st) int64 { return s.Binds.Load() }},
		{"socksfwd_reverse_sessions_total", "counter", "Callers that connected to the proxy's port.", func(s st) int64 { return s.Sessions.Load() }},
		{"socksfwd_reverse_sessions_active", "gauge", "Reverse sessions open now.", func(s st) int64 { return s.Active.Load() }},
	} {
		p.family(f.name, f.typ, f.help)
		for _, u := range units {
			p.sample(f.name, float64(f.v(stats(u))), "reverse", u.name)
		}
	}
	p.family("socksfwd_reverse_bytes_total", "counter", "Payload bytes relayed, by direction (up: caller to local target).")
	for _, u := range units {
		p.sample("socksfwd_reverse_bytes_total", float64(stats(u).BytesUp.Load()), "reverse", u.name, "direction", "up")
		p.sample("socksfwd_reverse_bytes_total", float64(stats(u).BytesDown.Load()), "reverse", u.name, "direction", "down")
	}
	p.family("socksfwd_reverse_failures_total", "counter", "Failed BINDs and callers, by cause (unsupported, refused, upstream, port_busy, control_lost, second_reply, target).")
	for _, u := range units {
		for c := range tunnel.NumReverseCauses {
			p.sample("socksfwd_reverse_failures_total", float64(stats(u).Failures[c].Load()), "reverse", u.name, "cause", c.String())
		}
	}
	// Read once for the three families, so that a scrape never pairs one
	// BIND's address with another's port, nor says listening=0 beside
	// an address.
	remotes := make([]socksclient.Addr, len(units))
	listening := make([]bool, len(units))
	for i, u := range units {
		remotes[i], listening[i] = u.svc.(*tunnel.Reverse).Remote()
	}
	p.family("socksfwd_reverse_listening", "gauge", "1 while the proxy listens for the next caller, 0 while it does not (a failure, a re-arm).")
	for i, u := range units {
		p.sample("socksfwd_reverse_listening", b2f(listening[i]), "reverse", u.name)
	}
	// The port is a value, not a label: with -R 0 a proxy such as Dante
	// listens on a new port for every caller, a new series each time.
	p.family("socksfwd_reverse_remote_info", "gauge", "The address the proxy listens on (remote, without the port), 1 per -R while it does.")
	for i, u := range units {
		if listening[i] {
			p.sample("socksfwd_reverse_remote_info", 1, "reverse", u.name, "remote", remotes[i].Host())
		}
	}
	p.family("socksfwd_reverse_remote_port", "gauge", "The port the proxy listens on, per -R while it does.")
	for i, u := range units {
		if listening[i] {
			p.sample("socksfwd_reverse_remote_port", float64(remotes[i].Port), "reverse", u.name)
		}
	}
	p.family("socksfwd_reverse_rearm_seconds", "histogram", "Time the port was closed between two callers: from a caller's arrival to the proxy listening again.")
	s.tel.rearms.WritePrometheus(p.w)
}

// rcodeName is an RCODE's mnemonic, lower case, or its number.
// upstreamLabels names each upstream for its series: its address, and
// for a second upstream at the same address (two accounts on one proxy)
// the address with its place among them, "proxy:1080#2", so that no
// series is written twice.
func upstreamLabels(status []socksclient.UpstreamStatus) []string {
	names := make([]string, len(status))
	seen := make(map[string]int, len(status))
	for i, st := range status {
		addr := st.Dialer.ProxyAddr
		seen[addr]++
		names[i] = addr
		if n := seen[addr]; n > 1 {
			names[i] = addr + "#" + strconv.Itoa(n)
		}
	}
	return names
}

func rcodeName(rc int) string {
	if n, ok := dns.RcodeToString[rc]; ok {
		return strings.ToLower(n)
	}
	return strconv.Itoa(rc)
}

func (s *supervisor) writeUpstreams(p *promWriter) {
	status := s.ups.Status()
	names := upstreamLabels(status)
	p.family("socksfwd_upstream_up", "gauge", "1 while the upstream works, 0 from a failure until the next success.")
	for i, st := range status {
		p.sample("socksfwd_upstream_up", b2f(st.Up), "upstream", names[i])
	}
	p.family("socksfwd_upstream_backoff_seconds", "gauge", "The upstream's current backoff (0 while up): tried after the others until it ends.")
	for i, st := range status {
		p.sample("socksfwd_upstream_backoff_seconds", st.Backoff.Seconds(), "upstream", names[i])
	}
	// Tries are recorded by the proxy's address: two upstreams at one
	// address share them, written once.
	proxies := make([]string, len(status))
	for i, st := range status {
		proxies[i] = st.Dialer.ProxyAddr
	}
	slices.Sort(proxies)
	proxies = slices.Compact(proxies)
	p.family("socksfwd_upstream_handshake_failures_total", "counter", "Tries of an upstream that failed, by cause (reply: the proxy's REP code, in code; timeout: the proxy's own; target_timeout: the proxy answered, then waited on the target until time ran out).")
	for _, proxy := range proxies {
		u := s.tel.upstream(proxy)
		var causes []failureCause
		u.failures.Range(func(k, _ any) bool { causes = append(causes, k.(failureCause)); return true })
		slices.SortFunc(causes, func(a, b failureCause) int { return strings.Compare(a.cause+a.code, b.cause+b.code) })
		for _, c := range causes {
			n, _ := u.failures.Load(c)
			labels := []string{"upstream", proxy, "cause", c.cause}
			if c.code != "" {
				labels = append(labels, "code", c.code)
			}
			p.sample("socksfwd_upstream_handshake_failures_total", float64(n.(*atomic.Int64).Load()), labels...)
		}
	}
	p.family("socksfwd_upstream_handshake_seconds", "histogram", "Time from the start of a try to the proxy's success reply (connect, negotiation, request).")
	s.tel.handshakes.WritePrometheus(p.w)
}
