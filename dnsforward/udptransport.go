package dnsforward

import (
	"context"
	crand "crypto/rand"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/dns"

	"github.com/socksfwd/socksfwd/socksclient"
)

// maxUDPSends bounds the datagrams one query sends (the first and its
// retransmissions); the deadline bounds them too.
const maxUDPSends = 8

// maxSilentQueries is how many queries in a row may time out on an
// association, each sent at least twice to a resolver that has answered
// on it, with no datagram at all read meanwhile, before it is taken for
// black-holed and replaced: a relay that drops everything (gone behind a
// NAT or a firewall, no ICMP error) while its control connection stays
// up. Two, not one: a resolver may drop one query (rate limits, a name it
// will not answer); a false alarm costs one UDP ASSOCIATE. A query to a
// resolver that has not answered on the association does not count: its
// silence says nothing of the relay (a dead first resolver, whose share
// of every query's deadline passes with nothing read while the next one
// answers on the same association), and replacing the association would
// not make it answer.
const maxSilentQueries = 2

// udpTransport sends queries as datagrams through one long-lived UDP
// ASSOCIATE shared by every query and resolver; answers are matched by ID
// and question (an error answer without a question, such as unbound's
// refusal by access control, by ID alone: see deliverByID), and by source
// when the resolver is an IP address. IDs are
// random (RFC 5452 §9.2), so an off-path sender has to guess one. A query
// unanswered after the retransmission timeout is sent again, and a query
// whose association ends is sent again at once on a new one, both within
// its deadline. An association on which queries to a resolver that
// answered on it keep timing out with nothing read is replaced (see
// maxSilentQueries).
type udpTransport struct {
	associate func(ctx context.Context) (relayConn, error)
	rtts      []rttEstimator // per resolver, by index
	stats     *Stats
	// firstRTO overrides the estimator's wait before a retransmission when
	// not 0 (tests that must tell a retransmission from another resend).
	firstRTO time.Duration

	mu      sync.Mutex
	cur     *association   // the newest association, possibly ended
	round   *associateCall // the handshake in progress, if any
	pending map[udpKey]udpPending
	ids     *rand.ChaCha8 // query IDs; seeded from crypto/rand
	// idsUsed marks the IDs of the pending queries: unique across them,
	// not only per question, so that an answer without a question (a
	// bare REFUSED) names one query.
	idsUsed [1 << 16 / 64]uint64
	idsHeld int // bits set in idsUsed
	closed  bool
	wg      sync.WaitGroup
}

// relayConn is what the transport uses of a UDP ASSOCIATE
// (*socksclient.UDPConn); tests put in-memory fakes in its place.
type relayConn interface {
	WritePacket(buf []byte, off int, dst socksclient.Addr) error
	ReadPacket(buf []byte) (off, n int, from socksclient.Addr, err error)
	Alive() bool
	Close() error
}

// association is one UDP ASSOCIATE and the end of its reader.
type association struct {
	conn      relayConn
	ended     chan struct{} // closed when the reader stops: the association is gone
	closing   chan struct{} // closed by close: wakes the reader from a backoff
	closeOnce sync.Once
	// datagrams counts what the reader read; silent, the queries in a
	// row that timed out with none read (see maxSilentQueries).
	datagrams atomic.Uint64
	silent    atomic.Int32
	// answeredBy is set, by resolver index, once that resolver's answer
	// to a query was read on this association.
	answeredBy []atomic.Bool
}

// timedOutSilently records a query to resolver i that timed out on a
// after sending sends datagrams on it with none read since the first
// (when a had read datagramsBefore), and ends a once maxSilentQueries did
// in a row: the queries on it then send again on a new one. Only a
// resolver that has answered on a counts (a dead one among live ones
// must not condemn the association), or any while nothing at all has
// been read on a (one silent from its start).
func (a *association) timedOutSilently(i, sends int, datagramsBefore uint64) {
	read := a.datagrams.Load()
	if sends < 2 || read != datagramsBefore || read != 0 && !a.answeredBy[i].Load() {
		return
	}
	if a.silent.Add(1) >= maxSilentQueries {
		a.close()
	}
}

// close ends the association from our side (replaced, or shutting down).
func (a *association) close() {
	a.closeOnce.Do(func() {
		close(a.closing)
		a.conn.Close()
	})
}

// gotAnswer records that resolver i answered a query on a.
func (a *association) gotAnswer(i int) {
	if !a.answeredBy[i].Load() { // a load, not a store, on every answer but the first
		a.answeredBy[i].Store(true)
	}
}

func (a *association) alive() bool {
	select {
	case <-a.ended:
		return false
	default:
		return a.conn.Alive()
	}
}

