package dnsforward

import (
	"context"
	"errors"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/miekg/dns"
	"github.com/rs/zerolog"

	"github.com/socksfwd/socksfwd/socksclient"
	"github.com/socksfwd/socksfwd/socksclient/sockstest"
)

// newHealthForwarder is a tcp-transport forwarder to two resolvers
// (192.0.2.53 and .54) answering on in-memory connections, logging to
// logs; the first one's dials fail while dead is set.
func newHealthForwarder(t *testing.T, logs *syncBuffer, dead *atomic.Bool) *Forwarder {
	t.Helper()
	f, err := New(Config{
		Resolvers: documentationResolvers(t, 2),
		Upstreams: socksclient.NewUpstreams(&socksclient.Dialer{ProxyAddr: "192.0.2.1:1080"}),
		Timeout:   10 * time.Second,
		Logger:    zerolog.New(logs),
	})
	if err != nil {
		t.Fatal(err)
	}
	res := &pipeResolver{}
	f.pools[0].dial = func(ctx context.Context) (net.Conn, error) {
		if dead.Load() {
			return nil, errors.New("socks connect: connection refused (REP 0x05)")
		}
		return res.dial(ctx)
	}
	f.pools[1].dial = res.dial
	t.Cleanup(func() {
		f.Close()
		res.wg.Wait()
	})
	return f
}

// newSlowNameForwarder is newHealthForwarder whose first resolver answers
// every name but those starting with "slow", logging to logs.
func newSlowNameForwarder(t *testing.T, logs *syncBuffer) (*Forwarder, *pipeResolver) {
	f := newHealthForwarder(t, logs, new(atomic.Bool))
	slow := &pipeResolver{silent: func(q *dns.Msg) bool { return strings.HasPrefix(q.Question[0].Name, "slow") }}
	f.pools[0].dial = slow.dial
	return f, slow
}

// healthLines are the log lines about resolver state.
func healthLines(logs *syncBuffer) []string {
	var out []string
	for _, l := range logs.lines() {
		if strings.Contains(l, `"message":"DNS resolver`) {
			out = append(out, l)
		}
	}
	return out
}

func wantAnswered(t *testing.T, f *Forwarder, name string) {
	t.Helper()
	if m := serve(t, f, query(name, dns.TypeA, 1)); m.Rcode != dns.RcodeSuccess || len(m.Answer) != 1 {
		t.Fatalf("%s: %s, want an answer", name, dns.RcodeToString[m.Rcode])
	}
}

// TestResolverStateLogged: a dead first resolver is logged once, at its
// first failure, though every query fails over past it; once it answers
// again that is logged too; state changes within the period are not
// logged one by one, and a change the period held back is logged by the
// first query after it. Before, nothing was logged while the second
// resolver answered: only "every resolver failed" had a line.
func TestResolverStateLogged(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var (
			logs syncBuffer
			dead atomic.Bool
		)
		dead.Store(true)
		f := newHealthForwarder(t, &logs, &dead)
		for range 20 {
			wantAnswered(t, f, "a.example")
		}
		lines := healthLines(&logs)
		if len(lines) != 1 || !strings.Contains(lines[0], "DNS resolver is failing; trying the next one") ||
			!strings.Contains(lines[0], `"resolver":"192.0.2.53:53"`) || !strings.Contains(lines[0], "connection refused") {
			t.Fatalf("after 20 queries past a dead first resolver, want one line naming it and why:\n%s", strings.Join(logs.lines(), "\n"))
		}

		dead.Store(false)
		time.Sleep(failureLogPeriod) // the redial backoff and the line's period pass
		wantAnswered(t, f, "b.example")
		lines = healthLines(&logs)
		if len(lines) != 2 || !strings.Contains(lines[1], "DNS resolver answers again") || !strings.Contains(lines[1], `"resolver":"192.0.2.53:53"`) {
			t.Fatalf("want a line saying it answers again:\n%s", strings.Join(logs.lines(), "\n"))
		}

		// It fails again at once: within the period, no line.
		dead.Store(true)
		f.pools[0].mu.Lock()
		for _, c := range f.pools[0].conns {
			c.fail(errors.New("test: the resolver went away"))
		}
		f.pools[0].mu.Unlock()
		for range 5 {
			wantAnswered(t, f, "c.example")
		}
		if lines = healthLines(&logs); len(lines) != 2 {
			t.Fatalf("a change within the period was logged:\n%s", strings.Join(lines, "\n"))
		}
		// After it, the first query logs the state it finds.
		time.Sleep(failureLogPeriod)
		wantAnswered(t, f, "d.example")
		if lines = healthLines(&logs); len(lines) != 3 || !strings.Contains(lines[2], "DNS resolver is failing") {
			t.Fatalf("want the failure held back logged after the period:\n%s", strings.Join(logs.lines(), "\n"))
		}
		if strings.Contains(strings.Join(healthLines(&logs), "\n"), "192.0.2.54:53") {
			t.Error("a line about the resolver that answered every query")
		}
	})
}

