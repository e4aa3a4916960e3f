//go:build linux

package main

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/socksfwd/socksfwd/internal/peertest"
	"github.com/socksfwd/socksfwd/internal/testnet"
	"github.com/socksfwd/socksfwd/socksclient"
)

// benchUDP: iperf3 UDP at fixed rates (loss, delivered rate) and the
// round-trip latency of 64-byte datagrams, through socksfwd → Dante beside
// direct. Each row names the busiest process, so a reader knows what
// limits it.
//
// Dante runs on a CPU of its own (the last) and everything else on the
// others, as a proxy on another host would: on two shared CPUs the traffic
// generator alone takes one, and Dante, starved, drops datagrams however
// little the forwarder in front of it uses.
func benchUDP(h *harness, cfg benchConfig) {
	iperf := peertest.Require(h, "iperf3")
	cpus := newCPUSplit(h)
	dante := cpus.dante(peertest.DanteOptions{}) // iperf3, socksfwd and this process stay off its CPU
	// A second Dante with 4 MiB socket buffers, socksfwd's own size: with
	// the kernel's default (about 208 KB) Dante drops bursts at 1 Gbit/s
	// while its CPU still has room.
	bigDante := cpus.dante(peertest.DanteOptions{Extra: "internal.socket.so_rcvbufforce: 4194304\nexternal.socket.so_rcvbufforce: 4194304"})
	iperfPort := peertest.FreePort(h)
	srv := peertest.Start(h, "iperf3 -s", iperf, "-s", "-p", strconv.Itoa(iperfPort), "--forceflush")
	peertest.WaitOutput(h, srv, "Server listening")
	iperfAddr := "127.0.0.1:" + strconv.Itoa(iperfPort)

	// iperf3 -u has a TCP control connection and UDP data on the same port
	// number: forward both.
	fwdAddr := h.socksfwdUDP(cfg.socksfwd, iperfAddr, dante.Addr, true)
	bigFwdAddr := h.socksfwdUDP(cfg.socksfwd, iperfAddr, bigDante.Addr, true)
	// The transparent UDP rows: iperf3's datagrams taken by TPROXY (its TCP
	// control connection goes straight to the server), to a server of
	// their own.
	tpIperfPort := peertest.FreePort(h)
	tpSrv := peertest.Start(h, "iperf3 -s", iperf, "-s", "-p", strconv.Itoa(tpIperfPort), "--forceflush")
	peertest.WaitOutput(h, tpSrv, "Server listening")
	tpIperfAddr := "127.0.0.1:" + strconv.Itoa(tpIperfPort)

	type run struct {
		rate, suffix, proxy, fwd string
	}
	var runs []run
	for _, rate := range []string{"100M", "300M", "1G"} {
		runs = append(runs, run{rate, "", dante.Addr, fwdAddr})
	}
	runs = append(runs, run{"1G", "-dante4MiB", bigDante.Addr, bigFwdAddr})
	for _, r := range runs {
		rate := r.rate
		cpu := startCPU()
		lost, mbps := socksUDPFlood(h, r.proxy, rate, cfg.seconds)
		fmt.Printf("%-26s %-10s offered %-4s delivered %7.1f Mbit/s  loss %6.2f %%  busiest: %s  (Dante's own ceiling: this process speaks SOCKS UDP to it)\n",
			"udp-flood-1200B"+r.suffix, "dante-only", rate, mbps, lost, cpu.busiest())
		var forwardMbps float64
		for _, way := range []string{"direct", "socksfwd", "tproxy"} {
			if way == "direct" && r.suffix != "" {
				continue // no Dante in it
			}
			addr := iperfAddr
			var prefix []string
			done := func() {}
			switch way {
			case "socksfwd":
				addr = r.fwd
			case "tproxy":
				// A fresh process and rule set each run.
				port, p := h.socksfwdTProxyUDP(cfg.socksfwd, r.proxy)
				tproxyUDP(h, tpIperfPort, port)
				addr, prefix = tpIperfAddr, redirectedClient
				done = func() { tproxyUDPOff(); p.Stop() }
			}
			cpu := startCPU()
			drops, perSocket := udpRcvbufErrors(), udpDrops()
			lost, mbps := iperfUDPVia(h, prefix, iperf, addr, rate, cfg.seconds)
			spent := cpu.spent() // before done stops the tproxy way's process
			done()
			busiest := cpu.busiestIn(spent)
			drops = udpRcvbufErrors() - drops
			where := dropsSince(perSocket)
			verdict := ""
			switch way {
			case "socksfwd":
				forwardMbps = mbps
				switch rate {
				case "100M":
					verdict = barText(lost <= 0.1, "loss ≤ 0.1 %")
				case "1G":
					verdict = barText(mbps >= 250 || spent.percent("danted") >= 95, "≥ 250 Mbit/s unless Dante ≥ 95 % CPU")
				}
			case "tproxy":
				switch rate {
				case "100M":
					verdict = barText(lost <= 0.1, "loss ≤ 0.1 %")
				case "1G":
					verdict = barText(mbps >= 0.9*forwardMbps, fmt.Sprintf("≥ 0.9 × the /udp forward's %.1f Mbit/s", forwardMbps))
				}
			}
			// Per datagram delivered: what a datagram that made it cost.
			datagrams := mbps * 1e6 / 8 / 1200 * float64(cfg.seconds)
			fmt.Printf("%-26s %-10s offered %-4s delivered %7.1f Mbit/s  loss %6.2f %%  socket-buffer drops %d (%s)  busiest: %s%s%s\n",
				"udp-iperf3-1200B"+r.suffix, way, rate, mbps, lost, drops, where, busiest, perItem(spent, way, "datagram", datagrams), verdict)
		}
	}

	benchUDPEcho(h, cfg, cpus, dante)
}

