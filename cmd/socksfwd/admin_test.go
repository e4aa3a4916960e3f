package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/miekg/dns"

	"github.com/socksfwd/socksfwd/internal/peertest"
	"github.com/socksfwd/socksfwd/internal/testnet"
	"github.com/socksfwd/socksfwd/socksclient"
	"github.com/socksfwd/socksfwd/socksclient/sockstest"
)

// scrape fetches /metrics, checks the whole text with lintMetrics and
// returns each series' value, keyed by the series as written.
func scrape(t *testing.T, admin string) map[string]float64 {
	t.Helper()
	body, code := get(t, admin, "/metrics")
	if code != http.StatusOK {
		t.Fatalf("/metrics: %d %s", code, body)
	}
	series, err := lintMetrics(body)
	if err != nil {
		t.Fatalf("/metrics does not lint: %v\n%s", err, body)
	}
	return series
}

// scrapeUntil scrapes until series reads want, for up to 10 s, and
// returns the last scrape. It is for a gauge that settles after the event
// a test can see: net/http lets a client connection go when it reads the
// client's close, or half a second after a Connection: close answer (it
// half-closes, then waits), and the active gauge counts it until then.
func scrapeUntil(t *testing.T, admin, series string, want float64) map[string]float64 {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		m := scrape(t, admin)
		if got, ok := m[series]; (ok && got == want) || time.Now().After(deadline) {
			return m
		}
		<-tick.C
	}
}

func get(t *testing.T, admin, path string) (string, int) {
	t.Helper()
	c := &http.Client{Timeout: 10 * time.Second}
	resp, err := c.Get("http://" + admin + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b), resp.StatusCode
}

// lintMetrics checks the Prometheus text format the way promtool check
// metrics does for what socksfwd writes: every socksfwd_ family has HELP
// text and a TYPE before its samples and appears once; counters end in
// _total; a sample belongs to the family announced before it (a
// histogram's as _bucket, _sum and _count); names and labels are valid;
// values parse; no series is written twice.
func lintMetrics(text string) (map[string]float64, error) {
	series := make(map[string]float64)
	families := make(map[string]string) // name → type
	var family, typ string
	sc := bufio.NewScanner(strings.NewReader(text))
	sc.Buffer(nil, 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "# HELP "):
			f := strings.SplitN(strings.TrimPrefix(line, "# HELP "), " ", 2)
			if len(f) < 2 || strings.TrimSpace(f[1]) == "" {
				return nil, fmt.Errorf("line %d: %s has no help text", n, f[0])
			}
			if _, dup := families[f[0]]; dup {
				return nil, fmt.Errorf("line %d: family %s appears twice", n, f[0])
			}
			family, typ = f[0], ""
			families[family] = ""
			continue
		case strings.HasPrefix(line, "# TYPE "):
			f := strings.Fields(strings.TrimPrefix(line, "# TYPE "))
			if len(f) != 2 || f[0] != family {
				return nil, fmt.Errorf("line %d: TYPE %q without its HELP", n, line)
			}
			switch f[1] {
			case "counter", "gauge", "histogram":
			default:
				return nil, fmt.Errorf("line %d: type %s", n, f[1])
			}
			if f[1] == "counter" && !strings.HasSuffix(family, "_total") {
				return nil, fmt.Errorf("line %d: counter %s does not end in _total", n, family)
			}
			typ = f[1]
			families[family] = typ
			continue
		case strings.HasPrefix(line, "#"), line == "":
			return nil, fmt.Errorf("line %d: unexpected %q", n, line)
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			return nil, fmt.Errorf("line %d: no value: %q", n, line)
		}
		name, value := line[:i], line[i+1:]
		if err := metrics.ValidateMetric(name); err != nil {
			return nil, fmt.Errorf("line %d: %v", n, err)
		}
		v, err := strconv.ParseFloat(value, 64)
		if err != nil {
			return nil, fmt.Errorf("line %d: value %q", n, value)
		}
		if _, dup := series[name]; dup {
			return nil, fmt.Errorf("line %d: series %s written twice", n, name)
		}
		series[name] = v
		base, _, _ := strings.Cut(name, "{")
		if !strings.HasPrefix(base, "socksfwd_") {
			continue // the Go runtime's and the process's, from the metrics package
		}
		owner := base
		if typ == "histogram" {
			for _, suffix := range []string{"_bucket", "_sum", "_count"} {
				owner = strings.TrimSuffix(owner, suffix)
			}
		}
		if owner != family || typ == "" {
			return nil, fmt.Errorf("line %d: sample %s outside its family (HELP/TYPE for %s)", n, name, family)
		}
	}
	return series, sc.Err()
}

