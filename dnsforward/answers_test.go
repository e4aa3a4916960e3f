package dnsforward

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/miekg/dns"
	"github.com/rs/zerolog"

	"github.com/socksfwd/socksfwd/socksclient"
)

// scriptResolver answers DNS over TCP on in-memory connections with the
// frames reply returns for each query (echoReply's when reply is nil);
// with hold set, every answer waits until hold is closed. It keeps the
// queries it read.
type scriptResolver struct {
	reply func(q *dns.Msg) [][]byte
	hold  chan struct{}
	wg    sync.WaitGroup
	mu    sync.Mutex
	seen  []*dns.Msg
}

func (r *scriptResolver) dial(ctx context.Context) (net.Conn, error) {
	client, server := net.Pipe()
	r.wg.Go(func() {
		defer server.Close()
		var (
			lenBuf  [2]byte
			wmu     sync.Mutex
			answers sync.WaitGroup
		)
		defer answers.Wait()
		for {
			q, err := readTCPMessage(server, &lenBuf)
			if err != nil || q == nil {
				return
			}
			r.mu.Lock()
			r.seen = append(r.seen, q)
			r.mu.Unlock()
			answers.Go(func() { // each on its own: a held answer holds up no read
				if r.hold != nil {
					<-r.hold
				}
				var frames [][]byte
				if r.reply != nil {
					frames = r.reply(q)
				} else {
					frames = [][]byte{packed(echoReply(q))}
				}
				wmu.Lock()
				defer wmu.Unlock()
				for _, b := range frames {
					if _, err := server.Write(append(binary.BigEndian.AppendUint16(nil, uint16(len(b))), b...)); err != nil {
						return
					}
				}
			})
		}
	})
	return client, nil
}

func (r *scriptResolver) queries() []*dns.Msg {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]*dns.Msg(nil), r.seen...)
}

func packed(m *dns.Msg) []byte {
	m.Compress = true
	b, err := m.Pack()
	if err != nil {
		panic(err)
	}
	return b
}

// echoReply answers A 192.0.2.7 as a resolver does: RD and CD copied, and
// to a query with EDNS an OPT record that echoes the query's options (a
// COOKIE server echoes the client cookie, a CLIENT-SUBNET one the
// subnet), or BADVERS to an EDNS version other than 0.
func echoReply(q *dns.Msg) *dns.Msg {
	m := new(dns.Msg)
	m.SetReply(q)
	m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: q.Question[0].Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60}, A: net.IPv4(192, 0, 2, 7)})
	if opt := q.IsEdns0(); opt != nil {
		m.SetEdns0(opt.UDPSize(), opt.Do())
		m.IsEdns0().Option = opt.Option
		if opt.Version() != 0 {
			m.Answer = nil
			m.Rcode = dns.RcodeBadVers
		}
	}
	return m
}

// newScriptForwarder is a tcp-transport forwarder to one scriptResolver
// (with reply and hold as given), with a cache of cacheSize answers.
func newScriptForwarder(t testing.TB, cacheSize int, reply func(q *dns.Msg) [][]byte, hold chan struct{}) (*Forwarder, *scriptResolver) {
	t.Helper()
	f, err := New(Config{
		Resolvers: documentationResolvers(t, 1),
		Upstreams: socksclient.NewUpstreams(&socksclient.Dialer{ProxyAddr: "192.0.2.1:1080"}),
		Timeout:   10 * time.Second,
		CacheSize: cacheSize,
		Logger:    zerolog.New(io.Discard),
	})
	if err != nil {
		t.Fatal(err)
	}
	res := &scriptResolver{reply: reply, hold: hold}
	f.pools[0].dial = res.dial
	t.Cleanup(func() {
		f.Close()
		res.wg.Wait()
	})
	return f, res
}

