package dnsforward

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/dns"
)

// errConnDead: a pooled connection failed or was closed while a query was
// on it; the query may be sent again on another connection.
var errConnDead = errors.New("dns over tcp: the connection to the resolver closed")

// errAwaitingConn: a query's time ran out while it waited for the pool's
// first connection (or the udp transport's association), which another
// query was making. That query's own failure says whether the proxy or
// the resolver was silent; this one is neither's to count. errors.Is
// finds context.DeadlineExceeded.
var errAwaitingConn = fmt.Errorf("no connection to the resolver in time (a handshake with the proxy was under way): %w", context.DeadlineExceeded)

// errStalled ends a connection on which a query timed out with nothing
// read since it was sent.
var errStalled = errors.New("dns over tcp: no answer on the connection while a query waited")

// errIdle ends a connection that carried nothing for the idle timeout.
var errIdle = errors.New("dns over tcp: idle")

// maxTCPSends bounds how often one query is sent again after the
// resolver closed the connection it was on; the deadline bounds it too. A
// resolver that closes after a bounded number of queries (dnsmasq: 100)
// loses at most the pipeline limit each time, so a query is rarely unlucky
// twice, let alone this often.
const maxTCPSends = 16

// Redial backoff after connections that fail (dial errors, or closed by
// the resolver before answering anything): the first failure is redialed
// at once (a stale connection is normal), the next ones wait from
// redialMin, doubling up to redialMax, so a resolver that accepts and
// closes at once is not redialed in a tight loop.
const (
	redialMin = 50 * time.Millisecond
	redialMax = 2 * time.Second
)

// errBackoff: the pool is waiting before it dials the resolver again.
type errBackoff struct {
	failures int
	wait     time.Duration
	last     error
}

func (e *errBackoff) Error() string {
	return fmt.Sprintf("dns over tcp: not dialing the resolver for another %s after %d failed connections (last: %v)",
		e.wait.Round(time.Millisecond), e.failures, e.last)
}
func (e *errBackoff) Unwrap() error { return e.last }

// tcpPool keeps pipelined DNS-over-TCP connections to one resolver
// (RFC 7766 §6.2.1.1): several queries in flight per connection, answers
// matched by ID, IDs rewritten so that clients cannot collide. A
// connection carries at most pipeline queries at once; beyond that the
// pool grows, up to size connections, and beyond that queries wait for a
// free slot (within their deadline). Queries on a connection the resolver
// closed are sent again on another one. A connection on which a query
// times out with nothing read meanwhile is closed. Idle connections are
// closed after idleTimeout.
type tcpPool struct {
	dial        func(ctx context.Context) (net.Conn, error)
	size        int
	pipeline    int
	idleTimeout time.Duration
	stats       *Stats
	// slots holds a token per query in the pool, at most size·pipeline:
	// so whenever a query holds one, some connection has a free slot or
	// the pool has room for another connection. Waiting on a channel
	// wakes one waiter per freed slot, not all of them.
	slots chan struct{}

	mu        sync.Mutex
	conns     []*pipeConn
	dialing   int           // dials in progress
	changed   chan struct{} // closed when a dial ends or a connection dies
	failures  int           // connections failed in a row (see redialMin)
	lastErr   error
	notBefore time.Time // no dial before this
	closed    bool
	wg        sync.WaitGroup
}

func newTCPPool(dial func(ctx context.Context) (net.Conn, error), size, pipeline int, idle time.Duration, stats *Stats) *tcpPool {
	return &tcpPool{dial: dial, size: size, pipeline: pipeline, idleTimeout: idle, stats: stats,
		slots: make(chan struct{}, size*pipeline)}
}

// exchange sends q and waits for its answer until ctx is done. A query
// whose connection the resolver closed (dnsmasq does after 100 queries) is
// sent again on another connection. failover says another resolver is left
// to try: then a first send finding the pool in redial backoff fails at
// once (that resolver is failing: the next one answers sooner), while a
// send again, to a resolver that was answering, waits out the backoff.
func (p *tcpPool) exchange(ctx context.Context, q *dns.Msg, failover bool) (*dns.Msg, error) {
	wire, err := q.Pack()
	if err != nil {
		return nil, unsendableError{fmt.Errorf("packing query: %w", err)}
	}
	answer, err := p.exchangeWire(ctx, wire, failover)
	if err != nil {
		return nil, err
	}
	m := new(dns.Msg)
	if err := m.Unpack(answer); err != nil {
		p.stats.MalformedAnswers.Add(1)
		return nil, fmt.Errorf("%w: %v", errMalformedAnswer, err)
	}
	return m, nil
}