// TestAdminMetricsAfterRealTraffic runs -L (TCP and UDP) and --dns through
// Dante to real services, then checks that /metrics counts exactly that
// traffic.
func TestAdminMetricsAfterRealTraffic(t *testing.T) {
	verifyNoLeaks(t)
	dante := peertest.Dante(t, peertest.DanteOptions{})
	dnsmasq := peertest.Dnsmasq(t, map[string]string{"app.socksfwd.test": "192.0.2.7"}, nil)
	echo := testnet.Echo(t).Addr().String()
	udpEcho := testnet.UDPEcho(t).LocalAddr().String()
	d := startDaemon(t, "-S", dante.Addr, "--log-level", "debug", "--udp-idle-timeout", "1s",
		"-L", "0:"+echo, "-L", "0:"+udpEcho+"/udp",
		"--dns", "0", "--dns-upstream", dnsmasq.Addr, "--admin", "0")
	d.waitFor("DNS on", 1)
	tcpL, udpL, dnsL, admin := d.listener("tcp"), d.listener("udp"), d.listener("dns"), d.listener("admin")

	const sessions, payload = 3, 1000
	msg := strings.Repeat("x", payload)
	for range sessions {
		if err := echoOnce(tcpL, msg); err != nil {
			t.Fatal(err)
		}
	}
	d.waitFor("session ended", sessions)

	const datagrams, dgSize = 5, 100
	c, err := net.Dial("udp", udpL)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 2048)
	for range datagrams { // one at a time: a lost one fails the test, not a count
		c.Write([]byte(strings.Repeat("u", dgSize)))
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if n, err := c.Read(buf); err != nil || n != dgSize {
			t.Fatalf("udp echo: %d bytes, %v", n, err)
		}
	}
	c.Close()
	d.waitFor("UDP session ended", 1)

	ask := func(network, name string, want int) {
		t.Helper()
		q := new(dns.Msg)
		q.SetQuestion(name, dns.TypeA)
		r, _, err := (&dns.Client{Net: network, Timeout: 10 * time.Second}).Exchange(q, dnsL)
		if err != nil || r.Rcode != want {
			t.Fatalf("%s %s: %v %v", network, name, r, err)
		}
	}
	for range 4 {
		ask("udp", "app.socksfwd.test.", dns.RcodeSuccess) // a miss, then hits
	}
	ask("tcp", "nx.socksfwd.test.", dns.RcodeNameError)

	m := scrape(t, admin)
	lab := func(listener, proto string, more ...string) string {
		s := fmt.Sprintf(`{listener=%q,proto=%q`, listener, proto)
		for i := 0; i+1 < len(more); i += 2 {
			s += fmt.Sprintf(`,%s=%q`, more[i], more[i+1])
		}
		return s + "}"
	}
	dnsLab := func(more ...string) string {
		s := fmt.Sprintf(`{listener=%q`, dnsL)
		for i := 0; i+1 < len(more); i += 2 {
			s += fmt.Sprintf(`,%s=%q`, more[i], more[i+1])
		}
		return s + "}"
	}
	up := fmt.Sprintf(`{upstream=%q}`, dante.Addr)
	want := map[string]float64{
		"socksfwd_sessions_total" + lab(tcpL, "tcp"):                                sessions,
		"socksfwd_sessions_active" + lab(tcpL, "tcp"):                               0,
		"socksfwd_sessions_failed_total" + lab(tcpL, "tcp"):                         0,
		"socksfwd_bytes_total" + lab(tcpL, "tcp", "direction", "up"):                sessions * payload,
		"socksfwd_bytes_total" + lab(tcpL, "tcp", "direction", "down"):              sessions * payload,
		"socksfwd_udp_sessions_total" + lab(udpL, "udp"):                            1,
		"socksfwd_udp_sessions_active" + lab(udpL, "udp"):                           0,
		"socksfwd_udp_received_total" + lab(udpL, "udp"):                            datagrams,
		"socksfwd_udp_datagrams_total" + lab(udpL, "udp", "direction", "up"):        datagrams,
		"socksfwd_udp_datagrams_total" + lab(udpL, "udp", "direction", "down"):      datagrams,
		"socksfwd_udp_bytes_total" + lab(udpL, "udp", "direction", "up"):            datagrams * dgSize,
		"socksfwd_udp_bytes_total" + lab(udpL, "udp", "direction", "down"):          datagrams * dgSize,
		"socksfwd_udp_dropped_total" + lab(udpL, "udp", "reason", "queue"):          0,
		"socksfwd_udp_dropped_total" + lab(udpL, "udp", "reason", "no_association"): 0,
		"socksfwd_dns_queries_total" + dnsLab("transport", "udp"):                   4,
		"socksfwd_dns_queries_total" + dnsLab("transport", "tcp"):                   1,
		"socksfwd_dns_responses_total" + dnsLab("rcode", "noerror"):                 4,
		"socksfwd_dns_responses_total" + dnsLab("rcode", "nxdomain"):                1,
		"socksfwd_dns_responses_total" + dnsLab("rcode", "servfail"):                0,
		"socksfwd_dns_cache_hits_total" + dnsLab():                                  3,
		"socksfwd_dns_cache_misses_total" + dnsLab():                                2,
		"socksfwd_dns_inflight" + dnsLab():                                          0,
		"socksfwd_upstream_up" + up:                                                 1,
		"socksfwd_reloads_total{result=\"ok\"}":                                     0,
		"socksfwd_listeners":                                                        4,
		"socksfwd_draining":                                                         0,
	}
	for k, v := range want {
		got, ok := m[k]
		if !ok {
			t.Errorf("no series %s", k)
			continue
		}
		if got != v {
			t.Errorf("%s = %v, want %v", k, got, v)
		}
	}
	// Three CONNECTs, one UDP ASSOCIATE, one DNS pool connection: every
	// try succeeded and was timed.
	if n := m["socksfwd_upstream_handshake_seconds_count"+up]; n < sessions+2 {
		t.Errorf("handshake histogram counted %v tries, want at least %d", n, sessions+2)
	}
	for k := range m {
		if strings.HasPrefix(k, "socksfwd_upstream_handshake_failures_total") {
			t.Errorf("a failure was counted: %s", k)
		}
	}

	if body, code := get(t, admin, "/readyz"); code != http.StatusOK {
		t.Errorf("/readyz after traffic: %d %s", code, body)
	}
	if body, code := get(t, admin, "/healthz"); code != http.StatusOK {
		t.Errorf("/healthz: %d %s", code, body)
	}
	if _, code := get(t, admin, "/debug/pprof/"); code != http.StatusNotFound {
		t.Errorf("/debug/pprof/ without --admin-pprof: %d, want 404", code)
	}
}