// askWire resolves q by the wire path (the UDP fast path's) and unpacks
// the answer.
func askWire(t *testing.T, f *Forwarder, q *dns.Msg) *dns.Msg {
	t.Helper()
	b := pack(t, q)
	var k questionKey
	if _, ok := parseQuery(b, &k); !ok {
		t.Fatalf("%v: not a plain query", q.Question)
	}
	answer, _, err := f.resolveWire(b, &k)
	if err != nil {
		t.Fatal(err)
	}
	m := new(dns.Msg)
	if err := m.Unpack(answer); err != nil {
		t.Fatal(err)
	}
	return m
}

func askMsg(t *testing.T, f *Forwarder, q *dns.Msg) *dns.Msg {
	t.Helper()
	m, err := f.Resolve(context.Background(), q)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func flagged(name string, id uint16, rd, cd bool) *dns.Msg {
	q := query(name, dns.TypeA, id)
	q.RecursionDesired, q.CheckingDisabled = rd, cd
	return q
}

// TestCacheKeyHasCDAndAnswersMirrorRDCD: an answer to a CD=1 query
// (data the resolver did not validate) is neither cached for nor merged
// with CD=0 queries; and an answer from the cache or shared with a
// concurrent miss carries the asking query's RD and CD bits, not the
// first asker's. Before, a CD=1 query fed CD=0 clients unvalidated data.
func TestCacheKeyHasCDAndAnswersMirrorRDCD(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f, res := newScriptForwarder(t, 10, nil, nil)
		if m := askWire(t, f, flagged("a.example", 1, true, true)); !m.CheckingDisabled {
			t.Fatal("CD=1 query answered CD=0")
		}
		if m := askMsg(t, f, flagged("a.example", 2, true, false)); len(res.queries()) != 2 || m.CheckingDisabled {
			t.Fatalf("CD=0 query after a CD=1 one: %d upstream queries, answer CD=%v; want its own query and CD=0", len(res.queries()), m.CheckingDisabled)
		}
		for _, rd := range []bool{false, true} {
			for _, cd := range []bool{false, true} {
				for path, ask := range map[string]func(*testing.T, *Forwarder, *dns.Msg) *dns.Msg{"wire": askWire, "message": askMsg} {
					m := ask(t, f, flagged("a.example", 3, rd, cd))
					if m.RecursionDesired != rd || m.CheckingDisabled != cd {
						t.Errorf("%s hit for RD=%v CD=%v: answer RD=%v CD=%v", path, rd, cd, m.RecursionDesired, m.CheckingDisabled)
					}
				}
			}
		}
		if n := len(res.queries()); n != 2 {
			t.Errorf("%d upstream queries, want the rest from the cache", n)
		}
	})
	// Concurrent misses: the leader asks RD=1; the RD=0 queries merge with
	// each other, not with it (TestRD0AnswersNotShared), each getting its
	// own RD; a CD=1 query is not merged.
	synctest.Test(t, func(t *testing.T) {
		hold := make(chan struct{})
		f, res := newScriptForwarder(t, 10, nil, hold)
		var asking sync.WaitGroup
		var leader, wireRD0, msgRD0, msgCD *dns.Msg
		asking.Go(func() { leader = askWire(t, f, flagged("b.example", 1, true, false)) })
		synctest.Wait() // the resolver holds the leader's query
		asking.Go(func() { wireRD0 = askWire(t, f, flagged("b.example", 2, false, false)) })
		asking.Go(func() { msgRD0 = askMsg(t, f, flagged("b.example", 3, false, false)) })
		asking.Go(func() { msgCD = askMsg(t, f, flagged("b.example", 4, true, true)) })
		synctest.Wait()
		close(hold)
		asking.Wait()
		if n := len(res.queries()); n != 3 {
			t.Errorf("%d upstream queries, want 3 (RD=1, RD=0 merged, CD=1)", n)
		}
		if !leader.RecursionDesired || wireRD0.RecursionDesired || msgRD0.RecursionDesired {
			t.Errorf("RD: leader %v, followers %v %v; want true, false, false", leader.RecursionDesired, wireRD0.RecursionDesired, msgRD0.RecursionDesired)
		}
		if !msgCD.CheckingDisabled || leader.CheckingDisabled {
			t.Errorf("CD: CD=1 query answered CD=%v, leader CD=%v", msgCD.CheckingDisabled, leader.CheckingDisabled)
		}
	})
}