// TestSlowNameNotResolverFailure: a query that times out on a resolver
// that answers other queries meanwhile (a name slow to resolve) fails
// over without a line saying the resolver is failing.
func TestSlowNameNotResolverFailure(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var logs syncBuffer
		f, slow := newSlowNameForwarder(t, &logs)
		var asking sync.WaitGroup
		asking.Go(func() { wantAnswered(t, f, "slow.example") })
		synctest.Wait() // slow.example waits on the first resolver
		wantAnswered(t, f, "fast.example")
		asking.Wait() // its share of the timeout passed: the second resolver answered it
		if n := f.Stats().Failovers.Load(); n != 1 {
			t.Errorf("Failovers = %d, want 1", n)
		}
		if lines := healthLines(&logs); len(lines) != 0 {
			t.Errorf("a resolver that answered meanwhile logged as failing:\n%s", strings.Join(lines, "\n"))
		}
		f.Close() // ends the connections the resolver's goroutines serve
		slow.wg.Wait()
	})
}

// revivableRelay is a fake association behind which the first resolver
// (192.0.2.53) drops every datagram until alive is set; every query
// answered is counted by the resolver asked (asked[0], asked[1]).
type revivableRelay struct {
	*fakeRelay
	alive *atomic.Bool
	asked *[2]atomic.Int64
}

func (r revivableRelay) WritePacket(buf []byte, off int, dst socksclient.Addr) error {
	ap, _ := dst.AddrPort()
	i := int(ap.Addr().As4()[3]) - 53
	if i == 0 && !r.alive.Load() {
		return nil
	}
	r.asked[i].Add(1)
	return r.fakeRelay.WritePacket(buf, off, dst)
}

// TestFailingResolverTriedLast: with a dead first resolver (its datagrams
// dropped beyond a working relay, the udp transport), the first two
// queries wait their share of the timeout (5 s of 10 s) on it and fail
// over (one timeout alone may be a slow name); the queries after them go to the second resolver first and are answered at
// once, until the backoff (1 s) is over: then one query tries the first
// resolver again (a probe, waiting its share while the others still go to
// the second) and, failing, starts a backoff twice as long. Once the
// resolver answers again, a probe finds it and it is first again. Before,
// every query waited its share on the dead resolver.
func TestFailingResolverTriedLast(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFakeUDPForwarder(t, &fakeRelays{}, 2)
		defer f.Close()
		var (
			alive atomic.Bool
			asked [2]atomic.Int64
		)
		f.udp.associate = func(ctx context.Context) (relayConn, error) {
			return revivableRelay{newFakeRelay(), &alive, &asked}, nil
		}
		// ask resolves a query and returns how long it took.
		ask := func(name string) time.Duration {
			t.Helper()
			start := time.Now()
			if _, err := f.Exchange(context.Background(), query(name, dns.TypeA, 1)); err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			return time.Since(start)
		}
		const share = 5 * time.Second // the first of two resolvers' share of 10 s
		// Two timeouts with no answer between: one may be a slow name.
		for _, name := range []string{"first.example", "second.example"} {
			if d := ask(name); d < share {
				t.Fatalf("%s took %v, want its share on the dead resolver first", name, d)
			}
		}
		for i := range 5 {
			if d := ask("next.example"); d != 0 {
				t.Fatalf("query %d after the failure took %v, want the second resolver first", i, d)
			}
		}
		time.Sleep(resolverBackoffMin)
		// The backoff is over: one probe waits on the first resolver
		// while the others are answered by the second.
		probe := make(chan time.Duration, 1)
		go func() { probe <- ask("probe.example") }()
		synctest.Wait()
		if d := ask("beside.example"); d != 0 {
			t.Errorf("a query beside the probe took %v", d)
		}
		if d := <-probe; d < share {
			t.Errorf("the probe took %v, want its share on the first resolver", d)
		}
		// The probe failed: 2 s now.
		time.Sleep(2*resolverBackoffMin - time.Millisecond)
		if d := ask("still.example"); d != 0 {
			t.Errorf("within the doubled backoff a query took %v", d)
		}
		if n := f.Stats().Failovers.Load(); n != 3 {
			t.Errorf("Failovers = %d, want the first two queries and the probe", n)
		}
		alive.Store(true)
		time.Sleep(time.Millisecond)
		ask("back.example") // the probe, answered
		before := asked[1].Load()
		for range 3 {
			ask("again.example")
		}
		if n := asked[1].Load() - before; n != 0 {
			t.Errorf("the second resolver asked %d times after the first answered again, want 0", n)
		}
	})
}