// listener is the address of the last listener of kind proto the start
// lines named.
func (d *daemon) listener(proto string) string {
	d.t.Helper()
	addr := ""
	for _, l := range d.linesWith("forwarding", "DNS on", "admin on", "transparent", "HTTP proxy on", "SOCKS5 server on") {
		if l["proto"] == proto {
			addr, _ = l["listener"].(string)
		}
	}
	if addr == "" {
		d.t.Fatalf("no %s listener in the log: %v", proto, d.dump())
	}
	return addr
}

// linesWith returns the log lines whose message starts with any of msgs.
func (d *daemon) linesWith(msgs ...string) []map[string]any {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []map[string]any
	for _, l := range d.lines {
		s, _ := l["message"].(string)
		for _, m := range msgs {
			if strings.HasPrefix(s, m) {
				out = append(out, l)
				break
			}
		}
	}
	return out
}

// TestAdminTwoUpstreamsAtOneAddress: two -S at one address (two
// accounts on one proxy) write no series twice.
func TestAdminTwoUpstreamsAtOneAddress(t *testing.T) {
	verifyNoLeaks(t)
	proxy := newSocks(t).Addr()
	d := startDaemon(t, "-S", "a:pw@"+proxy, "-S", "b:pw@"+proxy, "-L", "0:h:1", "--admin", "0")
	d.waitFor("admin on", 1)
	m := scrape(t, d.listener("admin")) // lints: no series twice
	for _, name := range []string{proxy, proxy + "#2"} {
		if _, ok := m[fmt.Sprintf("socksfwd_upstream_up{upstream=%q}", name)]; !ok {
			t.Errorf("no socksfwd_upstream_up for %s", name)
		}
	}
	d.stop()
}

