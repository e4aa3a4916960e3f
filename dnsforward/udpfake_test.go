package dnsforward

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"github.com/miekg/dns"
	"github.com/rs/zerolog"

	"github.com/socksfwd/socksfwd/socksclient"
)

// errFakeClosed is what a fake association reports after its owner's
// Close, as a socksclient.UDPConn does.
var errFakeClosed = fmt.Errorf("fake relay: closed: %w", net.ErrClosed)

// refused is the read or write error of a connected UDP socket after an
// ICMP port unreachable.
var refused = &net.OpError{Op: "read", Net: "udp", Err: os.NewSyscallError("read", syscall.ECONNREFUSED)}

// fakeRelay is an in-memory UDP association to a resolver: each query
// written to it is answered (A 192.0.2.9) through its read side. Tests
// may hold a write (hold), put read errors before an answer (errorsFirst),
// or make every read fail from some point on (startFailing).
type fakeRelay struct {
	reads     chan fakeRead
	failing   chan struct{} // closed: every read fails with refused
	closed    chan struct{}
	closeOnce sync.Once
	failOnce  sync.Once
	readCount atomic.Int64
	// hold, if set, is called at the start of each write (which it may
	// block).
	hold func(q *dns.Msg)
	// errorsFirst read errors come before each answer.
	errorsFirst int
	// writeErrors: the first writes fail with ECONNREFUSED (the datagram
	// does not leave), as after an ICMP error for an earlier one.
	writeErrors atomic.Int64
	// forge: a forged answer from another address comes before each
	// real one.
	forge bool
	// garbage: a datagram that is no DNS message comes before each answer.
	garbage bool
	// drop, if set, says which queries the relay silently drops.
	drop func(q *dns.Msg) bool
	// reply, if set, makes the answer to each query in place of A
	// 192.0.2.9.
	reply func(q *dns.Msg) *dns.Msg
	ids   chan uint16 // the ID of each query answered
}

type fakeRead struct {
	msg  []byte
	from socksclient.Addr // the sender, as the relay names it
	err  error
}

func newFakeRelay() *fakeRelay {
	return &fakeRelay{reads: make(chan fakeRead, 64), failing: make(chan struct{}), closed: make(chan struct{}), ids: make(chan uint16, 64)}
}

func (r *fakeRelay) WritePacket(buf []byte, off int, dst socksclient.Addr) error {
	q := new(dns.Msg)
	if err := q.Unpack(buf[off:]); err != nil {
		return err
	}
	if r.hold != nil {
		r.hold(q)
	}
	select {
	case <-r.closed:
		return errFakeClosed
	default:
	}
	if r.writeErrors.Add(-1) >= 0 {
		return &net.OpError{Op: "write", Net: "udp", Err: os.NewSyscallError("write", syscall.ECONNREFUSED)}
	}
	if r.drop != nil && r.drop(q) {
		return nil
	}
	m := new(dns.Msg)
	m.SetReply(q)
	m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: q.Question[0].Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60}, A: net.IPv4(192, 0, 2, 9)})
	if r.reply != nil {
		m = r.reply(q)
	}
	out, err := m.Pack()
	if err != nil {
		return err
	}
	for range r.errorsFirst {
		r.reads <- fakeRead{err: refused}
	}
	if r.garbage {
		r.reads <- fakeRead{msg: []byte{0xde, 0xad}, from: dst}
	}
	if r.forge {
		// An off-path sender that guessed the ID: another address, same
		// ID and question, another address record.
		forged := m.Copy()
		forged.Answer[0].(*dns.A).A = net.IPv4(203, 0, 113, 66)
		fout, err := forged.Pack()
		if err != nil {
			return err
		}
		r.reads <- fakeRead{msg: fout, from: socksclient.Addr{IP: netip.MustParseAddr("203.0.113.66"), Port: dst.Port}}
	}
	r.reads <- fakeRead{msg: out, from: dst}
	select {
	case r.ids <- q.Id:
	default: // a test that does not read them
	}
	return nil
}

