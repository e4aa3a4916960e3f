//go:build linux

package main

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
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

// reportAdmin prints the cost of --admin: the median of the per-round
// ratios of socksfwd-admin to socksfwd, run back to back in each round.
func reportAdmin(name string, rows []result) {
	var with, without *result
	for i := range rows {
		switch rows[i].way {
		case "socksfwd-admin":
			with = &rows[i]
		case "socksfwd":
			without = &rows[i]
		}
	}
	if with == nil || without == nil {
		return
	}
	var rs []float64
	var each []string
	for i, v := range with.rounds {
		if i < len(without.rounds) && without.rounds[i] > 0 {
			rs = append(rs, v/without.rounds[i])
			each = append(each, fmt.Sprintf("%.2f", v/without.rounds[i]))
		}
	}
	if len(rs) == 0 {
		return
	}
	ratio := median(rs)
	fmt.Printf("%-26s socksfwd-admin %.1f | socksfwd %.1f | socksfwd-admin/socksfwd = %.3f (rounds %s)%s\n",
		name, with.value, without.value, ratio, strings.Join(each, " "), barText(ratio >= adminBar, fmt.Sprintf("≥ %.2f", adminBar)))
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

// benchAdminCPU prices --admin by socksfwd's own CPU time, the measure a
// noisy machine does not blur: per gigabyte relayed (iperf3 -n) and per
// thousand connections (connrate), with --admin and scraped every second
// against without, interleaved.
func benchAdminCPU(h *harness, cfg benchConfig, iperf, target, proxy string, cpus cpuSplit, connrate string) {
	// One connection-rate run, with fresh servers as in the
	// connection-rate row: the connections made and socksfwd's CPU
	// milliseconds.
	connRun := func(withAdmin bool) (float64, int) {
		d := cpus.dante(peertest.DanteOptions{})
		defer d.Proc.Stop()
		echo := testnet.Echo(h).Addr().String()
		extra := []string{}
		admin := ""
		if withAdmin {
			admin = freeAddr(h)
			extra = append(extra, "--admin", admin)
		}
		fwd, p := h.socksfwd(cfg.socksfwd, echo, d.Addr, extra...)
		defer p.Stop()
		if admin != "" {
			defer scrapeWhile(h, admin)()
		}
		before := cpuMillis(h, p.Pid())
		r := connRate(h, nil, connrate, fwd, cfg.seconds)
		return r * float64(cfg.seconds), cpuMillis(h, p.Pid()) - before
	}
	const gigabytes, cpuRounds = 4, 7
	var perGB, perConn [2][]float64 // [0] without, [1] with --admin
	for round := range cpuRounds {
		// Alternate which goes first: the second run of a pair was seen
		// to pay for the first (a warm iperf3 server, a cooler CPU).
		for k := range 2 {
			with := (k + round) % 2
			extra := []string{}
			admin := ""
			if with == 1 {
				admin = freeAddr(h)
				extra = append(extra, "--admin", admin)
			}
			fwd, p := h.socksfwd(cfg.socksfwd, target, proxy, extra...)
			stop := func() {}
			if admin != "" {
				stop = scrapeWhile(h, admin)
			}
			before := cpuMillis(h, p.Pid())
			host, port, _ := net.SplitHostPort(fwd)
			if out, err := exec.Command(iperf, "-c", host, "-p", port, "-n", strconv.Itoa(gigabytes)+"G", "-J").Output(); err != nil {
				h.Fatalf("iperf3 -n %dG: %v\n%s", gigabytes, err, out)
			}
			perGB[with] = append(perGB[with], float64(cpuMillis(h, p.Pid())-before)/gigabytes)
			stop()
			p.Stop()

			conns, ms := connRun(with == 1)
			perConn[with] = append(perConn[with], float64(ms)/conns*1000)
		}
	}
	for _, row := range []struct {
		name, unit string
		v          [2][]float64
	}{{"admin-cpu-per-gb", "ms per GB relayed", perGB}, {"admin-cpu-per-1000-conns", "ms per 1000 connections", perConn}} {
		var rs []float64
		var each []string
		for i := range row.v[1] {
			if row.v[0][i] > 0 {
				rs = append(rs, row.v[1][i]/row.v[0][i])
				each = append(each, fmt.Sprintf("%.2f", row.v[1][i]/row.v[0][i]))
			}
		}
		ratio := median(rs)
		fmt.Printf("%-26s socksfwd CPU %s: --admin %.0f | without %.0f | admin/without = %.3f (rounds %s)%s\n",
			row.name, row.unit, median(row.v[1]), median(row.v[0]), ratio, strings.Join(each, " "),
			barText(ratio <= adminCPUBar, fmt.Sprintf("≤ %.2f", adminCPUBar)))
	}
}

// benchAdminOnly is benchAdminCPU alone (socksbench bench-admin), with the
// servers bench would have started for it.
func benchAdminOnly(h *harness, cfg benchConfig) {
	iperf := peertest.Require(h, "iperf3")
	connrate := buildConnrate(h, peertest.Require(h, "cc"))
	cpus := newCPUSplit(h)
	cpus.rest()
	defer cpus.all()
	dante := cpus.dante(peertest.DanteOptions{})
	port := peertest.FreePort(h)
	srv := peertest.Start(h, "iperf3 -s", iperf, "-s", "-p", strconv.Itoa(port), "--forceflush")
	peertest.WaitOutput(h, srv, "Server listening")
	benchAdminCPU(h, cfg, iperf, "127.0.0.1:"+strconv.Itoa(port), dante.Addr, cpus, connrate)
}
