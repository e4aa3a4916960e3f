package dnsforward

import (
	"context"
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