func (r *fakeRelay) ReadPacket(buf []byte) (int, int, socksclient.Addr, error) {
	r.readCount.Add(1)
	select {
	case <-r.closed:
		return 0, 0, socksclient.Addr{}, errFakeClosed
	default:
	}
	select {
	case d := <-r.reads:
		if d.err != nil {
			return 0, 0, socksclient.Addr{}, d.err
		}
		return 0, copy(buf, d.msg), d.from, nil
	case <-r.failing:
		return 0, 0, socksclient.Addr{}, refused
	case <-r.closed:
		return 0, 0, socksclient.Addr{}, errFakeClosed
	}
}

// Alive: the proxy never ends a fake association; only its owner does.
func (r *fakeRelay) Alive() bool {
	select {
	case <-r.closed:
		return false
	default:
		return true
	}
}

func (r *fakeRelay) Close() error {
	r.closeOnce.Do(func() { close(r.closed) })
	return nil
}

func (r *fakeRelay) startFailing() { r.failOnce.Do(func() { close(r.failing) }) }

// fakeRelays makes the associations of a udp transport: the i-th
// association is made by setup(i) (newFakeRelay when it is nil).
type fakeRelays struct {
	mu    sync.Mutex
	made  []*fakeRelay
	setup func(i int) *fakeRelay
}

func (fr *fakeRelays) associate(ctx context.Context) (relayConn, error) {
	fr.mu.Lock()
	defer fr.mu.Unlock()
	r := newFakeRelay()
	if fr.setup != nil {
		r = fr.setup(len(fr.made))
	}
	fr.made = append(fr.made, r)
	return r, nil
}

func (fr *fakeRelays) count() int {
	fr.mu.Lock()
	defer fr.mu.Unlock()
	return len(fr.made)
}

// documentationResolvers is n resolver addresses from the documentation
// range, for forwarders whose connections are fakes that never dial.
func documentationResolvers(t testing.TB, n int) []socksclient.Addr {
	t.Helper()
	var addrs []socksclient.Addr
	for i := range n {
		addrs = append(addrs, socksclient.AddrFromAddrPort(netipAddrPort(t, fmt.Sprintf("192.0.2.%d:53", 53+i))))
	}
	return addrs
}

// newFakeUDPForwarder is a udp-transport forwarder whose associations
// come from relays; resolvers are documentation addresses never dialed.
func newFakeUDPForwarder(t *testing.T, relays *fakeRelays, resolvers int) *Forwarder {
	t.Helper()
	f, err := New(Config{
		Resolvers: documentationResolvers(t, resolvers),
		Upstreams: socksclient.NewUpstreams(&socksclient.Dialer{ProxyAddr: "192.0.2.1:1080"}),
		Timeout:   10 * time.Second,
		Transport: "udp",
		Logger:    zerolog.New(io.Discard),
	})
	if err != nil {
		t.Fatal(err)
	}
	f.udp.associate = relays.associate
	f.udp.firstRTO = time.Hour // no retransmission on a timer: every resend here has another cause
	return f
}

// currentAssociation is the transport's newest association.
func currentAssociation(tr *udpTransport) *association {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return tr.cur
}

