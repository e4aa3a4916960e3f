//go:build linux

package main

import (
	_ "embed"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/socksfwd/socksfwd/internal/peertest"
	"github.com/socksfwd/socksfwd/internal/testnet"
)

//go:embed csrc/connrate.c
var connrateSource string

type benchConfig struct {
	socksfwd  string
	seconds   int
	idleConns int
}

// result is one way to reach the target: the median of its rounds, the
// busiest processes of the run that median came from, and every round's
// value in round order, with the CPU milliseconds its forwarder (or
// client: see wayCPU) spent in that round (NaN where unknown) and the
// seconds of each timed run.
type result struct {
	way    string
	value  float64
	busy   string
	rounds []float64
	cpu    []float64
	secs   float64
}

// report prints a workload's results and socksfwd's ratio to the baseline,
// with the bar it must meet (ratio ≥ bar), then every other forwarder's
// ratio to the same baseline, so a reader sees where the bar sits for them,
// and the busiest processes of each way.
func report(name, unit string, rows []result, baseline string, bar float64) {
	parts := make([]string, 0, len(rows))
	for _, r := range rows {
		parts = append(parts, fmt.Sprintf("%s %.1f %s", r.way, r.value, unit))
	}
	line := fmt.Sprintf("%-26s %s", name, strings.Join(parts, " | ")) + ratios(rows, baseline, bar)
	for _, r := range rows {
		if r.busy != "" && r.way != "direct" {
			line += fmt.Sprintf("\n%-26s   busiest via %s: %s", "", r.way, r.busy)
		}
	}
	fmt.Println(line + cpuLine(unit, rows))
}

// ratios is report's verdict: socksfwd against the bar, then the others.
// A ratio is the median of the per-round ratios: a round runs the ways back
// to back, so a slow minute of the host weighs on both sides of a ratio
// rather than on whichever way it happened to hit.
func ratios(rows []result, baseline string, bar float64) string {
	var base *result
	for i := range rows {
		if rows[i].way == baseline {
			base = &rows[i]
		}
	}
	if base == nil {
		return versusGost(rows)
	}
	paired := func(r result) (float64, []string) { return pairedRatio(r, *base) }
	var out string
	for _, r := range rows {
		if r.way != "socksfwd" {
			continue
		}
		if bar == 0 { // for the reader: no bar
			out, _ = pairedText("socksfwd", r, baseline, *base)
			continue
		}
		ratio, each := paired(r)
		verdict := "ok"
		if ratio < bar {
			verdict = "BELOW BAR"
		}
		out = fmt.Sprintf(" | socksfwd/%s = %.3f (rounds %s; bar ≥ %.2f: %s)", baseline, ratio, strings.Join(each, " "), bar, verdict)
	}
	for _, r := range rows {
		if r.way != "socksfwd" && r.way != baseline && r.way != "direct" {
			ratio, _ := paired(r)
			out += fmt.Sprintf(", %s/%s = %.2f", r.way, baseline, ratio)
		}
	}
	return out + versusGost(rows)
}

// versusGost is socksfwd's ratio to gost's forward, the like-for-like
// peer, when both ran: the median of per-round ratios, and each round's.
func versusGost(rows []result) string {
	var fwd, gost *result
	for i := range rows {
		switch rows[i].way {
		case "socksfwd":
			fwd = &rows[i]
		case wayGostForward:
			gost = &rows[i]
		}
	}
	if fwd == nil || gost == nil {
		return ""
	}
	text, _ := pairedText("socksfwd", *fwd, wayGostForward, *gost)
	return text
}

// pairedText is " | subject/base = ratio (rounds …)", r's paired ratio to
// base as the rows print it, and the ratio.
func pairedText(subject string, r result, baseName string, base result) (string, float64) {
	ratio, each := pairedRatio(r, base)
	return fmt.Sprintf(" | %s/%s = %.3f (rounds %s)", subject, baseName, ratio, strings.Join(each, " ")), ratio
}

