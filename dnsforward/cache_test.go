package dnsforward

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/miekg/dns"
)

func TestCacheTTLs(t *testing.T) {
	res := newResolver(t, 0)
	f := newCachingForwarder(t, socks(t).Addr(), 5*time.Second, 100, nil, res.addr)
	now := time.Unix(1_000_000, 0)
	f.cache.now = func() time.Time { return now }
	ask := func(name string, qtype uint16) *dns.Msg {
		t.Helper()
		resp, err := f.Resolve(context.Background(), query(name, qtype, 5))
		if err != nil {
			t.Fatal(err)
		}
		if resp.Id != 5 || resp.Question[0].Name != dns.Fqdn(name) {
			t.Fatalf("answer not made the query's own: %v", resp)
		}
		return resp
	}

	// A positive answer (TTL 60) is served from the cache, counted down.
	ask("a.example", dns.TypeA)
	now = now.Add(25 * time.Second)
	if r := ask("A.Example", dns.TypeA); r.Answer[0].Header().Ttl != 35 {
		t.Fatalf("TTL served %d, want 35", r.Answer[0].Header().Ttl)
	}
	if n := res.queries.Load(); n != 1 {
		t.Fatalf("resolver asked %d times, want 1 (case-insensitive hit)", n)
	}
	now = now.Add(40 * time.Second)
	ask("a.example", dns.TypeA)
	if n := res.queries.Load(); n != 2 {
		t.Fatalf("expired entry served: resolver asked %d times", n)
	}

	// NXDOMAIN: cached for min(SOA TTL 300, MINIMUM 30) (RFC 2308).
	ask("nx.example", dns.TypeA)
	now = now.Add(29 * time.Second)
	ask("nx.example", dns.TypeA)
	if n := res.queries.Load(); n != 3 {
		t.Fatalf("NXDOMAIN not cached: %d", n)
	}
	now = now.Add(2 * time.Second)
	ask("nx.example", dns.TypeA)
	if n := res.queries.Load(); n != 4 {
		t.Fatalf("NXDOMAIN cached beyond the SOA minimum: %d", n)
	}

	// SERVFAIL: a few seconds at most.
	ask("servfail.example", dns.TypeA)
	now = now.Add(3 * time.Second)
	ask("servfail.example", dns.TypeA)
	if n := res.queries.Load(); n != 6 {
		t.Fatalf("SERVFAIL cached too long: %d", n)
	}

	// Another type or the DO bit is another entry.
	ask("a.example", dns.TypeAAAA)
	do := query("a.example", dns.TypeA, 6)
	do.SetEdns0(1232, true)
	f.Resolve(context.Background(), do)
	if n := res.queries.Load(); n != 8 {
		t.Fatalf("type/DO not part of the key: %d", n)
	}
}

// TestCacheMergesConcurrentMisses: 20 identical misses while the first
// is still unanswered make one upstream query, and each asker gets the
// answer under its own ID.
func TestCacheMergesConcurrentMisses(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		hold := make(chan struct{})
		f, res := newScriptForwarder(t, 100, nil, hold)
		var wg sync.WaitGroup
		for i := range 20 {
			wg.Go(func() {
				resp, err := f.Resolve(context.Background(), query("slow.example", dns.TypeA, uint16(i)))
				if err != nil || resp.Id != uint16(i) {
					t.Errorf("query %d: %v %v", i, resp, err)
				}
			})
		}
		synctest.Wait() // every asker waits: the resolver holds its answer
		close(hold)
		wg.Wait()
		if n := len(res.queries()); n != 1 {
			t.Fatalf("20 identical concurrent misses made %d upstream queries, want 1", n)
		}
	})
}

func TestCacheDisabled(t *testing.T) {
	res := newResolver(t, 0)
	f := newCachingForwarder(t, socks(t).Addr(), 5*time.Second, 0, nil, res.addr)
	for range 3 {
		if _, err := f.Resolve(context.Background(), query("a.example", dns.TypeA, 1)); err != nil {
			t.Fatal(err)
		}
	}
	if n := res.queries.Load(); n != 3 {
		t.Fatalf("cache size 0 still cached: %d upstream queries", n)
	}
}

// TestCacheCounts: misses and hits of cacheable queries, and answers a
// full cache pushed out, are counted.
func TestCacheCounts(t *testing.T) {
	res := newResolver(t, 0)
	f := newCachingForwarder(t, socks(t).Addr(), 5*time.Second, 2, nil, res.addr)
	for _, name := range []string{"a.example", "b.example", "a.example", "c.example", "d.example"} {
		if _, err := f.Resolve(context.Background(), query(name, dns.TypeA, 1)); err != nil {
			t.Fatal(err)
		}
	}
	s := f.Stats()
	if h, m, e := s.CacheHits.Load(), s.CacheMisses.Load(), s.CacheEvictions.Load(); h != 1 || m != 4 || e != 2 {
		t.Errorf("hits %d, misses %d, evictions %d; want 1, 4, 2", h, m, e)
	}
	if n := f.CacheLen(); n != 2 {
		t.Errorf("CacheLen %d, want 2", n)
	}
}