// TestRD0AnswersNotShared: an RD=0 query (dig +norec, cache snooping)
// is merged only with RD=0 queries and its answer is not cached: a
// resolver may answer it REFUSED (unbound) or with a referral (BIND), or
// SERVFAIL, which the cache keeps for a while. Before, an RD=0 query that
// missed first decided the answer of every RD=1 query merged with it, or
// asking after it. An RD=0 query still gets an RD=1 query's cached answer,
// as from a caching resolver.
func TestRD0AnswersNotShared(t *testing.T) {
	norecAnswer := func(rcode int) func(q *dns.Msg) [][]byte {
		return func(q *dns.Msg) [][]byte {
			if !q.RecursionDesired {
				m := new(dns.Msg)
				m.SetRcode(q, rcode)
				return [][]byte{packed(m)}
			}
			return [][]byte{packed(echoReply(q))}
		}
	}
	synctest.Test(t, func(t *testing.T) {
		hold := make(chan struct{})
		f, res := newScriptForwarder(t, 10, norecAnswer(dns.RcodeRefused), hold)
		var asking sync.WaitGroup
		var norec, rec *dns.Msg
		asking.Go(func() { norec = askMsg(t, f, flagged("popular.example", 1, false, false)) })
		synctest.Wait() // the resolver holds the RD=0 query
		asking.Go(func() { rec = askWire(t, f, flagged("popular.example", 2, true, false)) })
		synctest.Wait()
		close(hold)
		asking.Wait()
		if norec.Rcode != dns.RcodeRefused || rec.Rcode != dns.RcodeSuccess || len(rec.Answer) != 1 {
			t.Errorf("RD=0 query: %s; RD=1 query while it was asked: %s with %d records; want REFUSED, and NOERROR with 1",
				dns.RcodeToString[norec.Rcode], dns.RcodeToString[rec.Rcode], len(rec.Answer))
		}
		if n := len(res.queries()); n != 2 {
			t.Errorf("%d upstream queries, want one for each RD", n)
		}
	})
	synctest.Test(t, func(t *testing.T) {
		f, res := newScriptForwarder(t, 10, norecAnswer(dns.RcodeServerFailure), nil)
		if m := askWire(t, f, flagged("a.example", 1, false, false)); m.Rcode != dns.RcodeServerFailure {
			t.Fatalf("RD=0 query: %s, want the resolver's SERVFAIL", dns.RcodeToString[m.Rcode])
		}
		if m := askMsg(t, f, flagged("a.example", 2, true, false)); m.Rcode != dns.RcodeSuccess || len(m.Answer) != 1 {
			t.Errorf("RD=1 query after an RD=0 one: %s with %d records, want its own answer", dns.RcodeToString[m.Rcode], len(m.Answer))
		}
		if m := askWire(t, f, flagged("a.example", 3, false, false)); m.Rcode != dns.RcodeSuccess || m.RecursionDesired {
			t.Errorf("RD=0 query after an RD=1 one: %s RD=%v, want the cached answer with RD=0", dns.RcodeToString[m.Rcode], m.RecursionDesired)
		}
		if n := len(res.queries()); n != 2 {
			t.Errorf("%d upstream queries, want 2 (the RD=1 answer from the cache for the last)", n)
		}
	})
}

// withOptions is q with EDNS (size 1232, DO=0) and a COOKIE and a
// CLIENT-SUBNET option.
func withOptions(q *dns.Msg) *dns.Msg {
	q.SetEdns0(1232, false)
	q.IsEdns0().Option = []dns.EDNS0{
		&dns.EDNS0_COOKIE{Code: dns.EDNS0COOKIE, Cookie: "0102030405060708"},
		&dns.EDNS0_SUBNET{Code: dns.EDNS0SUBNET, Family: 1, SourceNetmask: 24, Address: net.IPv4(198, 51, 100, 0).To4()},
	}
	return q
}

