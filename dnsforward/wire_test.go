package dnsforward

import (
	"bytes"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"
)

func pack(t testing.TB, m *dns.Msg) []byte {
	t.Helper()
	wire, err := m.Pack()
	if err != nil {
		t.Fatal(err)
	}
	return wire
}

// TestParseQueryKeyMatchesMiekg: the key read from the bytes is the key
// of the unpacked query, so that both paths share cache entries; case is
// kept for the reply and folded in the key; the type, EDNS presence, the
// DO and CD bits are part of the key; the EDNS size is read, at least 512.
func TestParseQueryKeyMatchesMiekg(t *testing.T) {
	plain := query("Www.Example.ORG", dns.TypeA, 0x1234)
	do := query("www.example.org", dns.TypeA, 1)
	do.SetEdns0(1232, true)
	small := query("www.example.org", dns.TypeA, 1)
	small.SetEdns0(100, false)
	large := query("WWW.example.org", dns.TypeA, 1)
	large.SetEdns0(4096, false)
	aaaa := query("www.example.org", dns.TypeAAAA, 1)
	cd := query("www.example.org", dns.TypeA, 1)
	cd.CheckingDisabled = true
	keys := map[string]string{}
	for _, tc := range []struct {
		q    *dns.Msg
		size int
	}{{plain, 512}, {do, 1232}, {small, 512}, {large, 4096}, {aaaa, 512}, {cd, 512}} {
		var fromWire, fromMsg questionKey
		wq, ok := parseQuery(pack(t, tc.q), &fromWire)
		if !ok {
			t.Fatalf("%v: not parsed", tc.q.Question)
		}
		if !keyOf(tc.q, &fromMsg) || !bytes.Equal(fromWire.bytes(), fromMsg.bytes()) {
			t.Fatalf("%v: key from the bytes % x, from the message % x", tc.q.Question, fromWire.bytes(), fromMsg.bytes())
		}
		if wq.id != tc.q.Id || wq.udpSize != tc.size {
			t.Errorf("%v: id %d size %d, want %d %d", tc.q.Question, wq.id, wq.udpSize, tc.q.Id, tc.size)
		}
		keys[string(fromWire.bytes())] = tc.q.String()
	}
	var k questionKey
	parseQuery(pack(t, plain), &k)
	if !bytes.Equal(k.asked(), []byte("\x03Www\x07Example\x03ORG\x00")) {
		t.Errorf("asked name % x: case not kept", k.asked())
	}
	// small and large differ only in case and EDNS size: one key.
	if len(keys) != 5 {
		t.Errorf("%d distinct keys, want 5 (type, EDNS, DO and CD bits count, case and EDNS size do not): %v", len(keys), keys)
	}
}

// TestParseQueryFallsBack: what is not a plain query is left to the
// miekg/dns path.
func TestParseQueryFallsBack(t *testing.T) {
	twoQuestions := query("a.example", dns.TypeA, 1)
	twoQuestions.Question = append(twoQuestions.Question, dns.Question{Name: "b.example.", Qtype: dns.TypeA, Qclass: dns.ClassINET})
	noQuestion := new(dns.Msg)
	notify := query("a.example", dns.TypeSOA, 1)
	notify.Opcode = dns.OpcodeNotify
	response := query("a.example", dns.TypeA, 1)
	response.Response = true
	anyClass := query("a.example", dns.TypeA, 1)
	anyClass.Question[0].Qclass = dns.ClassANY
	unknownClass := query("a.example", dns.TypeA, 1)
	unknownClass.Question[0].Qclass = 77
	withAnswer := query("a.example", dns.TypeA, 1)
	withAnswer.Answer = answerA("a.example.").Answer
	tsig := query("a.example", dns.TypeA, 1)
	tsig.Extra = append(tsig.Extra, &dns.TSIG{Hdr: dns.RR_Header{Name: "key.", Rrtype: dns.TypeTSIG, Class: dns.ClassANY}, Algorithm: dns.HmacSHA256, MAC: "00", OtherData: ""})
	ednsV1 := query("a.example", dns.TypeA, 1)
	ednsV1.SetEdns0(1232, false)
	ednsV1.IsEdns0().SetVersion(1)
	ednsOptions := withOptions(query("a.example", dns.TypeA, 1))
	twoOPT := query("a.example", dns.TypeA, 1)
	twoOPT.SetEdns0(1232, false)
	twoOPT.Extra = append(twoOPT.Extra, twoOPT.Extra[0])
	cases := map[string][]byte{
		"two questions":   pack(t, twoQuestions),
		"no question":     pack(t, noQuestion),
		"opcode NOTIFY":   pack(t, notify),
		"a response":      pack(t, response),
		"class ANY":       pack(t, anyClass),
		"unknown class":   pack(t, unknownClass),
		"an answer":       pack(t, withAnswer),
		"TSIG":            pack(t, tsig),
		"EDNS version 1":  pack(t, ednsV1),
		"two OPT records": pack(t, twoOPT),
		// upstreamWire would read its RDLENGTH one byte early.
		"OPT owner a pointer": optOwnerPointer(pack(t, ednsOptions)),
		"cut short":           pack(t, query("a.example", dns.TypeA, 1))[:20],
		"header only":         pack(t, query("a.example", dns.TypeA, 1))[:headerLen],
		// The question's name as a compression pointer to itself.
		"pointer name": append(pack(t, noQuestion)[:4:4], 0, 1, 0, 0, 0, 0, 0, 0, 0xC0, 12, 0, 1, 0, 1),
	}
	for name, wire := range cases {
		var k questionKey
		if _, ok := parseQuery(wire, &k); ok {
			t.Errorf("%s: taken by the fast path", name)
		}
	}
}

