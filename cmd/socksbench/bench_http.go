//go:build linux

package main

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"

	"github.com/socksfwd/socksfwd/internal/peertest"
	"github.com/socksfwd/socksfwd/internal/testnet"
)

// The --http door's bars: a CONNECT tunnel carries at least 0.95 of what
// the -L path carries, and it opens new connections at least 1.5 times
// as fast as privoxy and 1.2 times as fast as gost's HTTP listener.
const (
	httpThroughputBar   = 0.95
	httpConnsPrivoxyBar = 1.5
	httpConnsGostBar    = 1.2
)

// The ways a client reaches the target through Dante in the HTTP rows.
const (
	wayForward = "socksfwd-L"    // socksfwd -L, a plain TCP forward
	wayHTTP    = "socksfwd-http" // socksfwd --http, by CONNECT
	wayPrivoxy = "privoxy"       // privoxy with forward-socks5t, by CONNECT
	wayGost    = "gost-http"     // gost -L http://, by CONNECT
)

// benchHTTP: the --http door through Dante, same run as its baselines.
// Throughput: iperf3 (which cannot use a proxy) through a socat relay in
// front of each way, a plain one for -L and one that opens the tunnel by
// CONNECT (socat's PROXY address) for the HTTP proxies, so every way
// pays for the same extra hop. New connections per second: the connrate
// client, which sends CONNECT itself for the HTTP proxies.
func benchHTTP(h *harness, cfg benchConfig) {
	iperf := peertest.Require(h, "iperf3")
	socat := peertest.Require(h, "socat")
	privoxy := peertest.Require(h, "privoxy")
	connrate := h.connrate()
	fmt.Printf("socksbench: --http door, median of %d interleaved rounds, %d s per run, proxies → %s\n", rounds, cfg.seconds, peertest.Versions()[0])
	ways := []string{wayForward, wayHTTP, wayPrivoxy}
	gost := lookGost() // an optional extra way
	if gost != "" {
		ways = append(ways, wayGost)
	}

	// Dante on a CPU of its own, as in the TCP rows.
	cpus := newCPUSplit(h)
	cpus.rest()
	defer cpus.all()

	dante := cpus.dante(peertest.DanteOptions{})
	iperfAddr := h.iperfServer(iperf)
	fronts := map[string]string{}
	fwd, _ := h.socksfwd(cfg.socksfwd, iperfAddr, dante.Addr)
	fronts[wayForward] = h.socatRelay(socat, "TCP:"+fwd)
	for _, way := range ways[1:] {
		proxy, _ := h.httpProxy(way, cfg.socksfwd, privoxy, gost, dante.Addr)
		fronts[way] = h.socatRelay(socat, socatProxy(proxy, iperfAddr))
	}
	for _, streams := range []int{1, 4} {
		rows := measure(ways, func(way string, m *meter) float64 {
			return m.timed(cfg.seconds, func() float64 { return iperfGbps(h, nil, iperf, fronts[way], streams, cfg.seconds) })
		})
		reportHTTP(fmt.Sprintf("http-connect-throughput-%dstream", streams), "Gbit/s", rows,
			[]httpBar{{wayForward, httpThroughputBar}, {wayPrivoxy, 0}, {wayGost, 0}})
	}

	// Fresh servers for every run, as in the TCP connection-rate row.
	rows := measure(ways, func(way string, m *meter) float64 {
		echo := testnet.Echo(h).Addr().String()
		d := cpus.dante(peertest.DanteOptions{})
		defer d.Proc.Stop()
		if way == wayForward {
			fwd, p := h.socksfwd(cfg.socksfwd, echo, d.Addr)
			defer p.Stop()
			return m.timed(cfg.seconds, func() float64 { return connRate(h, nil, connrate, fwd, cfg.seconds) })
		}
		proxy, p := h.httpProxy(way, cfg.socksfwd, privoxy, gost, d.Addr)
		defer p.Stop()
		return m.timed(cfg.seconds, func() float64 { return connRate(h, nil, connrate, proxy, cfg.seconds, echo) })
	})
	reportHTTP(fmt.Sprintf("http-new-conns-%dthreads", connThreads), "conn/s", rows,
		[]httpBar{{wayPrivoxy, httpConnsPrivoxyBar}, {wayGost, httpConnsGostBar}, {wayForward, 0}})
}

