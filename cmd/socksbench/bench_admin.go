//go:build linux

package main

import (
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/socksfwd/socksfwd/internal/peertest"
	"github.com/socksfwd/socksfwd/internal/testnet"
)

// adminBar: a socksfwd with --admin, scraped every second as Prometheus
// would, may cost at most 3 % of what the same binary does without it.
const adminBar = 0.97

// adminCPUBar is the same bar for socksfwd's own CPU time: at most 3 %
// more with --admin.
const adminCPUBar = 1.03

// scrapeWhile fetches http://addr/metrics every second until stop is
// called, as a Prometheus server would; a failed scrape fails the bench.
func scrapeWhile(h *harness, addr string) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			if _, err := scrape(addr); err != nil {
				h.Fatalf("scraping %s: %v", addr, err)
			}
			select {
			case <-done:
				return
			case <-tick.C:
			}
		}
	})
	return func() { close(done); wg.Wait() }
}

// scrape returns /metrics as text.
func scrape(addr string) (string, error) {
	c := &http.Client{Timeout: 10 * time.Second}
	resp, err := c.Get("http://" + addr + "/metrics")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err == nil && resp.StatusCode != http.StatusOK {
		err = fmt.Errorf("status %s", resp.Status)
	}
	return string(b), err
}

// metricValue is the value of the series written exactly as series, 0
// when absent.
func metricValue(text, series string) float64 {
	for _, line := range strings.Split(text, "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			f, _ := strconv.ParseFloat(v, 64)
			return f
		}
	}
	return 0
}

var (
	reSent      = regexp.MustCompile(`Queries sent:\s+([0-9]+)`)
	reRcodes    = regexp.MustCompile(`Response codes:\s+(.*)`)
	reRcodePart = regexp.MustCompile(`([A-Z]+) ([0-9]+) \(`)
)

// dnsCounts is what /metrics says of the DNS listener on addr: queries
// (all transports) and responses by RCODE name, upper case as dnsperf
// writes them.
func dnsCounts(h *harness, admin, listener string) (queries float64, responses map[string]float64) {
	text, err := scrape(admin)
	if err != nil {
		h.Fatalf("scraping %s: %v", admin, err)
	}
	lab := fmt.Sprintf("listener=%q", listener)
	queries = metricValue(text, "socksfwd_dns_queries_total{"+lab+`,transport="udp"}`) +
		metricValue(text, "socksfwd_dns_queries_total{"+lab+`,transport="tcp"}`)
	responses = map[string]float64{}
	prefix := "socksfwd_dns_responses_total{" + lab + `,rcode="`
	for _, line := range strings.Split(text, "\n") {
		rest, ok := strings.CutPrefix(line, prefix)
		if !ok {
			continue
		}
		rcode, value, _ := strings.Cut(rest, `"} `)
		responses[strings.ToUpper(rcode)], _ = strconv.ParseFloat(value, 64)
	}
	return queries, responses
}

// reportDNSMetrics compares what /metrics counted over one dnsperf run
// (before and after) with dnsperf's own totals: queries sent, and
// responses by RCODE. The bar is an exact match.
func reportDNSMetrics(h *harness, name string, out []byte, q0, q1 float64, r0, r1 map[string]float64) {
	sent, _ := strconv.ParseFloat(dnsperfField(h, out, reSent), 64)
	want := map[string]float64{}
	if m := reRcodes.FindSubmatch(out); m != nil {
		for _, p := range reRcodePart.FindAllSubmatch(m[1], -1) {
			want[string(p[1])], _ = strconv.ParseFloat(string(p[2]), 64)
		}
	}
	ok := q1-q0 == sent
	parts := []string{fmt.Sprintf("queries %.0f (dnsperf sent %.0f)", q1-q0, sent)}
	for rcode, n := range want {
		got := r1[rcode] - r0[rcode]
		ok = ok && got == n
		parts = append(parts, fmt.Sprintf("%s %.0f (dnsperf %.0f)", rcode, got, n))
	}
	for rcode, n := range r1 {
		if _, seen := want[rcode]; !seen && n-r0[rcode] != 0 {
			ok = false
			parts = append(parts, fmt.Sprintf("%s %.0f (dnsperf none)", rcode, n-r0[rcode]))
		}
	}
	fmt.Printf("%-26s socksfwd-tcp /metrics: %s%s\n", name, strings.Join(parts, ", "), barText(ok, "counts = dnsperf's"))
}