// optOwnerPointer is a packed query with one question and an OPT record
// right after it, its OPT owner (one zero byte) written instead as a
// compression pointer to the question name's last byte: the root too, for
// miekg/dns and dnsmessage alike.
func optOwnerPointer(query []byte) []byte {
	nameEnd, _ := plainNameEnd(query, headerLen)
	opt := nameEnd + 4
	ptr := []byte{0xC0 | byte((nameEnd-1)>>8), byte(nameEnd - 1)}
	return append(append(append([]byte{}, query[:opt]...), ptr...), query[opt+1:]...)
}

// TestOPTOwnerPointerSendsNoOptions: a query whose OPT owner is a
// compression pointer, with a CLIENT-SUBNET option, reaches the resolver
// without the option, and another client's cached answer has none. Before,
// the fast path took it (the owner read as the root), read its OPT record
// one byte off, sent the option upstream and cached the answer made for
// that subnet (echoed back in the OPT record) for every client.
func TestOPTOwnerPointerSendsNoOptions(t *testing.T) {
	f, res := newScriptForwarder(t, 10, nil, nil)
	addr := startServer(t, f)
	c, err := net.Dial("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	q := query("a.example", dns.TypeA, 9)
	q.SetEdns0(1232, false)
	q.IsEdns0().Option = []dns.EDNS0{&dns.EDNS0_SUBNET{Code: dns.EDNS0SUBNET, Family: 1, SourceNetmask: 24, Address: net.IPv4(198, 51, 100, 0).To4()}}
	crafted := optOwnerPointer(pack(t, q))
	var m dns.Msg
	if err := m.Unpack(crafted); err != nil || m.IsEdns0() == nil || len(m.IsEdns0().Option) != 1 {
		t.Fatalf("the crafted query does not unpack with its option: %v", err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second)) // a bound, not a wait
	if _, err := c.Write(crafted); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1232)
	if _, err := c.Read(buf); err != nil {
		t.Fatal(err)
	}
	for _, sent := range res.queries() {
		if opt := sent.IsEdns0(); opt == nil || len(opt.Option) != 0 {
			t.Errorf("asked upstream with OPT %v, want EDNS without options", opt)
		}
	}
	other := query("a.example", dns.TypeA, 10)
	other.SetEdns0(1232, false)
	if opt := exchange(t, "udp", addr, other).IsEdns0(); opt == nil || len(opt.Option) != 0 {
		t.Errorf("another client got OPT %v, want EDNS without options", opt)
	}
}

// cacheAt returns a cache whose clock the test sets.
func cacheAt(now *time.Time) *cache {
	c := newCache(10)
	c.now = func() time.Time { return *now }
	return c
}

// TestPackedHitPatchesIDNameAndTTLs: a hit is the stored answer with the
// query's ID, the name as asked, and every TTL but OPT's counted down (to
// 0 at the least); the question of the stored answer stays as it was.
func TestPackedHitPatchesIDNameAndTTLs(t *testing.T) {
	now := time.Unix(1_000_000, 0)
	c := cacheAt(&now)
	resp := answerA("a.example.")
	resp.Answer[0].Header().Ttl = 100
	resp.Ns = append(resp.Ns, &dns.NS{Hdr: dns.RR_Header{Name: "example.", Rrtype: dns.TypeNS, Class: dns.ClassINET, Ttl: 3600}, Ns: "ns.example."})
	resp.Extra = append(resp.Extra, &dns.A{Hdr: dns.RR_Header{Name: "ns.example.", Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 5}, A: net.IPv4(192, 0, 2, 53)})
	resp.SetEdns0(1232, true)
	var k questionKey
	q := query("A.Example", dns.TypeA, 0xBEEF)
	q.SetEdns0(1232, true)
	keyOf(q, &k)
	c.put(&k, resp)

	now = now.Add(10 * time.Second)
	wire, rcode, ok := c.appendAnswer([]byte("prefix"), &k, 0xBEEF)
	if !ok || rcode != dns.RcodeSuccess || string(wire[:6]) != "prefix" {
		t.Fatalf("hit: %v, rcode %d, %q", ok, rcode, wire[:min(6, len(wire))])
	}
	m := new(dns.Msg)
	if err := m.Unpack(wire[6:]); err != nil {
		t.Fatal(err)
	}
	if m.Id != 0xBEEF || m.Question[0].Name != "A.Example." {
		t.Errorf("ID %#x question %q, want 0xbeef and the name as asked", m.Id, m.Question[0].Name)
	}
	if got := []uint32{m.Answer[0].Header().Ttl, m.Ns[0].Header().Ttl, m.Extra[0].Header().Ttl}; got[0] != 90 || got[1] != 3590 || got[2] != 0 {
		t.Errorf("TTLs %v, want [90 3590 0]", got)
	}
	if opt := m.IsEdns0(); opt == nil || !opt.Do() || opt.UDPSize() != 1232 || opt.Version() != 0 {
		t.Errorf("OPT changed: %v", opt)
	}
	// The stored answer is untouched: a later hit counts from the original.
	now = now.Add(20 * time.Second)
	wire, _, _ = c.appendAnswer(nil, &k, 1)
	m.Unpack(wire)
	if m.Answer[0].Header().Ttl != 70 || m.Question[0].Name != "A.Example." {
		t.Errorf("second hit: TTL %d name %q, want 70 A.Example.", m.Answer[0].Header().Ttl, m.Question[0].Name)
	}
	// Without the DO bit it is another question.
	var noDO questionKey
	keyOf(query("a.example", dns.TypeA, 1), &noDO)
	if _, _, ok := c.appendAnswer(nil, &noDO, 1); ok {
		t.Error("an answer stored for DO=1 served to DO=0")
	}
	// An answer to another question is not stored under k.
	var other questionKey
	keyOf(query("b.example", dns.TypeA, 1), &other)
	c.put(&other, resp)
	if _, _, ok := c.appendAnswer(nil, &other, 1); ok {
		t.Error("an answer to a.example. stored for b.example.")
	}
}