// httpBar is a way socksfwd --http (or -D) is compared with, and the
// ratio it must reach (0: shown without a bar).
type httpBar struct {
	way string
	bar float64
}

// reportHTTP prints the --http rows: socksfwd --http against bars.
func reportHTTP(name, unit string, rows []result, bars []httpBar) {
	reportAgainst(name, unit, rows, wayHTTP, bars)
}

// reportAgainst prints each way's median, then subject's ratio to each
// way of bars, the median of per-round ratios, with its bar. A way that
// did not run (gost without a binary) is left out.
func reportAgainst(name, unit string, rows []result, subject string, bars []httpBar) {
	byWay := map[string]result{}
	parts := make([]string, 0, len(rows))
	for _, r := range rows {
		byWay[r.way] = r
		parts = append(parts, fmt.Sprintf("%s %.1f %s", r.way, r.value, unit))
	}
	line := fmt.Sprintf("%-26s %s", name, strings.Join(parts, " | "))
	for _, b := range bars {
		base, ok := byWay[b.way]
		if !ok {
			continue
		}
		text, ratio := pairedText(subject, byWay[subject], b.way, base)
		line += text
		if b.bar > 0 {
			line += barText(ratio >= b.bar, fmt.Sprintf("≥ %.2f", b.bar))
		}
	}
	for _, r := range rows {
		if r.busy != "" {
			line += fmt.Sprintf("\n%-26s   busiest via %s: %s", "", r.way, r.busy)
		}
	}
	fmt.Println(line + cpuLine(unit, rows))
}

// httpProxy starts the HTTP proxy of way (one of the CONNECT ways) on a
// free port, forwarding through the SOCKS5 proxy dante, and returns its
// address.
func (h *harness) httpProxy(way, socksfwd, privoxy, gost, dante string) (string, *peertest.Proc) {
	if way == wayGost {
		return h.gostProxy(gost, "http", dante)
	}
	addr := freeAddr(h)
	var p *peertest.Proc
	switch way {
	case wayHTTP:
		p = peertest.Start(h, "socksfwd", socksfwd, "--http", addr, "-S", dante, "--log-format", "json")
		peertest.WaitOutput(h, p, `"message":"HTTP proxy on `)
		return addr, p
	case wayPrivoxy:
		p = h.privoxy(privoxy, addr, dante)
	default:
		h.Fatalf("no HTTP proxy for way %q", way)
	}
	peertest.WaitTCP(h, p, addr)
	return addr, p
}

// privoxy runs privoxy on addr, forwarding everything through the SOCKS5
// proxy with forward-socks5t (names go to the proxy). Its default lets
// CONNECT reach port 443 only: an action file opens every port.
func (h *harness) privoxy(bin, addr, proxy string) *peertest.Proc {
	dir := h.TempDir()
	write := func(name, content string) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
			h.Fatalf("%v", err)
		}
		return path
	}
	write("bench.action", "{+limit-connect{-}}\n/\n")
	conf := write("config", fmt.Sprintf(`confdir %s
actionsfile bench.action
listen-address %s
forward-socks5t / %s .
toggle 0
max-client-connections 4096
keep-alive-timeout 5
socket-timeout 300
`, dir, addr, proxy))
	return peertest.Start(h, "privoxy", bin, "--no-daemon", conf)
}

// socatRelay runs socat relaying each connection to a free loopback port
// on to dest (a socat address), and returns that port's address. Its
// readiness is its own "listening" line: a probe connection would reach
// the target through it, and iperf3 takes any connection as a test.
func (h *harness) socatRelay(socat, dest string) string {
	addr := freeAddr(h)
	_, port, _ := net.SplitHostPort(addr)
	p := peertest.Start(h, "socat", socat, "-d", "-d", "-b", "131072",
		"TCP-LISTEN:"+port+",bind=127.0.0.1,fork,reuseaddr", dest)
	peertest.WaitOutput(h, p, "listening on")
	return addr
}

// socatProxy is socat's address for a tunnel to target opened with
// CONNECT through the HTTP proxy at proxy.
func socatProxy(proxy, target string) string {
	pHost, pPort, _ := net.SplitHostPort(proxy)
	tHost, tPort, _ := net.SplitHostPort(target)
	return fmt.Sprintf("PROXY:%s:%s:%s,proxyport=%s", pHost, tHost, tPort, pPort)
}
