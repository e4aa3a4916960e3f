package dnsforward

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/miekg/dns"
)

// errConnDead: a pooled connection failed or was closed while a query was
// on it; the query may be retried on a new connection.
var errConnDead = errors.New("dns over tcp: connection to the resolver closed")

// tcpPool keeps a few pipelined DNS-over-TCP connections to one resolver
// (RFC 7766 §6.2.1.1): several queries in flight per connection, answers
// matched by ID, IDs rewritten so that clients cannot collide. New
// connections are dialed only while the pool is below size and every
// connection is busy; idle ones are closed after idleTimeout.
type tcpPool struct {
	dial        func(ctx context.Context) (net.Conn, error)
	size        int
	idleTimeout time.Duration

	mu      sync.Mutex
	conns   []*pipeConn
	dialing int           // dials in progress
	dialed  chan struct{} // closed when a dial ends, for queries waiting on it
	closed  bool
	wg      sync.WaitGroup
}

func newTCPPool(dial func(ctx context.Context) (net.Conn, error), size int, idle time.Duration) *tcpPool {
	return &tcpPool{dial: dial, size: size, idleTimeout: idle}
}

// exchange sends q and waits for its answer until ctx is done. A query that
// finds its pooled connection dead is retried once on a fresh one.
func (p *tcpPool) exchange(ctx context.Context, q *dns.Msg) (*dns.Msg, error) {
	for attempt := 0; ; attempt++ {
		pc, err := p.get(ctx)
		if err != nil {
			return nil, err
		}
		resp, err := pc.exchange(ctx, q)
		if errors.Is(err, errConnDead) && attempt == 0 && ctx.Err() == nil {
			continue
		}
		return resp, err
	}
}

// get picks the live connection with the fewest queries in flight, or
// dials a new one if all are busy and the pool has room. Dials count
// against the pool's size, so a burst of queries on an empty pool waits for
// the first connections instead of dialing one each.
func (p *tcpPool) get(ctx context.Context) (*pipeConn, error) {
	for {
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			return nil, net.ErrClosed
		}
		var best *pipeConn
		live := p.conns[:0]
		for _, c := range p.conns {
			if c.isDead() {
				continue
			}
			live = append(live, c)
			if best == nil || c.inFlight() < best.inFlight() {
				best = c
			}
		}
		p.conns = live
		full := len(p.conns)+p.dialing >= p.size
		if best != nil && (best.inFlight() == 0 || full) {
			p.mu.Unlock()
			return best, nil
		}
		if full { // nothing usable yet, dials in progress: wait for one
			if p.dialed == nil {
				p.dialed = make(chan struct{})
			}
			wait := p.dialed
			p.mu.Unlock()
			select {
			case <-wait:
				continue
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
		p.dialing++
		p.mu.Unlock()

		conn, err := p.dial(ctx)

		p.mu.Lock()
		p.dialing--
		if p.dialed != nil {
			close(p.dialed)
			p.dialed = nil
		}
		if err != nil {
			p.mu.Unlock()
			if best != nil {
				return best, nil // a busy connection beats none
			}
			return nil, err
		}
		if p.closed {
			p.mu.Unlock()
			conn.Close()
			return nil, net.ErrClosed
		}
		pc := newPipeConn(conn)
		p.conns = append(p.conns, pc)
		p.wg.Go(func() { pc.readAnswers(p.idleTimeout) })
		p.mu.Unlock()
		return pc, nil
	}
}

// close closes every connection and waits for their readers.
func (p *tcpPool) close() {
	p.mu.Lock()
	p.closed = true
	for _, c := range p.conns {
		c.fail(net.ErrClosed)
	}
	p.conns = nil
	p.mu.Unlock()
	p.wg.Wait()
}

// pipeConn is one pipelined connection to a resolver.
type pipeConn struct {
	conn net.Conn

	// Writes are combined: a query appends its frame to wbuf, and whoever
	// finds no flush in progress writes everything queued, so under load
	// one write carries many queries.
	wmu      sync.Mutex
	wbuf     []byte
	spare    []byte
	flushing bool

	mu      sync.Mutex
	pending map[uint16]chan *dns.Msg
	nextID  uint16
	dead    error
}

func newPipeConn(c net.Conn) *pipeConn {
	return &pipeConn{conn: c, pending: make(map[uint16]chan *dns.Msg), nextID: uint16(time.Now().UnixNano())}
}

func (c *pipeConn) isDead() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.dead != nil
}

