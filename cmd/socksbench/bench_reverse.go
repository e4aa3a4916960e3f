//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/rs/zerolog"

	"github.com/socksfwd/socksfwd/internal/peertest"
	"github.com/socksfwd/socksfwd/internal/sockbuf"
	"github.com/socksfwd/socksfwd/internal/testnet"
	"github.com/socksfwd/socksfwd/socksclient"
	"github.com/socksfwd/socksfwd/tunnel"
)

// Bars of the reverse forward: the port is closed between two callers for
// at most twice what a BIND to the same Dante takes a client that speaks
// SOCKS directly; one reverse connection carries at least 0.95 of what a
// -L connection through the same Dante carries.
const (
	rearmBar      = 2.0
	reverseTCPBar = 0.95
)

// bindRTTSamples is how many BINDs each round times directly.
const bindRTTSamples = 300

// benchReverse: -R through Dante. Connections per second with a
// closed-loop caller that retries a refused connect at once, the re-arm gap
// (second reply → next first reply) against Dante's own BIND round trip
// timed in the same rounds, and one reverse connection's throughput beside
// a -L connection's.
func benchReverse(h *harness, cfg benchConfig) {
	dante := peertest.Dante(h, peertest.DanteOptions{})
	fmt.Printf("socksbench: -R through %s, median of %d interleaved rounds, %d s per run\n", peertest.Versions()[0], rounds, cfg.seconds)
	benchReverseRate(h, cfg, dante.Addr)
	benchReverseThroughput(h, cfg, dante.Addr)
}

// reverseRun is what one timed run of the closed-loop caller saw.
type reverseRun struct {
	conns, refused, resets int
	gaps, held             []time.Duration // per re-arm: the whole gap, and the part spent waiting for the session
}

// benchReverseRate times the connection rate and re-arm gap of
// tunnel.Reverse (the service behind -R, run in this process so the gap
// comes from its hook) with the port Dante picks and with a fixed port,
// and Dante's BIND round trip, each round all three.
func benchReverseRate(h *harness, cfg benchConfig, dante string) {
	echo := testnet.Echo(h).Addr().String()
	d := &socksclient.Dialer{ProxyAddr: dante}
	ups := socksclient.NewUpstreams(d)
	ways := []string{"bind-rtt", "port-0", "fixed-port"}
	runs := make(map[string][]reverseRun)
	var rtts [][]time.Duration
	measure(ways, func(way string, m *meter) float64 {
		if way == "bind-rtt" {
			rtts = append(rtts, bindRoundTrips(h, d))
			return 0
		}
		var run reverseRun
		m.timed(cfg.seconds, func() float64 {
			run = reverseClosedLoop(h, ups, echo, way == "fixed-port", cfg.seconds)
			return 0
		})
		runs[way] = append(runs[way], run)
		return float64(run.conns) / float64(cfg.seconds)
	})

	var allRTT []time.Duration
	for _, r := range rtts {
		allRTT = append(allRTT, r...)
	}
	fmt.Printf("%-26s Dante's BIND round trip (connect, greeting, request, first reply; socksclient directly) p50 %s p99 %s, %d BINDs\n",
		"reverse-bind-rtt", ms(quantile(allRTT, 0.5)), ms(quantile(allRTT, 0.99)), len(allRTT))
	for _, way := range ways[1:] {
		var rates []float64
		var gaps, held, after []time.Duration
		refused, resets := 0, 0
		for _, r := range runs[way] {
			resets += r.resets
			rates = append(rates, float64(r.conns)/float64(cfg.seconds))
			gaps, held = append(gaps, r.gaps...), append(held, r.held...)
			refused += r.refused
			for i := range r.gaps {
				after = append(after, r.gaps[i]-r.held[i])
			}
		}
		// The bar, per round: that round's gap p50 over that round's BIND
		// round trip p50; the median of those.
		var ratios []float64
		var each []string
		for i, r := range runs[way] {
			if i < len(rtts) && len(r.gaps) > 0 {
				own := r.gaps
				if way == "fixed-port" {
					own = nil
					for j := range r.gaps {
						own = append(own, r.gaps[j]-r.held[j])
					}
				}
				ratio := float64(quantile(own, 0.5)) / float64(quantile(rtts[i], 0.5))
				ratios = append(ratios, ratio)
				each = append(each, fmt.Sprintf("%.2f", ratio))
			}
		}
		line := fmt.Sprintf("%-26s %.0f conn/s (rounds %s), connects refused in the gaps %d, reset %d | re-arm gap p50 %s p99 %s",
			"reverse-conns-"+way, median(rates), joinFloats(rates), refused, resets, ms(quantile(gaps, 0.5)), ms(quantile(gaps, 0.99)))
		what := "gap"
		if way == "fixed-port" {
			line += fmt.Sprintf(", of which waiting for the session to release the port p50 %s; after it p50 %s p99 %s",
				ms(quantile(held, 0.5)), ms(quantile(after, 0.5)), ms(quantile(after, 0.99)))
			what = "gap after the session"
		}
		if len(ratios) > 0 {
			ratio := median(ratios)
			line += fmt.Sprintf(" | %s p50 / BIND round trip p50 = %.2f (rounds %s)%s", what, ratio, strings.Join(each, " "),
				barText(ratio <= rearmBar, fmt.Sprintf("≤ %.0f", rearmBar)))
		}
		fmt.Println(line)
	}
}