// TestEDNSNotShared: the forwarder asks the resolver without the client's
// EDNS options (COOKIE, CLIENT-SUBNET), so what is cached or shared holds
// nothing of one client's; EDNS presence is part of the key, so a client
// without EDNS gets no OPT record (RFC 6891 §7); an EDNS version 1 query
// (BADVERS) is not merged with a version 0 one. Before, B got A's cookie
// back, C an OPT record, and a version-0 follower BADVERS.
func TestEDNSNotShared(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f, res := newScriptForwarder(t, 10, nil, nil)
		askMsg(t, f, withOptions(query("a.example", dns.TypeA, 1)))
		askWire(t, f, withOptions(query("w.example", dns.TypeA, 2)))
		for _, q := range res.queries() {
			if opt := q.IsEdns0(); opt == nil || len(opt.Option) != 0 {
				t.Errorf("%s asked upstream with OPT %v, want EDNS without options", q.Question[0].Name, opt)
			}
		}
		for _, name := range []string{"a.example", "w.example"} {
			b := query(name, dns.TypeA, 3)
			b.SetEdns0(1232, false)
			for path, ask := range map[string]func(*testing.T, *Forwarder, *dns.Msg) *dns.Msg{"wire": askWire, "message": askMsg} {
				if opt := ask(t, f, b.Copy()).IsEdns0(); opt == nil || len(opt.Option) != 0 {
					t.Errorf("%s %s: client without options got OPT %v", path, name, opt)
				}
				if opt := ask(t, f, query(name, dns.TypeA, 4)).IsEdns0(); opt != nil {
					t.Errorf("%s %s: client without EDNS got OPT %v", path, name, opt)
				}
			}
		}
		if n := len(res.queries()); n != 4 {
			t.Errorf("%d upstream queries, want 4 (two names, with and without EDNS)", n)
		}
	})
	synctest.Test(t, func(t *testing.T) {
		hold := make(chan struct{})
		f, res := newScriptForwarder(t, 10, nil, hold)
		var asking sync.WaitGroup
		var v1, v0 *dns.Msg
		asking.Go(func() {
			q := query("v.example", dns.TypeA, 1)
			q.SetEdns0(1232, false)
			q.IsEdns0().SetVersion(1)
			v1 = askMsg(t, f, q)
		})
		synctest.Wait()
		asking.Go(func() {
			q := query("v.example", dns.TypeA, 2)
			q.SetEdns0(1232, false)
			v0 = askMsg(t, f, q)
		})
		synctest.Wait()
		close(hold)
		asking.Wait()
		if v1.Rcode != dns.RcodeBadVers || v0.Rcode != dns.RcodeSuccess || len(res.queries()) != 2 {
			t.Errorf("version 1: %s, version 0: %s, %d upstream queries; want BADVERS, NOERROR, 2",
				dns.RcodeToString[v1.Rcode], dns.RcodeToString[v0.Rcode], len(res.queries()))
		}
	})
}

// TestTCPClientGetsAnswerLargerUncompressed: an answer of 400 A records
// for a long name is 6 KB compressed, as the resolver sends it, but over
// 100 KB written out in full: a TCP client gets it (on a cache miss),
// compressed. Before, the client got nothing (the write failed) while the
// query counted as answered.
func TestTCPClientGetsAnswerLargerUncompressed(t *testing.T) {
	name := strings.Repeat("a", 63) + "." + strings.Repeat("b", 63) + "." + strings.Repeat("c", 63) + ".example."
	many := func(q *dns.Msg) [][]byte {
		m := new(dns.Msg)
		m.SetReply(q)
		for i := range 400 {
			m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: q.Question[0].Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60},
				A: net.IPv4(10, 0, byte(i>>8), byte(i))})
		}
		return [][]byte{packed(m)}
	}
	for _, cacheSize := range []int{0, 10} {
		f, _ := newScriptForwarder(t, cacheSize, many, nil)
		addr := startServer(t, f)
		c := &dns.Client{Net: "tcp", Timeout: 3 * time.Second}
		resp, _, err := c.Exchange(query(name, dns.TypeA, 7), addr)
		if err != nil {
			t.Fatalf("cache size %d: %v", cacheSize, err)
		}
		if len(resp.Answer) != 400 || resp.Truncated {
			t.Errorf("cache size %d: %d records, truncated %v; want all 400", cacheSize, len(resp.Answer), resp.Truncated)
		}
	}
}

