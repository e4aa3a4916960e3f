package dnsforward

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"github.com/miekg/dns"
	"github.com/rs/zerolog"
)

// writeQueries sends queries on c in one write, each with its length.
func writeQueries(t *testing.T, c net.Conn, qs ...*dns.Msg) {
	t.Helper()
	var b []byte
	for _, q := range qs {
		wire, err := q.Pack()
		if err != nil {
			t.Fatal(err)
		}
		b = binary.BigEndian.AppendUint16(b, uint16(len(wire)))
		b = append(b, wire...)
	}
	if _, err := c.Write(b); err != nil {
		t.Fatal(err)
	}
}

// gotQuery waits until the gate resolver has read a query.
func gotQuery(t *testing.T, g *gateResolver) {
	t.Helper()
	select {
	case <-g.got:
	case <-time.After(10 * time.Second):
		t.Fatal("the resolver never got the query")
	}
}

// pipeArm is tcpServer.armRead for a client served alone.
func pipeArm(c net.Conn, d time.Duration) bool {
	var deadline time.Time
	if d > 0 {
		deadline = time.Now().Add(d)
	}
	c.SetReadDeadline(deadline)
	return true
}

// servePipe serves the server end of an in-memory connection as one DNS
// client, answering with serve, and returns the client end and a channel
// closed when the server end is done.
func servePipe(serve func(dns.ResponseWriter, []byte)) (net.Conn, <-chan struct{}) {
	server, client := net.Pipe()
	done := make(chan struct{})
	go func() {
		w := newWorkers()
		newTCPClient(server, serve, w.run, pipeArm).run()
		w.stop()
		close(done)
	}()
	return client, done
}

// serveHeldQuery starts a server whose resolver holds every answer until
// gate.open, and sends it one query (ID 1) over TCP, which the resolver has
// read by the time it returns. served has Serve's result.
func serveHeldQuery(t *testing.T) (srv *Server, served <-chan error, c net.Conn, gate *gateResolver) {
	t.Helper()
	gate = newGateResolver(t)
	pc, ln, err := Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv = NewServer(newForwarder(t, socks(t).Addr(), time.Minute, nil, gate.addr), pc, ln)
	done := make(chan error, 1)
	go func() { done <- srv.Serve(context.Background()) }()
	c, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	writeQueries(t, c, query("held.example", dns.TypeA, 1))
	gotQuery(t, gate)
	return srv, done, c, gate
}

func readAnswer(t *testing.T, c net.Conn) *dns.Msg {
	t.Helper()
	var lenBuf [2]byte
	m, err := readTCPMessage(c, &lenBuf)
	if err != nil || m == nil {
		t.Fatalf("reading an answer: %v", err)
	}
	return m
}

// TestTCPPipelining: queries a client sends on one connection without
// waiting are answered as each is ready, so a slow name does not hold up
// the names after it (RFC 7766 §6.2.1.1). Before, the second query was not
// even read until the first was answered.
func TestTCPPipelining(t *testing.T) {
	gate := newGateResolverHolding(t, "held.example.")
	_, addr := startServerFor(t, newForwarder(t, socks(t).Addr(), 10*time.Second, nil, gate.addr))
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second)) // the failure this test catches is a hang

	writeQueries(t, c, query("held.example", dns.TypeA, 1), query("free.example", dns.TypeA, 2))
	if first := readAnswer(t, c); first.Id != 2 {
		t.Fatalf("first answer is for query %d, want the unheld query 2", first.Id)
	}
	gate.open()
	if second := readAnswer(t, c); second.Id != 1 || !answerIP(t, second).Equal(net.IPv4(198, 51, 100, 1)) {
		t.Fatalf("second answer: %v", second)
	}
}

