//go:build linux

package main

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"github.com/socksfwd/socksfwd/internal/peertest"
)

// The DNS bars, against the resolver's own rate in the same run: a query
// forwarded uncached over the tcp transport (through Dante) at 30 % of
// what unbound answers directly, with none lost; a cache hit answered at
// least as fast as unbound answers from its own data.
const (
	dnsUncachedBar = 0.30
	dnsCachedBar   = 1.0
)

// benchDNS: dnsperf with 8 concurrent clients against unbound (one thread)
// directly and through socksfwd --dns → Dante, over the tcp and udp
// transports with unique names (the cache cannot help), and with a
// repeating set of names (cache hits); then the SERVFAIL count when
// dnsmasq closes pipelined connections under load. unbound is the
// resolver of the rate rows because dnsmasq forks for every TCP
// connection and would set their pace.
func benchDNS(h *harness, cfg benchConfig) {
	dnsperf := peertest.Require(h, "dnsperf")
	dante := peertest.Dante(h, peertest.DanteOptions{})
	resolver := peertest.UnboundWildcard(h, "bench.test", "192.0.2.7")
	closingResolver := peertest.DnsmasqWildcard(h, "bench.test", "192.0.2.7")

	dir := h.TempDir()
	unique := filepath.Join(dir, "unique.txt")
	repeat := filepath.Join(dir, "repeat.txt")
	closing := filepath.Join(dir, "closing.txt")
	writeNames(h, unique, "u", 500_000)
	writeNames(h, repeat, "r", 100)
	writeNames(h, closing, "c", 500_000) // names no earlier row has cached

	forward := func(upstream, transport string, extra ...string) string {
		addr := freeAddr(h)
		p := peertest.Start(h, "socksfwd", append([]string{cfg.socksfwd, "--dns", addr, "--dns-upstream", upstream,
			"--dns-transport", transport, "-S", dante.Addr, "--log-format", "json"}, extra...)...)
		peertest.WaitOutput(h, p, "DNS on")
		return addr
	}
	// The tcp forwarder's /metrics is checked against dnsperf's totals.
	admin := freeAddr(h)
	viaTCP, viaUDP := forward(resolver.Addr, "tcp", "--admin", admin), forward(resolver.Addr, "udp")

	type run struct {
		name, way, addr, file string
		bar                   float64 // of the direct rate of the same name
	}
	direct := map[string]float64{}
	for _, r := range []run{
		{"dns-unique-names", "direct", resolver.Addr, unique, 0},
		{"dns-unique-names", "socksfwd-tcp", viaTCP, unique, dnsUncachedBar},
		{"dns-unique-names", "socksfwd-udp", viaUDP, unique, 0},
		{"dns-cache-hits", "direct", resolver.Addr, repeat, 0},
		{"dns-cache-hits", "socksfwd-tcp", viaTCP, repeat, dnsCachedBar},
		{"dns-cache-hits", "socksfwd-udp", viaUDP, repeat, dnsCachedBar},
	} {
		var q0 float64
		var r0 map[string]float64
		if r.addr == viaTCP {
			q0, r0 = dnsCounts(h, admin, viaTCP)
		}
		cpu := startCPU()
		out := dnsperfOutput(h, dnsperf, r.addr, r.file, cfg.seconds)
		spent := cpu.spent()
		qps, lost, lat := dnsperfResult(out)
		completed, _ := strconv.ParseFloat(dnsperfField(h, out, reCompleted), 64)
		ratio := ""
		if r.way == "direct" {
			direct[r.name] = qps
		} else if base := direct[r.name]; base > 0 {
			ratio = fmt.Sprintf("  %s/direct = %.3f", r.way, qps/base)
			if r.bar > 0 {
				ok := qps >= r.bar*base && (r.name != "dns-unique-names" || lost == 0)
				ratio += barText(ok, fmt.Sprintf("≥ %.2f× unbound direct", r.bar))
			}
		}
		fmt.Printf("%-26s %-12s %8.0f q/s  avg latency %6.2f ms  lost %d  busiest: %s%s%s\n",
			r.name, r.way, qps, lat*1000, lost, cpu.busiestIn(spent), dnsPerQuery(spent, r.way, completed, lost), ratio)
		if r.addr == viaTCP {
			q1, r1 := dnsCounts(h, admin, viaTCP)
			reportDNSMetrics(h, r.name, out, q0, q1, r0, r1)
		}
	}
	benchDNSClosing(h, dnsperf, closingResolver.Addr, forward(closingResolver.Addr, "tcp"), closing, cfg.seconds)
}