// pairedRatio is the median of r's per-round ratios to base, and each
// round's ratio as printed; 0 and none without a round to pair.
func pairedRatio(r, base result) (float64, []string) {
	var rs []float64
	var text []string
	for i, v := range r.rounds {
		if i < len(base.rounds) && base.rounds[i] > 0 {
			rs = append(rs, v/base.rounds[i])
			text = append(text, fmt.Sprintf("%.2f", v/base.rounds[i]))
		}
	}
	if len(rs) == 0 {
		return 0, nil
	}
	return median(rs), text
}

// reportTransparent prints the transparent listener (behind the same
// REDIRECT rule as redsocks, and by TPROXY where that way ran) against the
// -L path and against redsocks, each the median of per-round ratios, with
// its bars.
func reportTransparent(name string, rows []result, barVsForward, barVsRedsocks float64) {
	find := func(way string) *result {
		for i := range rows {
			if rows[i].way == way {
				return &rows[i]
			}
		}
		return nil
	}
	for _, way := range []string{"transparent", "transparent-tproxy"} {
		tp := find(way)
		if tp == nil {
			continue
		}
		line := fmt.Sprintf("%-26s %s %.1f", name, way, tp.value)
		for _, b := range []struct {
			way string
			bar float64
		}{{"socksfwd", barVsForward}, {"redsocks", barVsRedsocks}, {"socksfwd-conntrack", 0}} {
			base := find(b.way)
			if base == nil {
				continue
			}
			var rs []float64
			for i, v := range tp.rounds {
				if i < len(base.rounds) && base.rounds[i] > 0 {
					rs = append(rs, v/base.rounds[i])
				}
			}
			if len(rs) == 0 {
				continue
			}
			ratio := median(rs)
			if b.bar == 0 { // for the reader: no bar
				line += fmt.Sprintf(" | %s/%s = %.3f", way, b.way, ratio)
				continue
			}
			verdict := "ok"
			if ratio < b.bar {
				verdict = "BELOW BAR"
			}
			line += fmt.Sprintf(" | %s/%s = %.3f (bar ≥ %.2f: %s)", way, b.way, ratio, b.bar, verdict)
		}
		fmt.Println(line)
	}
}

func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	return s[len(s)/2]
}

// rounds: every workload runs this many times, the ways interleaved, and
// the median is reported; the shared machines here are noisy (the same
// 4-stream run through the same proxy varied from 7.4 to 10.9 Gbit/s within
// minutes), so odd counts above 3 buy a steadier median.
const rounds = 5

// connThreads is the connection-rate client's concurrency.
const connThreads = 8

// meter names the busiest processes while a timed client runs (servers
// that a run starts and stops itself included), and keeps what the run
// cost in CPU and how long the client was told to run.
type meter struct {
	busy  string
	spent cpuSpent
	secs  int
}

// timed runs a client that measures a rate over secs seconds.
func (m *meter) timed(secs int, client func() float64) float64 {
	snap := startCPU()
	v := client()
	m.spent = snap.spent()
	m.busy = snap.busiestIn(m.spent)
	m.secs = secs
	return v
}

// measure runs each way's function rounds times, interleaved, and returns
// the medians in the ways' order, each with the busiest processes of the
// run it came from and all its rounds.
func measure(ways []string, run func(way string, m *meter) float64) []result {
	// A sample is one run: its result, and the way's CPU (NaN when not
	// measured) until the rounds are gathered into result.cpu.
	type sample struct {
		result
		cpuMs float64
	}
	samples := make(map[string][]sample)
	for round := range rounds {
		for _, k := range roundOrder(len(ways), round) {
			w := ways[k]
			var m meter
			v := run(w, &m)
			cpu := math.NaN()
			if ms, ok := m.spent.wayCPU(w); ok {
				cpu = ms
			}
			samples[w] = append(samples[w], sample{result{way: w, value: v, busy: m.busy, secs: float64(m.secs)}, cpu})
		}
	}
	out := make([]result, len(ways))
	for i, w := range ways {
		s := samples[w]
		inOrder := make([]float64, len(s))
		cpu := make([]float64, len(s))
		for j, r := range s {
			inOrder[j], cpu[j] = r.value, r.cpuMs
		}
		sort.Slice(s, func(a, b int) bool { return s[a].value < s[b].value })
		out[i] = s[len(s)/2].result
		out[i].rounds, out[i].cpu = inOrder, cpu
	}
	return out
}

