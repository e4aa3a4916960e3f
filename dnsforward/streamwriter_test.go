package dnsforward

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/miekg/dns"
)

// gatedConn records each Write and holds it until the test lets it
// through (a peer that reads when the test says so); then it fails with
// err, when set.
type gatedConn struct {
	net.Conn // nil: only the methods below are used
	writes   [][]byte
	pass     chan struct{}
	err      error
}

func (c *gatedConn) Write(b []byte) (int, error) {
	c.writes = append(c.writes, bytes.Clone(b))
	<-c.pass
	if c.err != nil {
		return 0, c.err
	}
	return len(b), nil
}

func (c *gatedConn) SetWriteDeadline(time.Time) error { return nil }

// frame is msg behind its length, under id.
func frame(id byte, payload ...byte) []byte {
	return append([]byte{0, byte(2 + len(payload)), 0, id}, payload...)
}

// TestStreamWriterCombines: messages queued while a write is under way
// wait, and go out together in the next write, each behind its length and
// under the ID asked for (the caller's message left as it was); every
// sender returns only once its message is written.
func TestStreamWriterCombines(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := &gatedConn{pass: make(chan struct{})}
		w := &streamWriter{conn: c, timeout: time.Second, waits: true}
		msg := []byte{0xAA, 0xBB, 7}
		returned := make(chan uint16, 4)
		send := func(id uint16) {
			go func() {
				if err := w.write(msg, id, true); err != nil {
					t.Errorf("write %d: %v", id, err)
				}
				returned <- id
			}()
			synctest.Wait()
		}
		send(0) // writes alone, held by the peer
		for id := range uint16(3) {
			send(id + 1) // queued behind it
		}
		if len(c.writes) != 1 || len(returned) != 0 {
			t.Fatalf("%d writes and %d senders returned while the first write is held, want 1 and 0", len(c.writes), len(returned))
		}
		c.pass <- struct{}{}
		synctest.Wait()
		if len(returned) != 1 || <-returned != 0 {
			t.Fatal("the first sender did not return alone when its write ended")
		}
		want := append(append(frame(1, 7), frame(2, 7)...), frame(3, 7)...)
		if len(c.writes) != 2 || !bytes.Equal(c.writes[1], want) {
			t.Fatalf("second write %x, want the three queued messages in one: %x", c.writes[1:], want)
		}
		if len(returned) != 0 {
			t.Fatal("a queued sender returned before its write ended")
		}
		c.pass <- struct{}{}
		synctest.Wait()
		if len(returned) != 3 || len(c.writes) != 2 {
			t.Fatalf("%d senders returned after %d writes, want 3 after 2", len(returned), len(c.writes))
		}
		if !bytes.Equal(msg, []byte{0xAA, 0xBB, 7}) {
			t.Fatalf("the caller's message changed: %x", msg)
		}
	})
}

// TestStreamWriterFailureSticks: a failed write fails its sender and the
// senders queued behind it, and every later write fails at once with the
// same error, writing nothing.
func TestStreamWriterFailureSticks(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		broken := errors.New("broken pipe")
		c := &gatedConn{pass: make(chan struct{}), err: broken}
		w := &streamWriter{conn: c, timeout: time.Second, waits: true}
		errs := make(chan error, 3)
		for range 3 {
			go func() { errs <- w.write([]byte{0, 1, 2}, 0, false) }()
			synctest.Wait()
		}
		close(c.pass) // the held write fails
		synctest.Wait()
		for range 3 {
			if err := <-errs; !errors.Is(err, broken) {
				t.Fatalf("a sender got %v, want %v", err, broken)
			}
		}
		if err := w.write([]byte{0, 1, 2}, 0, false); !errors.Is(err, broken) {
			t.Fatalf("write after the failure: %v, want %v", err, broken)
		}
		if len(c.writes) != 1 {
			t.Fatalf("%d writes, want 1 (none after the failure)", len(c.writes))
		}
	})
}

// heldFirstWrite starts a streamWriter without waits on a gatedConn and a
// first sender whose write the conn holds; first gets that sender's
// result. Called in a synctest bubble.
func heldFirstWrite() (*gatedConn, *streamWriter, chan error) {
	c := &gatedConn{pass: make(chan struct{})}
	w := &streamWriter{conn: c, timeout: time.Second}
	first := make(chan error, 1)
	go func() { first <- w.write([]byte{0, 0, 7}, 0, false) }()
	synctest.Wait() // its write is held
	return c, w, first
}

// TestStreamWriterWithoutWaits: without waits, a sender that finds a
// write under way returns at once, and the writer writes what was queued
// meanwhile before it returns.
func TestStreamWriterWithoutWaits(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, w, first := heldFirstWrite()
		for id := range byte(2) {
			if err := w.write([]byte{0, id + 1, 7}, 0, false); err != nil {
				t.Fatal(err)
			}
		}
		if len(c.writes) != 1 {
			t.Fatalf("%d writes while the first is held, want 1", len(c.writes))
		}
		c.pass <- struct{}{}
		synctest.Wait()
		want := append(frame(1, 7), frame(2, 7)...)
		if len(c.writes) != 2 || !bytes.Equal(c.writes[1], want) || len(first) != 0 {
			t.Fatalf("writes %x, want the two queued in a second write by the first sender, still writing", c.writes)
		}
		c.pass <- struct{}{}
		if err := <-first; err != nil {
			t.Fatal(err)
		}
	})
}

