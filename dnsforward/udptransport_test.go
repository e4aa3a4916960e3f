package dnsforward

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
	"github.com/rs/zerolog"

	"github.com/socksfwd/socksfwd/internal/testnet"
	"github.com/socksfwd/socksfwd/socksclient"
	"github.com/socksfwd/socksfwd/socksclient/sockstest"
)

// udpResolver serves A answers on UDP and TCP at one address; TXT answers
// are 3000 bytes, sent with TC=1 and no records over UDP.
func udpResolver(t *testing.T) string {
	t.Helper()
	pc, ln, err := Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	handler := dns.HandlerFunc(func(w dns.ResponseWriter, q *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(q)
		name := q.Question[0].Name
		if q.Question[0].Qtype == dns.TypeTXT {
			if _, udp := w.RemoteAddr().(*net.UDPAddr); udp {
				m.Truncated = true
			} else {
				m.Answer = append(m.Answer, &dns.TXT{Hdr: dns.RR_Header{Name: name, Rrtype: dns.TypeTXT, Class: dns.ClassINET, Ttl: 60},
					Txt: []string{strings.Repeat("t", 250), strings.Repeat("u", 250), strings.Repeat("v", 250), strings.Repeat("w", 250),
						strings.Repeat("x", 250), strings.Repeat("y", 250), strings.Repeat("z", 250), strings.Repeat("a", 250),
						strings.Repeat("b", 250), strings.Repeat("c", 250), strings.Repeat("d", 250), strings.Repeat("e", 250)}})
			}
		} else {
			m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60}, A: net.IPv4(192, 0, 2, 2)})
		}
		w.WriteMsg(m)
	})
	udp := &dns.Server{PacketConn: pc, Handler: handler, UDPSize: dns.MaxMsgSize}
	tcp := &dns.Server{Listener: ln, Handler: handler}
	var wg sync.WaitGroup
	for _, s := range []*dns.Server{udp, tcp} {
		started := make(chan struct{})
		s.NotifyStartedFunc = func() { close(started) }
		wg.Go(func() { s.ActivateAndServe() })
		<-started
	}
	t.Cleanup(func() {
		udp.Shutdown()
		tcp.Shutdown()
		wg.Wait()
	})
	return pc.LocalAddr().String()
}

func newUDPForwarder(t *testing.T, cfg sockstest.Config, resolver string) (*Forwarder, *sockstest.Server) {
	t.Helper()
	proxy, err := sockstest.NewServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { proxy.Close() })
	return newUDPForwarderVia(t, proxy.Addr(), resolver, 3*time.Second), proxy
}