// bench is the TCP part in the pinned arrangement (Dante on a CPU of its
// own), with every way, then the rows that share its servers.
func bench(h *harness, cfg benchConfig) {
	fmt.Printf("socksbench: median of %d interleaved rounds, %d s per run, proxies → %s\n", rounds, cfg.seconds, peertest.Versions()[0])
	t := newTCPBench(h, cfg)
	t.redsocks = peertest.Require(h, "redsocks")
	t.nft = peertest.Require(h, "nft")
	ways := []string{"direct", "socksfwd", "proxychains4", "redsocks", "transparent"}
	if t.gost != "" {
		ways = append(ways, wayGostForward)
	}

	// Dante gets a CPU of its own and everything else the others, as a
	// proxy on another host would, and as the UDP rows have it. Left to the
	// scheduler, Dante's relay process (at 93-99 % of a core in every way)
	// shares and changes CPUs more often the more threads run beside it,
	// which taxed each forwarder for its threads rather than its work: the
	// 4-stream runs went from 0.78 of proxychains4 to parity when pinned.
	// benchShared has the other arrangement.
	cpus := newCPUSplit(h)
	cpus.rest() // clients, forwarders, targets and this process
	defer cpus.all()

	// One more way for connections: the -L path while a NAT table is
	// loaded, as it is for the redirected ways, so that the cost of
	// connection tracking on every leg shows apart from socksfwd's own.
	// And the transparent listener taking connections by TPROXY, which
	// needs no NAT and so no connection tracking.
	connWays := append(append([]string{}, ways...), "socksfwd-conntrack", "transparent-tproxy")
	dante, iperfAddr := t.rows(cpus, ways, connWays)
	benchMicrosocks(h, cfg, cpus, iperfAddr, t.connrate, t.gost)
	benchSidecar(h, cfg, cpus, t.connrate)

	benchRelayCPU(h, t.iperf, iperfAddr, cfg.socksfwd, dante.Addr)
	benchAdmin(h, cfg, t.iperf, iperfAddr, dante.Addr, cpus, t.connrate)
	benchMemory(h, cfg, dante.Addr)
}

// benchShared is the main TCP rows again with nothing pinned: every
// process on every CPU, as a sidecar shares its host's CPUs with the
// application and, here, with the proxy. Fewer ways than the pinned rows
// (socksfwd, proxychains4 and gost), to keep `make bench` short; each row
// its own ratios, with the bars that hold in this arrangement.
func benchShared(h *harness, cfg benchConfig) {
	fmt.Printf("socksbench: shared CPUs (nothing pinned), median of %d interleaved rounds, %d s per run, proxies → %s\n", rounds, cfg.seconds, peertest.Versions()[0])
	t := newTCPBench(h, cfg)
	ways := []string{"socksfwd", "proxychains4"}
	if t.gost != "" {
		ways = append(ways, wayGostForward)
	}
	cpus := sharedCPUs(h)
	_, iperfAddr := t.rows(cpus, ways, ways)
	benchMicrosocks(h, cfg, cpus, iperfAddr, t.connrate, t.gost)
}

// The bars of the shared arrangement, through Dante and through
// microsocks alike: socksfwd against proxychains4, which makes no hop, and
// against gost's forward, the like-for-like peer.
var (
	sharedThroughputBars = []httpBar{{"proxychains4", 0.95}, {wayGostForward, 1.1}}
	sharedConnBars       = []httpBar{{"proxychains4", 0.85}, {wayGostForward, 1.3}}
)

