//go:build linux

package main

import (
	"fmt"

	"github.com/socksfwd/socksfwd/internal/peertest"
	"github.com/socksfwd/socksfwd/internal/testnet"
)

// The -D door's bar: it opens new connections at least 1.2 times as fast
// as gost's SOCKS5 listener chained to the same proxy.
const socksConnsGostBar = 1.2

// The ways a SOCKS client reaches the target in the -D rows. The client
// is the same in each, a libc program under proxychains4: straight to
// Dante, or to a local SOCKS5 server chained to Dante.
const (
	wayStraight  = "proxychains4" // proxychains4 straight to Dante
	wayDoor      = "socksfwd-D"   // proxychains4 → socksfwd -D → Dante
	wayGostSOCKS = "gost-socks5"  // proxychains4 → gost -L socks5:// → Dante
)

// benchSOCKSDoor: the -D door through Dante, same run as its baselines.
// Throughput with iperf3 and new connections per second with connrate,
// each under proxychains4 pointed at the way's SOCKS5 server.
func benchSOCKSDoor(h *harness, cfg benchConfig) {
	iperf := peertest.Require(h, "iperf3")
	pc := peertest.Require(h, "proxychains4")
	connrate := h.connrate()
	ways := []string{wayDoor, wayStraight}
	gost := lookGost()
	if gost != "" {
		ways = append(ways, wayGostSOCKS)
	}
	fmt.Printf("socksbench: -D door, median of %d interleaved rounds, %d s per run, proxies → %s\n", rounds, cfg.seconds, peertest.Versions()[0])

	// Dante on a CPU of its own, as in the TCP rows.
	cpus := newCPUSplit(h)
	cpus.rest()
	defer cpus.all()

	// server starts the way's SOCKS5 server in front of dante (none for
	// the straight way) and returns what proxychains4 must be pointed at.
	server := func(way, dante string) (string, func()) {
		switch way {
		case wayDoor:
			addr := freeAddr(h)
			p := peertest.Start(h, "socksfwd", cfg.socksfwd, "-D", addr, "-S", dante, "--log-format", "json")
			peertest.WaitOutput(h, p, `"message":"SOCKS5 server on `)
			return addr, p.Stop
		case wayGostSOCKS:
			addr, p := h.gostProxy(gost, "socks5", dante)
			return addr, p.Stop
		}
		return dante, func() {}
	}

	dante := cpus.dante(peertest.DanteOptions{})
	iperfAddr := h.iperfServer(iperf)
	prefixes := map[string][]string{}
	for _, way := range ways {
		addr, _ := server(way, dante.Addr)
		prefixes[way] = h.proxychains(pc, addr)
	}
	for _, streams := range []int{1, 4} {
		rows := measure(ways, func(way string, m *meter) float64 {
			return m.timed(cfg.seconds, func() float64 { return iperfGbps(h, prefixes[way], iperf, iperfAddr, streams, cfg.seconds) })
		})
		reportSOCKS(fmt.Sprintf("socks-door-throughput-%dstream", streams), "Gbit/s", rows, 0)
	}

	// Fresh servers for every run, as in the TCP connection-rate row.
	rows := measure(ways, func(way string, m *meter) float64 {
		echo := testnet.Echo(h).Addr().String()
		d := cpus.dante(peertest.DanteOptions{})
		defer d.Proc.Stop()
		addr, stop := server(way, d.Addr)
		defer stop()
		return m.timed(cfg.seconds, func() float64 { return connRate(h, h.proxychains(pc, addr), connrate, echo, cfg.seconds) })
	})
	reportSOCKS(fmt.Sprintf("socks-door-new-conns-%dthreads", connThreads), "conn/s", rows, socksConnsGostBar)
}

// reportSOCKS prints the -D rows: the door against proxychains4 straight
// to Dante (shown without a bar: the door is one hop more) and gost, with
// gostBar when not 0.
func reportSOCKS(name, unit string, rows []result, gostBar float64) {
	reportAgainst(name, unit, rows, wayDoor, []httpBar{{wayStraight, 0}, {wayGostSOCKS, gostBar}})
}
