package dnsforward

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/miekg/dns"
	"github.com/rs/zerolog"
	"go.uber.org/goleak"

	"github.com/socksfwd/socksfwd/internal/testnet"
	"github.com/socksfwd/socksfwd/socksclient"
	"github.com/socksfwd/socksfwd/socksclient/sockstest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// resolver is a DNS-over-TCP server for tests that answers pipelined
// queries concurrently: names starting with "slow" wait 30 ms, or until
// slowHold is closed when it is set, so answers leave in another order
// than the queries came. It answers A 192.0.2.1 and a TXT of txtSize
// bytes for TXT queries.
type resolver struct {
	addr        string
	conns       atomic.Int64
	maxInFlight atomic.Int64
	outOfOrder  atomic.Bool
	queries     atomic.Int64
	closed      chan struct{} // a value each time a client connection ends
	closeAfter  int           // close each connection after this many answers (0: never)
	txtSize     int
	slowHold    chan struct{}
	slowRead    chan struct{} // a value for each "slow" query read, when slowHold is set
}

func newResolver(t testing.TB, closeAfter int) *resolver {
	r := &resolver{closeAfter: closeAfter, txtSize: 3000, closed: make(chan struct{}, 1000)}
	ln := testnet.Serve(t, r.serveConn)
	r.addr = ln.Addr().String()
	return r
}

func (r *resolver) serveConn(c net.Conn) {
	r.conns.Add(1)
	defer func() {
		select {
		case r.closed <- struct{}{}:
		default:
		}
	}()
	var (
		wmu       sync.Mutex
		wg        sync.WaitGroup
		inFlight  atomic.Int64
		seq, sent atomic.Int64
	)
	defer wg.Wait()
	for {
		var l [2]byte
		if _, err := io.ReadFull(c, l[:]); err != nil {
			return
		}
		buf := make([]byte, binary.BigEndian.Uint16(l[:]))
		if _, err := io.ReadFull(c, buf); err != nil {
			return
		}
		q := new(dns.Msg)
		if q.Unpack(buf) != nil {
			return
		}
		r.queries.Add(1)
		n := inFlight.Add(1)
		for old := r.maxInFlight.Load(); n > old && !r.maxInFlight.CompareAndSwap(old, n); old = r.maxInFlight.Load() {
		}
		mySeq := seq.Add(1)
		slow := strings.HasPrefix(q.Question[0].Name, "slow")
		if slow && r.slowHold != nil {
			r.slowRead <- struct{}{}
		}
		wg.Go(func() {
			switch {
			case slow && r.slowHold != nil:
				<-r.slowHold
			case slow:
				time.Sleep(30 * time.Millisecond) // the resolver's work, to reorder answers
			}
			m := new(dns.Msg)
			m.SetReply(q)
			switch {
			case strings.HasPrefix(q.Question[0].Name, "nx"):
				m.Rcode = dns.RcodeNameError
				m.Ns = append(m.Ns, &dns.SOA{Hdr: dns.RR_Header{Name: "example.", Rrtype: dns.TypeSOA, Class: dns.ClassINET, Ttl: 300},
					Ns: "ns.example.", Mbox: "admin.example.", Serial: 1, Refresh: 3600, Retry: 600, Expire: 86400, Minttl: 30})
			case strings.HasPrefix(q.Question[0].Name, "servfail"):
				m.Rcode = dns.RcodeServerFailure
			case q.Question[0].Qtype == dns.TypeTXT:
				var parts []string
				for rest := r.txtSize; rest > 0; rest -= 200 {
					parts = append(parts, strings.Repeat("t", min(rest, 200)))
				}
				m.Answer = append(m.Answer, &dns.TXT{Hdr: dns.RR_Header{Name: q.Question[0].Name, Rrtype: dns.TypeTXT, Class: dns.ClassINET, Ttl: 60}, Txt: parts})
			default:
				m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: q.Question[0].Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60}, A: net.IPv4(192, 0, 2, 1)})
			}
			out, _ := m.Pack()
			frame := binary.BigEndian.AppendUint16(nil, uint16(len(out)))
			wmu.Lock()
			defer wmu.Unlock()
			inFlight.Add(-1) // before the answer leaves: the client may send the next at once
			if s := sent.Add(1); s != mySeq {
				r.outOfOrder.Store(true)
			}
			c.Write(append(frame, out...))
			if r.closeAfter > 0 && sent.Load() >= int64(r.closeAfter) {
				c.Close()
			}
		})
	}
}

