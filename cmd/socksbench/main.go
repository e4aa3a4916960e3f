//go:build linux

// Command socksbench is the driver behind `make demo` and `make bench`.
//
//	socksbench demo    forward a real request through socksfwd and microsocks
//	socksbench bench   measure socksfwd beside direct and proxychains4, same run
//	                   (bench-tcp, bench-udp, bench-echo, bench-dns, bench-mem,
//	                   bench-failover, bench-http, bench-socks, bench-reverse,
//	                   bench-kernel-relay, bench-sidecar, bench-admin,
//	                   bench-microsocks, bench-shared: one part alone)
//
// It starts its peers with internal/peertest and stops them on the way out.
package main

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/socksfwd/socksfwd/internal/peertest"
)

func main() {
	fs := flag.NewFlagSet("socksbench", flag.ExitOnError)
	bin := fs.String("socksfwd", "bin/socksfwd", "the socksfwd binary to drive")
	secs := fs.Int("seconds", 3, "duration of each timed run")
	conns := fs.Int("idle-conns", 1000, "idle connections held for the memory measurement")
	fs.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: socksbench [flags] demo|bench")
		fs.PrintDefaults()
	}
	fs.Parse(os.Args[1:])
	if fs.NArg() != 1 {
		fs.Usage()
		os.Exit(2)
	}
	abs, err := filepath.Abs(*bin)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	if strings.HasPrefix(fs.Arg(0), "bench") && os.Getenv(netnsEnv) == "" {
		if code, ok := inFreshNetns(os.Args); ok {
			os.Exit(code)
		}
	}
	cfg := benchConfig{socksfwd: abs, seconds: *secs, idleConns: *conns}
	socksfwdComm = commOf(abs)
	h := newHarness()
	code := h.run(func() {
		switch fs.Arg(0) {
		case "demo":
			demo(h, abs)
		case "bench":
			bench(h, cfg)
			benchShared(h, cfg)
			benchUDP(h, cfg)
			benchDNS(h, cfg)
			benchFailover(h, cfg)
			benchHTTP(h, cfg)
			benchSOCKSDoor(h, cfg)
			benchReverse(h, cfg)
			benchKernelRelay(h, cfg)
		case "bench-tcp":
			bench(h, cfg)
		case "bench-shared":
			benchShared(h, cfg)
		case "bench-sidecar":
			cpus := newCPUSplit(h)
			cpus.rest()
			benchSidecar(h, cfg, cpus, h.connrate())
			cpus.all()
		case "bench-admin":
			benchAdminOnly(h, cfg)
		case "bench-microsocks":
			benchMicrosocksOnly(h, cfg)
		case "bench-udp":
			benchUDP(h, cfg)
		case "bench-echo":
			cpus := newCPUSplit(h)
			benchUDPEcho(h, cfg, cpus, cpus.dante(peertest.DanteOptions{}))
		case "bench-mem":
			benchMemory(h, cfg, peertest.Dante(h, peertest.DanteOptions{}).Addr)
		case "bench-dns":
			benchDNS(h, cfg)
		case "bench-failover":
			benchFailover(h, cfg)
		case "bench-http":
			benchHTTP(h, cfg)
		case "bench-reverse":
			benchReverse(h, cfg)
		case "bench-socks":
			benchSOCKSDoor(h, cfg)
		case "bench-kernel-relay":
			benchKernelRelay(h, cfg)
		default:
			fs.Usage()
			h.Fatalf("unknown command %q", fs.Arg(0))
		}
	})
	os.Exit(code)
}

// netnsEnv marks the re-executed bench inside its own network namespace.
const netnsEnv = "SOCKSBENCH_NETNS"

// inFreshNetns re-runs the bench in a network namespace of its own, with a
// loopback that no other process shares and a TIME_WAIT table capped at
// 4096: the connection-rate runs open hundreds of thousands of loopback
// connections, whose TIME_WAIT entries would otherwise exhaust the
// ephemeral ports. ok is false (run in place) without root or ip(8).
func inFreshNetns(args []string) (code int, ok bool) {
	if os.Geteuid() != 0 {
		return 0, false
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return 0, false
	}
	name := fmt.Sprintf("socksbench-%d", os.Getpid())
	if err := exec.Command("ip", "netns", "add", name).Run(); err != nil {
		return 0, false
	}
	defer exec.Command("ip", "netns", "del", name).Run()
	for _, argv := range [][]string{
		{"ip", "link", "set", "lo", "up"},
		{"sysctl", "-q", "-w", "net.ipv4.tcp_max_tw_buckets=4096", "net.ipv4.tcp_tw_reuse=1"},
	} {
		if out, err := exec.Command("ip", append([]string{"netns", "exec", name}, argv...)...).CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "socksbench: netns setup %v: %v %s\n", argv, err, out)
			return 1, true
		}
	}
	self, err := os.Executable()
	if err != nil {
		return 0, false
	}
	cmd := exec.Command("ip", append([]string{"netns", "exec", name, self}, args[1:]...)...)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	cmd.Env = append(os.Environ(), netnsEnv+"="+name)
	if err := cmd.Run(); err != nil {
		if ee, isExit := err.(*exec.ExitError); isExit {
			return ee.ExitCode(), true
		}
		fmt.Fprintln(os.Stderr, "socksbench:", err)
		return 1, true
	}
	return 0, true
}
