package dnsforward

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/socksfwd/socksfwd/internal/testnet"
)

// gateResolver is a DNS-over-TCP resolver that reports each query it reads
// on got and answers it (A 198.51.100.1) only once open is called; with
// holds set, only queries for that name wait, the others are answered at
// once.
type gateResolver struct {
	holds    string
	addr     string
	got      chan string
	release  chan struct{}
	openOnce sync.Once
}

func newGateResolver(t *testing.T) *gateResolver { return newGateResolverHolding(t, "") }

func newGateResolverHolding(t *testing.T, holds string) *gateResolver {
	g := &gateResolver{holds: holds, got: make(chan string, 1000), release: make(chan struct{})}
	ln := testnet.Serve(t, func(c net.Conn) {
		var (
			wg  sync.WaitGroup
			wmu sync.Mutex
		)
		defer wg.Wait()
		var lenBuf [2]byte
		for {
			q, err := readTCPMessage(c, &lenBuf)
			if err != nil || q == nil {
				return
			}
			g.got <- q.Question[0].Name
			wg.Go(func() {
				if g.holds == "" || q.Question[0].Name == g.holds {
					<-g.release
				}
				m := new(dns.Msg)
				m.SetReply(q)
				m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: q.Question[0].Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60}, A: net.IPv4(198, 51, 100, 1)})
				out, _ := m.Pack()
				wmu.Lock()
				defer wmu.Unlock()
				c.Write(append(binary.BigEndian.AppendUint16(nil, uint16(len(out))), out...))
			})
		}
	})
	g.addr = ln.Addr().String()
	t.Cleanup(g.open) // runs before the server's cleanup, which waits for its handlers
	return g
}

func (g *gateResolver) open() { g.openOnce.Do(func() { close(g.release) }) }

// recorder is a dns.ResponseWriter that keeps what is written; its client
// is on TCP, so answers are not truncated, unless remote says otherwise.
type recorder struct {
	mu     sync.Mutex
	msgs   []*dns.Msg
	remote net.Addr
}

func (w *recorder) LocalAddr() net.Addr { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 53} }
func (w *recorder) RemoteAddr() net.Addr {
	if w.remote != nil {
		return w.remote
	}
	return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 40000}
}
func (w *recorder) WriteMsg(m *dns.Msg) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.msgs = append(w.msgs, m)
	return nil
}
func (w *recorder) Write(b []byte) (int, error) {
	m := new(dns.Msg)
	if err := m.Unpack(b); err != nil {
		return 0, err
	}
	return len(b), w.WriteMsg(m)
}
func (w *recorder) Close() error        { return nil }
func (w *recorder) TsigStatus() error   { return nil }
func (w *recorder) TsigTimersOnly(bool) {}
func (w *recorder) Hijack()             {}

// serve answers q through f and returns the one message written.
func serve(t *testing.T, f dns.Handler, q *dns.Msg) *dns.Msg {
	t.Helper()
	w := &recorder{}
	f.ServeDNS(w, q)
	if len(w.msgs) != 1 {
		t.Fatalf("%d messages written, want 1", len(w.msgs))
	}
	return w.msgs[0]
}

// TestMaxConcurrentRefused: with MaxConcurrent queries waiting on the
// resolver, the next query is answered REFUSED at once and counted; cache
// hits still pass.
func TestMaxConcurrentRefused(t *testing.T) {
	gate := newGateResolver(t)
	f := newForwarderConfig(t, socks(t).Addr(), Config{Timeout: time.Minute, MaxConcurrent: 2, CacheSize: 100}, nil, gate.addr)
	// A cached answer: a hit must not count against the limit.
	var k questionKey
	keyOf(query("cached.example", dns.TypeA, 1), &k)
	if f.cache.put(&k, answerA("cached.example.")); f.CacheLen() != 1 {
		t.Fatal("the answer was not cached")
	}

	var wg sync.WaitGroup
	rcodes := make(chan int, 2)
	for i := range 2 {
		wg.Go(func() { rcodes <- serve(t, f, query(fmt.Sprintf("held%d.example", i), dns.TypeA, 2)).Rcode })
	}
	<-gate.got
	<-gate.got // both are waiting on the resolver

	if r := serve(t, f, query("third.example", dns.TypeA, 3)); r.Rcode != dns.RcodeRefused || r.Id != 3 {
		t.Errorf("third query: %s id %d, want REFUSED id 3", dns.RcodeToString[r.Rcode], r.Id)
	}
	if n := f.Stats().Refused.Load(); n != 1 {
		t.Errorf("Refused = %d, want 1", n)
	}
	if r := serve(t, f, query("cached.example", dns.TypeA, 4)); r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1 {
		t.Errorf("cache hit at the limit: %s", dns.RcodeToString[r.Rcode])
	}

	gate.open()
	wg.Wait()
	close(rcodes)
	for rc := range rcodes {
		if rc != dns.RcodeSuccess {
			t.Errorf("held query: %s", dns.RcodeToString[rc])
		}
	}
	// Slots are given back: the next query is forwarded again.
	if r := serve(t, f, query("after.example", dns.TypeA, 5)); r.Rcode != dns.RcodeSuccess {
		t.Errorf("after the burst: %s", dns.RcodeToString[r.Rcode])
	}
}

func answerA(name string) *dns.Msg {
	m := new(dns.Msg)
	m.SetQuestion(name, dns.TypeA)
	m.Response = true
	m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 300}, A: net.IPv4(192, 0, 2, 3)})
	return m
}

// syncBuffer is a log sink that tests may read while the forwarder writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) lines() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return strings.FieldsFunc(s.b.String(), func(r rune) bool { return r == '\n' })
}

