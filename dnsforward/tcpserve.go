package dnsforward

import (
	"bufio"
	"context"
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
	// once; the next is read when one is done, its answer written, so a
	// client that sends more, or reads slowly, is slowed by TCP rather
	// than by queries or answers waiting in memory.
	tcpPipeline = 32
	// tcpMaxClients is how many clients are served at once; the next is
	// accepted when one leaves, and waits in the listen backlog until then
	// (as with dnsmasq, which serves a few TCP clients at a time). Each
	// holds a descriptor, a goroutine and a buffer, and up to tcpPipeline
	// queries: without a bound, one program opening connections would
	// take memory and descriptors from every listener of the process.
	tcpMaxClients = 1024
)

// tcpServer accepts DNS-over-TCP clients and answers each connection's
// queries concurrently, each answer written (length first) as soon as it
// is ready, in one write with the others ready then (streamWriter):
// answers may leave in another order than their queries came, which RFC
// 7766 allows and clients match by ID.
type tcpServer struct {
	ln      net.Listener
	serve   func(w dns.ResponseWriter, q []byte) // answers one query's bytes
	workers *workers                             // answer every client's queries

	room   chan struct{} // a token per client served (tcpMaxClients)
	onFull func()        // told when a client waits for room

	mu       sync.Mutex
	conns    map[net.Conn]struct{}
	stopped  bool
	stopping chan struct{} // closed when shutdown has stopped the readers
	clients  sync.WaitGroup
}

func newTCPServer(ln net.Listener, serve func(dns.ResponseWriter, []byte), maxClients int, onFull func()) *tcpServer {
	return &tcpServer{ln: ln, serve: serve, workers: newWorkers(), room: make(chan struct{}, maxClients), onFull: onFull,
		conns: make(map[net.Conn]struct{}), stopping: make(chan struct{})}
}

// run accepts clients until the listener is closed, as many at once as
// there is room for.
func (t *tcpServer) run() error {
	var delay time.Duration
	for {
		select {
		case t.room <- struct{}{}:
		default:
			t.onFull()
			select {
			case t.room <- struct{}{}:
			case <-t.stopping:
				return nil
			}
		}
		c, err := t.ln.Accept()
		if err != nil {
			<-t.room
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
		go func() {
			defer t.clients.Done()
			defer func() { <-t.room }()
			defer t.untrack(c)
			newTCPClient(c, t.serve, t.workers.run, t.armRead).run()
		}()
	}
}

func (t *tcpServer) isStopped() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.stopped
}

// track registers a client, counted in clients under the same lock
// shutdown takes, so that shutdown either sees it or refuses it.
func (t *tcpServer) track(c net.Conn) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.stopped {
		return false
	}
	t.conns[c] = struct{}{}
	t.clients.Add(1)
	return true
}

// armRead gives c's next read until d from now (no deadline for 0),
// unless the server is stopping: its past deadline must not be
// overwritten, or the reader would hold Shutdown until the client spoke.
func (t *tcpServer) armRead(c net.Conn, d time.Duration) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.stopped {
		return false
	}
	var deadline time.Time
	if d > 0 {
		deadline = time.Now().Add(d)
	}
	c.SetReadDeadline(deadline)
	return true
}

func (t *tcpServer) untrack(c net.Conn) {
	t.mu.Lock()
	delete(t.conns, c)
	t.mu.Unlock()
}

