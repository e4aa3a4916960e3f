package dnsforward

import (
	"encoding/binary"
	"net"
	"runtime"
	"sync"
	"time"
)

// keptWriteBuffer is the largest write buffer kept for reuse (by a
// streamWriter, or the UDP replies' queue): one large message, or one
// burst, should not stay with the connection.
const keptWriteBuffer = 64 << 10

// streamWriter writes DNS messages, each behind its length (RFC 1035
// §4.2.2), to a TCP stream shared by several goroutines, and combines
// them: a message is queued, and the sender that finds no flush under
// way yields once, so that the goroutines ready to run queue theirs
// behind it, then writes everything queued in one call (and again for
// what came meanwhile). Queries and answers come in bursts, one read
// brings several, and a write to a loopback peer costs several times
// what the yield does; with nothing else ready, the yield returns at once.
type streamWriter struct {
	conn    net.Conn
	timeout time.Duration // for each write

	mu       sync.Mutex
	queued   []byte
	spare    []byte
	flushing bool
	err      error // the stream failed: nothing more is written
}

// write queues msg, under id when withID (msg itself is left as it is),
// and flushes unless another sender is flushing. An error means the
// stream failed, in this flush or an earlier one; a message queued
// behind another sender's flush reports nil and, should that flush
// fail, is lost with the stream (whose owner fails every message on it).
func (s *streamWriter) write(msg []byte, id uint16, withID bool) error {
	s.mu.Lock()
	if s.err != nil {
		defer s.mu.Unlock()
		return s.err
	}
	s.queued = binary.BigEndian.AppendUint16(s.queued, uint16(len(msg)))
	start := len(s.queued)
	s.queued = append(s.queued, msg...)
	if withID {
		binary.BigEndian.PutUint16(s.queued[start:], id)
	}
	if s.flushing {
		s.mu.Unlock()
		return nil
	}
	s.flushing = true
	s.mu.Unlock()
	runtime.Gosched()
	s.mu.Lock()
	defer s.mu.Unlock()
	for len(s.queued) > 0 && s.err == nil {
		buf := s.queued
		s.queued = s.spare[:0]
		s.mu.Unlock()
		s.conn.SetWriteDeadline(time.Now().Add(s.timeout))
		_, err := s.conn.Write(buf)
		s.mu.Lock()
		s.spare = nil
		if cap(buf) <= keptWriteBuffer {
			s.spare = buf[:0]
		}
		s.err = err
	}
	s.queued = s.queued[:0]
	s.flushing = false
	return s.err
}
