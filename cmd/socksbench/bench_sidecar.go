//go:build linux

package main

import (
	"fmt"
	"net"
	"os/exec"
	"strconv"

	"github.com/socksfwd/socksfwd/internal/peertest"
	"github.com/socksfwd/socksfwd/internal/testnet"
)

// The remote side of benchSidecar: a namespace of its own, reached over a
// veth pair, as a proxy and its targets on another host would be.
const (
	sidecarLocal  = "10.99.0.1"
	sidecarRemote = "10.99.0.2"
)

// benchSidecar measures the transparent listener as a sidecar runs it:
// Dante and the targets in another namespace behind a veth pair, so that
// connection tracking, which the REDIRECT rule turns on here, sees only
// this host's legs (the app's connection to socksfwd, socksfwd's to the
// proxy), not the proxy's own connections to the targets, which share
// this host's tracking in the single-host rows. Ways: the -L path, the
// transparent listener behind REDIRECT, and by TPROXY; TCP throughput
// (one stream) and new connections per second, rounds interleaved.
func benchSidecar(h *harness, cfg benchConfig, cpus cpuSplit, connrate string) {
	iperf := peertest.Require(h, "iperf3")
	nft := peertest.Require(h, "nft")
	ns := sidecarNetns(h)

	iperfPort := peertest.FreePort(h)
	srv := peertest.Start(h, "iperf3 -s in "+ns, "ip", "netns", "exec", ns, iperf, "-s", "-B", sidecarRemote, "-p", strconv.Itoa(iperfPort), "--forceflush")
	peertest.WaitOutput(h, srv, "Server listening")
	iperfAddr := net.JoinHostPort(sidecarRemote, strconv.Itoa(iperfPort))

	// A Dante per run for connections (see the connection-rate row), one
	// for throughput.
	dante := func() peertest.Peer {
		// A port free there, where the echo servers listen too.
		var port int
		if err := peertest.InNetns(ns, func() error {
			ln, err := net.Listen("tcp", net.JoinHostPort(sidecarRemote, "0"))
			if err != nil {
				return err
			}
			port = ln.Addr().(*net.TCPAddr).Port
			return ln.Close()
		}); err != nil {
			h.Fatalf("free port in %s: %v", ns, err)
		}
		return cpus.dante(peertest.DanteOptions{Netns: ns, Listen: sidecarRemote, Port: port})
	}
	d := dante()
	ways := []string{"socksfwd", "transparent", "transparent-tproxy"}

	// run starts what way needs in front of target through proxy and
	// returns the address the client connects to, its prefix, and a stop.
	run := func(way, target, proxy string) (string, []string, func()) {
		if way == "socksfwd" {
			fwd, p := h.socksfwd(cfg.socksfwd, target, proxy)
			return fwd, nil, func() { p.Stop() }
		}
		port, p := h.socksfwdTransparent(cfg.socksfwd, proxy)
		if way == "transparent" {
			undo := redirect(h, nft, target, port)
			return target, redirectedClient, func() { undo(); p.Stop() }
		}
		_, tport, _ := net.SplitHostPort(target)
		tp, _ := strconv.Atoi(tport)
		// By destination, not by the client's group: the target is on
		// the remote host, where the last ACK of each connection (sent
		// from TIME-WAIT, with no owner) would otherwise go.
		tproxyRule(h, "tcp", "ip daddr "+sidecarRemote, tp, port)
		return target, redirectedClient, func() { tproxyUDPOff(); p.Stop() }
	}

	rows := measure(ways, func(way string, m *meter) float64 {
		addr, prefix, stop := run(way, iperfAddr, d.Addr)
		defer stop()
		return m.timed(cfg.seconds, func() float64 { return iperfGbps(h, prefix, iperf, addr, 1, cfg.seconds) })
	})
	d.Proc.Stop()
	report("sidecar-throughput-1stream", "Gbit/s", rows, "", 0)
	reportTransparent("sidecar-throughput-1stream", rows, 0.95, 0)

	rows = measure(ways, func(way string, m *meter) float64 {
		d := dante()
		defer d.Proc.Stop()
		var echo string
		if err := peertest.InNetns(ns, func() error {
			ln, err := testnet.ServeOn(h, net.JoinHostPort(sidecarRemote, "0"), testnet.EchoConn)
			if err == nil {
				echo = ln.Addr().String()
			}
			return err
		}); err != nil {
			h.Fatalf("echo in %s: %v", ns, err)
		}
		addr, prefix, stop := run(way, echo, d.Addr)
		defer stop()
		return m.timed(cfg.seconds, func() float64 { return connRate(h, prefix, connrate, addr, cfg.seconds) })
	})
	name := fmt.Sprintf("sidecar-new-conns-%dthreads", connThreads)
	report(name, "conn/s", rows, "", 0)
	reportTransparent(name, rows, 0.95, 0)
}

// sidecarNetns makes the remote namespace and the veth pair to it.
func sidecarNetns(h *harness) string {
	ns := peertest.NewNetns(h, "remote")
	for _, argv := range [][]string{
		{"ip", "link", "add", "sc0", "type", "veth", "peer", "name", "sc1", "netns", ns},
		{"ip", "addr", "add", sidecarLocal + "/24", "dev", "sc0"},
		{"ip", "link", "set", "sc0", "up"},
		{"ip", "-n", ns, "addr", "add", sidecarRemote + "/24", "dev", "sc1"},
		{"ip", "-n", ns, "link", "set", "sc1", "up"},
		{"ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv4.tcp_max_tw_buckets=4096", "net.ipv4.tcp_tw_reuse=1"},
	} {
		if out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput(); err != nil {
			h.Fatalf("%v: %v %s", argv, err, out)
		}
	}
	h.Cleanup(func() { exec.Command("ip", "link", "del", "sc0").Run() })
	return ns
}