// bindRoundTrips times BINDs to the proxy one after another, each closed
// at once (the proxy stops listening).
func bindRoundTrips(h *harness, d *socksclient.Dialer) []time.Duration {
	out := make([]time.Duration, 0, bindRTTSamples)
	for range bindRTTSamples {
		start := time.Now()
		b, err := d.Bind(context.Background(), socksclient.Addr{})
		if err != nil {
			h.Fatalf("BIND through %s: %v", d.ProxyAddr, err)
		}
		out = append(out, time.Since(start))
		b.Close()
	}
	return out
}

// reverseClosedLoop runs a tunnel.Reverse to echo through ups for secs
// seconds against one caller that connects, exchanges a byte and closes,
// again and again: at the port Dante picks (learnt from the forward), or
// at a fixed port, retrying a refused connect at once.
func reverseClosedLoop(h *harness, ups *socksclient.Upstreams, echo string, fixed bool, secs int) reverseRun {
	remote := socksclient.Addr{IP: netip.IPv4Unspecified()}
	if fixed {
		remote.Port = uint16(peertest.FreePort(h))
	}
	var (
		mu  sync.Mutex
		run reverseRun
	)
	listen := make(chan socksclient.Addr, 1)
	r := tunnel.NewReverse(tunnel.ReverseConfig{
		Name: "bench", Remote: remote, Target: echo, Upstreams: ups, Logger: zerolog.Nop(),
		OnListen: func(a socksclient.Addr) {
			if a.Port == 0 {
				return
			}
			select { // the caller wants the newest only
			case <-listen:
			default:
			}
			listen <- a
		},
		OnRearm: func(re tunnel.Rearm) {
			mu.Lock()
			run.gaps, run.held = append(run.gaps, re.Gap), append(run.held, re.Held)
			mu.Unlock()
		},
	})
	served := make(chan error, 1)
	go func() { served <- r.Serve(context.Background()) }()
	defer func() {
		r.Close()
		<-served
	}()

	var addr socksclient.Addr
	select {
	case addr = <-listen:
	case <-time.After(10 * time.Second):
		h.Fatalf("-R through %s never listened", ups.Dialers()[0].ProxyAddr)
	}
	deadline := time.Now().Add(time.Duration(secs) * time.Second)
	buf := make([]byte, 1)
	conns, refused, resets := 0, 0, 0
	for time.Now().Before(deadline) {
		if !fixed && conns > 0 { // each BIND listens on a new port
			select {
			case addr = <-listen:
			case <-time.After(10 * time.Second):
				h.Fatalf("-R did not listen again after caller %d", conns)
			}
		}
		c, err := net.Dial("tcp", addr.String())
		if fixed && errors.Is(err, syscall.ECONNREFUSED) {
			refused++ // the gap: at once again
			continue
		}
		if fixed && errors.Is(err, syscall.ECONNRESET) {
			resets++ // see below
			continue
		}
		if err != nil {
			h.Fatalf("caller: %v", err)
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		_, err = c.Write([]byte{'x'})
		if err == nil {
			_, err = io.ReadFull(c, buf)
		}
		c.Close()
		if fixed && (errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)) {
			// Connected to Dante's listener of the last BIND in the moment
			// before Dante closed it: as refused.
			resets++
			continue
		}
		if err != nil {
			h.Fatalf("caller %d through -R: %v", conns, err)
		}
		conns++
	}
	mu.Lock()
	defer mu.Unlock()
	run.conns, run.refused, run.resets = conns, refused, resets
	return run
}