// TestTCPHalfClosedClientGetsAnswers: a client that sends its queries and
// then shuts its side still gets every answer before the server closes.
func TestTCPHalfClosedClientGetsAnswers(t *testing.T) {
	gate := newGateResolver(t)
	_, addr := startServerFor(t, newForwarder(t, socks(t).Addr(), time.Minute, nil, gate.addr))
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	writeQueries(t, c, query("a.example", dns.TypeA, 1), query("b.example", dns.TypeA, 2))
	c.(*net.TCPConn).CloseWrite()
	gotQuery(t, gate)
	gotQuery(t, gate) // both read, and held, after the client's FIN
	gate.open()
	ids := map[uint16]bool{readAnswer(t, c).Id: true, readAnswer(t, c).Id: true}
	if !ids[1] || !ids[2] {
		t.Fatalf("answers for %v, want 1 and 2", ids)
	}
	if _, err := c.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("after the answers: %v, want the server's close", err)
	}
}

// TestTCPShutdownAnswersQueriesRead: Shutdown stops reading queries but
// answers those already read before it closes the connection.
func TestTCPShutdownAnswersQueriesRead(t *testing.T) {
	srv, served, c, gate := serveHeldQuery(t)
	stopped := make(chan error, 1)
	go func() { stopped <- srv.Shutdown(context.Background()) }()
	select {
	case <-srv.tcp.stopping:
	case err := <-stopped:
		t.Fatalf("Shutdown returned %v with a query in flight", err)
	}
	writeQueries(t, c, query("late.example", dns.TypeA, 2)) // not read any more
	gate.open()
	if m := readAnswer(t, c); m.Id != 1 {
		t.Fatalf("answer for %d, want 1", m.Id)
	}
	// Closed with the late query unread: a reset rather than a FIN.
	if _, err := c.Read(make([]byte, 1)); err != io.EOF && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("after the answer: %v, want the server's close", err)
	}
	if err := <-stopped; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if err := <-served; err != nil {
		t.Fatalf("Serve: %v", err)
	}
}

// TestTCPIdleTimeout: a connection is closed once it has been idle for
// the idle timeout, but not while an answer is due, however long that
// takes.
func TestTCPIdleTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		release := make(chan struct{})
		serve := func(w dns.ResponseWriter, q []byte) {
			<-release
			w.Write(q) // the query as its own answer will do
		}
		client, done := servePipe(serve)

		writeQueries(t, client, query("slow.example", dns.TypeA, 7))
		time.Sleep(10 * tcpIdleTimeout) // the fake clock: an answer 80 s late
		synctest.Wait()
		select {
		case <-done:
			t.Fatal("closed while an answer was due")
		default:
		}
		close(release)
		if m := readAnswer(t, client); m.Id != 7 {
			t.Fatalf("answer for %d, want 7", m.Id)
		}
		start := time.Now()
		<-done
		if idle := time.Since(start); idle != tcpIdleTimeout {
			t.Fatalf("closed after %v idle, want %v", idle, tcpIdleTimeout)
		}
		if _, err := client.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
			t.Fatalf("client read %v, want EOF", err)
		}
	})
}

// TestTCPCloseWithQueryHeld: Close stops at once even with a TCP query
// waiting on the resolver; before, it waited out the forwarder's timeout.
// Shutdown with a deadline likewise returns at the deadline.
func TestTCPCloseWithQueryHeld(t *testing.T) {
	for _, how := range []string{"Close", "Shutdown past its deadline"} {
		t.Run(how, func(t *testing.T) {
			srv, served, _, _ := serveHeldQuery(t)
			stopped := make(chan error, 1)
			go func() {
				if how == "Close" {
					stopped <- srv.Close()
					return
				}
				ctx, cancel := context.WithCancel(context.Background())
				cancel()
				stopped <- srv.Shutdown(ctx)
			}()
			select {
			case <-stopped:
			case <-time.After(10 * time.Second): // the forwarder would wait a minute
				t.Fatalf("%s waits for the query held upstream", how)
			}
			if err := <-served; err != nil {
				t.Errorf("Serve: %v", err)
			}
		})
	}
}