// TestSilentResolverTriedLastOverTCP: on the tcp transport, a first
// resolver that accepts connections and never answers costs the first two
// queries their share (one timeout alone may be a slow name); later ones
// go to the second resolver first.
func TestSilentResolverTriedLastOverTCP(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var (
			logs syncBuffer
			dead atomic.Bool
		)
		f := newHealthForwarder(t, &logs, &dead)
		silent := &pipeResolver{silent: neverAnswer}
		f.pools[0].dial = silent.dial
		for _, name := range []string{"first.example", "second.example"} { // two: one may be a slow name
			start := time.Now()
			wantAnswered(t, f, name)
			if d := time.Since(start); d < 5*time.Second {
				t.Fatalf("%s took %v, want its share on the silent resolver", name, d)
			}
		}
		start := time.Now()
		for range 5 {
			wantAnswered(t, f, "next.example")
		}
		if d := time.Since(start); d != 0 {
			t.Errorf("5 queries after the failure took %v, want the second resolver first", d)
		}
		f.Close()
		silent.wg.Wait()
	})
}

// wantStillFirst checks that, after what demoted stands for, f's next
// query still goes to slow (resolver 0) first and no line says it failed;
// then it closes f.
func wantStillFirst(t *testing.T, f *Forwarder, slow *pipeResolver, logs *syncBuffer, what string) {
	t.Helper()
	before := slow.queries.Load()
	wantAnswered(t, f, "fast.example")
	if slow.queries.Load() == before {
		t.Errorf("fast.example went to resolver 1: %s demoted a resolver that answers every other query", what)
	}
	if lines := healthLines(logs); len(lines) != 0 {
		t.Errorf("a healthy resolver logged as failing:\n%s", strings.Join(lines, "\n"))
	}
	f.Close()
	slow.wg.Wait()
}

// TestSlowNameKeepsResolverFirst: with sparse traffic (one query at a
// time), a single name resolver 0 is slow to resolve does not mark it
// failing: the next queries, for names it answers at once, still go to
// it first, and nothing is logged.
func TestSlowNameKeepsResolverFirst(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var logs syncBuffer
		f, slow := newSlowNameForwarder(t, &logs)
		wantAnswered(t, f, "warm.example") // resolver 0 answers
		wantAnswered(t, f, "slow.example") // 5 s on resolver 0, then resolver 1
		wantStillFirst(t, f, slow, &logs, "one slow name")
	})
}

// TestSlowNameAAndAAAAKeepResolverFirst: a stub resolver asks A and AAAA
// for one slow name at once; both time out on resolver 0 with no answer
// between, but the second began before the first timed out: still one
// slow name, and resolver 0 stays first.
func TestSlowNameAAndAAAAKeepResolverFirst(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var logs syncBuffer
		f, slow := newSlowNameForwarder(t, &logs)
		wantAnswered(t, f, "warm.example")
		var qs sync.WaitGroup
		for i, qt := range []uint16{dns.TypeA, dns.TypeAAAA} {
			qs.Go(func() { serve(t, f, query("slow.example", qt, uint16(10+i))) })
		}
		qs.Wait()
		wantStillFirst(t, f, slow, &logs, "one slow name (A+AAAA)")
	})
}

