package dnsforward

import (
	"bytes"
	"errors"
	"net"
	"testing"
	"time"
)

// recordingConn records each Write; it fails every write with err when
// set.
type recordingConn struct {
	net.Conn // nil: only the methods below are used
	writes   [][]byte
	err      error
}

func (c *recordingConn) Write(b []byte) (int, error) {
	c.writes = append(c.writes, bytes.Clone(b))
	if c.err != nil {
		return 0, c.err
	}
	return len(b), nil
}

func (c *recordingConn) SetWriteDeadline(time.Time) error { return nil }

// TestStreamWriterCombines: messages queued while a flush is under way go
// out in the flush's next write, one call, each behind its length and
// under the ID asked for (the caller's message left as it was).
func TestStreamWriterCombines(t *testing.T) {
	c := &recordingConn{}
	w := &streamWriter{conn: c, timeout: time.Second}
	msg := []byte{0xAA, 0xBB, 1, 2, 3}
	w.flushing = true // another sender is writing: these only queue
	for id := range uint16(3) {
		if err := w.write(msg, id, true); err != nil {
			t.Fatal(err)
		}
	}
	if len(c.writes) != 0 {
		t.Fatalf("%d writes while another sender flushes, want none", len(c.writes))
	}
	w.mu.Lock()
	w.flushing = false
	w.mu.Unlock()
	if err := w.write(msg, 0, false); err != nil {
		t.Fatal(err)
	}
	want := []byte{
		0, 5, 0, 0, 1, 2, 3,
		0, 5, 0, 1, 1, 2, 3,
		0, 5, 0, 2, 1, 2, 3,
		0, 5, 0xAA, 0xBB, 1, 2, 3,
	}
	if len(c.writes) != 1 || !bytes.Equal(c.writes[0], want) {
		t.Fatalf("writes %x, want one: %x", c.writes, want)
	}
	if !bytes.Equal(msg, []byte{0xAA, 0xBB, 1, 2, 3}) {
		t.Fatalf("the caller's message changed: %x", msg)
	}
}

// TestStreamWriterFailureSticks: a failed write fails its sender, drops
// what was queued, and every later write fails at once with the same
// error, writing nothing.
func TestStreamWriterFailureSticks(t *testing.T) {
	broken := errors.New("broken pipe")
	c := &recordingConn{err: broken}
	w := &streamWriter{conn: c, timeout: time.Second}
	if err := w.write([]byte{0, 1, 2}, 0, false); !errors.Is(err, broken) {
		t.Fatalf("write on a failing stream: %v, want %v", err, broken)
	}
	if err := w.write([]byte{0, 1, 2}, 0, false); !errors.Is(err, broken) {
		t.Fatalf("write after the failure: %v, want %v", err, broken)
	}
	if len(c.writes) != 1 {
		t.Fatalf("%d writes, want 1 (none after the failure)", len(c.writes))
	}
}