func newUDPForwarderVia(t *testing.T, proxy, resolver string, timeout time.Duration) *Forwarder {
	t.Helper()
	r, err := socksclient.ParseAddr(resolver)
	if err != nil {
		t.Fatal(err)
	}
	f, err := New(Config{
		Resolvers: []socksclient.Addr{r},
		Upstreams: socksclient.NewUpstreams(&socksclient.Dialer{ProxyAddr: proxy}),
		Timeout:   timeout, Transport: "udp",
		Logger: zerolog.New(io.Discard),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func TestUDPTransportOneAssociation(t *testing.T) {
	f, proxy := newUDPForwarder(t, sockstest.Config{}, udpResolver(t))
	var wg sync.WaitGroup
	for i := range 50 {
		wg.Go(func() {
			name := fmt.Sprintf("u%d.example.", i)
			resp, err := f.Exchange(context.Background(), query(name, dns.TypeA, 99))
			if err != nil || resp.Id != 99 || resp.Question[0].Name != name || len(resp.Answer) != 1 {
				t.Errorf("%s: %v %v", name, resp, err)
			}
		})
	}
	wg.Wait()
	if n := proxy.Requests(); n != 1 {
		t.Errorf("%d SOCKS requests for 50 queries, want one shared association", n)
	}
}

// A query larger than the usual packing buffer (here with a 1000-byte EDNS
// option) still goes out whole.
func TestUDPTransportLargeQuery(t *testing.T) {
	f, _ := newUDPForwarder(t, sockstest.Config{}, udpResolver(t))
	q := query("big.example.", dns.TypeA, 7)
	q.SetEdns0(4096, false)
	opt := q.IsEdns0()
	opt.Option = append(opt.Option, &dns.EDNS0_PADDING{Padding: make([]byte, 1000)})
	resp, err := f.Exchange(context.Background(), q)
	if err != nil || resp.Id != 7 || len(resp.Answer) != 1 {
		t.Fatalf("%v %v", resp, err)
	}
}

func TestUDPTransportTruncatedRetriesOverTCP(t *testing.T) {
	f, _ := newUDPForwarder(t, sockstest.Config{}, udpResolver(t))
	resp, err := f.Exchange(context.Background(), query("big.example", dns.TypeTXT, 1))
	if err != nil {
		t.Fatal(err)
	}
	if resp.Truncated || len(resp.Answer) != 1 {
		t.Fatalf("truncated=%v answers=%d, want the whole answer over TCP", resp.Truncated, len(resp.Answer))
	}
}

// TestUDPTransportReassociates: the proxy ends the association after every
// second datagram, taking the answer to that one with it; each query is
// still answered, sent again at once on a new association (no retry by
// the client).
func TestUDPTransportReassociates(t *testing.T) {
	f, proxy := newUDPForwarder(t, sockstest.Config{UDPCloseControlAfter: 2}, udpResolver(t))
	for i := range 4 {
		if _, err := f.Exchange(context.Background(), query(fmt.Sprintf("r%d.example", i), dns.TypeA, 1)); err != nil {
			t.Fatalf("query %d: %v", i, err)
		}
	}
	if n := proxy.Requests(); n < 2 {
		t.Errorf("%d associations, want a new one after the proxy ended the first", n)
	}
}

func TestUDPTransportWithoutAssociate(t *testing.T) {
	f, _ := newUDPForwarder(t, sockstest.Config{Fault: sockstest.FaultCloseAfterRequest}, udpResolver(t))
	_, err := f.Exchange(context.Background(), query("example", dns.TypeA, 1))
	if err == nil || !strings.Contains(err.Error(), "use --dns-transport tcp") || !strings.Contains(err.Error(), "does not support udp associate") {
		t.Fatalf("err = %v", err)
	}
}

// lossyResolver answers A queries over UDP, but drops the first datagram
// of each query (by ID and name), as a lossy path would; every datagram
// it reads is reported on got.
type lossyResolver struct {
	addr string
	got  chan string
}

func newLossyResolver(t *testing.T) *lossyResolver {
	pc := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
	r := &lossyResolver{addr: pc.LocalAddr().String(), got: make(chan string, 100)}
	done := make(chan struct{})
	go func() {
		defer close(done)
		seen := map[string]bool{}
		buf := make([]byte, 65536)
		for {
			n, from, err := pc.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			q := new(dns.Msg)
			if q.Unpack(buf[:n]) != nil || len(q.Question) != 1 {
				continue
			}
			select {
			case r.got <- q.Question[0].Name:
			default:
			}
			key := fmt.Sprintf("%d/%s", q.Id, q.Question[0].Name)
			if !seen[key] {
				seen[key] = true
				continue
			}
			m := new(dns.Msg)
			m.SetReply(q)
			m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: q.Question[0].Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60}, A: net.IPv4(192, 0, 2, 2)})
			out, _ := m.Pack()
			pc.WriteToUDPAddrPort(out, from)
		}
	}()
	t.Cleanup(func() {
		pc.Close()
		<-done
	})
	return r
}

// TestUDPRetransmitsLostDatagram: a query whose first datagram is lost is
// sent again after the retransmission timeout, well within its deadline,
// and counted.
func TestUDPRetransmitsLostDatagram(t *testing.T) {
	res := newLossyResolver(t)
	f, _ := newUDPForwarder(t, sockstest.Config{}, res.addr)
	resp, err := f.Exchange(context.Background(), query("lost.example", dns.TypeA, 5))
	if err != nil || resp.Id != 5 || len(resp.Answer) != 1 {
		t.Fatalf("%v %v", resp, err)
	}
	if n := f.Stats().Retransmits.Load(); n != 1 {
		t.Errorf("Retransmits = %d, want 1", n)
	}
}