// benchReverseThroughput: one connection's throughput through -R (caller →
// Dante's port → socksfwd → sink) beside one through -L (client → socksfwd
// → Dante → sink), both of the same socksfwd process, interleaved rounds,
// the verdict on the median of per-round ratios. Beside them, for the
// reader, Dante's own BIND path against its CONNECT path, driven by a
// client that speaks SOCKS directly (with socksfwd's socket buffers): what
// of the -R/-L ratio is Dante's.
func benchReverseThroughput(h *harness, cfg benchConfig, dante string) {
	sink := newByteSink(h)
	remotePort := strconv.Itoa(peertest.FreePort(h))
	local := freeAddr(h)
	p := peertest.Start(h, "socksfwd", cfg.socksfwd, "-R", remotePort+":"+sink.addr, "-L", local+":"+sink.addr,
		"-S", dante, "--log-format", "json")
	peertest.WaitOutput(h, p, `listens on`)
	d := &socksclient.Dialer{ProxyAddr: dante, Control: sockbuf.CapLoopbackTCP}
	ways := []string{"-L", "-R", "dante-connect", "dante-bind"}
	rows := measure(ways, func(way string, m *meter) float64 {
		return m.timed(cfg.seconds, func() float64 {
			switch way {
			case "-L":
				return sink.rate(h, pump(h, dialRetry(h, local), cfg.seconds))
			case "-R":
				return sink.rate(h, pump(h, dialRetry(h, "127.0.0.1:"+remotePort), cfg.seconds))
			case "dante-connect":
				target, _ := socksclient.ParseAddr(sink.addr)
				c, err := d.DialAddr(context.Background(), target)
				if err != nil {
					h.Fatalf("CONNECT through %s: %v", dante, err)
				}
				return sink.rate(h, pump(h, c, cfg.seconds))
			}
			b, err := d.Bind(context.Background(), socksclient.Addr{})
			if err != nil {
				h.Fatalf("BIND through %s: %v", dante, err)
			}
			bound := &byteSink{got: make(chan int64, 1)}
			go func() {
				c, err := b.Accept(context.Background())
				if err != nil {
					bound.got <- -1
					return
				}
				n, _ := io.Copy(io.Discard, c)
				c.Close()
				bound.got <- n
			}()
			return bound.rate(h, pump(h, dialRetry(h, b.Addr().String()), cfg.seconds))
		})
	})
	fwd, fwdRounds := pairedRatio(rows[1], rows[0])
	dan, danRounds := pairedRatio(rows[3], rows[2])
	fmt.Printf("%-26s -L %.2f Gbit/s | -R %.2f Gbit/s | -R/-L = %.3f (rounds %s)%s\n", "reverse-tcp-throughput",
		rows[0].value, rows[1].value, fwd, strings.Join(fwdRounds, " "), barText(fwd >= reverseTCPBar, fmt.Sprintf("≥ %.2f", reverseTCPBar)))
	fmt.Printf("%-26s Dante alone, socksclient directly: CONNECT %.2f Gbit/s | BIND %.2f Gbit/s | BIND/CONNECT = %.3f (rounds %s)\n",
		"reverse-tcp-dante-alone", rows[2].value, rows[3].value, dan, strings.Join(danRounds, " "))
	for _, r := range rows {
		fmt.Printf("%-26s   busiest via %s: %s\n", "", r.way, r.busy)
	}
	if line := cpuLine("Gbit/s", rows); line != "" {
		fmt.Println(line[1:]) // socksfwd's, for -L and -R; the Dante ways' client is this process
	}
}

// byteSink counts what each connection sends it until EOF.
type byteSink struct {
	addr string
	got  chan int64
}

func newByteSink(h *harness) *byteSink {
	s := &byteSink{got: make(chan int64, 1)}
	s.addr = testnet.Serve(h, func(c net.Conn) {
		n, _ := io.Copy(io.Discard, c)
		s.got <- n
	}).Addr().String()
	return s
}

// dialRetry connects to addr; a connect refused while -R re-arms is tried
// again, for up to 10 s.
func dialRetry(h *harness, addr string) net.Conn {
	for deadline := time.Now().Add(10 * time.Second); ; {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			return c
		}
		if !errors.Is(err, syscall.ECONNREFUSED) || time.Now().After(deadline) {
			h.Fatalf("throughput client: %v", err)
		}
		time.Sleep(time.Millisecond) // the forward re-arms; bounded
	}
}

// pumped is what pump sent on c, and since when.
type pumped struct {
	c     net.Conn
	sent  int64
	start time.Time
}

// pump writes to c for secs seconds, then half-closes it; rate closes it
// once the sink has counted.
func pump(h *harness, c net.Conn, secs int) pumped {
	buf := make([]byte, 256<<10)
	p := pumped{c: c, start: time.Now()}
	for end := p.start.Add(time.Duration(secs) * time.Second); time.Now().Before(end); {
		n, err := c.Write(buf)
		p.sent += int64(n)
		if err != nil {
			h.Fatalf("throughput client: %v", err)
		}
	}
	c.(interface{ CloseWrite() error }).CloseWrite()
	return p
}

// rate waits for the sink to count what p sent and returns the rate it
// received at, in Gbit/s.
func (s *byteSink) rate(h *harness, p pumped) float64 {
	defer p.c.Close()
	var got int64
	select {
	case got = <-s.got:
	case <-time.After(30 * time.Second):
		h.Fatalf("the sink never saw the end of the stream")
	}
	if got != p.sent {
		h.Fatalf("sent %d bytes, the sink got %d", p.sent, got)
	}
	return float64(got) * 8 / time.Since(p.start).Seconds() / 1e9
}

// quantile is the q-quantile of d (nearest rank), 0 when empty.
func quantile(d []time.Duration, q float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	// Nearest rank: the smallest value with at least q of them at or
	// below it.
	return s[max(int(math.Ceil(q*float64(len(s))))-1, 0)]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.3f ms", float64(d.Microseconds())/1000) }

func joinFloats(v []float64) string {
	parts := make([]string, len(v))
	for i, f := range v {
		parts[i] = fmt.Sprintf("%.2f", f)
	}
	return strings.Join(parts, " ")
}