// TestUDPQuerySentAgainOnReplacedAssociation: a query that took the
// association just before another query replaced it (its reader had
// stopped) finds it closed when it writes: net.ErrClosed, though the
// forwarder is not closing. The query is sent again on the new association
// and answered; before, Exchange took that net.ErrClosed for a shutdown,
// tried no other resolver and the client got SERVFAIL.
func TestUDPQuerySentAgainOnReplacedAssociation(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		held, release := make(chan struct{}), make(chan struct{})
		relays := &fakeRelays{setup: func(i int) *fakeRelay {
			r := newFakeRelay()
			if i == 0 {
				var once sync.Once
				r.hold = func(*dns.Msg) {
					once.Do(func() {
						close(held)
						<-release
					})
				}
			}
			return r
		}}
		f := newFakeUDPForwarder(t, relays, 2)
		defer f.Close()

		resultA := make(chan error, 1)
		go func() {
			resp, err := f.Exchange(context.Background(), query("a.example", dns.TypeA, 11))
			if err == nil && (resp.Id != 11 || len(resp.Answer) != 1) {
				err = fmt.Errorf("wrong answer %v", resp)
			}
			resultA <- err
		}()
		<-held // A took the first association and is about to write on it
		first := currentAssociation(f.udp)
		relays.made[0].startFailing() // its reads fail until its reader gives up
		<-first.ended

		// B replaces the ended association, closing the old one under A.
		if resp, err := f.Exchange(context.Background(), query("b.example", dns.TypeA, 12)); err != nil || len(resp.Answer) != 1 {
			t.Fatalf("query B: %v %v", resp, err)
		}
		if n := relays.count(); n != 2 {
			t.Fatalf("%d associations, want B on a second one", n)
		}
		close(release)
		if err := <-resultA; err != nil {
			t.Fatalf("query A: %v", err)
		}
		if n := f.Stats().Retransmits.Load(); n != 1 {
			t.Errorf("Retransmits = %d, want A sent once more", n)
		}
		if n := f.Stats().Failovers.Load(); n != 0 {
			t.Errorf("Failovers = %d, want A answered by its first resolver", n)
		}
	})
}

// TestUDPReadErrorKeepsAssociation: an ICMP port unreachable from the
// relay (ECONNREFUSED on the connected socket) is counted and the reader
// reads on: the answer behind it reaches its query on the same
// association, with no resend and no new UDP ASSOCIATE.
func TestUDPReadErrorKeepsAssociation(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		relays := &fakeRelays{setup: func(int) *fakeRelay {
			r := newFakeRelay()
			r.errorsFirst = 1
			return r
		}}
		f := newFakeUDPForwarder(t, relays, 1)
		defer f.Close()
		resp, err := f.Exchange(context.Background(), query("icmp.example", dns.TypeA, 3))
		if err != nil || len(resp.Answer) != 1 {
			t.Fatalf("%v %v", resp, err)
		}
		if n := relays.count(); n != 1 {
			t.Errorf("%d associations, want the first kept through a read error", n)
		}
		if n := f.Stats().Retransmits.Load(); n != 0 {
			t.Errorf("Retransmits = %d, want none", n)
		}
		if n := f.Stats().UDPReadErrors.Load(); n != 1 {
			t.Errorf("UDPReadErrors = %d, want 1", n)
		}
	})
}

// TestUDPRefusedWriteSentAgain: a send that fails with ECONNREFUSED (an
// earlier datagram's ICMP error, reported on this one, which did not
// leave) is sent again at once on the same association.
func TestUDPRefusedWriteSentAgain(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		relays := &fakeRelays{setup: func(int) *fakeRelay {
			r := newFakeRelay()
			r.writeErrors.Store(1)
			return r
		}}
		f := newFakeUDPForwarder(t, relays, 2)
		defer f.Close()
		resp, err := f.Exchange(context.Background(), query("refused.example", dns.TypeA, 4))
		if err != nil || len(resp.Answer) != 1 {
			t.Fatalf("%v %v", resp, err)
		}
		if relays.count() != 1 || f.Stats().Retransmits.Load() != 1 || f.Stats().Failovers.Load() != 0 {
			t.Errorf("%d associations, %d retransmits, %d failovers; want the same association, one resend, no failover",
				relays.count(), f.Stats().Retransmits.Load(), f.Stats().Failovers.Load())
		}
	})
}