// benchAdmin prices --admin: the same binary with it (and scraped every
// second, as Prometheus would) against without, in pairs, the order
// alternating from pair to pair. Each pair measures TCP throughput (one
// iperf3 stream) and new connections per second, and socksfwd's own CPU
// time per gigabyte and per thousand connections in the same runs: the
// rates are what the bar is about, the CPU times what a noisy machine
// blurs least. More pairs than the other rows, for a 3 % bar.
func benchAdmin(h *harness, cfg benchConfig, iperf, target, proxy string, cpus cpuSplit, connrate string) {
	const pairs = 9
	start := func(upstreamTarget, proxy string, withAdmin bool) (string, *peertest.Proc, func()) {
		extra, admin := []string{}, ""
		if withAdmin {
			admin = freeAddr(h)
			extra = append(extra, "--admin", admin)
		}
		fwd, p := h.socksfwd(cfg.socksfwd, upstreamTarget, proxy, extra...)
		stop := func() {}
		if withAdmin {
			stop = scrapeWhile(h, admin)
		}
		return fwd, p, func() { stop(); p.Stop() }
	}
	var gbps, perGB, cps, perKConn [2][]float64 // [0] without, [1] with --admin
	for pair := range pairs {
		for k := range 2 {
			with := (k + pair) % 2
			fwd, p, stop := start(target, proxy, with == 1)
			before := cpuMillis(h, p.Pid())
			g := iperfGbps(h, nil, iperf, fwd, 1, cfg.seconds)
			ms := cpuMillis(h, p.Pid()) - before
			stop()
			gbps[with] = append(gbps[with], g)
			perGB[with] = append(perGB[with], float64(ms)/(g*float64(cfg.seconds)/8))

			// Fresh servers for connections, as in the connection-rate row.
			d := cpus.dante(peertest.DanteOptions{})
			echo := testnet.Echo(h).Addr().String()
			fwd, p, stop = start(echo, d.Addr, with == 1)
			before = cpuMillis(h, p.Pid())
			r := connRate(h, nil, connrate, fwd, cfg.seconds)
			ms = cpuMillis(h, p.Pid()) - before
			stop()
			d.Proc.Stop()
			cps[with] = append(cps[with], r)
			perKConn[with] = append(perKConn[with], float64(ms)/(r*float64(cfg.seconds))*1000)
		}
	}
	line := func(name, unit string, v [2][]float64, higherIsBetter bool) {
		ratio, each := pairedRatio(result{rounds: v[1]}, result{rounds: v[0]})
		ok, bar := ratio >= adminBar, fmt.Sprintf("≥ %.2f", adminBar)
		if !higherIsBetter {
			ok, bar = ratio <= adminCPUBar, fmt.Sprintf("≤ %.2f", adminCPUBar)
		}
		fmt.Printf("%-26s %s: --admin %.1f | without %.1f | admin/without = %.3f (pairs %s)%s\n",
			name, unit, median(v[1]), median(v[0]), ratio, strings.Join(each, " "), barText(ok, bar))
	}
	line("admin-tcp-throughput", "Gbit/s, 1 stream", gbps, true)
	line("admin-tcp-throughput", "socksfwd CPU ms per GB", perGB, false)
	line("admin-new-conns", "conn/s, 8 threads", cps, true)
	line("admin-new-conns", "socksfwd CPU ms per 1000 conns", perKConn, false)
}

// benchAdminOnly is benchAdmin alone (socksbench bench-admin), with the
// servers bench would have started for it.
func benchAdminOnly(h *harness, cfg benchConfig) {
	iperf := peertest.Require(h, "iperf3")
	connrate := h.connrate()
	cpus := newCPUSplit(h)
	cpus.rest()
	defer cpus.all()
	dante := cpus.dante(peertest.DanteOptions{})
	benchAdmin(h, cfg, iperf, h.iperfServer(iperf), dante.Addr, cpus, connrate)
}
