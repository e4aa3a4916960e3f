package dnsforward

import (
	"bytes"
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"runtime"
	"sync"
	"syscall"

	"github.com/miekg/dns"

	"github.com/socksfwd/socksfwd/internal/udpbatch"
)

// UDP fast path sizes. A slot holds one query: the miekg/dns server read
// at most 512 bytes of one, so 1232 (the EDNS size that avoids
// fragmentation) is ample; a longer datagram is handled cut, as the
// miekg/dns server handled one over 512 (FORMERR, mostly).
const (
	udpBatchLen = 32
	udpSlotLen  = 1232
)

// udpFastPath serves the UDP socket in place of the miekg/dns server: it
// reads queries in batches (recvmmsg on Linux), answers the ones the cache
// holds at once from the reading goroutine (parsing only the question,
// copying the packed answer, writing the replies in batches), and hands
// every other query to a worker goroutine (see workers), which waits for
// its answer as the miekg/dns server's goroutine per query would. It
// serves only a socket bound to one address: replies then leave from the
// address the queries came to, which on a wildcard socket takes
// per-datagram control messages (the miekg/dns server keeps that case).
type udpFastPath struct {
	s       *Server
	pc      *net.UDPConn
	done    chan struct{}       // closed when serve has returned
	replies [udpBatchLen][]byte // per slot, grown as answers need
	to      [udpBatchLen]netip.AddrPort
	workers *workers    // serve the queries the cache cannot answer
	out     *replyQueue // the workers' replies
}

// newUDPFastPath returns the fast path for pc, or nil when pc is bound to
// a wildcard address.
func newUDPFastPath(s *Server, pc net.PacketConn) *udpFastPath {
	u, ok := pc.(*net.UDPConn)
	if !ok {
		return nil
	}
	local, ok := u.LocalAddr().(*net.UDPAddr)
	if !ok || local.IP.IsUnspecified() {
		return nil
	}
	return &udpFastPath{s: s, pc: u, done: make(chan struct{}), workers: newWorkers()}
}

// serve answers queries until the socket is closed, then waits for the
// queries handed on.
func (u *udpFastPath) serve() error {
	defer close(u.done)
	defer u.workers.stop()
	slots := make([][]byte, udpBatchLen)
	for i := range slots {
		slots[i] = make([]byte, udpSlotLen)
	}
	r, err := udpbatch.NewReader(u.pc, slots, 0, true)
	if err != nil {
		return closedIsDone(err)
	}
	w, err := udpbatch.NewWriter(u.pc, udpBatchLen)
	if err != nil {
		return closedIsDone(err)
	}
	workersW, err := udpbatch.NewWriter(u.pc, udpBatchLen)
	if err != nil {
		return closedIsDone(err)
	}
	u.out = newReplyQueue(workersW)
	stopReplies := make(chan struct{})
	var flusher sync.WaitGroup
	flusher.Go(func() { u.out.run(stopReplies) })
	defer func() {
		u.workers.stop() // no more replies
		close(stopReplies)
		flusher.Wait()
	}()
	for {
		n, err := r.Read()
		if err != nil {
			if transientReadError(err) {
				continue // as the miekg/dns server does
			}
			return closedIsDone(err)
		}
		queued := 0
		for i := range n {
			query, from, whole := r.Slot(i), r.Addr(i), !r.Truncated(i)
			if whole {
				if reply, ok := u.s.answerFromCache(u.replies[queued][:0], query, from); ok {
					u.replies[queued], u.to[queued] = reply, from
					queued++
					continue
				}
			}
			q := bytes.Clone(query)
			u.workers.run(func() { u.serveQuery(q, from, whole) })
		}
		sendAll(w, u.replies[:queued], u.to[:queued])
	}
}

// sendAll writes replies[i] to to[i] through w (made for udpBatchLen
// datagrams), a batch of udpBatchLen at a time; one that fails (a
// destination the kernel refuses) is skipped, the rest still go. Each
// batch is first put in order of client, and by size for each client,
// largest first: a run of equal sizes to one client is then one
// segmented send (UDP GSO), which on loopback costs the kernel little
// more than one datagram. UDP promises no order, and clients match
// replies by ID.
func sendAll(w *udpbatch.Writer, replies [][]byte, to []netip.AddrPort) {
	for len(replies) > 0 {
		n := min(len(replies), udpBatchLen)
		groupByClient(replies[:n], to[:n])
		for next := 0; next < n; {
			for i := next; i < n; i++ {
				w.Add(replies[i], to[i])
			}
			sent, err := w.Flush()
			next += sent
			if err != nil {
				next++ // the reply at next failed
			}
		}
		replies, to = replies[n:], to[n:]
	}
}

// groupByClient sorts replies (and to alike) by client, and by size,
// largest first, for each client; stable, and in place (a batch is at
// most udpBatchLen replies: insertion sort).
func groupByClient(replies [][]byte, to []netip.AddrPort) {
	before := func(i, j int) bool {
		if c := to[i].Compare(to[j]); c != 0 {
			return c < 0
		}
		return len(replies[i]) > len(replies[j])
	}
	for i := 1; i < len(replies); i++ {
		for j := i; j > 0 && before(j, j-1); j-- {
			replies[j], replies[j-1] = replies[j-1], replies[j]
			to[j], to[j-1] = to[j-1], to[j]
		}
	}
}

