package dnsforward

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/miekg/dns"
	"github.com/rs/zerolog"

	"github.com/socksfwd/socksfwd/internal/testnet"
	"github.com/socksfwd/socksfwd/socksclient"
)

// readTCPMessage reads one length-prefixed message and unpacks it; a
// message that does not parse is reported as (nil, nil).
func readTCPMessage(r io.Reader, lenBuf *[2]byte) (*dns.Msg, error) {
	wire, err := readTCPFrame(r, lenBuf)
	if err != nil {
		return nil, err
	}
	m := new(dns.Msg)
	if m.Unpack(wire) != nil {
		return nil, nil
	}
	return m, nil
}

func netipAddrPort(t testing.TB, s string) netip.AddrPort {
	t.Helper()
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		t.Fatal(err)
	}
	return ap
}

// pipeResolver answers DNS over TCP on in-memory connections until the
// client closes them; with hold set, each answer waits until it closes;
// it reads, and leaves unanswered, the queries silent picks (all of them
// for a resolver that hangs).
type pipeResolver struct {
	wg      sync.WaitGroup
	queries atomic.Int64
	hold    chan struct{}
	silent  func(q *dns.Msg) bool
}

// neverAnswer is a pipeResolver's silent for one that hangs.
func neverAnswer(*dns.Msg) bool { return true }

func (r *pipeResolver) dial(ctx context.Context) (net.Conn, error) {
	client, server := net.Pipe()
	r.serve(server)
	return client, nil
}

// serve answers the queries on server (A 192.0.2.7) until it fails.
func (r *pipeResolver) serve(server net.Conn) {
	r.wg.Go(func() {
		defer server.Close()
		var lenBuf [2]byte
		for {
			q, err := readTCPMessage(server, &lenBuf)
			if err != nil || q == nil {
				return
			}
			r.queries.Add(1)
			if r.silent != nil && r.silent(q) {
				continue
			}
			if r.hold != nil {
				<-r.hold
			}
			if writeAnswer(server, q) != nil {
				return
			}
		}
	})
}

// writeAnswer writes an answer to q (A 192.0.2.7) as one TCP frame.
func writeAnswer(c net.Conn, q *dns.Msg) error {
	m := new(dns.Msg)
	m.SetReply(q)
	m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: q.Question[0].Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60}, A: net.IPv4(192, 0, 2, 7)})
	out, err := m.Pack()
	if err != nil {
		return err
	}
	_, err = c.Write(append(binary.BigEndian.AppendUint16(nil, uint16(len(out))), out...))
	return err
}

// newPipeForwarder is a tcp-transport forwarder whose resolvers (never
// dialed through a proxy) answer on in-memory connections.
func newPipeForwarder(t *testing.T, resolvers int) *Forwarder {
	t.Helper()
	f, err := New(Config{
		Resolvers: documentationResolvers(t, resolvers),
		Upstreams: socksclient.NewUpstreams(&socksclient.Dialer{ProxyAddr: "192.0.2.1:1080"}),
		Timeout:   10 * time.Second,
		Logger:    zerolog.New(io.Discard),
	})
	if err != nil {
		t.Fatal(err)
	}
	res := &pipeResolver{}
	for _, p := range f.pools {
		p.dial = res.dial
	}
	t.Cleanup(func() {
		f.Close()
		res.wg.Wait()
	})
	return f
}

// backoffPool is a pool of at most two connections, one query each,
// whose dials the test scripts: the first connection goes to a resolver
// the test holds (held), the next two dials fail, putting the pool in
// redial backoff, and later ones reach an answering resolver.
type backoffPool struct {
	*tcpPool
	held   chan net.Conn // the server side of the first connection
	res    pipeResolver
	mu     sync.Mutex
	dials  int
	lastAt time.Time // when the last dial started
}

func newBackoffPool(stats *Stats) *backoffPool {
	bp := &backoffPool{held: make(chan net.Conn, 1)}
	bp.tcpPool = newTCPPool(func(ctx context.Context) (net.Conn, error) {
		bp.mu.Lock()
		bp.dials++
		n := bp.dials
		bp.lastAt = time.Now()
		bp.mu.Unlock()
		switch n {
		case 1:
			client, server := net.Pipe()
			bp.held <- server
			return client, nil
		case 2, 3:
			return nil, errors.New("connect: connection refused")
		}
		return bp.res.dial(ctx)
	}, 2, 1, time.Minute, stats)
	return bp
}