// TestAdminSlowBody: a request that declares a body and never sends it
// is answered at once, not held until the body comes.
func TestAdminSlowBody(t *testing.T) {
	verifyNoLeaks(t)
	d := startDaemon(t, "-S", "127.0.0.1:1", "-L", "0:h:1", "--admin", "0")
	d.waitFor("admin on", 1)
	c, err := net.DialTimeout("tcp", d.listener("admin"), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(c, "GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
	if n, err := c.Read(make([]byte, 1)); n == 0 {
		t.Fatalf("no answer to a request whose body never came: %v", err)
	}
	d.stop()
}

// TestReadyzProbesUpstreamsAtOnce: with no traffic yet, a first upstream
// that takes the greeting and never answers (black-holed) does not make
// /readyz wait out its budget and say 503 while the second works: the
// upstreams are probed at once. Before, one after the other under one
// 5 s budget, the first spent it all.
func TestReadyzProbesUpstreamsAtOnce(t *testing.T) {
	verifyNoLeaks(t)
	hole, err := sockstest.NewServer(sockstest.Config{Fault: sockstest.FaultHangAfterGreeting})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { hole.Close() })
	socks := newSocks(t)
	echo := testnet.Echo(t).Addr().String()
	path := filepath.Join(t.TempDir(), "socksfwd.toml")
	conf := fmt.Sprintf("server = [%q, %q]\nlocal = [%q]\nadmin = \"0\"\n", hole.Addr(), socks.Addr(), "0:"+echo)
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	d := startDaemon(t, "-c", path)
	d.waitFor("admin on", 1)
	if body, code := get(t, d.listener("admin"), "/readyz"); code != http.StatusOK {
		t.Fatalf("/readyz: %d %q, want 200 from the working second upstream", code, body)
	}
}

// TestAdminReadiness: /readyz says 503 with the reason when every upstream
// is in backoff and while draining, and reloads are counted.
func TestAdminReadiness(t *testing.T) {
	verifyNoLeaks(t)
	dead := testnet.ClosedPort(t)
	socks := newSocks(t)
	echo := testnet.Echo(t).Addr().String()
	path := filepath.Join(t.TempDir(), "socksfwd.toml")
	conf := func(server string) string {
		return fmt.Sprintf("server = [%q]\nlocal = [%q]\nadmin = \"0\"\nadmin-pprof = true\n", server, "0:"+echo)
	}
	if err := os.WriteFile(path, []byte(conf(dead)), 0o600); err != nil {
		t.Fatal(err)
	}
	d := startDaemon(t, "-c", path)
	d.waitFor("admin on", 1)
	fwd, admin := d.listener("tcp"), d.listener("admin")
	if echoOnce(fwd, "x") == nil {
		t.Fatal("a session through a dead upstream worked")
	}
	body, code := get(t, admin, "/readyz")
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "backoff") || !strings.Contains(body, dead) {
		t.Errorf("/readyz with the only upstream dead: %d %q, want 503 naming the upstream in backoff", code, body)
	}
	m := scrape(t, admin)
	if n := m[fmt.Sprintf(`socksfwd_upstream_handshake_failures_total{upstream=%q,cause="connect_refused"}`, dead)]; n < 1 {
		t.Errorf("connect_refused failures = %v, want at least 1", n)
	}
	if m[fmt.Sprintf(`socksfwd_upstream_up{upstream=%q}`, dead)] != 0 {
		t.Errorf("the dead upstream is reported up")
	}
	if _, code := get(t, admin, "/debug/pprof/"); code != http.StatusOK {
		t.Errorf("/debug/pprof/ with --admin-pprof: %d", code)
	}

	// A reload to a working upstream: counted, and /readyz probes it.
	d.reload(path, conf(socks.Addr()), 1)
	m = scrape(t, admin)
	for series := range m {
		if strings.Contains(series, dead) {
			t.Errorf("the upstream the reload removed is still in /metrics: %s", series)
		}
	}
	if m[`socksfwd_reloads_total{result="ok"}`] != 1 || m["socksfwd_last_reload_success"] != 1 {
		t.Errorf("reloads: ok %v, last success %v; want 1, 1", m[`socksfwd_reloads_total{result="ok"}`], m["socksfwd_last_reload_success"])
	}
	if body, code := get(t, admin, "/readyz"); code != http.StatusOK {
		t.Errorf("/readyz with a working upstream and no traffic (a probe): %d %q", code, body)
	}

	// Draining: a session held open keeps the drain going; /readyz says so.
	held := hold(t, fwd)
	d.sigs <- syscall.SIGTERM
	d.waitFor("draining sessions", 1)
	body, code = get(t, admin, "/readyz")
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "draining") {
		t.Errorf("/readyz while draining: %d %q", code, body)
	}
	if err := held.finish(); err != nil {
		t.Error(err)
	}
}

