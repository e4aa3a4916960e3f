// Package udpbatch moves many UDP datagrams per system call: recvmmsg to
// read a batch, sendmmsg to write one, and UDP generic segmentation
// offload (UDP_SEGMENT) to send a run of equal-sized datagrams to one
// peer as a single packet through the stack. A relay on loopback spends
// most of its time in the kernel per datagram and per system call; both
// shrink when the work is batched.
//
// Readers and Writers own preallocated message headers, so a batch costs
// no allocation. Each is used by one goroutine at a time.
//
// Those system calls are Linux's. Elsewhere Reader and Writer have the
// same methods and meaning but move one datagram per system call, through
// the net package: correct everywhere, only slower.
package udpbatch

import (
	"errors"
	"net"
	"net/netip"
)

// portableReader is the Reader outside Linux: one datagram per Read,
// into the first slot. It is compiled everywhere so that Linux tests
// exercise it too.
type portableReader struct {
	c        *net.UDPConn
	slot     []byte
	headroom int
	wantAddr bool
	// The datagram of the last Read.
	n     int
	trunc bool
	addr  netip.AddrPort
}

func newPortableReader(c *net.UDPConn, slots [][]byte, headroom int, wantAddr bool) (*portableReader, error) {
	if len(slots) == 0 || len(slots[0]) <= headroom {
		return nil, errors.New("udpbatch: no slot with room past the headroom")
	}
	return &portableReader{c: c, slot: slots[0], headroom: headroom, wantAddr: wantAddr}, nil
}

// Read waits for a datagram and returns 1.
func (r *portableReader) Read() (int, error) {
	b := r.slot[r.headroom:]
	n, _, flags, from, err := r.c.ReadMsgUDPAddrPort(b, nil)
	if err != nil {
		if !isMsgSize(err) {
			return 0, err
		}
		// Windows reports a datagram longer than the buffer as an error
		// after filling the buffer (and gives no source).
		flags |= msgTrunc
	}
	r.n, r.trunc = min(max(n, 0), len(b)), flags&msgTrunc != 0
	if r.wantAddr {
		r.addr = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
	}
	return 1, nil
}

// Slot is the datagram's whole slot: headroom, then the payload.
func (r *portableReader) Slot(int) []byte { return r.slot[:r.headroom+r.n] }

// Len is the payload length of the datagram.
func (r *portableReader) Len(int) int { return r.n }

// Truncated reports whether the datagram was longer than its slot.
func (r *portableReader) Truncated(int) bool { return r.trunc }

// Addr is the datagram's source, IPv4-mapped addresses unmapped.
func (r *portableReader) Addr(int) netip.AddrPort { return r.addr }

// portableWriter is the Writer outside Linux: Flush sends the queued
// datagrams one system call each.
type portableWriter struct {
	c     *net.UDPConn
	bufs  [][]byte
	dests []netip.AddrPort // zero: connected
	n     int
}

func newPortableWriter(c *net.UDPConn, size int) (*portableWriter, error) {
	return &portableWriter{c: c, bufs: make([][]byte, size), dests: make([]netip.AddrPort, size)}, nil
}

// SetSource asks for datagrams to leave from src; the portable writer
// cannot say so, and leaves it to the route.
func (w *portableWriter) SetSource(netip.Addr) {}

// Len is the number of queued datagrams.
func (w *portableWriter) Len() int { return w.n }

// Full reports whether the queue has no room left.
func (w *portableWriter) Full() bool { return w.n == len(w.bufs) }

// Add queues b for to (the zero AddrPort on a connected socket). b must
// stay untouched until Flush returns. Add on a full Writer panics.
func (w *portableWriter) Add(b []byte, to netip.AddrPort) {
	w.bufs[w.n], w.dests[w.n] = b, to
	w.n++
}

// Flush sends the queued datagrams in order and empties the queue. It
// stops at the first datagram that fails, so the datagrams that went are
// always the first sent queued: the one at index sent failed with err, and
// those after it were not tried.
func (w *portableWriter) Flush() (sent int, err error) {
	defer func() {
		clear(w.bufs[:w.n]) // hold no caller's buffer past Flush
		w.n = 0
	}()
	for i := range w.n {
		var e error
		if w.dests[i].IsValid() {
			_, e = w.c.WriteToUDPAddrPort(w.bufs[i], w.dests[i])
		} else {
			_, e = w.c.Write(w.bufs[i])
		}
		if e != nil {
			return sent, e
		}
		sent++
	}
	return sent, nil
}