func (bp *backoffPool) close() {
	bp.tcpPool.close()
	bp.res.wg.Wait()
}

// inBackoff is the state intoBackoff leaves: query A in flight on the
// held connection (server, as the resolver read it: q) and its result to
// come, and when the redial backoff ends.
type inBackoff struct {
	server    net.Conn
	q         *dns.Msg
	result    chan error
	notBefore time.Time
}

// intoBackoff puts query A in flight on the held connection, then fails
// two dials (queries that found A's connection full), which sets the
// redial backoff.
func (bp *backoffPool) intoBackoff(t *testing.T, ctx context.Context) inBackoff {
	t.Helper()
	result := make(chan error, 1)
	go func() {
		resp, err := bp.exchange(ctx, query("a.example", dns.TypeA, 1), false)
		if err == nil && len(resp.Answer) != 1 {
			err = errors.New("no answer record")
		}
		result <- err
	}()
	server := <-bp.held
	var lenBuf [2]byte
	q, err := readTCPMessage(server, &lenBuf)
	if err != nil || q == nil {
		t.Fatalf("held resolver: %v %v", q, err)
	}
	for _, name := range []string{"x.example", "y.example"} {
		if _, err := bp.exchange(ctx, query(name, dns.TypeA, 2), false); err == nil {
			t.Fatalf("%s answered, want its dial to fail", name)
		}
	}
	bp.mu.Lock()
	defer bp.mu.Unlock()
	if bp.notBefore.IsZero() {
		t.Fatal("two failed dials did not start a backoff")
	}
	return inBackoff{server: server, q: q, result: result, notBefore: bp.notBefore}
}

// TestTCPResendWaitsOutBackoff: a query whose connection the resolver
// closes while the pool is in redial backoff waits for the backoff to end
// and is sent again on a new connection, within its deadline; before, it
// failed at once (SERVFAIL with seconds of its deadline left).
func TestTCPResendWaitsOutBackoff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var stats Stats
		bp := newBackoffPool(&stats)
		defer bp.close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		st := bp.intoBackoff(t, ctx)

		st.server.Close() // the resolver closes A's connection unanswered
		if err := <-st.result; err != nil {
			t.Fatalf("query A: %v", err)
		}
		bp.mu.Lock()
		dials, lastAt := bp.dials, bp.lastAt
		bp.mu.Unlock()
		if dials != 4 {
			t.Errorf("%d dials, want one redial for A", dials)
		}
		if lastAt.Before(st.notBefore) {
			t.Errorf("redialed %v before the backoff ended", st.notBefore.Sub(lastAt))
		}
		if n := stats.Resent.Load(); n != 1 {
			t.Errorf("Resent = %d, want 1", n)
		}
	})
}

// TestTCPBackoffFailsFast: during redial backoff a query fails at once,
// with no redial, when its deadline would pass before the backoff ends,
// and when it is a first send with another resolver left to try (failing
// over is quicker than waiting for a failing resolver).
func TestTCPBackoffFailsFast(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var stats Stats
		bp := newBackoffPool(&stats)
		defer bp.close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		st := bp.intoBackoff(t, ctx)
		defer func() {
			st.server.Close()
			<-st.result
		}()

		start := time.Now()
		short, cancelShort := context.WithDeadline(context.Background(), st.notBefore.Add(-time.Millisecond))
		defer cancelShort()
		_, err := bp.exchange(short, query("short.example", dns.TypeA, 3), false)
		if _, ok := errors.AsType[*errBackoff](err); !ok {
			t.Errorf("deadline before the backoff ends: %v, want the backoff error", err)
		}
		_, err = bp.exchange(ctx, query("failover.example", dns.TypeA, 4), true)
		if _, ok := errors.AsType[*errBackoff](err); !ok {
			t.Errorf("first send with a resolver left: %v, want the backoff error", err)
		}
		if d := time.Since(start); d != 0 {
			t.Errorf("failing fast took %v of the clock", d)
		}
		bp.mu.Lock()
		defer bp.mu.Unlock()
		if bp.dials != 3 {
			t.Errorf("%d dials, want no redial during the backoff", bp.dials)
		}
	})
}

