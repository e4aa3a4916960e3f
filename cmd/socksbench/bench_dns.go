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

// benchDNS: dnsperf with 8 concurrent clients against dnsmasq directly and
// through socksfwd --dns → Dante, over the tcp and udp transports with
// unique names (the cache cannot help), and with a repeating set of names
// (cache hits).
func benchDNS(h *harness, cfg benchConfig) {
	dnsperf := peertest.Require(h, "dnsperf")
	dante := peertest.Dante(h, peertest.DanteOptions{})
	resolver := peertest.DnsmasqWildcard(h, "bench.test", "192.0.2.7")

	dir := h.TempDir()
	unique := filepath.Join(dir, "unique.txt")
	repeat := filepath.Join(dir, "repeat.txt")
	var ub, rb strings.Builder
	for i := range 500_000 {
		fmt.Fprintf(&ub, "u%d.bench.test A\n", i)
	}
	for i := range 100 {
		fmt.Fprintf(&rb, "r%d.bench.test A\n", i)
	}
	os.WriteFile(unique, []byte(ub.String()), 0o644)
	os.WriteFile(repeat, []byte(rb.String()), 0o644)

	forward := func(transport string) string {
		addr := freeAddr(h)
		p := peertest.Start(h, "socksfwd", cfg.socksfwd, "--dns", addr, "--dns-upstream", resolver.Addr,
			"--dns-transport", transport, "-S", dante.Addr, "--log-format", "json")
		peertest.WaitOutput(h, p, "DNS on")
		return addr
	}
	viaTCP, viaUDP := forward("tcp"), forward("udp")

	type run struct {
		name, way, addr, file string
		bar                   float64
	}
	for _, r := range []run{
		{"dns-unique-names", "direct", resolver.Addr, unique, 0},
		{"dns-unique-names", "socksfwd-tcp", viaTCP, unique, 15000},
		{"dns-unique-names", "socksfwd-udp", viaUDP, unique, 7000},
		{"dns-cache-hits", "direct", resolver.Addr, repeat, 0},
		{"dns-cache-hits", "socksfwd-tcp", viaTCP, repeat, 45000},
	} {
		cpu := startCPU()
		qps, lost, lat := dnsperfRun(h, dnsperf, r.addr, r.file, cfg.seconds)
		verdict := ""
		if r.bar > 0 {
			verdict = barText(qps >= r.bar && (r.name != "dns-unique-names" || r.way != "socksfwd-tcp" || lost == 0),
				fmt.Sprintf("≥ %.0f q/s", r.bar))
		}
		fmt.Printf("%-26s %-12s %8.0f q/s  avg latency %6.2f ms  lost %d  busiest: %s%s\n",
			r.name, r.way, qps, lat*1000, lost, cpu.busiest(), verdict)
	}
}

var (
	reQPS  = regexp.MustCompile(`Queries per second:\s+([0-9.]+)`)
	reLost = regexp.MustCompile(`Queries lost:\s+([0-9]+)`)
	reLat  = regexp.MustCompile(`Average Latency \(s\):\s+([0-9.]+)`)
)

// dnsperfRun runs dnsperf with 8 clients and returns queries per second,
// lost queries and the average latency in seconds.
func dnsperfRun(h *harness, dnsperf, addr, file string, secs int) (qps float64, lost int, lat float64) {
	host, port, _ := net.SplitHostPort(addr)
	out, err := exec.Command(dnsperf, "-s", host, "-p", port, "-d", file, "-c", "8", "-l", strconv.Itoa(secs), "-q", "200").CombinedOutput()
	if err != nil {
		h.Fatalf("dnsperf: %v\n%s", err, out)
	}
	num := func(re *regexp.Regexp) string {
		m := re.FindSubmatch(out)
		if m == nil {
			h.Fatalf("dnsperf output without %s:\n%s", re, out)
		}
		return string(m[1])
	}
	qps, _ = strconv.ParseFloat(num(reQPS), 64)
	lost, _ = strconv.Atoi(num(reLost))
	lat, _ = strconv.ParseFloat(num(reLat), 64)
	return qps, lost, lat
}