// TestPackedHitAllocatesNothing: the hit path of the cache (key from the
// bytes, copy, patches) allocates nothing.
func TestPackedHitAllocatesNothing(t *testing.T) {
	now := time.Unix(1_000_000, 0)
	c := cacheAt(&now)
	q := pack(t, query("a.example", dns.TypeA, 9))
	var k questionKey
	parseQuery(q, &k)
	c.put(&k, answerA("a.example."))
	now = now.Add(time.Second)
	buf := make([]byte, 0, 512)
	allocs := testing.AllocsPerRun(100, func() {
		var k questionKey
		wq, ok := parseQuery(q, &k)
		if _, _, hit := c.appendAnswer(buf, &k, wq.id); !ok || !hit {
			t.Fatal("no hit")
		}
	})
	if allocs != 0 {
		t.Errorf("%v allocations per hit, want 0", allocs)
	}
}

// TestCachedAnswersThroughServer: hits over UDP and TCP come from the
// packed answers: the ID and name as asked, TTLs counted down, TC=1 and
// at most 512 bytes for a UDP client without EDNS, the whole answer over
// TCP, and NXDOMAIN with its SOA counted down.
func TestCachedAnswersThroughServer(t *testing.T) {
	res, f := newCachingPair(t)
	var clock atomic.Int64 // seconds; the server's goroutines read it
	clock.Store(1_000_000)
	f.cache.now = func() time.Time { return time.Unix(clock.Load(), 0) }
	addr := startServer(t, f)

	exchange(t, "tcp", addr, query("big.example", dns.TypeTXT, 1)) // fills the cache
	exchange(t, "udp", addr, query("a.example", dns.TypeA, 2))
	exchange(t, "udp", addr, query("nx.example", dns.TypeA, 3))
	clock.Add(7)

	for _, transport := range []string{"udp", "tcp"} {
		a := exchange(t, transport, addr, query("A.EXAMPLE", dns.TypeA, 0x4242))
		if a.Id != 0x4242 || a.Question[0].Name != "A.EXAMPLE." || a.Answer[0].Header().Ttl != 53 {
			t.Errorf("%s hit: id %#x name %q TTL %d, want 0x4242 A.EXAMPLE. 53", transport, a.Id, a.Question[0].Name, a.Answer[0].Header().Ttl)
		}
		nx := exchange(t, transport, addr, query("nx.example", dns.TypeA, 5))
		if nx.Rcode != dns.RcodeNameError || len(nx.Ns) != 1 || nx.Ns[0].Header().Ttl != 293 {
			t.Errorf("%s negative hit: %s %v", transport, dns.RcodeToString[nx.Rcode], nx.Ns)
		}
	}
	udp := exchange(t, "udp", addr, query("big.example", dns.TypeTXT, 6))
	if !udp.Truncated || udp.Len() > dns.MinMsgSize || udp.Id != 6 {
		t.Errorf("UDP hit too large for the client: truncated=%v len=%d id %d", udp.Truncated, udp.Len(), udp.Id)
	}
	tcp := exchange(t, "tcp", addr, query("big.example", dns.TypeTXT, 7))
	if tcp.Truncated || tcp.Len() < 3000 || tcp.Answer[0].Header().Ttl != 53 {
		t.Errorf("TCP hit: truncated=%v len=%d", tcp.Truncated, tcp.Len())
	}
	if n := res.queries.Load(); n != 3 {
		t.Errorf("resolver asked %d times, want 3 (the rest from the cache)", n)
	}
	if hits := f.Stats().CacheHits.Load(); hits != 6 {
		t.Errorf("CacheHits = %d, want 6", hits)
	}
}
