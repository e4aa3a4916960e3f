package dnsforward

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/socksfwd/socksfwd/internal/allowlist"
	"github.com/socksfwd/socksfwd/internal/udpbatch"
)

// TestUDPFastPathBurst: a burst of datagrams read in batches gets one
// reply per query: hits from the cache (ID and name as asked), misses
// forwarded (a query that is not plain, too, by the miekg/dns path), and
// what the miekg/dns server would reject answered as it
// would (NOTIMP for UPDATE, FORMERR for two questions or a body cut
// short); responses and runts get nothing. Every query is counted, by its
// answer's RCODE, and what gets nothing as ignored.
func TestUDPFastPathBurst(t *testing.T) {
	res, f := newCachingPair(t)
	s, addr := startServerFor(t, f)
	if s.fast == nil {
		t.Fatal("a server on 127.0.0.1 does not use the UDP fast path")
	}
	exchange(t, "udp", addr, query("hit.example", dns.TypeA, 1))

	c, err := net.Dial("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	want := map[uint16]string{} // ID: what the reply must say
	send := func(m *dns.Msg, expect string) {
		t.Helper()
		if _, err := c.Write(pack(t, m)); err != nil {
			t.Fatal(err)
		}
		if expect != "" {
			want[m.Id] = expect
		}
	}
	// First, so that they have been read once later datagrams are answered.
	resp := query("hit.example", dns.TypeA, 300)
	resp.Response = true
	send(resp, "")
	if _, err := c.Write([]byte{1, 2, 3, 4, 5}); err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		name := "hit.example"
		if i%2 == 1 {
			name = "HIT.Example"
		}
		send(query(name, dns.TypeA, uint16(100+i)), "NOERROR "+dns.Fqdn(name))
	}
	for i := range 5 {
		send(query(fmt.Sprintf("miss%d.example", i), dns.TypeA, uint16(200+i)), fmt.Sprintf("NOERROR miss%d.example.", i))
	}
	anyClass := query("any.example", dns.TypeA, 304) // not plain: the miekg/dns path
	anyClass.Question[0].Qclass = dns.ClassANY
	send(anyClass, "NOERROR any.example.")
	update := query("hit.example", dns.TypeSOA, 301)
	update.Opcode = dns.OpcodeUpdate
	send(update, "NOTIMP")
	two := query("hit.example", dns.TypeA, 302)
	two.Question = append(two.Question, two.Question[0])
	send(two, "FORMERR")
	cut := pack(t, query("hit.example", dns.TypeA, 303))
	if _, err := c.Write(cut[:len(cut)-3]); err != nil {
		t.Fatal(err)
	}
	want[303] = "FORMERR"

	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 1500)
	for len(want) > 0 {
		n, err := c.Read(buf)
		if err != nil {
			t.Fatalf("waiting for %d replies: %v", len(want), err)
		}
		m := new(dns.Msg)
		if err := m.Unpack(buf[:n]); err != nil {
			t.Fatal(err)
		}
		expect, ok := want[m.Id]
		if !ok {
			t.Fatalf("unexpected or second reply: %v", m)
		}
		delete(want, m.Id)
		got := dns.RcodeToString[m.Rcode]
		if len(m.Question) > 0 && m.Rcode == dns.RcodeSuccess {
			got += " " + m.Question[0].Name
			if len(m.Answer) != 1 {
				got += " without an answer"
			}
		}
		if got != expect {
			t.Errorf("reply %d: %q, want %q", m.Id, got, expect)
		}
	}
	if n := res.queries.Load(); n != 7 {
		t.Errorf("resolver asked %d times, want 7 (1 + 5 misses + class ANY)", n)
	}
	if n := f.Stats().CacheHits.Load(); n != 20 {
		t.Errorf("CacheHits = %d, want 20", n)
	}
	s.Close()
	s.fast.wait(context.Background()) // every query's worker is done
	st := f.Stats()
	if q, u := st.Queries.Load(), st.QueriesUDP.Load(); q != 30 || u != 30 {
		t.Errorf("Queries = %d, QueriesUDP = %d, want 30 (the rejected ones too)", q, u)
	}
	var responses int64
	for i := range st.Responses {
		responses += st.Responses[i].Load()
	}
	formerr, notimp := st.Responses[dns.RcodeFormatError].Load(), st.Responses[dns.RcodeNotImplemented].Load()
	if responses != 30 || formerr != 2 || notimp != 1 {
		t.Errorf("Responses: %d, FORMERR %d, NOTIMP %d; want 30, 2, 1", responses, formerr, notimp)
	}
	if n := st.Ignored.Load(); n != 2 {
		t.Errorf("Ignored = %d, want 2 (the response and the runt)", n)
	}
}