// TestTCPAnswerToAnotherQuestionDropped: an answer under a query's ID but
// to another question (a late answer to an earlier query that had the ID,
// once the counter came round) is dropped and counted; the query gets its
// own answer, whose name may differ in case. Before, the query took the
// other question's answer.
func TestTCPAnswerToAnotherQuestionDropped(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f, _ := newScriptForwarder(t, 0, func(q *dns.Msg) [][]byte {
			late := echoReply(q)
			late.Question[0].Name = "other.example."
			late.Answer[0] = &dns.A{Hdr: dns.RR_Header{Name: "other.example.", Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60}, A: net.IPv4(203, 0, 113, 66)}
			own := echoReply(q)
			own.Question[0].Name = strings.ToUpper(q.Question[0].Name)
			return [][]byte{packed(late), packed(own)}
		}, nil)
		wantOwnAnswer(t, f, query("a.example", dns.TypeA, 5), net.IPv4(192, 0, 2, 7))
	})
}

// TestNegativeCacheTTL: a negative answer is cached for the least of the
// SOA's TTL, its MINIMUM and the TTLs of a CNAME chain before it (RFC 2308
// §5), NODATA after a CNAME chain included, and no longer than maxTTL.
func TestNegativeCacheTTL(t *testing.T) {
	soa := func(ttl, minimum uint32) dns.RR {
		return &dns.SOA{Hdr: dns.RR_Header{Name: "example.", Rrtype: dns.TypeSOA, Class: dns.ClassINET, Ttl: ttl},
			Ns: "ns.example.", Mbox: "admin.example.", Serial: 1, Minttl: minimum}
	}
	cname := func(ttl uint32) dns.RR {
		return &dns.CNAME{Hdr: dns.RR_Header{Name: "a.example.", Rrtype: dns.TypeCNAME, Class: dns.ClassINET, Ttl: ttl}, Target: "b.example."}
	}
	a := func(ttl uint32) dns.RR {
		return &dns.A{Hdr: dns.RR_Header{Name: "b.example.", Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: ttl}, A: net.IPv4(192, 0, 2, 1)}
	}
	const huge = 1<<31 - 1
	for _, tc := range []struct {
		name   string
		rcode  int
		answer []dns.RR
		ns     []dns.RR
		want   time.Duration
	}{
		{"NXDOMAIN", dns.RcodeNameError, nil, []dns.RR{soa(300, 30)}, 30 * time.Second},
		{"NXDOMAIN after a CNAME", dns.RcodeNameError, []dns.RR{cname(10)}, []dns.RR{soa(300, 60)}, 10 * time.Second},
		{"NODATA", dns.RcodeSuccess, nil, []dns.RR{soa(300, 30)}, 30 * time.Second},
		{"NODATA after a CNAME", dns.RcodeSuccess, []dns.RR{cname(600)}, []dns.RR{soa(300, 30)}, 30 * time.Second},
		{"NXDOMAIN capped", dns.RcodeNameError, nil, []dns.RR{soa(huge, huge)}, maxTTL},
		{"positive after a CNAME", dns.RcodeSuccess, []dns.RR{cname(600), a(40)}, nil, 40 * time.Second},
		{"positive capped", dns.RcodeSuccess, []dns.RR{a(huge)}, nil, maxTTL},
	} {
		m := new(dns.Msg)
		m.SetReply(query("a.example", dns.TypeA, 1))
		m.Rcode, m.Answer, m.Ns = tc.rcode, tc.answer, tc.ns
		l, err := answerLayout(packed(m), nil)
		if err != nil {
			t.Fatal(err)
		}
		if got, ok := l.cacheTTL(); !ok || got != tc.want {
			t.Errorf("%s: cached for %v (%v), want %v", tc.name, got, ok, tc.want)
		}
	}
}