// benchUDPEcho: the round-trip latency of 64-byte datagrams, direct, through
// one plain relay hop, through Dante alone and through socksfwd → Dante.
func benchUDPEcho(h *harness, cfg benchConfig, cpus cpuSplit, dante peertest.Peer) {
	cpus.all() // the latency rows run unpinned, but for Dante
	echo := testnet.UDPEcho(h).LocalAddr().String()
	echoFwd := h.socksfwdUDP(cfg.socksfwd, echo, dante.Addr, false)
	// The floor for any forwarder: this process speaking SOCKS UDP to Dante
	// itself, as an application linked with a SOCKS library would.
	d := socksclient.Dialer{ProxyAddr: dante.Addr}
	viaDante, err := d.DialUDP(context.Background(), echo)
	if err != nil {
		h.Fatalf("UDP associate with Dante: %v", err)
	}
	defer viaDante.Close()
	// What one relay hop costs by itself: socat (C) between client and
	// echo, no SOCKS. socksfwd's row should exceed dante-only by about this.
	socat := peertest.Require(h, "socat")
	socatPort := peertest.FreePort(h)
	socatAddr := "127.0.0.1:" + strconv.Itoa(socatPort)
	peertest.Start(h, "socat", socat, "-T", "600",
		"UDP4-LISTEN:"+strconv.Itoa(socatPort)+",bind=127.0.0.1,reuseaddr", "UDP4:"+echo)
	waitUDPBound(h, socatAddr)

	// Interleaved rounds, so that a noisy moment on a shared machine hits
	// every way alike; percentiles over all rounds' samples.
	ways := []string{"direct", "socat-hop", "dante-only", "socksfwd"}
	conns := map[string]net.Conn{"dante-only": viaDante}
	for way, addr := range map[string]string{"direct": echo, "socat-hop": socatAddr, "socksfwd": echoFwd} {
		c, err := net.Dial("udp", addr)
		if err != nil {
			h.Fatalf("%v", err)
		}
		defer c.Close()
		conns[way] = c
	}
	rtts := map[string][]time.Duration{}
	for range 5 {
		for _, way := range ways {
			rtts[way] = append(rtts[way], udpEchoRTTs(h, conns[way], 400)...)
		}
	}
	for _, way := range ways {
		p50, p99 := percentiles(rtts[way])
		verdict := ""
		if way == "socksfwd" {
			verdict = barText(p50 <= 150*time.Microsecond, "p50 ≤ 150 µs")
		}
		fmt.Printf("%-26s %-10s p50 %6.0f µs  p99 %6.0f µs%s\n", "udp-echo-64B", way,
			float64(p50)/1e3, float64(p99)/1e3, verdict)
	}
}

