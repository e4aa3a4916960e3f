package dnsforward

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"net"
	"sync"
	"time"

	"github.com/miekg/dns"
)

// DNS over TCP, served in place of the miekg/dns server, whose loop answers
// one query per connection at a time: a client that sends several queries
// without waiting (RFC 7766 pipelining: systemd-resolved, unbound's
// upstream streams, glibc's A and AAAA with use-vc) had each one wait for
// the upstream round trip of every query before it, so one slow name held
// up every name behind it.
const (
	// tcpFirstReadTimeout and tcpIdleTimeout are the miekg/dns server's:
	// a client has this long for its first query, then between queries
	// while none is being answered.
	tcpFirstReadTimeout = 2 * time.Second
	tcpIdleTimeout      = 8 * time.Second
	// tcpWriteTimeout bounds each answer's write, so that a client that
	// stops reading cannot hold the answers of others.
	tcpWriteTimeout = 2 * time.Second
	// tcpPipeline is how many of one connection's queries are answered at
	// once; the next is read when one is done, so a client that sends more
	// is slowed by TCP rather than by queries waiting in memory.
	tcpPipeline = 32
)

// tcpServer accepts DNS-over-TCP clients and answers each connection's
// queries concurrently, each answer written (length first, in one write)
// as soon as it is ready: answers may leave in another order than their
// queries came, which RFC 7766 allows and clients match by ID.
type tcpServer struct {
	ln    net.Listener
	serve func(w dns.ResponseWriter, q []byte) // answers one query's bytes

	mu       sync.Mutex
	conns    map[net.Conn]struct{}
	stopped  bool
	stopping chan struct{} // closed when shutdown begins
	clients  sync.WaitGroup
}

func newTCPServer(ln net.Listener, serve func(dns.ResponseWriter, []byte)) *tcpServer {
	return &tcpServer{ln: ln, serve: serve, conns: make(map[net.Conn]struct{}), stopping: make(chan struct{})}
}

// run accepts clients until the listener is closed.
func (t *tcpServer) run() error {
	var delay time.Duration
	for {
		c, err := t.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) || t.isStopped() {
				return nil
			}
			// Out of descriptors and the like: back off, keep serving.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			time.Sleep(delay)
			continue
		}
		delay = 0
		if !t.track(c) {
			c.Close()
			return nil
		}
		t.clients.Go(func() {
			defer t.untrack(c)
			newTCPClient(c, t.serve).run(t.armRead)
		})
	}
}

func (t *tcpServer) isStopped() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.stopped
}

func (t *tcpServer) track(c net.Conn) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.stopped {
		return false
	}
	t.conns[c] = struct{}{}
	return true
}

// armRead gives c's next read until d from now, unless the server is
// stopping: its past deadline must not be overwritten, or the reader
// would hold Shutdown until the client spoke.
func (t *tcpServer) armRead(c net.Conn, d time.Duration) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.stopped {
		return false
	}
	c.SetReadDeadline(time.Now().Add(d))
	return true
}

func (t *tcpServer) untrack(c net.Conn) {
	t.mu.Lock()
	delete(t.conns, c)
	t.mu.Unlock()
}

// shutdown stops accepting and reading: the queries already read are
// answered until ctx is done, then every connection is closed.
func (t *tcpServer) shutdown(ctx context.Context) error {
	t.mu.Lock()
	if !t.stopped {
		t.stopped = true
		close(t.stopping)
	}
	for c := range t.conns {
		c.SetReadDeadline(aLongTimeAgo) // the reader stops; answers still go out
	}
	t.mu.Unlock()
	t.ln.Close()
	done := make(chan struct{})
	go func() { t.clients.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
	}
	t.mu.Lock()
	for c := range t.conns {
		c.Close()
	}
	t.mu.Unlock()
	<-done // the writes fail at once now
	return ctx.Err()
}

// aLongTimeAgo is a deadline in the past: a read waiting on it returns.
var aLongTimeAgo = time.Unix(1, 0)

// tcpClient is one DNS-over-TCP connection.
type tcpClient struct {
	conn    net.Conn
	serve   func(dns.ResponseWriter, []byte)
	slots   chan struct{} // a token per query being answered
	answers sync.WaitGroup

	wmu  sync.Mutex
	wbuf []byte // the length and the answer, written in one call
}

func newTCPClient(c net.Conn, serve func(dns.ResponseWriter, []byte)) *tcpClient {
	return &tcpClient{conn: c, serve: serve, slots: make(chan struct{}, tcpPipeline)}
}

// run reads queries until the client closes or stays idle too long,
// answers each on a goroutine of its own, and closes the connection once
// every answer is written. Idle means nothing asked and nothing being
// answered: a client waiting for an answer is not timed out.
func (cl *tcpClient) run(arm func(net.Conn, time.Duration) bool) {
	defer cl.conn.Close()
	defer cl.answers.Wait()
	// Buffered: pipelined queries arrive several to a segment.
	r := bufio.NewReaderSize(cl.conn, 4096)
	var lenBuf [2]byte
	timeout := tcpFirstReadTimeout
	for {
		if !arm(cl.conn, timeout) {
			return // shutting down
		}
		if _, err := r.Peek(1); err != nil {
			if isTimeout(err) && cl.busy() {
				cl.answers.Wait()
				continue
			}
			return
		}
		// A query has begun: the rest of it is due within the idle time.
		if !arm(cl.conn, tcpIdleTimeout) {
			return
		}
		q, err := readTCPFrame(r, &lenBuf)
		if err != nil {
			return
		}
		timeout = tcpIdleTimeout
		cl.slots <- struct{}{}
		cl.answers.Go(func() {
			defer func() { <-cl.slots }()
			cl.serve(&tcpResponse{cl: cl}, q)
		})
	}
}

// busy reports whether an answer is due.
func (cl *tcpClient) busy() bool { return len(cl.slots) > 0 }

// write sends one message, its length first, in one write. A failed or
// timed-out write closes the connection: the client has gone or does not
// read, and the reader must not take more queries from it.
func (cl *tcpClient) write(b []byte) (int, error) {
	if len(b) > dns.MaxMsgSize {
		return 0, dns.ErrBuf
	}
	cl.wmu.Lock()
	defer cl.wmu.Unlock()
	cl.wbuf = binary.BigEndian.AppendUint16(cl.wbuf[:0], uint16(len(b)))
	cl.wbuf = append(cl.wbuf, b...)
	cl.conn.SetWriteDeadline(time.Now().Add(tcpWriteTimeout))
	if _, err := cl.conn.Write(cl.wbuf); err != nil {
		cl.conn.Close()
		return 0, err
	}
	return len(b), nil
}

// tcpResponse is the dns.ResponseWriter of one query that came over TCP.
type tcpResponse struct{ cl *tcpClient }

func (w *tcpResponse) LocalAddr() net.Addr  { return w.cl.conn.LocalAddr() }
func (w *tcpResponse) RemoteAddr() net.Addr { return w.cl.conn.RemoteAddr() }
func (w *tcpResponse) WriteMsg(m *dns.Msg) error {
	b, err := m.Pack()
	if err != nil {
		return err
	}
	_, err = w.cl.write(b)
	return err
}
func (w *tcpResponse) Write(b []byte) (int, error) { return w.cl.write(b) }
func (w *tcpResponse) Close() error                { return w.cl.conn.Close() }
func (w *tcpResponse) TsigStatus() error           { return nil }
func (w *tcpResponse) TsigTimersOnly(bool)         {}
func (w *tcpResponse) Hijack()                     {}
