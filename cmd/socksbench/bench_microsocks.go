//go:build linux

package main

import (
	"fmt"

	"github.com/socksfwd/socksfwd/internal/peertest"
	"github.com/socksfwd/socksfwd/internal/testnet"
)

// benchMicrosocks: the -L path with microsocks in Dante's place, beside
// proxychains4 and gost's forward to the same microsocks, same run. A
// thread per connection and a plain read/write loop, microsocks costs
// each forwarder differently from Dante's single relay process: one
// stream of throughput to the iperf3 server at iperfAddr, and new
// connections per second. gost is "" when it is not on PATH.
func benchMicrosocks(h *harness, cfg benchConfig, cpus cpuSplit, iperfAddr, connrate, gost string) {
	iperf := peertest.Require(h, "iperf3")
	pc := peertest.Require(h, "proxychains4")
	ways := []string{"socksfwd", "proxychains4"}
	if gost != "" {
		ways = append(ways, wayGostForward)
	}
	// start puts what way needs in front of target through proxy, and
	// returns the client's prefix, the address it connects to, and the
	// forwarder's process (nil for proxychains4, which runs in the client).
	start := func(way, target, proxy string) ([]string, string, *peertest.Proc) {
		switch way {
		case "proxychains4":
			return h.proxychains(pc, proxy), target, nil
		case wayGostForward:
			addr, p := h.gostForward(gost, target, proxy)
			return nil, addr, p
		}
		addr, p := h.socksfwd(cfg.socksfwd, target, proxy)
		return nil, addr, p
	}
	stop := func(p *peertest.Proc) {
		if p != nil {
			p.Stop()
		}
	}

	// One microsocks and one forwarder per way for all throughput runs,
	// stopped before the connection runs.
	throughput := func() []result {
		ms := cpus.microsocks()
		defer ms.Proc.Stop()
		prefixes, addrs := map[string][]string{}, map[string]string{}
		for _, way := range ways {
			var p *peertest.Proc
			prefixes[way], addrs[way], p = start(way, iperfAddr, ms.Addr)
			defer stop(p)
		}
		return measure(ways, func(way string, m *meter) float64 {
			return m.timed(cfg.seconds, func() float64 { return iperfGbps(h, prefixes[way], iperf, addrs[way], 1, cfg.seconds) })
		})
	}
	name := "tcp-throughput-1stream-microsocks"
	cpus.report(name, "Gbit/s", throughput(), 0, sharedThroughputBars)

	// Fresh servers for every run, as in the connection-rate row.
	rows := measure(ways, func(way string, m *meter) float64 {
		echo := testnet.Echo(h).Addr().String()
		ms := cpus.microsocks()
		defer ms.Proc.Stop()
		prefix, addr, p := start(way, echo, ms.Addr)
		defer stop(p)
		return m.timed(cfg.seconds, func() float64 { return connRate(h, prefix, connrate, addr, cfg.seconds) })
	})
	name = fmt.Sprintf("tcp-new-conns-%dthreads-microsocks", connThreads)
	cpus.report(name, "conn/s", rows, 0, sharedConnBars)
}

// benchMicrosocksOnly runs benchMicrosocks alone, with what bench would
// have set up for it.
func benchMicrosocksOnly(h *harness, cfg benchConfig) {
	fmt.Printf("socksbench: through microsocks, median of %d interleaved rounds, %d s per run, %s\n", rounds, cfg.seconds, peertest.Versions()[1])
	gost := lookGost()
	cpus := newCPUSplit(h)
	cpus.rest()
	defer cpus.all()
	iperfAddr := h.iperfServer(peertest.Require(h, "iperf3"))
	benchMicrosocks(h, cfg, cpus, iperfAddr, h.connrate(), gost)
}

// microsocks starts microsocks where Dante would run, on a CPU of its own
// unless the arrangement is shared.
func (c cpuSplit) microsocks() peertest.Peer {
	c.pin(c.cpus[len(c.cpus)-1:]) // its threads inherit it
	defer c.rest()
	return peertest.Microsocks(c.h, peertest.MicrosocksOptions{})
}