func barText(ok bool, bar string) string {
	if ok {
		return "  (bar " + bar + ": ok)"
	}
	return "  (bar " + bar + ": MISSED)"
}

// iperfUDPVia runs an iperf3 UDP client with 1200-byte datagrams and a 2 MB
// socket buffer, under prefix (redirectedClient for the TPROXY rows), and
// returns the receiver's loss and rate.
func iperfUDPVia(h *harness, prefix []string, iperf, addr, rate string, secs int) (lostPct, mbps float64) {
	host, port, _ := net.SplitHostPort(addr)
	argv := append(append([]string{}, prefix...), iperf, "-c", host, "-p", port, "-u", "-b", rate, "-l", "1200", "-w", "2M", "-t", strconv.Itoa(secs), "-J")
	got := runIperf(h, argv)
	return got.LostPercent, got.BitsPerSecond / 1e6
}

// socksfwdTProxyUDP starts the binary with a transparent UDP listener on a
// free loopback port via proxy.
func (h *harness) socksfwdTProxyUDP(bin, proxy string) (int, *peertest.Proc) {
	port := peertest.FreePort(h)
	p := peertest.Start(h, "socksfwd", bin, "--transparent", "127.0.0.1:"+strconv.Itoa(port)+"/udp", "-S", proxy, "--log-format", "json")
	peertest.WaitOutput(h, p, `/udp (TPROXY)`)
	return port, p
}

// tproxyUDP sends redirectedClient's UDP datagrams to the iperf3 port on
// to the transparent listener at port by TPROXY: marked on output, routed
// back in through lo by policy routing, taken by TPROXY in prerouting.
// The bench runs in a network namespace of its own, so the routing rule
// touches nothing else. tproxyUDPOff undoes it.
func tproxyUDP(h *harness, iperfPort, port int) { tproxyRule(h, "udp", byClientGID, iperfPort, port) }

// byClientGID is tproxyRule's output match for the client's packets on a
// single host, where Dante's own connections to the same port must not be
// taken. It misses what a socket sends after its program closed it (the
// last ACK, from TIME-WAIT, has no owner): harmless when the target's
// address is this host's, where that ACK still reaches socksfwd's socket;
// with a remote target it would go out to the real host instead, and
// socksfwd's side of every connection would stay in LAST-ACK, resending
// its FIN (the sidecar rows match by destination for that reason).
const byClientGID = "meta skgid " + redirectGID

// tproxyRule is tproxyUDP for protocol proto (tcp or udp), taking the
// output packets that match the nft expression match.
func tproxyRule(h *harness, proto, match string, dport, port int) {
	nft := peertest.Require(h, "nft")
	ip := peertest.Require(h, "ip")
	script := fmt.Sprintf(`table ip socksbench_tproxy {
	chain out {
		type route hook output priority mangle; policy accept;
		%s %s dport %d meta mark set 0x1
	}
	chain pre {
		type filter hook prerouting priority mangle; policy accept;
		meta mark 0x1 %s dport %d tproxy to 127.0.0.1:%d meta mark set 0x1 accept
	}
}
`, match, proto, dport, proto, dport, port)
	cmd := exec.Command(nft, "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		h.Fatalf("nft tproxy rules: %v %s", err, out)
	}
	for _, args := range [][]string{{"rule", "add", "fwmark", "0x1", "lookup", "100"}, {"route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100"}} {
		if out, err := exec.Command(ip, args...).CombinedOutput(); err != nil {
			h.Fatalf("ip %v: %v %s", args, err, out)
		}
	}
}