// errMalformedAnswer: the resolver's answer to a query did not parse.
var errMalformedAnswer = errors.New("dns over tcp: malformed answer")

// exchangeWire is exchange for a query in wire form, which it leaves as
// it is: the answer comes back in wire form, with the query's ID.
func (p *tcpPool) exchangeWire(ctx context.Context, wire []byte, failover bool) ([]byte, error) {
	if len(wire) < headerLen {
		return nil, unsendableError{errors.New("dns over tcp: query shorter than a header")}
	}
	select {
	case p.slots <- struct{}{}:
	default:
		select {
		case p.slots <- struct{}{}:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	defer func() { <-p.slots }()
	for sends := 1; ; sends++ {
		pc, err := p.get(ctx, failover && sends == 1)
		if err != nil {
			return nil, err
		}
		resp, err := pc.exchange(ctx, wire)
		pc.load.Add(-1)
		if !errors.Is(err, errConnDead) || ctx.Err() != nil || sends >= maxTCPSends {
			return resp, err
		}
		p.stats.Resent.Add(1)
	}
}

// get takes a slot on the live connection with the fewest queries in
// flight, or dials a new connection if every one is busy and the pool has
// room. Dials count against the pool's size, so a burst of queries on an
// empty pool waits for the first connections instead of dialing one each.
// The caller holds a token of p.slots and gives the slot back (load) when
// its query ends.
//
// While redials back off, a query with no free slot waits for the backoff
// to end (or the pool to change), within ctx; it fails at once only when
// failFast or when its deadline would pass before the backoff ends.
func (p *tcpPool) get(ctx context.Context, failFast bool) (*pipeConn, error) {
	var backoff *time.Timer
	defer func() {
		if backoff != nil {
			backoff.Stop()
		}
	}()
	for {
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			return nil, errForwarderClosed
		}
		best := p.leastLoaded()
		free := best != nil && int(best.load.Load()) < p.pipeline
		room := len(p.conns)+p.dialing < p.size
		if free && (best.load.Load() == 0 || !room) {
			return p.take(best), nil
		}
		if room {
			wait := time.Until(p.notBefore)
			if wait <= 0 {
				p.dialing++
				p.mu.Unlock()
				return p.dialNew(ctx)
			}
			if free {
				return p.take(best), nil
			}
			if deadline, ok := ctx.Deadline(); failFast || ok && deadline.Before(p.notBefore) {
				err := &errBackoff{failures: p.failures, wait: wait, last: p.lastErr}
				p.mu.Unlock()
				return nil, err
			}
			// Backing off, with time left: wait for the backoff to end, or
			// for a change (a dial ends, a connection dies or answers).
			changed := p.changedLocked()
			p.mu.Unlock()
			if backoff == nil {
				backoff = time.NewTimer(wait)
			} else {
				backoff.Reset(wait)
			}
			select {
			case <-changed:
			case <-backoff.C:
			case <-ctx.Done():
				return nil, ctx.Err()
			}
			continue
		}
		// Every connection is full and dials are under way (the tokens
		// guarantee one or the other): wait for a dial or a death.
		changed := p.changedLocked()
		none := best == nil
		p.mu.Unlock()
		select {
		case <-changed:
		case <-ctx.Done():
			if none && errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return nil, errAwaitingConn // the dial's own query tells whose silence it was
			}
			return nil, ctx.Err()
		}
	}
}

// changedLocked returns the channel that the next change of the pool
// closes. Called with p.mu held.
func (p *tcpPool) changedLocked() <-chan struct{} {
	if p.changed == nil {
		p.changed = make(chan struct{})
	}
	return p.changed
}

// leastLoaded drops dead connections and returns the live one with the
// fewest queries in flight (nil if none). Called with p.mu held.
func (p *tcpPool) leastLoaded() *pipeConn {
	var best *pipeConn
	live := p.conns[:0]
	for _, c := range p.conns {
		if c.dead.Load() {
			continue
		}
		live = append(live, c)
		if best == nil || c.load.Load() < best.load.Load() {
			best = c
		}
	}
	clear(p.conns[len(live):])
	p.conns = live
	return best
}

// take reserves a slot on c and unlocks p.mu.
func (p *tcpPool) take(c *pipeConn) *pipeConn {
	c.load.Add(1)
	p.mu.Unlock()
	return c
}