// TestTTLWithTopBitIsZero: a TTL field with the most significant bit set
// counts as zero (RFC 2181 §8), in the answer and authority sections and
// for a negative answer's SOA (its TTL and MINIMUM): such an answer is not
// cached. Before, it was cached for maxTTL (24 h).
func TestTTLWithTopBitIsZero(t *testing.T) {
	a := &dns.A{Hdr: dns.RR_Header{Name: "a.example.", Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 0x80000000}, A: net.IPv4(192, 0, 2, 1)}
	soa := func(ttl, minimum uint32) dns.RR {
		return &dns.SOA{Hdr: dns.RR_Header{Name: "example.", Rrtype: dns.TypeSOA, Class: dns.ClassINET, Ttl: ttl},
			Ns: "ns.example.", Mbox: "admin.example.", Serial: 1, Minttl: minimum}
	}
	for _, tc := range []struct {
		name   string
		rcode  int
		answer []dns.RR
		ns     []dns.RR
	}{
		{"answer TTL 2^31", dns.RcodeSuccess, []dns.RR{a}, nil},
		{"NXDOMAIN, SOA TTL 2^32-1", dns.RcodeNameError, nil, []dns.RR{soa(0xFFFFFFFF, 300)}},
		{"NXDOMAIN, SOA MINIMUM 2^31", dns.RcodeNameError, nil, []dns.RR{soa(300, 0x80000000)}},
	} {
		m := new(dns.Msg)
		m.SetReply(query("a.example", dns.TypeA, 1))
		m.Rcode, m.Answer, m.Ns = tc.rcode, tc.answer, tc.ns
		l, err := answerLayout(packed(m), nil)
		if err != nil {
			t.Fatal(err)
		}
		if ttl, ok := l.cacheTTL(); ok && ttl > 0 {
			t.Errorf("%s: cached for %v, want not cached", tc.name, ttl)
		}
		c := newCache(10)
		var k questionKey
		keyOf(query("a.example", dns.TypeA, 1), &k)
		if c.put(&k, m); c.lru.Len() != 0 {
			t.Errorf("%s: the cache kept it", tc.name)
		}
	}
}

// TestZoneTransfersRefused: AXFR and IXFR are answered REFUSED without
// reaching the resolver, by either path; and no query with records in
// its answer or authority section (IXFR's serial), nor one signed (TSIG),
// is cached or merged. Before, an AXFR got the first message of the
// transfer, cached as the whole of it for every later AXFR, and an IXFR's
// answer was cached and served to clients at another serial.
func TestZoneTransfersRefused(t *testing.T) {
	soa := func(serial uint32) dns.RR {
		return &dns.SOA{Hdr: dns.RR_Header{Name: "example.", Rrtype: dns.TypeSOA, Class: dns.ClassINET, Ttl: 300},
			Ns: "ns.example.", Mbox: "admin.example.", Serial: serial, Minttl: 300}
	}
	synctest.Test(t, func(t *testing.T) {
		f, res := newScriptForwarder(t, 100, func(q *dns.Msg) [][]byte {
			// A transfer in two messages: SOA, A; then A, SOA.
			first, last := echoReply(q), echoReply(q)
			first.Answer = []dns.RR{soa(7), first.Answer[0]}
			last.Question = nil
			last.Answer = append(last.Answer, soa(7))
			return [][]byte{packed(first), packed(last)}
		}, nil)
		axfr := query("example", dns.TypeAXFR, 1)
		ixfr := query("example", dns.TypeIXFR, 2)
		ixfr.Ns = []dns.RR{soa(5)}
		for _, q := range []*dns.Msg{axfr, ixfr} {
			name := dns.TypeToString[q.Question[0].Qtype]
			if f.serveWire(udpClientWriter(), pack(t, q)) {
				t.Errorf("%s taken by the wire path", name)
			}
			for range 2 {
				m := serve(t, f, q)
				if m.Rcode != dns.RcodeRefused || m.Id != q.Id || len(m.Question) != 1 || len(m.Answer) != 0 {
					t.Errorf("%s: %s id %d with %d records, want REFUSED id %d", name, dns.RcodeToString[m.Rcode], m.Id, len(m.Answer), q.Id)
				}
			}
		}
		if n := len(res.queries()); n != 0 {
			t.Errorf("%d transfer queries reached the resolver", n)
		}
		if n := f.Stats().Responses[dns.RcodeRefused].Load(); n != 4 {
			t.Errorf("Responses[REFUSED] = %d, want 4", n)
		}
	})
	withAuthority := query("a.example", dns.TypeA, 1)
	withAuthority.Ns = []dns.RR{soa(5)}
	signed := query("a.example", dns.TypeA, 1)
	signed.Extra = []dns.RR{&dns.TSIG{Hdr: dns.RR_Header{Name: "key.", Rrtype: dns.TypeTSIG, Class: dns.ClassANY}, Algorithm: dns.HmacSHA256, MAC: "00"}}
	for name, q := range map[string]*dns.Msg{"authority record": withAuthority, "TSIG": signed} {
		var k questionKey
		if keyOf(q, &k) {
			t.Errorf("a query with a %s is cacheable", name)
		}
	}
}