// associateCall is one handshake that every query arriving meanwhile waits
// for (each until its own deadline) instead of associating on its own.
type associateCall struct {
	done chan struct{}
	a    *association
	err  error
}

// udpQueryRoom fits a query with EDNS options (packing needs one byte
// more than the message).
const udpQueryRoom = 512

// udpKey matches an answer to its query: ID and question. (Not the
// resolver: the relay names the sender by the address it reached, which is
// an IP even when the resolver was configured by name.)
type udpKey struct {
	id    uint16
	name  string
	qtype uint16
}

// udpPending is a query waiting for its answer.
type udpPending struct {
	ch chan *dns.Msg
	// from is where the answer must come from: the resolver's address when
	// it is configured as one (else not valid, and not checked).
	from netip.AddrPort
	// resolver is the index of the resolver asked.
	resolver int
}

func newUDPTransport(associate func(ctx context.Context) (relayConn, error), resolvers int, stats *Stats) *udpTransport {
	return &udpTransport{
		associate: associate,
		rtts:      make([]rttEstimator, resolvers),
		stats:     stats,
		pending:   make(map[udpKey]udpPending),
		ids:       newIDSource(),
	}
}

// newIDSource returns a generator of unpredictable query IDs.
func newIDSource() *rand.ChaCha8 {
	var seed [32]byte
	crand.Read(seed[:]) // never fails (Go 1.24+)
	return rand.NewChaCha8(seed)
}

// errNoUDPAssociate wraps a proxy without UDP ASSOCIATE with the advice to
// use the TCP transport.
type errNoUDPAssociate struct{ err error }

func (e errNoUDPAssociate) Error() string {
	return e.err.Error() + "; this proxy cannot carry DNS over UDP: use --dns-transport tcp"
}
func (e errNoUDPAssociate) Unwrap() error { return e.err }

// getConn returns the live association, building one if needed. Queries
// arriving during a handshake wait for it, each no longer than its own
// context allows, and share its outcome; a handshake abandoned because its
// caller gave up is started again by the next caller still waiting.
func (t *udpTransport) getConn(ctx context.Context) (*association, error) {
	for {
		t.mu.Lock()
		if t.closed {
			t.mu.Unlock()
			return nil, errForwarderClosed
		}
		if a := t.cur; a != nil && a.alive() {
			t.mu.Unlock()
			return a, nil
		}
		if call := t.round; call != nil {
			t.mu.Unlock()
			select {
			case <-call.done:
			case <-ctx.Done():
				if errors.Is(ctx.Err(), context.DeadlineExceeded) {
					return nil, errAwaitingConn // the association's own query tells whose silence it was
				}
				return nil, ctx.Err()
			}
			if call.err != nil && !(isContextErr(call.err) && ctx.Err() == nil) {
				return nil, call.err
			}
			continue
		}
		call := &associateCall{done: make(chan struct{})}
		t.round = call
		t.mu.Unlock()

		c, err := t.associate(ctx)

		t.mu.Lock()
		t.round = nil
		switch {
		case err != nil && errors.Is(err, socksclient.ErrCommandNotSupported):
			call.err = errNoUDPAssociate{err}
		case err != nil:
			call.err = err
		case t.closed:
			c.Close()
			call.err = errForwarderClosed
		default:
			if old := t.cur; old != nil {
				// Ended already. A query that took it before this swap
				// and writes now gets net.ErrClosed: it sends again on
				// the new one.
				old.close()
			}
			a := &association{conn: c, ended: make(chan struct{}), closing: make(chan struct{}),
				answeredBy: make([]atomic.Bool, len(t.rtts))}
			t.cur, call.a = a, a
			t.wg.Go(func() { t.readAnswers(a) })
		}
		close(call.done)
		t.mu.Unlock()
		return call.a, call.err
	}
}

func isContextErr(err error) bool {
	return errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
}

func keyFor(id uint16, q dns.Question) udpKey {
	return udpKey{id: id, name: strings.ToLower(q.Name), qtype: q.Qtype}
}