func newForwarder(t testing.TB, proxy string, timeout time.Duration, logs io.Writer, resolvers ...string) *Forwarder {
	return newCachingForwarder(t, proxy, timeout, 0, logs, resolvers...)
}

func newCachingForwarder(t testing.TB, proxy string, timeout time.Duration, cacheSize int, logs io.Writer, resolvers ...string) *Forwarder {
	return newForwarderConfig(t, proxy, Config{Timeout: timeout, CacheSize: cacheSize}, logs, resolvers...)
}

// newCachingPair returns a resolver and a forwarder to it with a cache of
// 100 answers, through a fresh SOCKS5 server.
func newCachingPair(t testing.TB) (*resolver, *Forwarder) {
	res := newResolver(t, 0)
	return res, newCachingForwarder(t, socks(t).Addr(), 5*time.Second, 100, nil, res.addr)
}

func newForwarderConfig(t testing.TB, proxy string, cfg Config, logs io.Writer, resolvers ...string) *Forwarder {
	t.Helper()
	var addrs []socksclient.Addr
	for _, r := range resolvers {
		a, err := socksclient.ParseAddr(r)
		if err != nil {
			t.Fatal(err)
		}
		addrs = append(addrs, a)
	}
	if logs == nil {
		logs = io.Discard
	}
	cfg.Resolvers = addrs
	cfg.Upstreams = socksclient.NewUpstreams(&socksclient.Dialer{ProxyAddr: proxy})
	if cfg.PoolSize == 0 {
		cfg.PoolSize = 2
	}
	cfg.Logger = zerolog.New(logs)
	f, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func socks(t testing.TB) *sockstest.Server {
	s, err := sockstest.NewServer(sockstest.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func query(name string, qtype uint16, id uint16) *dns.Msg {
	q := new(dns.Msg)
	q.SetQuestion(dns.Fqdn(name), qtype)
	q.Id = id
	return q
}

// TestPipelining: 100 concurrent queries, all with the same client ID,
// cost at most pool-size SOCKS handshakes; connections carry several
// queries at once; answers come back out of order and each reaches its own
// query with its own ID. The resolver holds the slow half's answers until
// the others are answered, the first slow query read before the rest are
// asked.
func TestPipelining(t *testing.T) {
	proxy := socks(t)
	res := newResolver(t, 0)
	res.slowHold, res.slowRead = make(chan struct{}), make(chan struct{}, 100)
	f := newForwarder(t, proxy.Addr(), 5*time.Second, nil, res.addr)
	var slow, fast sync.WaitGroup
	errs := make(chan error, 100)
	for i := range 100 {
		name := fmt.Sprintf("q%d.example.", i)
		asking := &fast
		if i%2 == 0 {
			name, asking = "slow"+name, &slow
		}
		asking.Go(func() {
			resp, err := f.Exchange(context.Background(), query(name, dns.TypeA, 42))
			if err != nil {
				errs <- err
				return
			}
			if resp.Id != 42 || resp.Question[0].Name != name || len(resp.Answer) != 1 {
				errs <- fmt.Errorf("query %s got %v", name, resp)
			}
		})
		if i == 0 {
			<-res.slowRead
		}
	}
	fast.Wait()
	close(res.slowHold)
	slow.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if n := proxy.Handshakes(); n > 2 {
		t.Errorf("%d SOCKS handshakes for 100 queries, want at most the pool size 2", n)
	}
	if n := res.maxInFlight.Load(); n < 2 {
		t.Errorf("at most %d queries in flight on a connection, want pipelining", n)
	}
	if !res.outOfOrder.Load() {
		t.Error("answers never came back out of order")
	}
}

func TestRedialDeadConnection(t *testing.T) {
	res := newResolver(t, 1) // closes every connection after one answer
	f := newForwarder(t, socks(t).Addr(), 5*time.Second, nil, res.addr)
	for i := range 5 {
		if _, err := f.Exchange(context.Background(), query(fmt.Sprintf("r%d.example", i), dns.TypeA, 1)); err != nil {
			t.Fatalf("query %d: %v", i, err)
		}
	}
}

func TestFailoverFromBlackhole(t *testing.T) {
	blackhole := testnet.Serve(t, func(c net.Conn) { io.Copy(io.Discard, c) }) // accepts, never answers
	good := newResolver(t, 0)
	f := newForwarder(t, socks(t).Addr(), 2*time.Second, nil, blackhole.Addr().String(), good.addr)
	start := time.Now()
	if _, err := f.Exchange(context.Background(), query("example", dns.TypeA, 7)); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("took %v, beyond the whole-query timeout", d)
	}
	if f.Stats().Failovers.Load() == 0 {
		t.Error("failover not counted")
	}
}

// startServer serves f on UDP and TCP at one loopback address.
func startServer(t *testing.T, f *Forwarder) string {
	t.Helper()
	_, addr := startServerFor(t, f)
	return addr
}

func exchange(t *testing.T, net, addr string, q *dns.Msg) *dns.Msg {
	t.Helper()
	// The sockets are bound before Serve starts: a query sent before the
	// server reads waits in the socket's queue (or the listen backlog).
	c := &dns.Client{Net: net, Timeout: 10 * time.Second}
	resp, _, err := c.Exchange(q, addr)
	if err != nil {
		t.Fatalf("%s exchange: %v", net, err)
	}
	return resp
}

func TestServerServFailWithReason(t *testing.T) {
	var logs bytes.Buffer
	var mu sync.Mutex
	w := writerFunc(func(p []byte) (int, error) { mu.Lock(); defer mu.Unlock(); return logs.Write(p) })
	f := newForwarder(t, socks(t).Addr(), time.Second, w, testnet.ClosedPort(t))
	addr := startServer(t, f)
	resp := exchange(t, "udp", addr, query("example", dns.TypeA, 9))
	if resp.Rcode != dns.RcodeServerFailure {
		t.Fatalf("rcode %s, want SERVFAIL", dns.RcodeToString[resp.Rcode])
	}
	mu.Lock()
	defer mu.Unlock()
	if !strings.Contains(logs.String(), "every resolver failed") || !strings.Contains(logs.String(), "connection refused") {
		t.Fatalf("log: %s", logs.String())
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

// TestServerTruncation: a 3000-byte TXT answer gets TC=1 over UDP without
// EDNS, and comes whole over TCP.
func TestServerTruncation(t *testing.T) {
	res := newResolver(t, 0)
	f := newForwarder(t, socks(t).Addr(), 5*time.Second, nil, res.addr)
	addr := startServer(t, f)
	udp := exchange(t, "udp", addr, query("big.example", dns.TypeTXT, 3))
	if !udp.Truncated {
		t.Fatalf("UDP answer not truncated: %d answers", len(udp.Answer))
	}
	tcp := exchange(t, "tcp", addr, query("big.example", dns.TypeTXT, 4))
	if tcp.Truncated || len(tcp.Answer) != 1 || tcp.Len() < 3000 {
		t.Fatalf("TCP answer: truncated=%v len=%d", tcp.Truncated, tcp.Len())
	}
}

// TestServerLargeAnswerOverTCP: answers up to 64 KiB pass over TCP.
func TestServerLargeAnswerOverTCP(t *testing.T) {
	res := newResolver(t, 0)
	res.txtSize = 60000
	f := newForwarder(t, socks(t).Addr(), 5*time.Second, nil, res.addr)
	addr := startServer(t, f)
	resp := exchange(t, "tcp", addr, query("huge.example", dns.TypeTXT, 8))
	if resp.Truncated || resp.Len() < 60000 {
		t.Fatalf("truncated=%v len=%d, want a whole 60 KB answer", resp.Truncated, resp.Len())
	}
}

// TestIdleConnectionClosed: a pooled connection with nothing in flight is
// closed after the idle timeout, and the next query dials again.
func TestIdleConnectionClosed(t *testing.T) {
	res := newResolver(t, 0)
	f := newForwarderConfig(t, socks(t).Addr(), Config{Timeout: 5 * time.Second, IdleTimeout: 100 * time.Millisecond}, nil, res.addr)
	if _, err := f.Exchange(context.Background(), query("a.example", dns.TypeA, 1)); err != nil {
		t.Fatal(err)
	}
	select {
	case <-res.closed:
	case <-time.After(5 * time.Second):
		t.Fatal("idle connection not closed")
	}
	if _, err := f.Exchange(context.Background(), query("b.example", dns.TypeA, 2)); err != nil {
		t.Fatal(err)
	}
	if n := res.conns.Load(); n != 2 {
		t.Fatalf("%d connections, want a new one after the idle close", n)
	}
}

// TestCloseCancelsWaitingQueries: Close ends at once every query waiting
// on a dial to a resolver (tcp transport: ServeDNS, the wire path and
// Exchange) or on a UDP ASSOCIATE (udp transport), with the forwarder's
// closing as their cause. Before, Close closed the connections but left a
// query in a dial or a handshake to its deadline (the whole --dns-timeout),
// and Server.Close waited for it.
func TestCloseCancelsWaitingQueries(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f, _ := newScriptForwarder(t, 10, nil, nil)
		f.pools[0].dial = func(ctx context.Context) (net.Conn, error) {
			<-ctx.Done() // a proxy that never answers the handshake
			return nil, ctx.Err()
		}
		served := make(chan *dns.Msg, 2)
		go func() { served <- serve(t, f, query("message.example", dns.TypeA, 1)) }()
		go func() {
			w := udpClientWriter()
			f.serveWire(w, pack(t, query("wire.example", dns.TypeA, 2)))
			m := new(dns.Msg)
			if err := m.Unpack(w.buf[:w.n]); err != nil {
				t.Errorf("wire path answer: %v", err)
			}
			served <- m
		}()
		exchanged := make(chan error, 1)
		go func() {
			_, err := f.Exchange(context.Background(), query("exchange.example", dns.TypeA, 3))
			exchanged <- err
		}()
		synctest.Wait() // every query is dialing
		f.Close()
		synctest.Wait()
		if len(served) != 2 || len(exchanged) != 1 {
			// Drained below once their deadline passes on the bubble's clock.
			t.Errorf("%d of 3 queries ended at Close; the others wait on their dial", len(served)+len(exchanged))
		}
		for range 2 {
			if m := <-served; m.Rcode != dns.RcodeServerFailure {
				t.Errorf("answered %s, want SERVFAIL", dns.RcodeToString[m.Rcode])
			}
		}
		if err := <-exchanged; !errors.Is(err, errForwarderClosed) {
			t.Errorf("Exchange: %v, want the forwarder's closing", err)
		}
	})
	synctest.Test(t, func(t *testing.T) {
		f := newFakeUDPForwarder(t, &fakeRelays{}, 1)
		f.udp.associate = func(ctx context.Context) (relayConn, error) {
			<-ctx.Done()
			return nil, ctx.Err()
		}
		exchanged := make(chan error, 1)
		go func() {
			_, err := f.Exchange(context.Background(), query("a.example", dns.TypeA, 1))
			exchanged <- err
		}()
		synctest.Wait() // associating
		f.Close()
		synctest.Wait()
		if len(exchanged) != 1 {
			t.Error("a query still waits on its UDP ASSOCIATE after Close")
		}
		if err := <-exchanged; !errors.Is(err, errForwarderClosed) {
			t.Errorf("Exchange: %v, want the forwarder's closing", err)
		}
	})
}