// TestProxySilenceNotResolverFailure: queries whose time runs out while
// the proxy has not answered its handshake fail naming the proxy, and do
// not mark the resolver failing: it was never reached. They had said "no
// answer in time" and logged the resolver as failing. A proxy that took
// the request and waits on the resolver still counts against it (the
// resolver is black-holed beyond the proxy), unless the request was a UDP
// ASSOCIATE (the udp transport), which reaches no resolver.
func TestProxySilenceNotResolverFailure(t *testing.T) {
	for _, c := range []struct {
		transport  string
		fault      sockstest.Fault
		cause      string
		resolverOK bool
	}{
		{"tcp", sockstest.FaultHangAfterGreeting, "the proxy did not answer in time", true},
		{"tcp", sockstest.FaultHangAfterRequest, "no answer in time", false},
		{"udp", sockstest.FaultHangAfterGreeting, "the proxy did not answer in time", true},
		{"udp", sockstest.FaultHangAfterRequest, "the proxy did not answer in time", true},
	} {
		srv, err := sockstest.NewServer(sockstest.Config{Fault: c.fault})
		if err != nil {
			t.Fatal(err)
		}
		var logs syncBuffer
		f := newForwarderConfig(t, srv.Addr(), Config{Timeout: 300 * time.Millisecond, Transport: c.transport}, &logs, "192.0.2.53:53")
		for i := range 2 { // the second timeout in a row is the one that counts
			_, err := f.Exchange(context.Background(), query("a.example", dns.TypeA, uint16(i)))
			rerr, ok := errors.AsType[*ResolveError](err)
			if !ok || !strings.Contains(rerr.cause(), c.cause) {
				t.Errorf("%s, fault %d, query %d: %v, want the cause %q", c.transport, c.fault, i, err, c.cause)
			}
		}
		if lines := healthLines(&logs); (len(lines) == 0) != c.resolverOK {
			t.Errorf("%s, fault %d: resolver state lines %q; want the resolver failing: %v", c.transport, c.fault, lines, !c.resolverOK)
		}
		f.Close()
		srv.Close()
	}
}

// TestAwaitingConnNotResolverFailure: queries that wait for the pool's
// first connection (or the udp transport's association), which another
// query makes through a silent proxy, fail saying so and count against no
// resolver either.
func TestAwaitingConnNotResolverFailure(t *testing.T) {
	for _, transport := range []string{"tcp", "udp"} {
		t.Run(transport, func(t *testing.T) { testAwaitingConn(t, transport) })
	}
}

func testAwaitingConn(t *testing.T, transport string) {
	srv, err := sockstest.NewServer(sockstest.Config{Fault: sockstest.FaultHangAfterGreeting})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	var logs syncBuffer
	f := newForwarderConfig(t, srv.Addr(), Config{Timeout: 300 * time.Millisecond, PoolSize: 1, Transport: transport}, &logs, "192.0.2.53:53")
	causes := map[string]int{}
	for round := range 2 {
		var wg sync.WaitGroup
		errs := make([]error, 3)
		for i := range errs {
			wg.Go(func() {
				_, errs[i] = f.Exchange(context.Background(), query("a.example", dns.TypeA, uint16(round*3+i)))
			})
		}
		wg.Wait()
		for _, err := range errs {
			rerr, ok := errors.AsType[*ResolveError](err)
			if !ok {
				t.Fatalf("%v, want a ResolveError", err)
			}
			causes[rerr.cause()]++
		}
	}
	for cause := range causes {
		if !strings.Contains(cause, "the proxy did not answer in time") && !strings.Contains(cause, "no connection to the resolver in time") {
			t.Errorf("cause %q: want the proxy's silence, or the wait for its dial", cause)
		}
	}
	if lines := healthLines(&logs); len(lines) != 0 {
		t.Errorf("the resolver was logged failing: %q", lines)
	}
}