// wantOPT checks that m, an answer to a query with EDNS and the DO bit
// do, has an OPT record with that DO bit and the forwarder's UDP size.
func wantOPT(t *testing.T, what string, m *dns.Msg, do bool) {
	t.Helper()
	opt := m.IsEdns0()
	switch {
	case opt == nil:
		t.Errorf("%s (%s): no OPT record in the answer to an EDNS query", what, dns.RcodeToString[m.Rcode])
	case opt.Do() != do || opt.UDPSize() != ednsUDPSize || opt.Version() != 0:
		t.Errorf("%s: OPT DO=%v size %d version %d, want DO=%v size %d version 0", what, opt.Do(), opt.UDPSize(), opt.Version(), do, ednsUDPSize)
	}
}

// TestOwnAnswersCarryOPT: the answers the forwarder makes itself to a
// query with EDNS carry an OPT record (RFC 6891 §7) with the query's DO bit
// (RFC 3225 §3): SERVFAIL, REFUSED, the header-and-question answer of a
// UDP client's truncated answer, and FORMERR and NOTIMP to a query that
// reads; without EDNS, none. Before, none of them had one.
func TestOwnAnswersCarryOPT(t *testing.T) {
	t.Run("failures", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			f, _ := newScriptForwarder(t, 0, nil, nil)
			f.pools[0].dial = func(ctx context.Context) (net.Conn, error) { return nil, errors.New("connect: connection refused") }
			for _, do := range []bool{false, true} {
				q := query("a.example", dns.TypeA, 3)
				q.SetEdns0(4096, do)
				wantOPT(t, "SERVFAIL", serve(t, f, q), do)
				axfr := query("example", dns.TypeAXFR, 4)
				axfr.SetEdns0(4096, do)
				wantOPT(t, "REFUSED", serve(t, f, axfr), do)
			}
			if m := serve(t, f, query("a.example", dns.TypeA, 5)); m.IsEdns0() != nil {
				t.Errorf("SERVFAIL to a query without EDNS has OPT %v", m.IsEdns0())
			}
		})
	})
	t.Run("truncated", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			// An answer too large for the client that miekg/dns cannot cut
			// record by record (see TestUDPUnreadableLargeAnswerTruncated),
			// with an extended RCODE (BADCOOKIE) in its OPT record.
			f, _ := newScriptForwarder(t, 0, func(q *dns.Msg) [][]byte {
				m := echoReply(q)
				for i := range 60 {
					m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: q.Question[0].Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60}, A: net.IPv4(10, 0, 0, byte(i))})
				}
				m.Rcode = dns.RcodeBadCookie
				b := packed(m)
				// The OPT record (11 bytes) is last; the last A record's
				// RDLENGTH is 4 + 2 bytes before it: 5, and one byte more.
				binary.BigEndian.PutUint16(b[len(b)-17:], 5)
				return [][]byte{append(b[:len(b)-11:len(b)-11], append([]byte{0}, b[len(b)-11:]...)...)}
			}, nil)
			q := query("A.Example", dns.TypeA, 0x4321)
			q.SetEdns0(512, true)
			w := udpClientWriter()
			if !f.serveWire(w, pack(t, q)) {
				t.Fatal("not taken by the wire path")
			}
			m := new(dns.Msg)
			if err := m.Unpack(w.buf[:w.n]); err != nil || !m.Truncated || len(m.Answer) != 0 {
				t.Fatalf("%v: %v", err, m)
			}
			wantOPT(t, "truncated", m, true)
			if m.Rcode != dns.RcodeBadCookie {
				t.Errorf("truncated answer: RCODE %s, want the answer's BADCOOKIE", dns.RcodeToString[m.Rcode])
			}
		})
	})
	t.Run("rejected", func(t *testing.T) {
		f, _ := newScriptForwarder(t, 0, nil, nil)
		addr := startServer(t, f)
		twoQuestions := query("a.example", dns.TypeA, 6)
		twoQuestions.Question = append(twoQuestions.Question, twoQuestions.Question[0])
		twoQuestions.SetEdns0(1232, true)
		wantOPT(t, "FORMERR", exchange(t, "udp", addr, twoQuestions), true)
		update := query("a.example", dns.TypeA, 7)
		update.Opcode = dns.OpcodeUpdate
		update.SetEdns0(1232, false)
		wantOPT(t, "NOTIMP", exchange(t, "tcp", addr, update), false)
	})
}