func tproxyUDPOff() {
	exec.Command("nft", "delete", "table", "ip", "socksbench_tproxy").Run()
	exec.Command("ip", "rule", "del", "fwmark", "0x1", "lookup", "100").Run()
	exec.Command("ip", "route", "flush", "table", "100").Run()
}

// udpEchoRTTs measures n sequential 64-byte round trips over c.
func udpEchoRTTs(h *harness, c net.Conn, n int) []time.Duration {
	msg, buf := make([]byte, 64), make([]byte, 512)
	rtts := make([]time.Duration, 0, n)
	for i := 0; len(rtts) < n && i < 2*n; i++ {
		msg[0], msg[1] = byte(i), byte(i>>8)
		start := time.Now()
		c.Write(msg)
		c.SetReadDeadline(time.Now().Add(time.Second))
		// A late echo of an earlier probe is skipped, not timed as this
		// one's.
		var err error
		for got := 0; err == nil && (got < 2 || buf[0] != msg[0] || buf[1] != msg[1]); {
			got, err = c.Read(buf)
		}
		if err != nil {
			continue // lost; the first ones while the association is built
		}
		if i >= 10 { // warm-up
			rtts = append(rtts, time.Since(start))
		}
	}
	if len(rtts) == 0 {
		h.Fatalf("no echo through %s", c.RemoteAddr())
	}
	return rtts
}

func percentiles(rtts []time.Duration) (p50, p99 time.Duration) {
	return quantile(rtts, 0.50), quantile(rtts, 0.99)
}

// cpuSnapshot holds CPU ticks per process at a moment, to name the busiest
// process of a run.
type cpuSnapshot struct {
	at       time.Time
	ticks    map[int]procTicks
	cpus     []cpuTimes
	children time.Duration // childrenCPU at the snapshot
}

// cpuTimes is one CPU's line of /proc/stat: busy and total ticks.
type cpuTimes struct {
	name        string
	busy, total int
}

func readCPUTimes() []cpuTimes {
	data, _ := os.ReadFile("/proc/stat")
	var out []cpuTimes
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 9 || !strings.HasPrefix(f[0], "cpu") || f[0] == "cpu" {
			continue
		}
		t := cpuTimes{name: f[0]}
		for i, v := range f[1:9] { // user nice system idle iowait irq softirq steal
			n, _ := strconv.Atoi(v)
			t.total += n
			if i != 3 && i != 4 {
				t.busy += n
			}
		}
		out = append(out, t)
	}
	return out
}

type procTicks struct {
	comm  string
	ticks int
}

func startCPU() *cpuSnapshot {
	return &cpuSnapshot{at: time.Now(), ticks: readTicks(), cpus: readCPUTimes(), children: childrenCPU()}
}

func readTicks() map[int]procTicks {
	out := map[int]procTicks{}
	// Only processes in the bench's own network namespace: a socksfwd,
	// gost or Dante serving the host would be counted as the way's
	// forwarder (counted by command name).
	ownNet, _ := os.Readlink("/proc/self/ns/net")
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if ownNet != "" {
			if ns, err := os.Readlink("/proc/" + e.Name() + "/ns/net"); err != nil || ns != ownNet {
				continue
			}
		}
		if t, ok := readProcStat(pid); ok {
			out[pid] = t
		}
	}
	return out
}

// busiest names the processes using most CPU, e.g. "danted 97 %, socksfwd 41 %".
func (c *cpuSnapshot) busiest() string { return c.busiestIn(c.spent()) }