// shutdown stops accepting and reading: the queries already read are
// answered until ctx is done; then every connection is closed and
// shutdown returns without waiting for the answers still due, which wait
// on the forwarder: the caller closes it, then calls wait.
func (t *tcpServer) shutdown(ctx context.Context) error {
	t.mu.Lock()
	for c := range t.conns {
		c.SetReadDeadline(aLongTimeAgo) // the reader stops; answers still go out
	}
	if !t.stopped {
		t.stopped = true
		close(t.stopping) // once no reader takes another query
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
	return ctx.Err()
}

// wait waits until every client's goroutines have ended, and the workers.
func (t *tcpServer) wait() {
	t.clients.Wait()
	t.workers.stop()
}

// aLongTimeAgo is a deadline in the past: a read waiting on it returns.
var aLongTimeAgo = time.Unix(1, 0)

// tcpClient is one DNS-over-TCP connection.
type tcpClient struct {
	conn    net.Conn
	serve   func(dns.ResponseWriter, []byte)
	runTask func(func()) // on a worker
	arm     func(net.Conn, time.Duration) bool
	slots   chan struct{} // a token per query being answered
	answers sync.WaitGroup

	// mu orders the read deadline's changes with pending: a client with
	// answers due has no deadline; the last answer starts the idle time.
	mu      sync.Mutex
	pending int

	w *streamWriter // combines the answers' writes
}

// newTCPClient serves c, answering each query by serve on a task given
// to runTask; arm sets its read deadline, or refuses once the server is
// stopping (tcpServer.armRead).
func newTCPClient(c net.Conn, serve func(dns.ResponseWriter, []byte), runTask func(func()), arm func(net.Conn, time.Duration) bool) *tcpClient {
	return &tcpClient{conn: c, serve: serve, runTask: runTask, arm: arm, slots: make(chan struct{}, tcpPipeline),
		w: &streamWriter{conn: c, timeout: tcpWriteTimeout, waits: true}}
}

// run reads queries until the client closes or stays idle too long,
// answers each on a worker, and closes the connection once
// every answer is written. Idle means nothing asked and nothing being
// answered: a client waiting for an answer is not timed out, and may
// send more queries meanwhile.
func (cl *tcpClient) run() {
	defer cl.conn.Close()
	defer cl.answers.Wait()
	// Buffered: pipelined queries arrive several to a segment.
	r := bufio.NewReaderSize(cl.conn, 4096)
	var lenBuf [2]byte
	// The whole first query is due within tcpFirstReadTimeout, as with the
	// miekg/dns server; after each query, the deadline is set again.
	if !cl.armIdle(tcpFirstReadTimeout) {
		return // shutting down
	}
	for {
		q, err := readTCPFrame(r, &lenBuf)
		if err != nil {
			// Nothing read, and answers are due: not idle.
			if isTimeout(err) && cl.busy() && cl.armIdle(tcpIdleTimeout) {
				continue
			}
			return
		}
		cl.slots <- struct{}{}
		cl.start()
		// The deadline is armed after each query rather than before the
		// next read, so that a query read as Shutdown stopped the readers
		// is seen, and not taken.
		if !cl.armIdle(tcpIdleTimeout) {
			cl.done()
			<-cl.slots
			return
		}
		cl.answers.Add(1)
		cl.runTask(func() {
			defer cl.answers.Done()
			defer func() { <-cl.slots }()
			defer cl.done()
			cl.serve(&tcpResponse{cl: cl}, q)
		})
	}
}

// armIdle gives the next read d when no answer is due, and no deadline
// while one is (the last answer arms it then). false: shutting down.
func (cl *tcpClient) armIdle(d time.Duration) bool {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	if cl.pending > 0 {
		d = 0
	}
	return cl.arm(cl.conn, d)
}

func (cl *tcpClient) start() {
	cl.mu.Lock()
	cl.pending++
	cl.mu.Unlock()
}

// done ends one answer; the last one due starts the idle time.
func (cl *tcpClient) done() {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	if cl.pending--; cl.pending == 0 {
		cl.arm(cl.conn, tcpIdleTimeout)
	}
}

func (cl *tcpClient) busy() bool {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	return cl.pending > 0
}

// write sends one message, its length first, combined with the answers
// written meanwhile (see streamWriter). A failed or timed-out write
// closes the connection: the client has gone or does not read, and the
// reader must not take more queries from it.
func (cl *tcpClient) write(b []byte) (int, error) {
	if len(b) > dns.MaxMsgSize {
		return 0, dns.ErrBuf
	}
	if err := cl.w.write(b, 0, false); err != nil {
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