// tcpBench is what the TCP rows of either arrangement run with: the
// clients, the peers found, and the connection-rate client built once.
// redsocks and nft are "" unless the redirected ways run.
type tcpBench struct {
	h                   *harness
	cfg                 benchConfig
	iperf, pc, connrate string
	gost                string // "" when not on PATH
	redsocks, nft       string
}

func newTCPBench(h *harness, cfg benchConfig) tcpBench {
	return tcpBench{
		h: h, cfg: cfg,
		iperf:    peertest.Require(h, "iperf3"),
		pc:       peertest.Require(h, "proxychains4"),
		connrate: h.connrate(),
		gost:     lookGost(), // an optional extra way
	}
}

// rows runs the throughput rows (1 stream, 4 streams, 4 streams reverse)
// through ways and the connection-rate row through connWays, all through
// Dante placed by cpus, and reports them with the arrangement's bars. It
// returns the throughput rows' Dante and iperf3 server, which stay up.
func (t tcpBench) rows(cpus cpuSplit, ways, connWays []string) (peertest.Peer, string) {
	h, cfg := t.h, t.cfg
	// TCP throughput with iperf3 (a libc client, so proxychains4 can carry it).
	dante := cpus.dante(peertest.DanteOptions{})
	iperfAddr := h.iperfServer(t.iperf)
	addrs := map[string]string{"direct": iperfAddr, "proxychains4": iperfAddr, "redsocks": iperfAddr}
	addrs["socksfwd"], _ = h.socksfwd(cfg.socksfwd, iperfAddr, dante.Addr)
	if slices.Contains(ways, wayGostForward) {
		addrs[wayGostForward], _ = h.gostForward(t.gost, iperfAddr, dante.Addr)
	}
	pcDante := h.proxychains(t.pc, dante.Addr)
	var rsPort, tpPort int
	if slices.Contains(ways, "redsocks") {
		rsPort, _ = h.redsocks(t.redsocks, dante.Addr)
	}
	if slices.Contains(ways, "transparent") {
		tpPort, _ = h.socksfwdTransparent(cfg.socksfwd, dante.Addr)
	}
	// Four streams both ways: with -R the target sends, so the bytes
	// cross each forwarder and Dante the other way round.
	for _, run := range []struct {
		streams int
		reverse bool
	}{{1, false}, {4, false}, {4, true}} {
		var extra []string
		name := fmt.Sprintf("tcp-throughput-%dstream", run.streams)
		if run.reverse {
			extra = []string{"-R"}
			name += "-reverse"
		}
		rows := measure(ways, func(way string, m *meter) float64 {
			var prefix []string
			switch way {
			case "proxychains4":
				prefix = pcDante
			case "redsocks":
				defer redirect(h, t.nft, iperfAddr, rsPort)()
				prefix = redirectedClient
			case "transparent":
				defer redirect(h, t.nft, iperfAddr, tpPort)()
				prefix = redirectedClient
			}
			addr := addrs[way]
			if way == "transparent" {
				addr = iperfAddr
			}
			return m.timed(cfg.seconds, func() float64 { return iperfGbps(h, prefix, t.iperf, addr, run.streams, cfg.seconds, extra...) })
		})
		cpus.report(name, "Gbit/s", rows, 0.9, sharedThroughputBars)
		if !cpus.shared {
			reportTransparent(name, rows, 0.95, 1.15)
		}
	}

	// New connections per second, one 1-byte exchange each. Every run gets
	// fresh servers on fresh ports: tens of thousands of loopback
	// connections leave TIME_WAIT entries that would starve the next run.
	rows := measure(connWays, func(way string, m *meter) float64 {
		echo := testnet.Echo(h).Addr().String()
		rate := func(prefix []string, addr string) float64 {
			return m.timed(cfg.seconds, func() float64 { return connRate(h, prefix, t.connrate, addr, cfg.seconds) })
		}
		if way == "direct" {
			return rate(nil, echo)
		}
		d := cpus.dante(peertest.DanteOptions{})
		defer d.Proc.Stop()
		switch way {
		case "proxychains4":
			return rate(h.proxychains(t.pc, d.Addr), echo)
		case wayGostForward:
			fwd, p := h.gostForward(t.gost, echo, d.Addr)
			defer p.Stop()
			return rate(nil, fwd)
		case "redsocks":
			port, p := h.redsocks(t.redsocks, d.Addr)
			defer p.Stop()
			defer redirect(h, t.nft, echo, port)()
			return rate(redirectedClient, echo)
		case "transparent":
			port, p := h.socksfwdTransparent(cfg.socksfwd, d.Addr)
			defer p.Stop()
			defer redirect(h, t.nft, echo, port)()
			return rate(redirectedClient, echo)
		case "transparent-tproxy":
			port, p := h.socksfwdTransparent(cfg.socksfwd, d.Addr)
			defer p.Stop()
			_, echoPort, _ := net.SplitHostPort(echo)
			ep, _ := strconv.Atoi(echoPort)
			tproxyRule(h, "tcp", byClientGID, ep, port)
			defer tproxyUDPOff()
			return rate(redirectedClient, echo)
		case "socksfwd-conntrack":
			defer redirect(h, t.nft, "192.0.2.1:9", 9)() // matches nothing; its NAT hook tracks every connection
		}
		fwd, p := h.socksfwd(cfg.socksfwd, echo, d.Addr)
		defer p.Stop()
		return rate(nil, fwd)
	})
	name := fmt.Sprintf("tcp-new-conns-%dthreads", connThreads)
	cpus.report(name, "conn/s", rows, 0.8, sharedConnBars)
	if !cpus.shared {
		reportTransparent(name, rows, 0.95, 1.0)
	}
	return dante, iperfAddr
}