// busiestIn is busiest from s, what spent read since this snapshot.
func (c *cpuSnapshot) busiestIn(s cpuSpent) string {
	type kv struct {
		k string
		v float64
	}
	var all []kv
	for comm := range s.byComm {
		all = append(all, kv{comm, s.percent(comm)})
	}
	sort.Slice(all, func(i, j int) bool { return all[i].v > all[j].v })
	var parts []string
	for i := 0; i < len(all) && i < 3; i++ {
		parts = append(parts, fmt.Sprintf("%s %.0f %%", all[i].k, all[i].v))
	}
	// Each CPU's load too: a CPU can be full with no process near 100 %
	// (a sender, a forwarder and their softirqs sharing it).
	var loads []string
	for i, t := range readCPUTimes() {
		if i < len(c.cpus) && c.cpus[i].name == t.name && t.total > c.cpus[i].total {
			loads = append(loads, fmt.Sprintf("%s %.0f %%", t.name, 100*float64(t.busy-c.cpus[i].busy)/float64(t.total-c.cpus[i].total)))
		}
	}
	return strings.Join(parts, ", ") + " (" + strings.Join(loads, ", ") + " busy)"
}

// udpRcvbufErrors is the namespace's count of datagrams dropped because a
// socket's receive buffer was full (/proc/net/snmp, Udp RcvbufErrors).
func udpRcvbufErrors() int {
	b, err := os.ReadFile("/proc/net/snmp")
	if err != nil {
		return 0
	}
	var names []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || f[0] != "Udp:" {
			continue
		}
		if names == nil {
			names = f
			continue
		}
		for i, n := range names {
			if n == "RcvbufErrors" && i < len(f) {
				v, _ := strconv.Atoi(f[i])
				return v
			}
		}
	}
	return 0
}

// udpDrops is the receive-buffer drop count of every UDP socket in the
// namespace (the drops column of /proc/net/udp and udp6), by inode.
func udpDrops() map[string]int {
	out := map[string]int{}
	for _, f := range []string{"/proc/net/udp", "/proc/net/udp6"} {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n")[1:] {
			fs := strings.Fields(line)
			if len(fs) < 13 {
				continue
			}
			if n, err := strconv.Atoi(fs[len(fs)-1]); err == nil {
				out[fs[9]] = n
			}
		}
	}
	return out
}

// dropsSince names the processes whose sockets dropped datagrams since
// before, e.g. "socksfwd 2000, danted 10": where a flood was lost.
func dropsSince(before map[string]int) string {
	owner := map[string]string{} // socket inode → command
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		t, ok := readProcStat(pid)
		if !ok {
			continue
		}
		fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
		for _, fd := range fds {
			l, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name()))
			if err == nil && strings.HasPrefix(l, "socket:[") {
				owner[strings.TrimSuffix(strings.TrimPrefix(l, "socket:["), "]")] = t.comm
			}
		}
	}
	by := map[string]int{}
	for inode, n := range udpDrops() {
		if d := n - before[inode]; d > 0 {
			name := owner[inode]
			if name == "" {
				name = "closed socket"
			}
			by[name] += d
		}
	}
	var parts []string
	for name, n := range by {
		parts = append(parts, fmt.Sprintf("%s %d", name, n))
	}
	sort.Strings(parts)
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, ", ")
}

// waitUDPBound waits (at most 5 s) until something has bound addr: our
// own bind to it fails then.
func waitUDPBound(h *harness, addr string) {
	ua := net.UDPAddrFromAddrPort(netip.MustParseAddrPort(addr))
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		c, err := net.ListenUDP("udp4", ua)
		if err != nil {
			return
		}
		c.Close()
	}
	h.Fatalf("nothing bound %s within 5 s", addr)
}

// cpuSplit gives Dante the last CPU this process may use and everything
// else the others, as a proxy on another host would have it. With one CPU,
// or shared, it pins nothing.
type cpuSplit struct {
	h    *harness
	cpus []int
	// shared: every process on every CPU, as a sidecar shares its host's
	// CPUs with everything else; the rows it runs are named with a suffix.
	shared bool
}

