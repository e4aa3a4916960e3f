package dnsforward

import (
	"context"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
	"github.com/rs/zerolog"

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
	r, err := socksclient.ParseAddr(resolver)
	if err != nil {
		t.Fatal(err)
	}
	f, err := New(Config{
		Resolvers: []socksclient.Addr{r},
		Upstreams: socksclient.NewUpstreams(&socksclient.Dialer{ProxyAddr: proxy.Addr()}),
		Timeout:   3 * time.Second, Transport: "udp",
		Logger: zerolog.New(io.Discard),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f, proxy
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

func TestUDPTransportReassociates(t *testing.T) {
	f, _ := newUDPForwarder(t, sockstest.Config{UDPCloseControlAfter: 2}, udpResolver(t))
	for i := range 4 {
		// The first query after a drop may be lost with its association;
		// a client retries, as resolvers do.
		var err error
		for range 3 {
			ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
			_, err = f.Exchange(ctx, query(fmt.Sprintf("r%d.example", i), dns.TypeA, 1))
			cancel()
			if err == nil {
				break
			}
		}
		if err != nil {
			t.Fatalf("query %d: %v", i, err)
		}
	}
}

func TestUDPTransportWithoutAssociate(t *testing.T) {
	f, _ := newUDPForwarder(t, sockstest.Config{Fault: sockstest.FaultCloseAfterRequest}, udpResolver(t))
	_, err := f.Exchange(context.Background(), query("example", dns.TypeA, 1))
	if err == nil || !strings.Contains(err.Error(), "use --dns-transport tcp") || !strings.Contains(err.Error(), "does not support udp associate") {
		t.Fatalf("err = %v", err)
	}
}