// TestUDPUnreadableLargeAnswerTruncated: an answer larger than the UDP
// client takes that passes the forwarder's own reading but not miekg/dns's
// (so it cannot be cut record by record) reaches the client as header and
// question with TC=1, within its size. Before, it went out whole.
func TestUDPUnreadableLargeAnswerTruncated(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f, _ := newScriptForwarder(t, 0, func(q *dns.Msg) [][]byte {
			m := new(dns.Msg)
			m.SetReply(q)
			for i := range 60 {
				m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: q.Question[0].Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60}, A: net.IPv4(10, 0, 0, byte(i))})
			}
			b := packed(m)
			// The last record's RDLENGTH 5: one byte more than an address.
			binary.BigEndian.PutUint16(b[len(b)-6:], 5)
			return [][]byte{append(b, 0)}
		}, nil)
		w := udpClientWriter()
		if !f.serveWire(w, pack(t, query("A.Example", dns.TypeA, 0x4321))) {
			t.Fatal("not taken by the wire path")
		}
		out := w.buf[:w.n]
		m := new(dns.Msg)
		if err := m.Unpack(out); err != nil || len(out) > dns.MinMsgSize || !m.Truncated || m.Id != 0x4321 ||
			len(m.Question) != 1 || m.Question[0].Name != "A.Example." || len(m.Answer) != 0 {
			t.Fatalf("%d bytes (%v): %v", len(out), err, m)
		}
	})
}

// wantOwnAnswer exchanges q through f and wants the answer carrying ip,
// with one other answer dropped as not q's (Stats.Mismatched).
func wantOwnAnswer(t *testing.T, f *Forwarder, q *dns.Msg, ip net.IP) {
	t.Helper()
	resp, err := f.Exchange(context.Background(), q)
	if err != nil {
		t.Fatal(err)
	}
	if got := resp.Answer[0].(*dns.A).A; !got.Equal(ip) {
		t.Errorf("answer %v, want %v (not the other one's)", got, ip)
	}
	if n := f.Stats().Mismatched.Load(); n != 1 {
		t.Errorf("Mismatched = %d, want 1", n)
	}
}