// TestUDPFastPathLeavesDisallowedSources: a source outside the allow
// list is not answered from the cache by the fast path; ServeDNS refuses
// it (loopback, which the list always allows, cannot show this on the
// wire).
func TestUDPFastPathLeavesDisallowedSources(t *testing.T) {
	_, f := newCachingPair(t)
	s, addr := startServerFor(t, f)
	exchange(t, "udp", addr, query("a.example", dns.TypeA, 1))
	q := pack(t, query("a.example", dns.TypeA, 2))
	outsider := netip.MustParseAddrPort("192.0.2.7:5353")
	if _, ok := s.answerFromCache(nil, q, outsider); !ok {
		t.Fatal("no allow list: the cached answer was not served")
	}
	l, err := allowlist.Parse([]string{"198.51.100.0/24"})
	if err != nil {
		t.Fatal(err)
	}
	s.SetAllow(l)
	if _, ok := s.answerFromCache(nil, q, outsider); ok {
		t.Fatal("a source outside the allow list was answered from the cache")
	}
	if _, ok := s.answerFromCache(nil, q, netip.MustParseAddrPort("198.51.100.9:5353")); !ok {
		t.Fatal("an allowed source was not answered from the cache")
	}
	w := &recorder{}
	w.remote = &net.UDPAddr{IP: outsider.Addr().AsSlice(), Port: int(outsider.Port())}
	s.ServeDNS(w, query("a.example", dns.TypeA, 3))
	if len(w.msgs) != 1 || w.msgs[0].Rcode != dns.RcodeRefused {
		t.Fatalf("the outsider got %v, want REFUSED", w.msgs)
	}
}

// TestUDPWirePathRefusesBeyondMaxConcurrent: the wire path of UDP misses
// keeps the limit on queries waiting on the resolvers: beyond it, REFUSED
// at once, counted; the query held answers once the resolver does.
func TestUDPWirePathRefusesBeyondMaxConcurrent(t *testing.T) {
	gate := newGateResolver(t)
	f := newForwarderConfig(t, socks(t).Addr(), Config{Timeout: time.Minute, MaxConcurrent: 1}, nil, gate.addr)
	_, addr := startServerFor(t, f)
	held := make(chan *dns.Msg, 1)
	go func() {
		c := &dns.Client{Net: "udp", Timeout: 10 * time.Second}
		r, _, err := c.Exchange(query("held.example", dns.TypeA, 1), addr)
		if err != nil {
			t.Errorf("held query: %v", err)
		}
		held <- r
	}()
	<-gate.got
	if r := exchange(t, "udp", addr, query("second.example", dns.TypeA, 2)); r.Rcode != dns.RcodeRefused || r.Id != 2 {
		t.Errorf("second query: %s id %d, want REFUSED id 2", dns.RcodeToString[r.Rcode], r.Id)
	}
	if n := f.Stats().Refused.Load(); n != 1 {
		t.Errorf("Refused = %d, want 1", n)
	}
	gate.open()
	if r := <-held; r != nil && (r.Rcode != dns.RcodeSuccess || r.Id != 1 || len(r.Answer) != 1) {
		t.Errorf("held query: %v", r)
	}
}