// dialNew dials a connection for the caller (who counted it in p.dialing)
// and returns it with a slot taken.
func (p *tcpPool) dialNew(ctx context.Context) (*pipeConn, error) {
	conn, err := p.dial(ctx)

	p.mu.Lock()
	p.dialing--
	p.notifyLocked()
	if err != nil {
		if ctx.Err() == nil { // our caller giving up is not the resolver's failure
			p.failedLocked(err)
		}
		if best := p.leastLoaded(); best != nil && int(best.load.Load()) < p.pipeline {
			return p.take(best), nil // a busy connection beats none
		}
		p.mu.Unlock()
		return nil, err
	}
	if p.closed {
		p.mu.Unlock()
		conn.Close()
		return nil, errForwarderClosed
	}
	pc := &pipeConn{conn: conn, pool: p, w: &streamWriter{conn: conn, timeout: writeTimeout},
		pending: make(map[uint16]pendingQuery), nextID: uint16(time.Now().UnixNano())}
	p.conns = append(p.conns, pc)
	p.wg.Go(func() { pc.readAnswers(p.idleTimeout) })
	return p.take(pc), nil
}

// failedLocked counts a failed connection and sets when the next dial may
// start. Called with p.mu held.
func (p *tcpPool) failedLocked(err error) {
	p.failures++
	p.lastErr = err
	if p.failures >= 2 {
		wait := min(redialMin<<min(p.failures-2, 16), redialMax)
		p.notBefore = time.Now().Add(wait)
	}
}

// notifyLocked wakes the queries waiting for a change. Called
// with p.mu held.
func (p *tcpPool) notifyLocked() {
	if p.changed != nil {
		close(p.changed)
		p.changed = nil
	}
}

// answered records that a connection delivered its first answer: the
// resolver works, so the failures in a row are over, and queries waiting
// out the backoff may dial now.
func (p *tcpPool) answered() {
	p.mu.Lock()
	p.failures = 0
	p.lastErr = nil
	p.notBefore = time.Time{}
	p.notifyLocked()
	p.mu.Unlock()
}

// ended records the end of a connection, which had delivered answered
// answers and died of err: closed by the resolver before answering
// anything, it counts as a failed connection.
func (p *tcpPool) ended(answered int, err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if answered == 0 && !errors.Is(err, errIdle) && !errors.Is(err, net.ErrClosed) {
		p.failedLocked(fmt.Errorf("%w before answering: %v", errConnDead, err))
	}
	p.notifyLocked()
}

// close closes every connection and waits for their readers.
func (p *tcpPool) close() {
	p.mu.Lock()
	p.closed = true
	for _, c := range p.conns {
		c.fail(net.ErrClosed)
	}
	p.conns = nil
	p.notifyLocked()
	p.mu.Unlock()
	p.wg.Wait()
}

// pipeConn is one pipelined connection to a resolver.
type pipeConn struct {
	conn net.Conn
	pool *tcpPool
	load atomic.Int32 // slots taken: queries on it or about to be
	dead atomic.Bool
	// frames counts the messages read: a query that times out with none
	// read since it was sent finds the connection stuck (see exchange).
	frames atomic.Uint64
	w      *streamWriter // combines the queries' writes

	mu      sync.Mutex
	pending map[uint16]pendingQuery
	nextID  uint16
	err     error // why it died
}

// pendingQuery is a query on a connection waiting for its answer.
type pendingQuery struct {
	ch chan []byte
	// question is the query's question section in wire form (nil when it
	// has no plain one): an answer under the query's ID to another
	// question is a late answer to an earlier query that had the ID.
	question []byte
}

// exchange writes the query in wire under a connection-unique ID (wire
// itself is left as it is) and waits for the answer, which gets the
// query's ID back.
func (c *pipeConn) exchange(ctx context.Context, wire []byte) ([]byte, error) {
	if len(wire) > 0xFFFF {
		return nil, unsendableError{errors.New("dns over tcp: query larger than 65535 bytes")}
	}
	ch := make(chan []byte, 1)
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return nil, errConnDead
	}
	id := c.nextID
	for {
		id++
		if _, used := c.pending[id]; !used {
			break
		}
	}
	c.nextID = id
	c.pending[id] = pendingQuery{ch: ch, question: questionOf(wire)}
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		delete(c.pending, id)
		c.mu.Unlock()
	}()

	framesBefore := c.frames.Load()
	if err := c.w.write(wire, id, true); err != nil {
		c.fail(err)
		return nil, errConnDead
	}
	select {
	case resp, ok := <-ch:
		if !ok {
			if errors.Is(c.cause(), errStalled) {
				// Closed here, not by the resolver: it answered nothing.
				return nil, fmt.Errorf("%w: %w", errConnDead, errStalled)
			}
			return nil, errConnDead
		}
		copy(resp, wire[:2]) // the query's ID
		return resp, nil
	case <-ctx.Done():
		if errors.Is(ctx.Err(), context.DeadlineExceeded) && c.frames.Load() == framesBefore {
			// Nothing at all came back while the query waited: the
			// resolver hangs on this connection, or the proxy's side of
			// it is gone without a FIN. Kept, it would be taken by every
			// later query (it has a free slot) and time them all out.
			c.fail(errStalled)
		}
		return nil, ctx.Err()
	}
}

