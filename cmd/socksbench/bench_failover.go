//go:build linux

package main

import (
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/miekg/dns"

	"github.com/socksfwd/socksfwd/internal/peertest"
	"github.com/socksfwd/socksfwd/internal/testnet"
)

// benchFailover: the first of two upstreams is black-holed (it accepts
// and never answers), Dante is second. The bars: the first TCP connection
// is served within 1 s (the hedge, not the 10 s handshake timeout), 200
// DNS queries are all answered (none SERVFAIL), and the log says once that
// the upstream is down. The baseline is the same first connection and
// queries with Dante as the only upstream.
func benchFailover(h *harness, cfg benchConfig) {
	dante := peertest.Dante(h, peertest.DanteOptions{})
	resolver := peertest.DnsmasqWildcard(h, "bench.test", "192.0.2.7")
	echo := testnet.Echo(h).Addr().String()
	hole := blackHole(h)

	for _, way := range []struct{ name, servers string }{{"dante-only", dante.Addr}, {"blackhole+dante", hole + "," + dante.Addr}} {
		// One process for each measure, so each meets the black hole first.
		start := func() (local, dnsAddr string, p *peertest.Proc) {
			local, dnsAddr = freeAddr(h), freeAddr(h)
			args := []string{cfg.socksfwd, "-L", local + ":" + echo, "--dns", dnsAddr, "--dns-upstream", resolver.Addr, "--log-format", "json"}
			for _, s := range strings.Split(way.servers, ",") {
				args = append(args, "-S", s)
			}
			p = peertest.Start(h, "socksfwd", args...)
			peertest.WaitOutput(h, p, "DNS on")
			return local, dnsAddr, p
		}
		local, _, p := start()
		t0 := time.Now()
		if err := echoRoundTrip(local); err != nil {
			h.Fatalf("failover %s: first connection: %v", way.name, err)
		}
		first := time.Since(t0)
		settleLog := func(p *peertest.Proc) {
			if way.name != "dante-only" { // the line may still be on its way through the pipe
				peertest.WaitOutput(h, p, "upstream is down")
			}
		}
		settleLog(p)
		downLines := strings.Count(p.Output(), "upstream is down")
		p.Stop()

		_, dnsAddr, p := start()
		t0 = time.Now()
		servfail, failed := dnsBurst(dnsAddr, 200)
		dnsTime := time.Since(t0)
		settleLog(p)
		downLines += strings.Count(p.Output(), "upstream is down")
		p.Stop()

		verdict := ""
		if way.name != "dante-only" {
			verdict = barText(first < time.Second && servfail == 0 && failed == 0 && downLines == 2,
				"first connection < 1 s, 0 SERVFAIL, one 'down' line per process")
		}
		fmt.Printf("%-26s %-16s first TCP connection %6.1f ms | first 200 DNS queries in %6.1f ms: %d SERVFAIL, %d unanswered | 'upstream is down' lines %d in 2 processes%s\n",
			"failover-first-blackholed", way.name, float64(first.Microseconds())/1000, float64(dnsTime.Microseconds())/1000,
			servfail, failed, downLines, verdict)
	}
}

// blackHole listens on loopback and holds every connection without
// reading or answering, until the bench ends.
func blackHole(h *harness) string {
	ln := testnet.Serve(h, func(c net.Conn) {
		io.Copy(io.Discard, c) // returns when the bench closes it
	})
	return ln.Addr().String()
}

// echoRoundTrip connects to addr, exchanges one message and half-closes.
func echoRoundTrip(addr string) error {
	c, err := net.DialTimeout("tcp", addr, 15*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(15 * time.Second))
	if _, err := io.WriteString(c, "ping"); err != nil {
		return err
	}
	buf := make([]byte, 4)
	_, err = io.ReadFull(c, buf)
	return err
}

// dnsBurst sends n queries at once over UDP and counts SERVFAIL answers
// and queries that got no answer at all.
func dnsBurst(addr string, n int) (servfail, failed int) {
	var (
		mu sync.Mutex
		wg sync.WaitGroup
	)
	for i := range n {
		wg.Go(func() {
			c := &dns.Client{Timeout: 10 * time.Second}
			q := new(dns.Msg)
			q.SetQuestion(fmt.Sprintf("f%d.bench.test.", i), dns.TypeA)
			r, _, err := c.Exchange(q, addr)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err != nil:
				failed++
			case r.Rcode == dns.RcodeServerFailure:
				servfail++
			}
		})
	}
	wg.Wait()
	return servfail, failed
}