// relayModes are socksfwd's copy modes (its hidden --relay-copy flag):
// splice, its default, through pipes lent only while bytes are in flight;
// iocopy, Go's own splice (io.Copy), which holds two pipes per session; and
// pooled, through user-space buffers.
var relayModes = []string{"splice", "iocopy", "pooled"}

// roundOrder is the order in which round runs n ways: every other round
// backwards, and each pair of rounds starting one way further along, so
// that a way neither keeps its place nor always follows the same other
// one: the run after a heavy one pays for it (a warm or a cooling CPU,
// sockets in TIME_WAIT). (Rotating by one every round and reversing every
// other cancelled out: two ways ran in one order in every round, and of
// four, two never ran first.)
func roundOrder(n, round int) []int {
	order := make([]int, n)
	for i := range order {
		if round%2 == 0 {
			order[i] = (i + round/2) % n
		} else {
			order[i] = (n - 1 - i + round/2) % n
		}
	}
	return order
}

// benchRelayCPU: socksfwd's CPU per gigabyte relayed in each copy mode, the
// robust measure on a noisy machine and what the default was chosen by.
// The modes run interleaved, and the verdict is the median of the
// per-round ratios of splice to iocopy: the pooled pipes must cost no more
// than 10 % over Go's splice.
func benchRelayCPU(h *harness, iperf, target, bin, proxy string) {
	// iperf3 reads -n 4G as 4 GiB; the figures are per 10^9 bytes, as
	// every other row's.
	const gibibytes, cpuRounds = 4, 3
	const gigabytes = gibibytes * (1 << 30) / 1e9
	perGB := make(map[string][]float64)
	for round := range cpuRounds {
		for _, k := range roundOrder(len(relayModes), round) {
			mode := relayModes[k]
			fwd, p := h.socksfwd(bin, target, proxy, "--relay-copy", mode)
			before := cpuMillis(h, p.Pid())
			host, port, _ := net.SplitHostPort(fwd)
			if out, err := exec.Command(iperf, "-c", host, "-p", port, "-n", strconv.Itoa(gibibytes)+"G", "-J").Output(); err != nil {
				h.Fatalf("iperf3 -n %dG: %v\n%s", gibibytes, err, out)
			}
			perGB[mode] = append(perGB[mode], float64(cpuMillis(h, p.Pid())-before)/gigabytes)
			p.Stop()
		}
	}
	parts := make([]string, 0, len(relayModes))
	for _, mode := range relayModes {
		parts = append(parts, fmt.Sprintf("%s %.0f ms", mode, median(perGB[mode])))
	}
	var ratios []float64
	var each []string
	for i, v := range perGB["splice"] {
		if base := perGB["iocopy"][i]; base > 0 {
			ratios = append(ratios, v/base)
			each = append(each, fmt.Sprintf("%.2f", v/base))
		}
	}
	verdict, ratio := "no data", 0.0
	if len(ratios) > 0 {
		ratio = median(ratios)
		verdict = "ok"
		if ratio > 1.10 {
			verdict = "ABOVE BAR"
		}
	}
	fmt.Printf("%-26s socksfwd CPU per GB relayed: %s | splice/iocopy = %.3f (rounds %s; bar ≤ 1.10: %s)\n",
		"tcp-relay-cpu", strings.Join(parts, " | "), ratio, strings.Join(each, " "), verdict)
}