// TestUDPPersistentReadErrorsBackOffThenEnd: a read error that persists
// does not spin the reader: it waits between reads, and after
// maxReadErrors in a row the association ends, so the next query makes a
// new one.
func TestUDPPersistentReadErrorsBackOffThenEnd(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		relays := &fakeRelays{}
		var stats Stats
		tr := newUDPTransport(relays.associate, 1, &stats)
		defer tr.close()
		a, err := tr.getConn(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		relays.made[0].startFailing()
		<-a.ended
		if n := relays.made[0].readCount.Load(); n != maxReadErrors {
			t.Errorf("%d reads, want the reader to stop after %d errors in a row", n, maxReadErrors)
		}
		if n := stats.UDPReadErrors.Load(); n != maxReadErrors {
			t.Errorf("UDPReadErrors = %d, want %d", n, maxReadErrors)
		}
		var backoff time.Duration // waits between the errors (on synctest's clock)
		for e := 2; e < maxReadErrors; e++ {
			backoff += min(readErrorBackoffMin<<(e-2), readErrorBackoffMax)
		}
		if d := time.Since(start); d < backoff {
			t.Errorf("%d errors within %v, want waits of %v between them", maxReadErrors, d, backoff)
		}
		if b, err := tr.getConn(context.Background()); err != nil || b == a || relays.count() != 2 {
			t.Errorf("after the end: %v (new association: %v), %d associations", err, b != a, relays.count())
		}
	})
}

// TestUDPReaderBackoffEndsOnClose: a reader waiting between failing reads
// stops as soon as the forwarder closes (goleak and synctest would catch
// it lingering).
func TestUDPReaderBackoffEndsOnClose(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		relays := &fakeRelays{}
		var stats Stats
		tr := newUDPTransport(relays.associate, 1, &stats)
		a, err := tr.getConn(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		relays.made[0].startFailing()
		synctest.Wait() // the reader is in a backoff
		if stats.UDPReadErrors.Load() < 2 {
			t.Fatal("the reader is not backing off")
		}
		start := time.Now()
		tr.close()
		select {
		case <-a.ended:
		default:
			t.Fatal("the reader outlived close")
		}
		if d := time.Since(start); d != 0 {
			t.Errorf("close waited %v for the backoff", d)
		}
	})
}

// TestExchangeFailsOverOnConnectionClosed: a net.ErrClosed from one
// attempt (a connection closed under the query, not the forwarder's own
// Close) is that resolver's failure: the next resolver is tried. Only the
// forwarder's Close stops Exchange before the last resolver.
func TestExchangeFailsOverOnConnectionClosed(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newPipeForwarder(t, 2)
		f.pools[0].dial = func(ctx context.Context) (net.Conn, error) {
			return nil, &net.OpError{Op: "dial", Net: "tcp", Err: net.ErrClosed}
		}
		resp, err := f.Exchange(context.Background(), query("x.example", dns.TypeA, 5))
		if err != nil || len(resp.Answer) != 1 {
			t.Fatalf("%v %v", resp, err)
		}
		if n := f.Stats().Failovers.Load(); n != 1 {
			t.Errorf("Failovers = %d, want 1", n)
		}

		f.Close()
		_, err = f.Exchange(context.Background(), query("y.example", dns.TypeA, 6))
		rerr, ok := errors.AsType[*ResolveError](err)
		// The first resolver failed above: it is tried last now, and the
		// attempt is on the second one.
		if !ok || len(rerr.Attempts) != 1 || !errors.Is(err, errForwarderClosed) || rerr.cause() != "192.0.2.54:53: shutting down" {
			t.Fatalf("after Close: %v, want one attempt that says the forwarder is closed", err)
		}
	})
}

// TestUDPAnswerFromAnotherSourceDropped: an answer with the query's ID
// and question from another address than the resolver's (an off-path
// forgery) is dropped and counted; the query gets the resolver's answer.
// Before, the forgery was taken.
func TestUDPAnswerFromAnotherSourceDropped(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		relays := &fakeRelays{setup: func(int) *fakeRelay {
			r := newFakeRelay()
			r.forge = true
			return r
		}}
		f := newFakeUDPForwarder(t, relays, 1)
		defer f.Close()
		wantOwnAnswer(t, f, query("forged.example", dns.TypeA, 8), net.IPv4(192, 0, 2, 9))
	})
}