// sharedCPUs is the arrangement with nothing pinned. It first undoes any
// pinning an earlier part left on this process.
func sharedCPUs(h *harness) cpuSplit {
	c := newCPUSplit(h)
	c.all()
	c.shared = true
	return c
}

// report prints a TCP row in the arrangement: pinned, against
// proxychains4 and the pinned bar (0: none); shared, named with -shared,
// socksfwd against the shared bars.
func (c cpuSplit) report(name, unit string, rows []result, pinnedBar float64, sharedBars []httpBar) {
	if c.shared {
		reportAgainst(name+"-shared", unit, rows, "socksfwd", sharedBars)
		return
	}
	report(name, unit, rows, "proxychains4", pinnedBar)
}

func newCPUSplit(h *harness) cpuSplit {
	var set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &set); err != nil {
		h.Fatalf("CPU affinity: %v", err)
	}
	c := cpuSplit{h: h}
	for cpu := range 1024 {
		if set.IsSet(cpu) {
			c.cpus = append(c.cpus, cpu)
		}
	}
	return c
}

// dante starts a Dante on its own CPU; this process (and what it starts
// next) is left on the others.
func (c cpuSplit) dante(opt peertest.DanteOptions) peertest.Peer {
	c.pin(c.cpus[len(c.cpus)-1:]) // Dante's processes inherit it
	defer c.rest()
	return peertest.Dante(c.h, opt)
}

// rest pins this process to the CPUs other than Dante's; all undoes it.
func (c cpuSplit) rest() { c.pin(c.cpus[:len(c.cpus)-1]) }
func (c cpuSplit) all()  { c.pin(c.cpus) }

func (c cpuSplit) pin(cpus []int) {
	if len(c.cpus) >= 2 && !c.shared {
		pinSelf(c.h, cpus...)
	}
}

// pinSelf binds every thread of this process, and so the processes it
// starts from now on, to cpus.
func pinSelf(h *harness, cpus ...int) {
	var set unix.CPUSet
	for _, c := range cpus {
		set.Set(c)
	}
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		h.Fatalf("%v", err)
	}
	for _, t := range tasks {
		tid, _ := strconv.Atoi(t.Name())
		if err := unix.SchedSetaffinity(tid, &set); err != nil {
			h.Fatalf("pin thread %d to CPUs %v: %v", tid, cpus, err)
		}
	}
}

// socksUDPFlood sends paced 1200-byte datagrams at rate through its own UDP
// association with the proxy to a local sink, and returns the loss and the
// delivered rate: what the proxy's relay manages with no forwarder in front.
func socksUDPFlood(h *harness, proxy, rate string, secs int) (lostPct, mbps float64) {
	bps := map[string]float64{"100M": 100e6, "300M": 300e6, "1G": 1e9}[rate]
	sink := testnet.NewUDPSink(h)
	d := socksclient.Dialer{ProxyAddr: proxy}
	u, err := d.Associate(context.Background())
	if err != nil {
		h.Fatalf("UDP associate with %s: %v", proxy, err)
	}
	defer u.Close()
	dst := socksclient.AddrFromAddrPort(sink.Addr())
	buf := make([]byte, socksclient.MaxUDPHeaderLen+1200)
	perSec := bps / 8 / 1200
	start, sent := time.Now(), 0
	for elapsed := time.Duration(0); elapsed < time.Duration(secs)*time.Second; elapsed = time.Since(start) {
		for want := int(elapsed.Seconds() * perSec); sent < want; sent++ {
			u.WritePacket(buf, socksclient.MaxUDPHeaderLen, dst)
		}
		time.Sleep(200 * time.Microsecond) // pacing
	}
	time.Sleep(300 * time.Millisecond) // let the relay drain
	got := sink.Count()
	return 100 * float64(int64(sent)-got) / float64(sent), float64(got) * 1200 * 8 / float64(secs) / 1e6
}