// benchMemory: RSS idle, and RSS and descriptors per idle forwarded
// session, for each copy mode. The bars hold the default (splice): an idle
// session holds its two sockets only, and at most 12 KB.
func benchMemory(h *harness, cfg benchConfig, proxy string) {
	for _, mode := range relayModes {
		m := idleSessions(h, cfg, testnet.Echo(h).Addr().String(), proxy, mode)
		bars := ""
		if mode == "splice" {
			verdict := "ok"
			// Pipes kept free for the next burst are the process's, not a
			// session's: a few of them round away over a thousand sessions.
			if m.kbPer > 12 || m.fdsPer >= 2.05 {
				verdict = "ABOVE BAR"
			}
			bars = " (bars ≤ 12 KB, 2 descriptors: " + verdict + ")"
		}
		fmt.Printf("%-26s socksfwd (%s copy) idle RSS %d KB | per idle session %.1f KB, %.2f descriptors; %d held%s\n",
			"tcp-idle-session", mode, m.idleKB, m.kbPer, m.fdsPer, cfg.idleConns, bars)
	}
}

// iperfServer starts iperf3 -s on a free loopback port and returns its
// address, once it says it listens (a probe connection would count as a
// test).
func (h *harness) iperfServer(iperf string) string {
	port := strconv.Itoa(peertest.FreePort(h))
	srv := peertest.Start(h, "iperf3 -s", iperf, "-s", "-p", port, "--forceflush")
	peertest.WaitOutput(h, srv, "Server listening")
	return "127.0.0.1:" + port
}

// iperfGbps runs an iperf3 client (under prefix, e.g. proxychains4) and
// returns the received throughput; extra are more client flags (-R).
func iperfGbps(h *harness, prefix []string, iperf, addr string, streams, secs int, extra ...string) float64 {
	host, port, _ := net.SplitHostPort(addr)
	argv := append(append([]string{}, prefix...), iperf, "-c", host, "-p", port, "-P", strconv.Itoa(streams), "-t", strconv.Itoa(secs), "-J")
	got := runIperf(h, append(argv, extra...))
	return got.BitsPerSecond / 1e9
}

// iperfReceived is what an iperf3 client reports the receiver got.
type iperfReceived struct {
	BitsPerSecond float64 `json:"bits_per_second"`
	LostPercent   float64 `json:"lost_percent"` // UDP only
}

