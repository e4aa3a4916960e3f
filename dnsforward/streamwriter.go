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
// them: a message is queued, and a sender that finds no write under way
// takes everything queued and writes it in one call; it yields once
// before, so that the goroutines ready to run queue theirs behind it.
// Queries and answers come in bursts, one read brings several, and a
// write to a loopback peer costs several times what the yield does; with
// nothing else ready, the yield returns at once.
//
// With waits set, a sender returns once its message is written (or the
// stream failed): the messages queued behind a write wait, and one of
// their senders writes them all next. So a peer that reads slowly holds
// the senders, and through them whatever bounds them (the DNS server's
// queries in flight per connection), not a growing queue; and no sender
// writes more than one batch. Without it, a sender that finds a write
// under way returns at once, and the writer goes on until nothing is
// queued: for senders bounded otherwise (a resolver connection's
// pipeline) that wait on something else anyway (the answer).
type streamWriter struct {
	conn    net.Conn
	timeout time.Duration // for each write
	waits   bool

	mu      sync.Mutex
	cond    sync.Cond // on mu: a write ended
	queued  []byte
	spare   []byte
	writing bool
	batches uint64 // taken to write, so far
	written uint64 // written whole, of those (the stream fails at the first that is not)
	err     error  // the stream failed: nothing more is written
}

// write queues msg, under id when withID (msg itself is left as it is),
// and returns once it is written, or (without waits) handed to the write
// under way. An error means the stream failed, in the write that carried
// msg or an earlier one; without waits, also in a later batch this sender
// went on to write: its senders had been told their messages were on the
// way, and only this error tells the stream's owner to fail what was on
// it (they would wait out their deadlines on a stream that sends nothing).
func (s *streamWriter) write(msg []byte, id uint16, withID bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cond.L == nil {
		s.cond.L = &s.mu
	}
	if s.err != nil {
		return s.err
	}
	s.queued = binary.BigEndian.AppendUint16(s.queued, uint16(len(msg)))
	start := len(s.queued)
	s.queued = append(s.queued, msg...)
	if withID {
		binary.BigEndian.PutUint16(s.queued[start:], id)
	}
	mine := s.batches + 1 // the next batch taken carries msg
	yielded, wroteFailed := false, false
	for s.err == nil && (s.written < mine || !s.waits && len(s.queued) > 0) {
		if s.writing {
			if !s.waits {
				return nil // the writer under way writes it
			}
			s.cond.Wait()
			continue
		}
		s.writing = true
		if !yielded {
			yielded = true
			s.mu.Unlock()
			runtime.Gosched()
			s.mu.Lock()
		}
		s.writeBatch()
		wroteFailed = s.err != nil
	}
	if s.written >= mine && !wroteFailed {
		return nil
	}
	return s.err
}

// writeBatch writes everything queued, in one call without s.mu held,
// and wakes the senders waiting. Called with s.mu held and s.writing set.
func (s *streamWriter) writeBatch() {
	buf := s.queued
	s.queued = s.spare[:0]
	s.batches++
	s.mu.Unlock()
	s.conn.SetWriteDeadline(time.Now().Add(s.timeout))
	_, err := s.conn.Write(buf)
	s.mu.Lock()
	s.spare = nil
	if cap(buf) <= keptWriteBuffer {
		s.spare = buf[:0]
	}
	if err != nil {
		s.err = err
		s.queued = nil
	} else {
		s.written = s.batches
	}
	s.writing = false
	s.cond.Broadcast()
}