// TestTCPReadsWhileAnswerIsLate: a query sent long after another whose
// answer is still due is read and answered at once; before, the reader
// stopped at the idle deadline until every answer due was written.
func TestTCPReadsWhileAnswerIsLate(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		release := make(chan struct{})
		serve := func(w dns.ResponseWriter, q []byte) {
			if binary.BigEndian.Uint16(q) == 1 {
				<-release
			}
			w.Write(q)
		}
		client, done := servePipe(serve)
		writeQueries(t, client, query("slow.example", dns.TypeA, 1))
		time.Sleep(tcpIdleTimeout + time.Second)                     // a resolver slower than the idle time
		writeQueries(t, client, query("fast.example", dns.TypeA, 2)) // blocks until read
		if m := readAnswer(t, client); m.Id != 2 {
			t.Fatalf("answer for %d, want the late query 2 first", m.Id)
		}
		close(release)
		if m := readAnswer(t, client); m.Id != 1 {
			t.Fatalf("answer for %d, want 1", m.Id)
		}
		client.Close()
		<-done
	})
}

// TestTCPClientThatDoesNotReadIsHeld: a client that sends queries and
// reads no answers gets at most tcpPipeline of them answered (each
// answer's write waits for the client); the rest wait in TCP, not as
// answers queued in memory.
func TestTCPClientThatDoesNotReadIsHeld(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var served atomic.Int32
		serve := func(w dns.ResponseWriter, q []byte) {
			served.Add(1)
			w.Write(q) // the query as its own answer will do
		}
		client, done := servePipe(serve)
		go func() {
			for i := range 3 * tcpPipeline {
				wire, _ := query("a.example", dns.TypeA, uint16(i)).Pack()
				if _, err := client.Write(binary.BigEndian.AppendUint16(nil, uint16(len(wire)))); err != nil {
					return // closed at the end of the test
				}
				if _, err := client.Write(wire); err != nil {
					return
				}
			}
		}()
		synctest.Wait()
		if n := served.Load(); n != tcpPipeline {
			t.Fatalf("%d queries answered while the client reads nothing, want %d", n, tcpPipeline)
		}
		client.Close()
		<-done
	})
}

// TestTCPClientsBounded: past its bound of clients, the server accepts
// the next only when one leaves (it waits in the listen backlog), and says
// so in one line. Unbounded, one program opening connections took
// descriptors and memory from every listener of the process.
func TestTCPClientsBounded(t *testing.T) {
	f, _ := newScriptForwarder(t, 0, nil, nil)
	var logs syncBuffer
	f.cfg.Logger = zerolog.New(&logs)
	pc, ln, err := Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(f, pc, ln)
	s.tcp = newTCPServer(ln, s.serveMessage, 1, nil)
	full := make(chan struct{}, 1)
	s.tcp.onFull = func() {
		s.tcpFull()
		select {
		case full <- struct{}{}:
		default:
		}
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(context.Background()) }()
	defer func() { s.Close(); <-done }()

	ask := func(c net.Conn, id uint16) {
		t.Helper()
		writeQueries(t, c, query("a.example", dns.TypeA, id))
		c.SetReadDeadline(time.Now().Add(10 * time.Second)) // a bound, not a wait
		var l [2]byte
		b, err := readTCPFrame(c, &l)
		if err != nil {
			t.Fatalf("query %d: %v", id, err)
		}
		if got := binary.BigEndian.Uint16(b); got != id {
			t.Fatalf("answer id %d, want %d", got, id)
		}
	}
	first, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	ask(first, 1)
	select {
	case <-full:
	case <-time.After(10 * time.Second): // a bound, not a wait
		t.Fatal("with one client of one served, the server did not wait for room")
	}
	second, err := net.Dial("tcp", ln.Addr().String()) // in the backlog
	if err != nil {
		t.Fatal(err)
	}
	defer second.Close()
	first.Close()
	ask(second, 2) // accepted once the first left
	if l := logs.lines(); len(l) != 1 || !strings.Contains(l[0], "DNS over TCP: 1 clients at once, the most it serves; the next waits until one leaves") {
		t.Errorf("log lines %q, want one saying the clients are at the bound", l)
	}
}