// TestTCPBackoffWaiterWakesOnAnswer: a query waiting out the backoff
// goes on as soon as a connection answers (the resolver works again), not
// at the end of the backoff.
func TestTCPBackoffWaiterWakesOnAnswer(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var stats Stats
		bp := newBackoffPool(&stats)
		defer bp.close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		st := bp.intoBackoff(t, ctx)

		resultB := make(chan error, 1)
		go func() {
			_, err := bp.exchange(ctx, query("b.example", dns.TypeA, 5), false)
			resultB <- err
		}()
		synctest.Wait() // B waits out the backoff: A's connection is full
		select {
		case err := <-resultB:
			t.Fatalf("query B did not wait: %v", err)
		default:
		}

		// The held resolver answers A, and then whatever else comes.
		if err := writeAnswer(st.server, st.q); err != nil {
			t.Fatal(err)
		}
		if err := <-st.result; err != nil {
			t.Fatalf("query A: %v", err)
		}
		bp.res.serve(st.server)
		if err := <-resultB; err != nil {
			t.Fatalf("query B: %v", err)
		}
		if !time.Now().Before(st.notBefore) {
			t.Errorf("query B answered at the end of the backoff, want once the resolver answered")
		}
	})
}

// TestMalformedAnswerFailsAttempt: an answer that carries the query's ID
// but does not parse fails that attempt at once (the next resolver, or
// SERVFAIL), rather than leaving the query to time out.
func TestMalformedAnswerFailsAttempt(t *testing.T) {
	ln := testnet.Serve(t, func(c net.Conn) {
		var lenBuf [2]byte
		for {
			q, err := readTCPFrame(c, &lenBuf)
			if err != nil || len(q) < headerLen {
				return
			}
			// The query's ID, QR set, a question whose name runs past the end.
			bad := []byte{q[0], q[1], 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0, 5, 'a'}
			c.Write(append(binary.BigEndian.AppendUint16(nil, uint16(len(bad))), bad...))
		}
	})
	f := newForwarder(t, socks(t).Addr(), time.Minute, nil, ln.Addr().String())
	_, err := f.Exchange(context.Background(), query("a.example", dns.TypeA, 1))
	if !errors.Is(err, errMalformedAnswer) {
		t.Fatalf("Exchange: %v, want a malformed answer", err)
	}
	if n := f.Stats().MalformedAnswers.Load(); n != 1 {
		t.Errorf("MalformedAnswers = %d, want 1", n)
	}
}

// TestDroppedAnswersCounted: an answer too short to match (tcp) or that
// does not parse (udp transport) is dropped and counted, and the query
// gets the answer behind it. Before, neither was counted.
func TestDroppedAnswersCounted(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f, _ := newScriptForwarder(t, 0, func(q *dns.Msg) [][]byte {
			return [][]byte{{0xde, 0xad}, packed(echoReply(q))}
		}, nil)
		if _, err := f.Exchange(context.Background(), query("a.example", dns.TypeA, 1)); err != nil {
			t.Fatal(err)
		}
		if n := f.Stats().MalformedAnswers.Load(); n != 1 {
			t.Errorf("tcp: MalformedAnswers = %d, want 1", n)
		}
	})
	synctest.Test(t, func(t *testing.T) {
		f := newFakeUDPForwarder(t, &fakeRelays{setup: func(int) *fakeRelay {
			r := newFakeRelay()
			r.garbage = true
			return r
		}}, 1)
		defer f.Close()
		if _, err := f.Exchange(context.Background(), query("a.example", dns.TypeA, 1)); err != nil {
			t.Fatal(err)
		}
		if n := f.Stats().MalformedAnswers.Load(); n != 1 {
			t.Errorf("udp: MalformedAnswers = %d, want 1", n)
		}
	})
}