func (c *pipeConn) inFlight() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.pending)
}

// exchange writes q under a connection-unique ID and waits for the answer,
// which gets the client's ID back.
func (c *pipeConn) exchange(ctx context.Context, q *dns.Msg) (*dns.Msg, error) {
	ch := make(chan *dns.Msg, 1)
	c.mu.Lock()
	if c.dead != nil {
		c.mu.Unlock()
		return nil, errConnDead
	}
	if len(c.pending) >= 1<<16-1 {
		c.mu.Unlock()
		return nil, errors.New("dns over tcp: 65535 queries in flight on one connection")
	}
	id := c.nextID
	for {
		id++
		if _, used := c.pending[id]; !used {
			break
		}
	}
	c.nextID = id
	c.pending[id] = ch
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		delete(c.pending, id)
		c.mu.Unlock()
	}()

	wire, err := packWithID(q, id, nil)
	if err != nil {
		return nil, fmt.Errorf("packing query: %w", err)
	}
	if len(wire) > 0xFFFF {
		return nil, errors.New("dns over tcp: query larger than 65535 bytes")
	}
	if err := c.send(wire); err != nil {
		c.fail(err)
		return nil, errConnDead
	}
	select {
	case resp, ok := <-ch:
		if !ok {
			return nil, errConnDead
		}
		resp.Id = q.Id
		return resp, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
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

// send queues one framed query and flushes the queue unless another
// sender is already flushing (it will write this frame too).
func (c *pipeConn) send(wire []byte) error {
	c.wmu.Lock()
	c.wbuf = binary.BigEndian.AppendUint16(c.wbuf, uint16(len(wire)))
	c.wbuf = append(c.wbuf, wire...)
	if c.flushing {
		c.wmu.Unlock()
		return nil
	}
	c.flushing = true
	for len(c.wbuf) > 0 {
		buf := c.wbuf
		c.wbuf = c.spare[:0]
		c.wmu.Unlock()
		c.conn.SetWriteDeadline(time.Now().Add(writeTimeout))
		_, err := c.conn.Write(buf)
		c.wmu.Lock()
		c.spare = buf[:0]
		if err != nil {
			c.flushing = false
			c.wbuf = c.wbuf[:0]
			c.wmu.Unlock()
			return err
		}
	}
	c.flushing = false
	c.wmu.Unlock()
	return nil
}

// readAnswers dispatches answers by ID until the connection fails or has
// been idle (nothing in flight) for idle.
func (c *pipeConn) readAnswers(idle time.Duration) {
	var lenBuf [2]byte
	// Buffered: under load one read brings many answers.
	r := bufio.NewReaderSize(c.conn, 16<<10)
	for {
		// With nothing in flight, the read may time out: then the
		// connection has been idle long enough and is closed.
		if idle > 0 {
			c.conn.SetReadDeadline(time.Now().Add(idle))
		}
		resp, err := readTCPMessage(r, &lenBuf)
		if err != nil {
			if isTimeout(err) && c.inFlight() > 0 {
				continue // waiting on a slow answer is not idleness
			}
			c.fail(err)
			return
		}
		if resp == nil {
			continue // a malformed answer cannot be matched; its query times out
		}
		c.mu.Lock()
		ch, ok := c.pending[resp.Id]
		if ok {
			delete(c.pending, resp.Id)
		}
		c.mu.Unlock()
		if ok {
			ch <- resp
		}
	}
}

// readTCPMessage reads one length-prefixed DNS message (RFC 1035 §4.2.2).
// A message that does not parse is consumed and reported as (nil, nil):
// the stream stays in step. An error means the stream itself failed.
func readTCPMessage(r io.Reader, lenBuf *[2]byte) (*dns.Msg, error) {
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
	m := new(dns.Msg)
	if m.Unpack(buf) != nil {
		return nil, nil
	}
	return m, nil
}

// cut reports a stream that failed inside a message. It deliberately does
// not wrap err: a timeout there is not retryable (the stream is out of
// step), so it must not look like one.
func cut(err error) error {
	return fmt.Errorf("dns over tcp: message cut short: %v", err)
}

// fail marks the connection dead, closes it and wakes every waiting query.
func (c *pipeConn) fail(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.dead != nil {
		return
	}
	c.dead = err
	c.conn.Close()
	for id, ch := range c.pending {
		close(ch)
		delete(c.pending, id)
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