// benchDNSClosing: DNS through a resolver that closes pipelined
// connections, 200 in flight. dnsmasq answers 100 queries on a TCP
// connection and closes it, stranding whatever else was in flight on it;
// socksfwd's tcp transport must send those again, so that no client sees
// a SERVFAIL (the bar). The baseline is the same load straight to dnsmasq
// over UDP: the SERVFAILs the resolver itself gives.
func benchDNSClosing(h *harness, dnsperf, direct, viaTCP, names string, secs int) {
	for _, r := range []struct{ way, addr string }{{"direct", direct}, {"socksfwd-tcp", viaTCP}} {
		cpu := startCPU()
		out := dnsperfOutput(h, dnsperf, r.addr, names, secs)
		spent := cpu.spent()
		qps, _ := strconv.ParseFloat(dnsperfField(h, out, reQPS), 64)
		lost, _ := strconv.Atoi(dnsperfField(h, out, reLost))
		completed, _ := strconv.Atoi(dnsperfField(h, out, reCompleted))
		servfail := 0
		if m := reServFail.FindSubmatch(out); m != nil {
			servfail, _ = strconv.Atoi(string(m[1]))
		}
		verdict := ""
		if r.way != "direct" {
			verdict = barText(servfail == 0 && lost == 0, "0 SERVFAIL, 0 lost")
		}
		fmt.Printf("%-26s %-12s %8.0f q/s  SERVFAIL %d of %d answered  lost %d%s%s\n",
			"dns-closing-resolver-200", r.way, qps, servfail, completed, lost, dnsPerQuery(spent, r.way, float64(completed), lost), verdict)
	}
}

// dnsPerQuery is a DNS row's CPU per query answered: the forwarder's, or
// for direct dnsperf's own, but only when nothing was lost, as dnsperf
// then waits out each lost query's timeout, busy, after the run.
func dnsPerQuery(s cpuSpent, way string, completed float64, lost int) string {
	if _, client := wayProcess(way); client && lost > 0 {
		return "  (client CPU left out: dnsperf waits out lost queries)"
	}
	return perItem(s, way, "query", completed)
}

// writeNames writes n unique A queries under bench.test for dnsperf.
func writeNames(h *harness, path, prefix string, n int) {
	var b strings.Builder
	for i := range n {
		fmt.Fprintf(&b, "%s%d.bench.test A\n", prefix, i)
	}
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		h.Fatalf("%v", err)
	}
}

var (
	reQPS       = regexp.MustCompile(`Queries per second:\s+([0-9.]+)`)
	reLost      = regexp.MustCompile(`Queries lost:\s+([0-9]+)`)
	reCompleted = regexp.MustCompile(`Queries completed:\s+([0-9]+)`)
	reLat       = regexp.MustCompile(`Average Latency \(s\):\s+([0-9.]+)`)
	reServFail  = regexp.MustCompile(`Response codes:.*SERVFAIL ([0-9]+)`)
)

// dnsperfResult reads queries per second, lost queries and the average
// latency in seconds from dnsperf's report.
func dnsperfResult(out []byte) (qps float64, lost int, lat float64) {
	field := func(re *regexp.Regexp) string {
		if m := re.FindSubmatch(out); m != nil {
			return string(m[1])
		}
		return ""
	}
	qps, _ = strconv.ParseFloat(field(reQPS), 64)
	lost, _ = strconv.Atoi(field(reLost))
	lat, _ = strconv.ParseFloat(field(reLat), 64)
	return qps, lost, lat
}

// dnsperfOutput runs dnsperf with 8 clients and 200 queries in flight and
// returns its report.
func dnsperfOutput(h *harness, dnsperf, addr, file string, secs int) []byte {
	host, port, _ := net.SplitHostPort(addr)
	out, err := exec.Command(dnsperf, "-s", host, "-p", port, "-d", file, "-c", "8", "-l", strconv.Itoa(secs), "-q", "200").CombinedOutput()
	if err != nil {
		h.Fatalf("dnsperf: %v\n%s", err, out)
	}
	return out
}

// dnsperfField is the first group of re in dnsperf's report.
func dnsperfField(h *harness, out []byte, re *regexp.Regexp) string {
	m := re.FindSubmatch(out)
	if m == nil {
		h.Fatalf("dnsperf output without %s:\n%s", re, out)
	}
	return string(m[1])
}