// txtAnswer is an answer to a TXT query for name with size bytes of text.
func txtAnswer(name string, size int) (*questionKey, *dns.Msg) {
	q := query(name, dns.TypeTXT, 1)
	m := new(dns.Msg)
	m.SetReply(q)
	var parts []string
	for rest := size; rest > 0; rest -= 200 {
		parts = append(parts, strings.Repeat("x", min(rest, 200)))
	}
	m.Answer = []dns.RR{&dns.TXT{Hdr: dns.RR_Header{Name: q.Question[0].Name, Rrtype: dns.TypeTXT, Class: dns.ClassINET, Ttl: 3600}, Txt: parts}}
	k := new(questionKey)
	keyOf(q, k)
	return k, m
}

// TestCacheBytesBounded: the cache holds at most cacheBytesPerEntry
// bytes of answers per entry on average: large answers push out the
// least recently used ones (counted), an answer larger than the whole
// budget is not kept, and an answer replaced gives its bytes back.
// Before, only entries were bounded: 100 entries of 60 KB answers held
// 6 MB, the default 10 000 would hold 600 MB.
func TestCacheBytesBounded(t *testing.T) {
	c := newCache(100) // 200 KiB
	evicted := 0
	var last *questionKey
	for i := range 100 {
		k, m := txtAnswer(fmt.Sprintf("n%d.big.example", i), 30000)
		evicted += c.put(k, m)
		last = k
	}
	held := heldBytes(c)
	if held > c.budget || c.bytes != held {
		t.Errorf("%d entries hold %d bytes (counted %d), want at most %d", c.lru.Len(), held, c.bytes, c.budget)
	}
	if c.lru.Len()+evicted != 100 || evicted == 0 {
		t.Errorf("%d entries and %d pushed out of 100", c.lru.Len(), evicted)
	}
	if _, ok := c.get(last); !ok {
		t.Error("the newest answer was pushed out")
	}

	small := newCache(10) // 20 KiB
	if k, m := txtAnswer("huge.example", 30000); small.put(k, m) != 0 || small.lru.Len() != 0 {
		t.Errorf("an answer larger than the budget was cached (%d entries)", small.lru.Len())
	}
	k, m := txtAnswer("a.example", 1000)
	small.put(k, m)
	small.put(k, m)
	if e, _ := small.lru.Peek(small.hash(k)); small.lru.Len() != 1 || small.bytes != cap(e.wire) {
		t.Errorf("an answer cached twice: %d entries, %d bytes counted, want 1 entry of %d", small.lru.Len(), small.bytes, cap(e.wire))
	}
}

// heldBytes is the memory the cache's answers hold: their slices'
// capacity.
func heldBytes(c *cache) int {
	held := 0
	for _, h := range c.lru.Keys() {
		e, _ := c.lru.Peek(h)
		held += cap(e.wire)
	}
	return held
}

// TestCacheBudgetCountsMemoryHeld: the byte budget bounds the memory the
// answers hold, not their lengths. put (the message path: TCP clients,
// the udp transport, queries with EDNS options) kept the slice miekg/dns
// Pack returns, whose capacity is the uncompressed length + 1, while the
// budget counted the compressed length: 10 answers of 100 A records for
// a long name held 211 120 bytes counted as 18 110 within a budget of
// 20 480.
func TestCacheBudgetCountsMemoryHeld(t *testing.T) {
	c := newCache(10) // 20 KiB
	long := strings.Repeat(strings.Repeat("x", 60)+".", 3) + "example."
	for i := range 10 {
		q := query(fmt.Sprintf("n%d.%s", i, long), dns.TypeA, 1)
		m := new(dns.Msg)
		m.SetReply(q)
		for j := range 100 {
			m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: q.Question[0].Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 3600},
				A: net.IPv4(10, 0, byte(i), byte(j))})
		}
		var k questionKey
		if !keyOf(q, &k) {
			t.Fatal("not cacheable")
		}
		c.put(&k, m)
	}
	if held := heldBytes(c); held > c.budget || held != c.bytes || c.lru.Len() == 0 {
		t.Errorf("%d entries hold %d bytes, counted as %d, with a budget of %d", c.lru.Len(), held, c.bytes, c.budget)
	}
}

// TestCacheBytesMatchEntries: random puts, replacements, expiries and
// hits keep the count of bytes equal to what the entries hold, and
// within the budget.
func TestCacheBytesMatchEntries(t *testing.T) {
	now := time.Unix(1e9, 0)
	c := newCache(20)
	c.now = func() time.Time { return now }
	r := rand.New(rand.NewPCG(1, 2))
	for i := range 20000 {
		k, m := txtAnswer(fmt.Sprintf("n%d.example", r.IntN(40)), 1+r.IntN(9000))
		m.Answer[0].Header().Ttl = uint32(1 + r.IntN(5))
		if r.IntN(3) < 2 {
			c.put(k, m)
		} else {
			c.appendAnswer(nil, k, 1)
		}
		if r.IntN(10) == 0 {
			now = now.Add(time.Second)
		}
		if held := heldBytes(c); held != c.bytes || held > c.budget {
			t.Fatalf("step %d: held %d, counted %d, budget %d", i, held, c.bytes, c.budget)
		}
	}
}