// questionOf is the question section (name, type, class) of a query in
// wire form, nil unless it has exactly one question with a plain name.
func questionOf(query []byte) []byte {
	if end, ok := soleQuestion(query); ok {
		return query[headerLen : end+4]
	}
	return nil
}

// answersQuestion reports whether answer may be to the question section
// question (see questionOf): false only when it has one question, readable,
// and that is another name (in any case), type or class. An answer without
// a question (FORMERR and the like) has nothing to compare, nor has a
// query without a plain question (nil); an answer whose question does not
// read is delivered to fail its query as malformed.
func answersQuestion(answer, question []byte) bool {
	end, ok := soleQuestion(answer)
	if question == nil || !ok {
		return true
	}
	n := len(question) - 4
	return equalFoldASCII(answer[headerLen:end], question[:n]) && bytes.Equal(answer[end:end+4], question[n:])
}

// packWithID packs q under another ID without copying it: the ID is
// swapped in for the Pack and restored (the caller owns q and is not
// sharing it meanwhile). The message goes into buf when it fits there
// (buf[0] onwards), else into a new slice.
func packWithID(q *dns.Msg, id uint16, buf []byte) ([]byte, error) {
	orig := q.Id
	q.Id = id
	wire, err := q.PackBuffer(buf)
	q.Id = orig
	return wire, err
}

// writeTimeout bounds one combined write; a resolver that stops reading
// fails the connection instead of stalling every query on it.
const writeTimeout = 5 * time.Second

// readAnswers dispatches answers by ID until the connection fails or has
// been idle (nothing in flight) for idle, then tells the pool.
func (c *pipeConn) readAnswers(idle time.Duration) {
	var lenBuf [2]byte
	// Buffered: under load one read brings many answers.
	r := bufio.NewReaderSize(c.conn, 16<<10)
	answered := 0
	for {
		// With nothing in flight, the read may time out: then the
		// connection has been idle long enough and is closed.
		if idle > 0 {
			c.conn.SetReadDeadline(time.Now().Add(idle))
		}
		resp, err := readTCPFrame(r, &lenBuf)
		if err != nil {
			if isTimeout(err) {
				if c.load.Load() > 0 {
					continue // waiting on a slow answer is not idleness
				}
				err = errIdle
			}
			c.fail(err)
			c.pool.ended(answered, c.cause())
			return
		}
		c.frames.Add(1)
		if len(resp) < headerLen {
			c.pool.stats.MalformedAnswers.Add(1)
			continue // a malformed answer cannot be matched; its query times out
		}
		id := binary.BigEndian.Uint16(resp)
		c.mu.Lock()
		pq, ok := c.pending[id]
		if ok && !answersQuestion(resp, pq.question) {
			// The ID came round again (or the resolver erred): dropped,
			// and the query waits on for its own answer.
			ok = false
			c.pool.stats.Mismatched.Add(1)
		}
		if ok {
			delete(c.pending, id)
		}
		c.mu.Unlock()
		if ok {
			pq.ch <- resp
			if answered++; answered == 1 {
				c.pool.answered()
			}
		}
	}
}

// readTCPFrame reads one length-prefixed DNS message (RFC 1035 §4.2.2)
// whole, in a new slice, without parsing it. An error means the stream
// itself failed.
func readTCPFrame(r io.Reader, lenBuf *[2]byte) ([]byte, error) {
	if n, err := io.ReadFull(r, lenBuf[:]); err != nil {
		if n > 0 {
			return nil, cut(err)
		}
		return nil, err // nothing consumed: a timeout here may be retried
	}
	buf := make([]byte, binary.BigEndian.Uint16(lenBuf[:]))
	if _, err := io.ReadFull(r, buf); err != nil {
		return nil, cut(err)
	}
	return buf, nil
}

// cut reports a stream that failed inside a message. It deliberately does
// not wrap err: a timeout there is not retryable (the stream is out of
// step), so it must not look like one.
func cut(err error) error {
	return fmt.Errorf("dns over tcp: message cut short: %v", err)
}

// fail marks the connection dead, closes it and wakes every waiting query
// (which is then sent again elsewhere). The first cause sticks.
func (c *pipeConn) fail(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return
	}
	c.err = err
	c.dead.Store(true)
	c.conn.Close()
	for id, pq := range c.pending {
		close(pq.ch)
		delete(c.pending, id)
	}
}

func (c *pipeConn) cause() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