// exchange sends q to resolver i and waits for the matching answer,
// sending it again when the retransmission timeout passes or the
// association ends, until ctx is done.
func (t *udpTransport) exchange(ctx context.Context, i int, resolver socksclient.Addr, q *dns.Msg) (*dns.Msg, error) {
	if len(q.Question) != 1 {
		return nil, unsendableError{errors.New("dns over udp: a query needs exactly one question to be matched")}
	}
	a, err := t.getConn(ctx)
	if err != nil {
		return nil, err
	}
	ch := make(chan *dns.Msg, 1)
	from, _ := resolver.AddrPort() // a name: the source is not known
	t.mu.Lock()
	key, err := t.reserveLocked(q.Question[0], udpPending{ch: ch, from: from, resolver: i})
	t.mu.Unlock()
	if err != nil {
		return nil, err
	}
	defer t.release(key)

	// Packed straight after the SOCKS header's room; a query too large for
	// the usual buffer is copied into a larger one. Every send reuses it
	// (the same ID: whichever send is answered first answers the query).
	const hdr = socksclient.MaxUDPHeaderLen
	buf := make([]byte, hdr+udpQueryRoom)
	wire, err := packWithID(q, key.id, buf[hdr:])
	if err != nil {
		return nil, unsendableError{fmt.Errorf("packing query: %w", err)}
	}
	if len(wire) > 0 && &wire[0] != &buf[hdr] {
		buf = append(make([]byte, hdr, hdr+len(wire)), wire...)
	}
	pkt := buf[:hdr+len(wire)]

	est := &t.rtts[i]
	rto := est.rto()
	if t.firstRTO > 0 {
		rto = t.firstRTO
	}
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	var (
		sendsOnA        int // sends on a, since the query took it
		datagramsBefore = a.datagrams.Load()
	)
	for sends := 0; ; {
		if sends > 0 {
			cur, err := t.getConn(ctx)
			if err != nil {
				return nil, err
			}
			if cur != a {
				a, sendsOnA, datagramsBefore = cur, 0, cur.datagrams.Load()
			}
			t.stats.Retransmits.Add(1)
		}
		sends++
		sendsOnA++
		sentAt := time.Now()
		if err := a.conn.WritePacket(pkt, hdr, resolver); err != nil {
			if resendAfterWriteError(err) && sends < maxUDPSends {
				continue
			}
			return nil, err
		}
		var retransmit <-chan time.Time
		if sends < maxUDPSends {
			if timer == nil {
				timer = time.NewTimer(rto)
			} else {
				timer.Reset(rto)
			}
			retransmit = timer.C
		}
		select {
		case resp := <-ch:
			if sends == 1 {
				est.sample(time.Since(sentAt))
			}
			resp.Id = q.Id
			return resp, nil
		case <-retransmit:
			est.timedOut(rto)
			rto = min(2*rto, rtoMax)
		case <-a.ended:
			if sends >= maxUDPSends {
				return nil, socksclient.ErrAssociationClosed
			}
			// The association is gone with the datagram: send again at
			// once rather than wait for the timer.
			if timer != nil {
				timer.Stop()
			}
			select {
			case resp := <-ch: // an answer read just before the end
				resp.Id = q.Id
				return resp, nil
			default:
			}
		case <-ctx.Done():
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				a.timedOutSilently(i, sendsOnA, datagramsBefore)
			}
			return nil, ctx.Err()
		}
	}
}

// reserveLocked files p under a random ID that no other pending query
// has (RFC 5452 §9.2), and question. Called with t.mu held.
func (t *udpTransport) reserveLocked(question dns.Question, p udpPending) (udpKey, error) {
	if t.idsHeld >= 1<<16 { // an ID stays held past its delivery, until release
		return udpKey{}, unsendableError{errors.New("dns over udp: every query ID is in use")}
	}
	var id uint16
	for {
		id = uint16(t.ids.Uint64())
		if t.idsUsed[id/64]&(1<<(id%64)) == 0 {
			break
		}
	}
	t.idsUsed[id/64] |= 1 << (id % 64)
	t.idsHeld++
	key := keyFor(id, question)
	t.pending[key] = p
	return key, nil
}

// release forgets a pending query (delivered or not) and frees its ID.
func (t *udpTransport) release(key udpKey) {
	t.mu.Lock()
	delete(t.pending, key)
	t.idsUsed[key.id/64] &^= 1 << (key.id % 64)
	t.idsHeld--
	t.mu.Unlock()
}

// resendAfterWriteError reports whether a query whose datagram failed to
// go with err is sent again at once (getConn then gives it the live
// association, or errForwarderClosed when the forwarder is closing):
//   - the proxy ended the association;
//   - net.ErrClosed: another query replaced the association (its reader
//     had stopped) and closed it between our getConn and this write; only
//     the forwarder's own close, which getConn reports, ends the query;
//   - an ICMP error for an earlier datagram (the relay's port unreachable,
//     a firewall's "prohibited"; socksclient.IsICMPError), reported on
//     this send, which therefore did not leave.
func resendAfterWriteError(err error) bool {
	return errors.Is(err, socksclient.ErrAssociationClosed) || errors.Is(err, net.ErrClosed) ||
		socksclient.IsICMPError(err)
}