// runIperf runs an iperf3 client with -J (argv may start with a wrapper
// such as proxychains4) and returns the receiver's totals.
func runIperf(h *harness, argv []string) iperfReceived {
	out, err := exec.Command(argv[0], argv[1:]...).Output()
	var res struct {
		End struct {
			SumReceived iperfReceived `json:"sum_received"`
		} `json:"end"`
		Error string `json:"error"`
	}
	if jerr := json.Unmarshal(out, &res); jerr != nil || res.Error != "" {
		h.Fatalf("%s: %v %v %s", strings.Join(argv, " "), err, jerr, res.Error)
	}
	return res.End.SumReceived
}

// connrate is the connection-rate client, compiled with cc on first use
// and shared by every part of the run.
func (h *harness) connrate() string {
	if h.connrateBin != "" {
		return h.connrateBin
	}
	cc := peertest.Require(h, "cc")
	connrate := filepath.Join(h.TempDir(), "connrate")
	src := connrate + ".c"
	os.WriteFile(src, []byte(connrateSource), 0o644)
	if out, err := exec.Command(cc, "-O2", "-pthread", "-o", connrate, src).CombinedOutput(); err != nil {
		h.Fatalf("building connrate: %v\n%s", err, out)
	}
	h.connrateBin = connrate
	return connrate
}

// connRate runs the connection-rate client against addr (under prefix,
// e.g. proxychains4) and returns connections per second; extra are its
// optional arguments (a CONNECT target, when addr is an HTTP proxy).
func connRate(h *harness, prefix []string, connrate, addr string, secs int, extra ...string) float64 {
	host, port, _ := net.SplitHostPort(addr)
	argv := append(append([]string{}, prefix...), connrate, host, port, strconv.Itoa(secs), strconv.Itoa(connThreads))
	argv = append(argv, extra...)
	out, err := exec.Command(argv[0], argv[1:]...).Output()
	if err != nil {
		h.Fatalf("%s: %v", strings.Join(argv, " "), err)
	}
	var n, failed int
	if _, err := fmt.Sscan(string(out), &n, &failed); err != nil {
		h.Fatalf("connrate printed %q", out)
	}
	// A run where nothing got through is no figure (a ratio to it would
	// be dropped in silence); a few failures are said beside the row.
	if n == 0 {
		h.Fatalf("%s: no connection completed (%d failed)", strings.Join(argv, " "), failed)
	}
	if failed > 0 {
		through := addr
		if len(prefix) > 0 { // proxychains4, whose hop is in the client
			through = filepath.Base(prefix[0]) + " → " + addr
		}
		fmt.Printf("  (connrate through %s: %d of %d connections failed)\n", through, failed, n+failed)
	}
	return float64(n) / float64(secs)
}

// idleCost is what held idle sessions cost a forwarder.
type idleCost struct {
	idleKB int     // RSS with no session
	kbPer  float64 // RSS growth per idle session
	fdsPer float64 // descriptors per idle session
}

// idleSessions starts a fresh socksfwd, warms it with one session, then
// holds cfg.idleConns sessions open after one exchange each, and returns
// the idle RSS and the RSS and descriptor growth per held session.
func idleSessions(h *harness, cfg benchConfig, echo, proxy, mode string) idleCost {
	fwd, p := h.socksfwd(cfg.socksfwd, echo, proxy, "--relay-copy", mode)
	exchange := func() net.Conn {
		c, err := net.Dial("tcp", fwd)
		if err != nil {
			h.Fatalf("%v", err)
		}
		c.SetDeadline(time.Now().Add(30 * time.Second))
		if _, err := c.Write([]byte("x")); err != nil {
			h.Fatalf("%v", err)
		}
		if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
			h.Fatalf("exchange through socksfwd: %v", err)
		}
		return c
	}
	exchange().Close()
	settle()
	before, fdsBefore := rssKB(h, p.Pid()), openFDs(h, p.Pid())
	conns := make([]net.Conn, 0, cfg.idleConns)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range cfg.idleConns {
		conns = append(conns, exchange())
	}
	settle()
	after, fdsAfter := rssKB(h, p.Pid()), openFDs(h, p.Pid())
	p.Stop()
	n := float64(cfg.idleConns)
	return idleCost{idleKB: before, kbPer: float64(after-before) / n, fdsPer: float64(fdsAfter-fdsBefore) / n}
}