// replyQueue combines the workers' replies into batched writes, as the
// tcp transport combines queries: a worker queues a copy of its reply and
// goes on; the queue's own goroutine, woken by the first reply of a
// burst, yields once, so that the workers ready to run queue theirs, then
// writes everything queued. Answers come in bursts (one read from the
// resolver brings many), and a system call per reply cost a quarter of
// the CPU of a forwarded query. A worker never waits on a write, and
// none is held writing the others' replies.
type replyQueue struct {
	w    *udpbatch.Writer // run's
	kick chan struct{}    // a reply was queued

	mu     sync.Mutex
	queued replyBatch
	spare  replyBatch
}

// replyBatch is queued replies: their bytes one after another in data,
// each one's end in ends.
type replyBatch struct {
	data []byte
	ends []int
	to   []netip.AddrPort

	replies [][]byte // slices of data, built to write
}

func newReplyQueue(w *udpbatch.Writer) *replyQueue {
	return &replyQueue{w: w, kick: make(chan struct{}, 1)}
}

// write queues a copy of b for to.
func (q *replyQueue) write(b []byte, to netip.AddrPort) {
	q.mu.Lock()
	q.queued.data = append(q.queued.data, b...)
	q.queued.ends = append(q.queued.ends, len(q.queued.data))
	q.queued.to = append(q.queued.to, to)
	q.mu.Unlock()
	select {
	case q.kick <- struct{}{}:
	default: // already woken
	}
}

// run writes the replies queued until stop is closed, then those still
// queued, and returns.
func (q *replyQueue) run(stop <-chan struct{}) {
	for {
		select {
		case <-q.kick:
			runtime.Gosched()
			q.flush()
		case <-stop:
			q.flush()
			return
		}
	}
}

// flush writes everything queued, including what is queued meanwhile.
func (q *replyQueue) flush() {
	q.mu.Lock()
	defer q.mu.Unlock()
	for len(q.queued.ends) > 0 {
		batch := q.queued
		q.queued = q.spare
		q.mu.Unlock()
		batch.replies = batch.replies[:0]
		start := 0
		for _, end := range batch.ends {
			batch.replies = append(batch.replies, batch.data[start:end:end])
			start = end
		}
		sendAll(q.w, batch.replies, batch.to)
		q.mu.Lock()
		q.spare = replyBatch{}
		if cap(batch.data) <= keptWriteBuffer { // a burst's buffers do not stay
			q.spare = replyBatch{data: batch.data[:0], ends: batch.ends[:0], to: batch.to[:0], replies: batch.replies[:0]}
		}
	}
}

// transientReadError reports whether a failed read leaves the socket
// usable: an ICMP error from an earlier reply (connection refused), an
// interrupted call, or a moment without memory or buffers.
func transientReadError(err error) bool {
	for _, e := range []syscall.Errno{syscall.ECONNREFUSED, syscall.EINTR, syscall.ENOBUFS, syscall.ENOMEM, syscall.EAGAIN} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// closedIsDone: the socket closed, or its read deadline set in the past
// (Shutdown stops the reader so, and answers what it read): the end.
func closedIsDone(err error) error {
	if errors.Is(err, net.ErrClosed) || errors.Is(err, os.ErrDeadlineExceeded) {
		return nil
	}
	return err
}

// wait waits until serve has returned (or ctx is done) when it started.
func (u *udpFastPath) wait(ctx context.Context) error {
	select {
	case <-u.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// serveQuery handles a query the cache did not answer: a plain one, read
// whole, by the forwarder's wire path, anything else by serveMessage.
func (u *udpFastPath) serveQuery(q []byte, from netip.AddrPort, whole bool) {
	w := &udpResponse{pc: u.pc, to: from, out: u.out}
	if whole && len(q) >= headerLen && u.s.serveWire(w, q, from) {
		return
	}
	u.s.serveMessage(w, q)
}

// udpResponse is the dns.ResponseWriter of a query that came by the fast
// path's socket. Its replies go through the fast path's replyQueue, so a
// write reports no error: a reply the kernel refuses is dropped, as a
// datagram lost on the way would be.
type udpResponse struct {
	pc  *net.UDPConn
	to  netip.AddrPort
	out *replyQueue
}

func (w *udpResponse) LocalAddr() net.Addr  { return w.pc.LocalAddr() }
func (w *udpResponse) RemoteAddr() net.Addr { return net.UDPAddrFromAddrPort(w.to) }
func (w *udpResponse) WriteMsg(m *dns.Msg) error {
	b, err := m.Pack()
	if err != nil {
		return err
	}
	_, err = w.Write(b)
	return err
}
func (w *udpResponse) Write(b []byte) (int, error) {
	w.out.write(b, w.to)
	return len(b), nil
}
func (w *udpResponse) Close() error        { return nil }
func (w *udpResponse) TsigStatus() error   { return nil }
func (w *udpResponse) TsigTimersOnly(bool) {}
func (w *udpResponse) Hijack()             {}