// TestUDPQueryIDsRandom: the IDs the udp transport sends are not a
// sequence an off-path sender could follow.
func TestUDPQueryIDsRandom(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		relays := &fakeRelays{}
		f := newFakeUDPForwarder(t, relays, 1)
		defer f.Close()
		var ids []uint16
		for i := range 32 {
			if _, err := f.Exchange(context.Background(), query(fmt.Sprintf("q%d.example", i), dns.TypeA, 1)); err != nil {
				t.Fatal(err)
			}
			ids = append(ids, <-relays.made[0].ids)
		}
		steps := 0
		for i := 1; i < len(ids); i++ {
			if ids[i] == ids[i-1]+1 {
				steps++
			}
		}
		if steps > 3 {
			t.Errorf("IDs %v: %d of %d follow the one before", ids, steps, len(ids)-1)
		}
	})
}

// askWithin3s asks f for name's A record, giving up after 3 s.
func askWithin3s(f *Forwarder, name string, id uint16) error {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	_, err := f.Exchange(ctx, query(name, dns.TypeA, id))
	return err
}

// TestUDPBlackholedAssociationReplaced: an association that answered and
// then goes silent (the relay gone behind a NAT or a firewall, its
// control connection still up), on which maxSilentQueries queries in a
// row time out, retransmitted, with not one datagram read, is closed, and
// the next query associates again. One that drops some queries but
// answers others in between is kept. Before, a black-holed association
// was kept for every later query.
func TestUDPBlackholedAssociationReplaced(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		relays := &fakeRelays{setup: func(i int) *fakeRelay {
			r := newFakeRelay()
			if i == 0 { // answers the first query, then nothing
				r.drop = func(q *dns.Msg) bool { return q.Question[0].Name != "first.example." }
			}
			return r
		}}
		f := newFakeUDPForwarder(t, relays, 1)
		defer f.Close()
		f.udp.firstRTO = 0 // retransmit as the estimator says
		if err := askWithin3s(f, "first.example", 100); err != nil {
			t.Fatal(err)
		}
		for i := range maxSilentQueries + 2 {
			err := askWithin3s(f, "a.example", uint16(i))
			if wantAnswer := i >= maxSilentQueries; (err == nil) != wantAnswer {
				t.Errorf("query %d: %v, want answered %v", i, err, wantAnswer)
			}
		}
		if n := relays.count(); n != 2 {
			t.Errorf("%d associations, want the black-holed one replaced once", n)
		}
	})
	synctest.Test(t, func(t *testing.T) {
		relays := &fakeRelays{setup: func(int) *fakeRelay {
			r := newFakeRelay()
			r.drop = func(q *dns.Msg) bool { return q.Question[0].Name == "dropped.example." }
			return r
		}}
		f := newFakeUDPForwarder(t, relays, 1)
		defer f.Close()
		f.udp.firstRTO = 0
		for i := range 2 * maxSilentQueries {
			if err := askWithin3s(f, "dropped.example", uint16(2*i)); err == nil {
				t.Fatal("a dropped query was answered")
			}
			if err := askWithin3s(f, "a.example", uint16(2*i+1)); err != nil {
				t.Fatalf("query %d: %v", 2*i+1, err)
			}
		}
		// Dropped queries timing out together, with an answer read while
		// they waited.
		var dropped sync.WaitGroup
		for i := range maxSilentQueries {
			dropped.Go(func() { askWithin3s(f, "dropped.example", uint16(100+i)) })
		}
		synctest.Wait()
		if err := askWithin3s(f, "a.example", 200); err != nil {
			t.Fatal(err)
		}
		dropped.Wait()
		if err := askWithin3s(f, "a.example", 201); err != nil {
			t.Fatal(err)
		}
		if n := relays.count(); n != 1 {
			t.Errorf("%d associations, want the one answering kept", n)
		}
	})
}

// deadResolverRelay is a fake association behind which one resolver is
// dead (its datagrams vanish beyond the relay, no ICMP error) while the
// others answer after a round trip of 20 ms.
type deadResolverRelay struct {
	*fakeRelay
	dead netip.AddrPort
}