// TestWireAndMessagePathsShareMisses: a query in wire form (the UDP fast
// path) and an unpacked one (ServeDNS) for the same question while it is
// being asked make one upstream query, whichever came first, and each
// gets the answer with its own ID and name as asked.
func TestWireAndMessagePathsShareMisses(t *testing.T) {
	for _, wireFirst := range []bool{true, false} {
		synctest.Test(t, func(t *testing.T) {
			f, err := New(Config{
				Resolvers: documentationResolvers(t, 1),
				Upstreams: socksclient.NewUpstreams(&socksclient.Dialer{ProxyAddr: "192.0.2.1:1080"}),
				CacheSize: 10,
				Logger:    zerolog.New(io.Discard),
			})
			if err != nil {
				t.Fatal(err)
			}
			res := &pipeResolver{hold: make(chan struct{})}
			f.pools[0].dial = res.dial
			defer res.wg.Wait()
			defer f.Close()

			var wireAnswer []byte
			var msgAnswer *dns.Msg
			var wireErr, msgErr error
			var asking sync.WaitGroup
			askWire := func() {
				asking.Go(func() {
					var k questionKey
					q := pack(t, query("Shared.Example", dns.TypeA, 0x1111))
					parseQuery(q, &k)
					wireAnswer, _, wireErr = f.resolveWire(q, &k)
				})
			}
			askMsg := func() {
				asking.Go(func() {
					msgAnswer, msgErr = f.Resolve(context.Background(), query("shared.example", dns.TypeA, 0x2222))
				})
			}
			if wireFirst {
				askWire()
				synctest.Wait() // the resolver holds the first query
				askMsg()
			} else {
				askMsg()
				synctest.Wait()
				askWire()
			}
			synctest.Wait() // the second waits for the first's answer
			close(res.hold)
			asking.Wait()

			if wireErr != nil || msgErr != nil {
				t.Fatalf("wire: %v, message: %v", wireErr, msgErr)
			}
			if n := res.queries.Load(); n != 1 {
				t.Errorf("wire first %v: %d upstream queries, want 1", wireFirst, n)
			}
			m := new(dns.Msg)
			if err := m.Unpack(wireAnswer); err != nil || m.Id != 0x1111 || m.Question[0].Name != "Shared.Example." || len(m.Answer) != 1 {
				t.Errorf("wire first %v: wire answer %v %v", wireFirst, m, err)
			}
			if msgAnswer.Id != 0x2222 || msgAnswer.Question[0].Name != "shared.example." || len(msgAnswer.Answer) != 1 {
				t.Errorf("wire first %v: message answer %v", wireFirst, msgAnswer)
			}
		})
	}
}

// TestTCPStalledConnectionRedialed: a pooled connection on which a query
// times out with nothing at all read since it was sent (the resolver hangs
// on it, or the proxy's side of it is gone without a FIN) is failed, and
// the next query dials again. Before, the connection kept a free slot and
// every later query took it and timed out, until it stayed idle for the
// idle timeout.
func TestTCPStalledConnectionRedialed(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f, res := newScriptForwarder(t, 0, nil, nil)
		var dials atomic.Int64
		stalled := &pipeResolver{silent: neverAnswer}
		t.Cleanup(func() {
			f.Close() // ends the stalled connection if it is still pooled
			stalled.wg.Wait()
		})
		f.pools[0].dial = func(ctx context.Context) (net.Conn, error) {
			if dials.Add(1) > 1 {
				return res.dial(ctx)
			}
			return stalled.dial(ctx)
		}
		for i, wantAnswer := range []bool{false, true, true} {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			_, err := f.Exchange(ctx, query("a.example", dns.TypeA, uint16(i)))
			cancel()
			if gotAnswer := err == nil; gotAnswer != wantAnswer {
				t.Errorf("query %d: %v, want answered %v", i, err, wantAnswer)
			}
		}
		if n := dials.Load(); n != 2 {
			t.Errorf("%d dials, want the stalled connection replaced once", n)
		}
	})
	// A query the resolver drops, on a connection that answers others
	// meanwhile: the connection works, and stays.
	synctest.Test(t, func(t *testing.T) {
		f, res := newScriptForwarder(t, 0, func(q *dns.Msg) [][]byte {
			if q.Question[0].Name == "dropped.example." {
				return nil
			}
			return [][]byte{packed(echoReply(q))}
		}, nil)
		var dials atomic.Int64
		f.pools[0].size = 1 // every query on the one connection
		f.pools[0].dial = func(ctx context.Context) (net.Conn, error) {
			dials.Add(1)
			return res.dial(ctx)
		}
		dropped := make(chan error, 1)
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			_, err := f.Exchange(ctx, query("dropped.example", dns.TypeA, 1))
			dropped <- err
		}()
		synctest.Wait() // sent, and waiting
		for i := range 2 {
			if _, err := f.Exchange(context.Background(), query("a.example", dns.TypeA, uint16(2+i))); err != nil {
				t.Fatalf("query %d: %v", i, err)
			}
			if i == 0 && <-dropped == nil {
				t.Fatal("the dropped query was answered")
			}
		}
		if n := dials.Load(); n != 1 {
			t.Errorf("%d dials, want the answering connection kept after a dropped query", n)
		}
	})
}