// TestUDPFastPathLongQuery: a query longer than a read slot is handled
// cut, as the miekg/dns server handled one longer than its buffer: it
// does not unpack, so FORMERR, never silence.
func TestUDPFastPathLongQuery(t *testing.T) {
	_, f := newCachingPair(t)
	_, addr := startServerFor(t, f)
	q := query("a.example", dns.TypeTXT, 77)
	q.SetEdns0(4096, false)
	q.IsEdns0().Option = append(q.IsEdns0().Option, &dns.EDNS0_PADDING{Padding: make([]byte, udpSlotLen)})
	if r := exchange(t, "udp", addr, q); r.Rcode != dns.RcodeFormatError || r.Id != 77 {
		t.Fatalf("a query of %d bytes: %s id %d, want FORMERR id 77", q.Len(), dns.RcodeToString[r.Rcode], r.Id)
	}
}

// TestReplyQueue: queued replies go out, in batches of the writer's size,
// each once, to its own client and as it was when queued (the caller may
// reuse its buffer at once), also those queued while the queue writes and
// those left when it stops; a reply the kernel refuses (to port 0) is
// dropped and the ones after it still go.
func TestReplyQueue(t *testing.T) {
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	w, err := udpbatch.NewWriter(pc, udpBatchLen)
	if err != nil {
		t.Fatal(err)
	}
	q := newReplyQueue(w)
	clients := make([]*net.UDPConn, 3)
	for i := range clients {
		if clients[i], err = net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}); err != nil {
			t.Fatal(err)
		}
		defer clients[i].Close()
	}
	addrOf := func(c *net.UDPConn) netip.AddrPort { return c.LocalAddr().(*net.UDPAddr).AddrPort() }

	const perClient = 3 * udpBatchLen // more than one writer's batch
	buf := make([]byte, 0, 64)
	// Queued before the queue's goroutine runs: one flush writes them all.
	for i := range perClient {
		for c, cl := range clients {
			buf = fmt.Appendf(buf[:0], "reply %d to %d", i, c)
			q.write(buf, addrOf(cl))
			clear(buf[:cap(buf)])
		}
		if i == udpBatchLen/2 {
			q.write([]byte("refused"), netip.MustParseAddrPort("127.0.0.1:0"))
		}
	}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() { q.run(stop); close(done) }()
	q.write([]byte("last"), addrOf(clients[0])) // queued while it may be writing
	close(stop)
	<-done // what was queued before stop is written by then

	for c, cl := range clients {
		want := map[string]bool{} // each reply once, in any order
		for i := range perClient {
			want[fmt.Sprintf("reply %d to %d", i, c)] = true
		}
		if c == 0 {
			want["last"] = true
		}
		cl.SetReadDeadline(time.Now().Add(10 * time.Second))
		b := make([]byte, 100)
		for len(want) > 0 {
			n, err := cl.Read(b)
			if err != nil {
				t.Fatalf("client %d, %d replies missing: %v", c, len(want), err)
			}
			if got := string(b[:n]); !want[got] {
				t.Fatalf("client %d got %q: not its reply, or twice", c, got)
			}
			delete(want, string(b[:n]))
		}
	}
}

// TestGroupByClient: replies are put in order of client, and by size,
// largest first, for each client, keeping their order otherwise, with
// their destinations alongside.
func TestGroupByClient(t *testing.T) {
	a := netip.MustParseAddrPort("127.0.0.1:1000")
	b := netip.MustParseAddrPort("127.0.0.1:2000")
	replies := [][]byte{[]byte("b-2"), []byte("a-22"), []byte("a-1"), []byte("b-33"), []byte("a-33"), []byte("b-4")}
	to := []netip.AddrPort{b, a, a, b, a, b}
	groupByClient(replies, to)
	want := []string{"a-22", "a-33", "a-1", "b-33", "b-2", "b-4"}
	for i, r := range replies {
		wantTo := a
		if want[i][0] == 'b' {
			wantTo = b
		}
		if string(r) != want[i] || to[i] != wantTo {
			t.Fatalf("reply %d: %q to %v, want %q to %v (all: %q)", i, r, to[i], want[i], wantTo, replies)
		}
	}
}