func (r deadResolverRelay) WritePacket(buf []byte, off int, dst socksclient.Addr) error {
	if ap, ok := dst.AddrPort(); ok && ap == r.dead {
		return nil
	}
	cp := append([]byte(nil), buf...)
	go func() {
		time.Sleep(20 * time.Millisecond) // the bubble's clock
		r.fakeRelay.WritePacket(cp, off, dst)
	}()
	return nil
}

// TestUDPDeadResolverKeepsAssociation: two resolvers, the first dead
// behind a working relay, the second answering on the same association.
// Bursts of two queries after idle both time out on the first resolver
// (their share of the deadline, retransmitted, nothing read meanwhile)
// and are answered by the second on the same association, which is kept.
// Before, the two timeouts counted as two silent queries in a row and
// the healthy association was closed and associated again on every burst
// (4 associations for 6 answered queries); now only the first burst,
// on an association nothing was read on yet, may replace it.
func TestUDPDeadResolverKeepsAssociation(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFakeUDPForwarder(t, &fakeRelays{}, 2)
		defer f.Close()
		f.udp.firstRTO = 0 // retransmit as the estimator says
		dead, _ := f.cfg.Resolvers[0].AddrPort()
		var associations atomic.Int64
		f.udp.associate = func(ctx context.Context) (relayConn, error) {
			associations.Add(1)
			return deadResolverRelay{newFakeRelay(), dead}, nil
		}
		var afterFirst int64
		for burst := range 3 {
			if burst == 1 {
				afterFirst = associations.Load()
			}
			var wg sync.WaitGroup
			for i := range 2 {
				time.Sleep(time.Millisecond) // clients ask a moment apart
				wg.Go(func() {
					q := query(fmt.Sprintf("q%d-%d.example", burst, i), dns.TypeA, uint16(i))
					if _, err := f.Exchange(context.Background(), q); err != nil {
						t.Errorf("burst %d query %d: %v", burst, i, err)
					}
				})
			}
			wg.Wait()
			time.Sleep(time.Minute) // idle between bursts
		}
		// The first burst comes on an association nothing has been read
		// on yet, where any resolver's silence counts (one silent from
		// its start must be replaced): it may cost one more. After it,
		// the dead resolver's timeouts condemn nothing.
		if n := associations.Load(); n != afterFirst || n > 2 {
			t.Errorf("%d UDP ASSOCIATEs after the first burst, %d after all three; want no more after the first, at most 2", afterFirst, n)
		}
		// Both queries of a burst past the dead resolver at least in the
		// first (later bursts try it once, a probe: see resolverHealth).
		if n := f.Stats().Failovers.Load(); n < 2 {
			t.Errorf("Failovers = %d, want the first burst's two queries past the dead resolver", n)
		}
	})
}

// TestUDPAssociationSilentFromBirthReplaced: an association replaced
// because it went silent, whose successor is silent from its first
// datagram (the outage outlasts the replacement), is replaced too: no
// resolver has answered on it, so every one's silence counts.
func TestUDPAssociationSilentFromBirthReplaced(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		relays := &fakeRelays{setup: func(i int) *fakeRelay {
			r := newFakeRelay()
			switch i {
			case 0: // answers the first query, then nothing
				r.drop = func(q *dns.Msg) bool { return q.Question[0].Name != "first.example." }
			case 1: // nothing at all
				r.drop = func(*dns.Msg) bool { return true }
			}
			return r
		}}
		f := newFakeUDPForwarder(t, relays, 1)
		defer f.Close()
		f.udp.firstRTO = 0
		if err := askWithin3s(f, "first.example", 100); err != nil {
			t.Fatal(err)
		}
		answered := 0
		for i := range 4 * maxSilentQueries {
			if askWithin3s(f, "a.example", uint16(i)) == nil {
				answered++
			}
		}
		if answered == 0 {
			t.Errorf("%d associations, no query answered in %d: the second association, silent from birth, is kept for ever",
				relays.count(), 4*maxSilentQueries)
		}
	})
}