// TestFailureLogOneLinePerCause: 200 queries failing the same way log one
// line, not 200; a different cause gets its own line. (The resolver's
// own line, that it is failing, is TestResolverStateLogged's.)
func TestFailureLogOneLinePerCause(t *testing.T) {
	var logs syncBuffer
	f := newForwarder(t, socks(t).Addr(), time.Second, &logs, testnet.ClosedPort(t))
	for i := range 200 {
		if r := serve(t, f, query(fmt.Sprintf("n%d.example", i), dns.TypeA, 1)); r.Rcode != dns.RcodeServerFailure {
			t.Fatalf("query %d: %s, want SERVFAIL", i, dns.RcodeToString[r.Rcode])
		}
	}
	if lines := healthLines(&logs); len(lines) != 1 || !strings.Contains(lines[0], "DNS resolver is failing") {
		t.Errorf("want one line saying the resolver is failing:\n%s", strings.Join(logs.lines(), "\n"))
	}
	queryLines := func() []string {
		var out []string
		for _, l := range logs.lines() {
			if strings.Contains(l, "DNS query failed") {
				out = append(out, l)
			}
		}
		return out
	}
	lines := queryLines()
	if len(lines) != 1 || !strings.Contains(lines[0], "connection refused") || !strings.Contains(lines[0], "SERVFAIL") {
		t.Fatalf("%d log lines for 200 failures of one cause, want 1 naming it:\n%s", len(lines), strings.Join(lines, "\n"))
	}
	// A first line has no repeats to count (logthrottle.Repeats).
	for _, l := range logs.lines() {
		if strings.Contains(l, "_since_last_line") {
			t.Errorf("a first line with a count: %s", l)
		}
	}
	if n := f.Stats().ServFail.Load(); n != 200 {
		t.Errorf("ServFail = %d, want every failure counted", n)
	}

	f.cfg.MaxConcurrent = 0 // every query is over the limit: another cause
	for range 10 {
		serve(t, f, query("busy.example", dns.TypeA, 1))
	}
	lines = queryLines()
	if len(lines) != 2 || !strings.Contains(lines[1], "REFUSED") {
		t.Fatalf("want one more line for the REFUSED cause:\n%s", strings.Join(lines, "\n"))
	}
}

// TestResendWhenResolverClosesPipelined: a resolver that closes each
// connection after 20 answers (as dnsmasq does after 100) with many
// queries in flight: every query is answered, the stranded ones sent again
// on another connection.
func TestResendWhenResolverClosesPipelined(t *testing.T) {
	res := newResolver(t, 20)
	f := newForwarderConfig(t, socks(t).Addr(), Config{Timeout: 20 * time.Second, PoolSize: 4, PipelineLimit: 32}, nil, res.addr)
	var (
		wg     sync.WaitGroup
		failed atomic.Int64
	)
	for i := range 200 {
		wg.Go(func() {
			if _, err := f.Exchange(context.Background(), query(fmt.Sprintf("p%d.example", i), dns.TypeA, 1)); err != nil {
				if failed.Add(1) == 1 {
					t.Errorf("query %d: %v", i, err)
				}
			}
		})
	}
	wg.Wait()
	if n := failed.Load(); n > 0 {
		t.Errorf("%d of 200 queries failed", n)
	}
	if f.Stats().Resent.Load() == 0 {
		t.Error("no query was sent again, yet connections closed with queries in flight")
	}
}

// TestPipelineLimitGrowsPool: no connection carries more than
// PipelineLimit queries at once; the pool grows to PoolSize instead and
// further queries wait for a slot.
func TestPipelineLimitGrowsPool(t *testing.T) {
	res := newResolver(t, 0)
	f := newForwarderConfig(t, socks(t).Addr(), Config{Timeout: 20 * time.Second, PoolSize: 4, PipelineLimit: 4}, nil, res.addr)
	var wg sync.WaitGroup
	for i := range 40 {
		wg.Go(func() {
			if _, err := f.Exchange(context.Background(), query(fmt.Sprintf("slow%d.example", i), dns.TypeA, 1)); err != nil {
				t.Errorf("query %d: %v", i, err)
			}
		})
	}
	wg.Wait()
	if n := res.maxInFlight.Load(); n > 4 {
		t.Errorf("%d queries in flight on one connection, want at most the pipeline limit 4", n)
	}
	if n := res.conns.Load(); n > 4 {
		t.Errorf("%d connections, want at most the pool size 4", n)
	}
}

// TestNoTightRedialOfClosingResolver: a resolver that accepts and closes
// at once is redialed with backoff, not once or twice per query.
func TestNoTightRedialOfClosingResolver(t *testing.T) {
	var accepted atomic.Int64
	closer := testnet.Serve(t, func(c net.Conn) { accepted.Add(1) })
	f := newForwarder(t, socks(t).Addr(), 2*time.Second, nil, closer.Addr().String())
	// Concurrent: queries wait out the backoff within their deadline, so
	// one after another they would take the whole timeout each.
	var wg sync.WaitGroup
	for i := range 100 {
		wg.Go(func() {
			if _, err := f.Exchange(context.Background(), query(fmt.Sprintf("c%d.example", i), dns.TypeA, 1)); err == nil {
				t.Error("answered by a resolver that answers nothing")
			}
		})
	}
	wg.Wait()
	// Unbounded, each query is sent up to maxTCPSends times (hundreds of
	// connections); with backoff from 50 ms doubling, the 2 s timeout
	// holds a handful of redial rounds of at most the pool size (2) each.
	if n := accepted.Load(); n > 20 {
		t.Errorf("%d connections for 100 queries: the resolver is redialed in a tight loop", n)
	}
}