// TestUDPResendsWhenAssociationEnds: a query waiting for its answer when
// the proxy ends the association wakes at once and is sent again on a new
// one; it does not wait for a retransmission timer (here too long to
// matter) or its deadline.
func TestUDPResendsWhenAssociationEnds(t *testing.T) {
	res := newLossyResolver(t) // drops the first send: only a resend is answered
	proxy := socks(t)
	cutter := testnet.NewCutter(t, proxy.Addr()) // carries the control connections
	f := newUDPForwarderVia(t, cutter.Addr(), res.addr, time.Minute)
	f.udp.firstRTO = time.Hour

	result := make(chan error, 1)
	go func() {
		_, err := f.Exchange(context.Background(), query("cut.example", dns.TypeA, 1))
		result <- err
	}()
	<-res.got // the first send reached the resolver (and was dropped)
	if n := cutter.Cut(); n != 1 {
		t.Fatalf("cut %d control connections, want 1", n)
	}
	if err := <-result; err != nil {
		t.Fatal(err)
	}
	if n := proxy.Requests(); n != 2 {
		t.Errorf("%d associations, want a second after the cut", n)
	}
}

// TestUDPWaitHonoursContext: while one query's UDP ASSOCIATE hangs, a
// query whose context is done returns at once instead of queueing behind
// that handshake.
func TestUDPWaitHonoursContext(t *testing.T) {
	greeted := make(chan struct{}, 1)
	f, _ := newUDPForwarder(t, sockstest.Config{Fault: sockstest.FaultHangAfterGreeting, Greeted: greeted}, udpResolver(t))
	ctx1, cancel1 := context.WithCancel(context.Background())
	first := make(chan error, 1)
	go func() {
		_, err := f.udp.exchange(ctx1, 0, f.cfg.Resolvers[0], query("hang.example", dns.TypeA, 1))
		first <- err
	}()
	<-greeted // the first query is in the handshake

	ctx2, cancel2 := context.WithCancel(context.Background())
	cancel2()
	second := make(chan error, 1)
	go func() {
		_, err := f.udp.exchange(ctx2, 0, f.cfg.Resolvers[0], query("other.example", dns.TypeA, 2))
		second <- err
	}()
	select {
	case err := <-second:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("second query: %v, want its own context's end", err)
		}
	case err := <-first:
		t.Fatalf("the handshake ended (%v) before the cancelled query returned: it waited for it", err)
	}
	cancel1()
	if err := <-first; !errors.Is(err, context.Canceled) {
		t.Errorf("first query: %v", err)
	}
}

// TestUDPQueryIDsUniqueAcrossQuestions: the pending queries' IDs differ
// whatever their questions, so that an answer without a question (a bare
// REFUSED) names one query. Random 16-bit IDs for 5000 questions would
// collide about 190 times.
func TestUDPQueryIDsUniqueAcrossQuestions(t *testing.T) {
	tr := &udpTransport{pending: make(map[udpKey]udpPending), ids: newIDSource()}
	seen := make(map[uint16]bool)
	var keys []udpKey
	for i := range 5000 {
		key, err := tr.reserveLocked(dns.Question{Name: fmt.Sprintf("q%d.example.", i), Qtype: dns.TypeA, Qclass: dns.ClassINET}, udpPending{})
		if err != nil {
			t.Fatal(err)
		}
		if seen[key.id] {
			t.Fatalf("query %d got ID %d, which another pending query has", i, key.id)
		}
		seen[key.id] = true
		keys = append(keys, key)
	}
	for _, key := range keys {
		tr.release(key)
	}
	if len(tr.pending) != 0 || tr.idsUsed != [len(tr.idsUsed)]uint64{} || tr.idsHeld != 0 {
		t.Error("released queries left IDs reserved")
	}
	// Every ID held, one query's answer delivered (its entry gone, its
	// ID held until its exchange returns): the next is refused, not an
	// endless search.
	keys = keys[:0]
	for i := range 1 << 16 {
		key, err := tr.reserveLocked(dns.Question{Name: fmt.Sprintf("f%d.example.", i), Qtype: dns.TypeA, Qclass: dns.ClassINET}, udpPending{})
		if err != nil {
			t.Fatalf("query %d: %v", i, err)
		}
		keys = append(keys, key)
	}
	delete(tr.pending, keys[0])
	if _, err := tr.reserveLocked(dns.Question{Name: "one.more.", Qtype: dns.TypeA, Qclass: dns.ClassINET}, udpPending{}); err == nil {
		t.Error("a query got an ID with all 65536 held")
	}
}