// Read errors that do not end the association: an ICMP port unreachable
// from the relay (a datagram it dropped, or one from before a restart)
// reads as ECONNREFUSED on the connected socket, once, and the relay still
// works. The reader counts each and reads on; when they repeat with no
// datagram between, it waits before each read from readErrorBackoffMin,
// doubling up to readErrorBackoffMax, so an error that persists cannot
// spin; after maxReadErrors in a row the relay is taken as gone and the
// association ends (queries on it send again on a new one).
const (
	readErrorBackoffMin = time.Millisecond
	readErrorBackoffMax = 100 * time.Millisecond
	maxReadErrors       = 16
)

// readAnswers delivers answers from one association until it ends.
func (t *udpTransport) readAnswers(a *association) {
	defer close(a.ended)
	buf := make([]byte, socksclient.MaxUDPDatagram)
	var (
		errorsInRow int
		backoff     *time.Timer
	)
	defer func() {
		if backoff != nil {
			backoff.Stop()
		}
	}()
	for {
		off, n, from, err := a.conn.ReadPacket(buf)
		if err != nil {
			if !a.conn.Alive() || errors.Is(err, net.ErrClosed) || errors.Is(err, socksclient.ErrAssociationClosed) {
				return // closed or ended by the proxy: queries on it send again
			}
			t.stats.UDPReadErrors.Add(1)
			if errorsInRow++; errorsInRow >= maxReadErrors {
				return
			}
			if errorsInRow > 1 {
				wait := min(readErrorBackoffMin<<(errorsInRow-2), readErrorBackoffMax)
				if backoff == nil {
					backoff = time.NewTimer(wait)
				} else {
					backoff.Reset(wait)
				}
				select {
				case <-backoff.C:
				case <-a.closing:
					return
				}
			}
			continue
		}
		errorsInRow = 0
		a.datagrams.Add(1)
		a.silent.Store(0)
		resp := new(dns.Msg)
		if resp.Unpack(buf[off:n]) != nil {
			t.stats.MalformedAnswers.Add(1)
			continue // unmatchable; its query is retransmitted or times out
		}
		if questionlessErrorMsg(resp) {
			// REFUSED without the question (unbound's access control),
			// FORMERR and the like: the answer to the query with its ID.
			if resolver, ok := t.deliverByID(resp, from); ok {
				a.gotAnswer(resolver)
			} else {
				t.stats.MalformedAnswers.Add(1)
			}
			continue
		}
		if len(resp.Question) != 1 {
			t.stats.MalformedAnswers.Add(1)
			continue
		}
		key := keyFor(resp.Id, resp.Question[0])
		t.mu.Lock()
		p, ok := t.pending[key]
		if ok && p.from.IsValid() && !sameAddrPort(from, p.from) {
			// Not from the resolver asked: a forgery, dropped; the
			// query waits on for the real answer.
			ok = false
			t.stats.Mismatched.Add(1)
		}
		if ok {
			delete(t.pending, key)
		}
		t.mu.Unlock()
		if ok {
			p.ch <- resp
			a.gotAnswer(p.resolver)
		}
	}
}

// deliverByID hands an answer without a question (see
// questionlessErrorMsg) to the query waiting under its ID (IDs are
// unique across the pending queries) when from is the resolver it asked,
// if that is known; false when none is. It returns the
// index of the resolver that query asked. The pending queries are
// searched: rare answers, and at most a few thousand queries.
func (t *udpTransport) deliverByID(resp *dns.Msg, from socksclient.Addr) (resolver int, ok bool) {
	t.mu.Lock()
	var (
		found udpKey
		n     int
	)
	for key, p := range t.pending {
		if key.id == resp.Id && (!p.from.IsValid() || sameAddrPort(from, p.from)) {
			found = key
			n++
		}
	}
	p := t.pending[found]
	if n == 1 {
		delete(t.pending, found)
	}
	t.mu.Unlock()
	if n != 1 {
		return 0, false
	}
	p.ch <- resp
	return p.resolver, true
}

// sameAddrPort reports whether the relay's sender address a is want.
func sameAddrPort(a socksclient.Addr, want netip.AddrPort) bool {
	ap, ok := a.AddrPort()
	return ok && ap.Addr().Unmap() == want.Addr().Unmap() && ap.Port() == want.Port()
}

func (t *udpTransport) close() {
	t.mu.Lock()
	t.closed = true
	if t.cur != nil {
		t.cur.close()
	}
	t.mu.Unlock()
	t.wg.Wait()
}