// TestStreamWriterWithoutWaitsLaterFailure: without waits, a sender that
// goes on to write the batch queued behind its own gets that batch's
// failure, though its own message went out: the senders of that batch
// were told it was on the way, and only this error tells the stream's
// owner to fail it (and them) rather than leave them to their deadlines.
func TestStreamWriterWithoutWaitsLaterFailure(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, w, first := heldFirstWrite()
		if err := w.write([]byte{0, 1, 7}, 0, false); err != nil {
			t.Fatal(err)
		}
		c.pass <- struct{}{} // the first write goes out
		synctest.Wait()
		broken := errors.New("write: i/o timeout")
		c.err = broken
		c.pass <- struct{}{} // the second fails
		if err := <-first; !errors.Is(err, broken) {
			t.Fatalf("the sender that wrote the failed batch got %v, want %v", err, broken)
		}
	})
}

// laterFailConn holds its first Write until pass is closed, and fails its
// second, as a write that hit its deadline does; reads go on.
type laterFailConn struct {
	net.Conn
	writes atomic.Int32
	pass   chan struct{}
}

func (c *laterFailConn) Write(b []byte) (int, error) {
	switch c.writes.Add(1) {
	case 1:
		<-c.pass
	case 2:
		return 0, errors.New("write: i/o timeout")
	}
	return c.Conn.Write(b)
}

// TestPooledQueryHandedOnResent: on a resolver connection, a query
// queued behind another's write goes out in the next write; when that
// write fails, the connection is failed and the query sent again on a new
// one at once. It had waited out its whole deadline: the sender that
// wrote it had its own query out, and nobody failed the connection.
func TestPooledQueryHandedOnResent(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var resolvers sync.WaitGroup
		defer resolvers.Wait()
		var dials atomic.Int32
		first := &laterFailConn{pass: make(chan struct{})}
		p := newTCPPool(func(ctx context.Context) (net.Conn, error) {
			client, server := net.Pipe()
			resolvers.Go(func() { // answers each query
				defer server.Close()
				var l [2]byte
				for {
					b, err := readTCPFrame(server, &l)
					if err != nil {
						return
					}
					q := new(dns.Msg)
					if q.Unpack(b) != nil {
						return
					}
					out := packed(echoReply(q))
					if _, err := server.Write(append(binary.BigEndian.AppendUint16(nil, uint16(len(out))), out...)); err != nil {
						return
					}
				}
			})
			if dials.Add(1) == 1 {
				first.Conn = client
				return first, nil
			}
			return client, nil
		}, 1, 32, time.Minute, new(Stats))
		defer p.close()
		exchange := func(name string, id uint16) chan error {
			done := make(chan error, 1)
			go func() {
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				defer cancel()
				_, err := p.exchangeWire(ctx, packed(query(name, dns.TypeA, id)), false)
				done <- err
			}()
			synctest.Wait()
			return done
		}
		a := exchange("a.example", 1) // its write is held
		b := exchange("b.example", 2) // queued behind it
		start := time.Now()
		close(first.pass)
		for name, done := range map[string]chan error{"a": a, "b": b} {
			if err := <-done; err != nil {
				t.Errorf("query %s: %v after %v", name, err, time.Since(start))
			}
		}
		if n := dials.Load(); n != 2 {
			t.Errorf("%d connections dialed, want 2 (the failed one and its replacement)", n)
		}
	})
}

// TestStalledConnCause: when a query's timeout finds a resolver
// connection that has read nothing, the connection is failed, and the
// other queries on it fail with that cause, not as if the resolver had
// closed it (their line said "the resolver closed the connection").
func TestStalledConnCause(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var resolvers sync.WaitGroup
		defer resolvers.Wait()
		p := newTCPPool(func(ctx context.Context) (net.Conn, error) {
			client, server := net.Pipe()
			resolvers.Go(func() { // reads every query, answers none
				defer server.Close()
				var l [2]byte
				for {
					if _, err := readTCPFrame(server, &l); err != nil {
						return
					}
				}
			})
			return client, nil
		}, 1, 32, time.Minute, new(Stats))
		defer p.close()
		pc, err := p.get(context.Background(), false)
		if err != nil {
			t.Fatal(err)
		}
		other := make(chan error, 1)
		go func() {
			_, err := pc.exchange(context.Background(), packed(query("b.example", dns.TypeA, 2)))
			other <- err
		}()
		synctest.Wait()
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		if _, err := pc.exchange(ctx, packed(query("a.example", dns.TypeA, 1))); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("the query that timed out: %v", err)
		}
		err = <-other
		if !errors.Is(err, errConnDead) || causeOf(err) != "no answer in time" {
			t.Errorf("the other query: %v (cause %q), want errConnDead with the cause no answer in time", err, causeOf(err))
		}
	})
}