// redsocks, the C transparent redirector (libevent), takes connections that
// the kernel redirected to it and carries each to its original destination
// through proxy, as socksfwd's users run it beside iptables. It starts on a
// free port, which it returns with the process.
func (h *harness) redsocks(bin, proxy string) (int, *peertest.Proc) {
	port := peertest.FreePort(h)
	proxyHost, proxyPort, _ := net.SplitHostPort(proxy)
	conf := filepath.Join(h.TempDir(), "redsocks.conf")
	os.WriteFile(conf, fmt.Appendf(nil, `base {
	log_debug = off;
	log_info = off;
	log = stderr;
	daemon = off;
	redirector = iptables;
}
redsocks {
	local_ip = 127.0.0.1;
	local_port = %d;
	ip = %s;
	port = %s;
	type = socks5;
}
`, port, proxyHost, proxyPort), 0o644)
	p := peertest.Start(h, "redsocks", bin, "-c", conf)
	peertest.WaitTCP(h, p, "127.0.0.1:"+strconv.Itoa(port))
	return port, p
}

// redirectGID marks the clients whose connections are redirected to
// redsocks: a group no peer runs as (Dante's children run as nobody).
const redirectGID = "4242"

// redirectedClient runs a client command in redirectGID.
var redirectedClient = []string{"setpriv", "--regid=" + redirectGID, "--clear-groups"}

// redirect sends redirectedClient's TCP connections to target on to the
// local port instead, through an nftables table that the returned function
// deletes. The table exists only while a redsocks row runs: its NAT hook
// turns on connection tracking, which would tax every other row too.
func redirect(h *harness, nft, target string, port int) (undo func()) {
	host, tport, _ := net.SplitHostPort(target)
	for _, cmd := range []string{
		"add table ip socksbench",
		"add chain ip socksbench out { type nat hook output priority -100 ; }",
		fmt.Sprintf("add rule ip socksbench out ip daddr %s tcp dport %s meta skgid %s redirect to :%d", host, tport, redirectGID, port),
	} {
		if out, err := exec.Command(nft, strings.Fields(cmd)...).CombinedOutput(); err != nil {
			h.Fatalf("nft %s: %v %s", cmd, err, out)
		}
	}
	return func() { exec.Command(nft, "delete", "table", "ip", "socksbench").Run() }
}

// socksfwdTransparent starts the binary with a transparent listener on a
// free loopback port via proxy, for the REDIRECT rule redsocks also gets.
func (h *harness) socksfwdTransparent(bin, proxy string) (int, *peertest.Proc) {
	port := peertest.FreePort(h)
	p := peertest.Start(h, "socksfwd", bin, "--transparent", "127.0.0.1:"+strconv.Itoa(port), "-S", proxy, "--log-format", "json")
	peertest.WaitOutput(h, p, `"message":"transparent `)
	return port, p
}

// proxychains is the argv prefix that runs a client under proxychains4
// (pc) through the SOCKS5 proxy on loopback, by a generated config.
func (h *harness) proxychains(pc, proxy string) []string {
	_, port, _ := net.SplitHostPort(proxy)
	conf := filepath.Join(h.TempDir(), "proxychains.conf")
	os.WriteFile(conf, []byte("strict_chain\nquiet_mode\ntcp_read_time_out 15000\ntcp_connect_time_out 8000\n[ProxyList]\nsocks5 127.0.0.1 "+port+"\n"), 0o644)
	return []string{pc, "-q", "-f", conf}
}
