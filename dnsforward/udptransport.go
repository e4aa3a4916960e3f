package dnsforward

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/miekg/dns"

	"github.com/socksfwd/socksfwd/socksclient"
)

// udpTransport sends queries as datagrams through one long-lived UDP
// ASSOCIATE shared by every query and resolver; answers are matched by ID
// and question. When the proxy ends the association, the next query
// builds a new one.
type udpTransport struct {
	associate func(ctx context.Context) (*socksclient.UDPConn, error)

	assocMu sync.Mutex // one association handshake at a time

	mu      sync.Mutex
	conn    *socksclient.UDPConn
	pending map[udpKey]chan *dns.Msg
	nextID  uint16
	closed  bool
	wg      sync.WaitGroup
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

func newUDPTransport(associate func(ctx context.Context) (*socksclient.UDPConn, error)) *udpTransport {
	return &udpTransport{associate: associate, pending: make(map[udpKey]chan *dns.Msg), nextID: uint16(time.Now().UnixNano())}
}

// errNoUDPAssociate wraps a proxy without UDP ASSOCIATE with the advice to
// use the TCP transport.
type errNoUDPAssociate struct{ err error }

func (e errNoUDPAssociate) Error() string {
	return e.err.Error() + "; this proxy cannot carry DNS over UDP: use --dns-transport tcp"
}
func (e errNoUDPAssociate) Unwrap() error { return e.err }

// live returns the current association if it stands.
func (t *udpTransport) live() (*socksclient.UDPConn, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil, errors.New("dnsforward: closed")
	}
	if t.conn != nil && t.conn.Alive() {
		return t.conn, nil
	}
	return nil, nil
}

// getConn returns the live association, building one if needed; queries
// arriving meanwhile wait for that one instead of associating each.
func (t *udpTransport) getConn(ctx context.Context) (*socksclient.UDPConn, error) {
	if c, err := t.live(); c != nil || err != nil {
		return c, err
	}
	t.assocMu.Lock()
	defer t.assocMu.Unlock()
	if c, err := t.live(); c != nil || err != nil {
		return c, err
	}
	c, err := t.associate(ctx)
	if err != nil {
		if errors.Is(err, socksclient.ErrCommandNotSupported) {
			return nil, errNoUDPAssociate{err}
		}
		return nil, err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		c.Close()
		return nil, errors.New("dnsforward: closed")
	}
	if t.conn != nil {
		t.conn.Close()
	}
	t.conn = c
	t.wg.Go(func() { t.readAnswers(c) })
	return c, nil
}

func keyFor(id uint16, q dns.Question) udpKey {
	return udpKey{id: id, name: strings.ToLower(q.Name), qtype: q.Qtype}
}

// exchange sends q to resolver and waits for the matching answer.
func (t *udpTransport) exchange(ctx context.Context, resolver socksclient.Addr, q *dns.Msg) (*dns.Msg, error) {
	if len(q.Question) != 1 {
		return nil, errors.New("dns over udp: a query needs exactly one question to be matched")
	}
	c, err := t.getConn(ctx)
	if err != nil {
		return nil, err
	}
	ch := make(chan *dns.Msg, 1)
	t.mu.Lock()
	var key udpKey
	for {
		t.nextID++
		key = keyFor(t.nextID, q.Question[0])
		if _, used := t.pending[key]; !used {
			break
		}
	}
	t.pending[key] = ch
	t.mu.Unlock()
	defer func() {
		t.mu.Lock()
		delete(t.pending, key)
		t.mu.Unlock()
	}()

	// Packed straight after the SOCKS header's room; a query too large for
	// the usual buffer is copied into a larger one.
	const hdr = socksclient.MaxUDPHeaderLen
	buf := make([]byte, hdr+udpQueryRoom)
	wire, err := packWithID(q, key.id, buf[hdr:])
	if err != nil {
		return nil, fmt.Errorf("packing query: %w", err)
	}
	if len(wire) > 0 && &wire[0] != &buf[hdr] {
		buf = append(make([]byte, hdr, hdr+len(wire)), wire...)
	}
	if err := c.WritePacket(buf[:hdr+len(wire)], hdr, resolver); err != nil {
		return nil, err
	}
	select {
	case resp := <-ch:
		resp.Id = q.Id
		return resp, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// readAnswers delivers answers from one association until it ends.
func (t *udpTransport) readAnswers(c *socksclient.UDPConn) {
	buf := make([]byte, socksclient.MaxUDPDatagram)
	for {
		off, n, _, err := c.ReadPacket(buf)
		if err != nil {
			return // closed or ended by the proxy: the next query re-associates
		}
		resp := new(dns.Msg)
		if resp.Unpack(buf[off:n]) != nil || len(resp.Question) != 1 {
			continue // unmatchable; its query times out
		}
		key := keyFor(resp.Id, resp.Question[0])
		t.mu.Lock()
		ch, ok := t.pending[key]
		if ok {
			delete(t.pending, key)
		}
		t.mu.Unlock()
		if ok {
			ch <- resp
		}
	}
}

func (t *udpTransport) close() {
	t.mu.Lock()
	t.closed = true
	if t.conn != nil {
		t.conn.Close()
	}
	t.mu.Unlock()
	t.wg.Wait()
}
