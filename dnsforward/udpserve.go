package dnsforward

import (
	"bytes"
	"context"
	"errors"
	"net"
	"net/netip"
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
// every other query to Server.ServeDNS in a goroutine of its own, as the
// miekg/dns server would. It serves only a socket bound to one address:
// replies then leave from the address the queries came to, which on a
// wildcard socket takes per-datagram control messages (the miekg/dns
// server keeps that case).
type udpFastPath struct {
	s        *Server
	pc       *net.UDPConn
	done     chan struct{} // closed when serve has returned
	handlers sync.WaitGroup
	replies  [udpBatchLen][]byte // per slot, grown as answers need
	to       [udpBatchLen]netip.AddrPort
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
	return &udpFastPath{s: s, pc: u, done: make(chan struct{})}
}

// serve answers queries until the socket is closed, then waits for the
// queries handed on.
func (u *udpFastPath) serve() error {
	defer close(u.done)
	defer u.handlers.Wait()
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
			u.handlers.Go(func() { u.serveQuery(q, from, whole) })
		}
		u.send(w, queued)
	}
}

// send writes the first n replies; one that fails (a destination the
// kernel refuses) is skipped, the rest still go.
func (u *udpFastPath) send(w *udpbatch.Writer, n int) {
	for next := 0; next < n; {
		for i := next; i < n; i++ {
			w.Add(u.replies[i], u.to[i])
		}
		sent, err := w.Flush()
		next += sent
		if err != nil {
			next++ // the reply at next failed
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

func closedIsDone(err error) error {
	if errors.Is(err, net.ErrClosed) {
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
	w := &udpResponse{pc: u.pc, to: from}
	if whole && len(q) >= headerLen && u.s.serveWire(w, q, from) {
		return
	}
	u.s.serveMessage(w, q)
}

// udpResponse is the dns.ResponseWriter of a query that came by the fast
// path's socket.
type udpResponse struct {
	pc *net.UDPConn
	to netip.AddrPort
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
func (w *udpResponse) Write(b []byte) (int, error) { return w.pc.WriteToUDPAddrPort(b, w.to) }
func (w *udpResponse) Close() error                { return nil }
func (w *udpResponse) TsigStatus() error           { return nil }
func (w *udpResponse) TsigTimersOnly(bool)         {}
func (w *udpResponse) Hijack()                     {}