// TestMaxSessions: beyond --max-sessions a connection is closed at once
// (no byte of it reaches the target) and counted; once a session ends
// there is room again. A reload changes the bound for new connections.
func TestMaxSessions(t *testing.T) {
	verifyNoLeaks(t)
	socks := newSocks(t)
	echo := testnet.Echo(t).Addr().String()
	d := startDaemon(t, "-S", socks.Addr(), "-L", "0:"+echo, "--max-sessions", "1", "--admin", "0", "--log-level", "debug")
	d.waitFor("admin on", 1)
	fwd, admin := d.listener("tcp"), d.listener("admin")
	held := hold(t, fwd)
	if err := echoOnce(fwd, "over the bound"); err == nil {
		t.Fatal("a second session was served with --max-sessions 1")
	}
	d.waitFor("connection rejected", 1)
	key := fmt.Sprintf(`socksfwd_sessions_rejected_total{listener=%q,proto="tcp",reason="max_sessions"}`, fwd)
	if n := scrape(t, admin)[key]; n != 1 {
		t.Errorf("%s = %v, want 1", key, n)
	}
	if err := held.finish(); err != nil {
		t.Fatal(err)
	}
	d.waitFor("session ended", 1)
	if err := echoOnce(fwd, "room again"); err != nil {
		t.Errorf("after the held session ended: %v", err)
	}
}

// TestObserveTargetTimeouts: a try cut short by another upstream's win is
// no failure; one that ran out of time while the proxy waited on the
// target counts as target_timeout, apart from the proxy's own timeouts
// (which counted them all, and paged for a healthy proxy whose target was
// dead).
func TestObserveTargetTimeouts(t *testing.T) {
	tel := newTelemetry()
	tel.observe(socksclient.Attempt{Proxy: "p:1080", Err: context.Canceled})
	tel.observe(socksclient.Attempt{Proxy: "p:1080", Err: context.DeadlineExceeded, WaitedOnTarget: true})
	tel.observe(socksclient.Attempt{Proxy: "p:1080", Err: context.DeadlineExceeded})
	got := map[failureCause]int64{}
	tel.upstream("p:1080").failures.Range(func(k, v any) bool { got[k.(failureCause)] = v.(*atomic.Int64).Load(); return true })
	if want := map[failureCause]int64{{cause: "target_timeout"}: 1, {cause: "timeout"}: 1}; !maps.Equal(got, want) {
		t.Errorf("failures %v, want %v", got, want)
	}
}
