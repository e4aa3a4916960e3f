package dnsforward

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"net"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/socksfwd/socksfwd/internal/allowlist"
)

// startServerFor serves f on UDP and TCP at one loopback address until
// cleanup.
func startServerFor(t testing.TB, f *Forwarder) (*Server, string) {
	t.Helper()
	pc, ln, err := Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(f, pc, ln)
	done := make(chan error, 1)
	go func() { done <- s.Serve(context.Background()) }()
	t.Cleanup(func() {
		s.Close()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return s, pc.LocalAddr().String()
}

func answerIP(t *testing.T, m *dns.Msg) net.IP {
	t.Helper()
	if m.Rcode != dns.RcodeSuccess || len(m.Answer) != 1 {
		t.Fatalf("answer: %s with %d records", dns.RcodeToString[m.Rcode], len(m.Answer))
	}
	return m.Answer[0].(*dns.A).A
}

// TestSetForwarder: a reload swaps the forwarder with the sockets bound.
// New queries go to the new forwarder; a query in flight finishes on the
// old one, which is closed only after it.
func TestSetForwarder(t *testing.T) {
	gate := newGateResolver(t) // answers 198.51.100.1 when opened
	oldFwd := newForwarder(t, socks(t).Addr(), time.Minute, nil, gate.addr)
	newFwd := newForwarder(t, socks(t).Addr(), time.Minute, nil, newResolver(t, 0).addr) // 192.0.2.1
	srv, addr := startServerFor(t, oldFwd)

	held := make(chan *dns.Msg, 1)
	go func() {
		resp, _, err := (&dns.Client{Net: "tcp", Timeout: time.Minute}).Exchange(query("held.example", dns.TypeA, 1), addr)
		if err != nil {
			t.Error(err)
		}
		held <- resp
	}()
	<-gate.got // in flight on the old forwarder

	srv.SetForwarder(newFwd)
	if srv.Forwarder() != newFwd {
		t.Fatal("Forwarder() is not the new one")
	}
	if ip := answerIP(t, exchange(t, "udp", addr, query("new.example", dns.TypeA, 2))); !ip.Equal(net.IPv4(192, 0, 2, 1)) {
		t.Errorf("after the swap answered %v, want the new forwarder's 192.0.2.1", ip)
	}
	select {
	case <-oldFwd.life.Done():
		t.Fatal("the old forwarder was closed with a query still in flight on it")
	default:
	}

	gate.open()
	if resp := <-held; resp == nil || !answerIP(t, resp).Equal(net.IPv4(198, 51, 100, 1)) {
		t.Fatalf("the query in flight during the swap: %v", resp)
	}
	select {
	case <-oldFwd.life.Done():
	case <-time.After(time.Minute):
		t.Fatal("the old forwarder was never closed")
	}
	select {
	case <-newFwd.life.Done():
		t.Fatal("the new forwarder is closed")
	default:
	}
}

// TestSetForwarderAfterClose: the server owns what it is given; after
// Close, a forwarder handed to it is closed at once.
func TestSetForwarderAfterClose(t *testing.T) {
	first := newForwarder(t, socks(t).Addr(), time.Second, nil, newResolver(t, 0).addr)
	srv, _ := startServerFor(t, first)
	srv.Close()
	late := newForwarder(t, socks(t).Addr(), time.Second, nil, newResolver(t, 0).addr)
	srv.SetForwarder(late)
	for name, f := range map[string]*Forwarder{"the first": first, "the late": late} {
		select {
		case <-f.life.Done():
		default:
			t.Errorf("%s forwarder is still open after Close", name)
		}
	}
}

// TestServerCloseCancelsHungDial: with a UDP or a TCP client's query
// waiting on a dial that hangs (a black-holed proxy), Server.Close returns
// at once and so does Serve, its workers done: nothing waits out the
// forwarder's timeout. Before, Close (TCP) or Serve (UDP, the query's
// worker) waited for the dial's deadline, a goroutine outliving Close.
func TestServerCloseCancelsHungDial(t *testing.T) {
	for _, network := range []string{"udp", "tcp"} {
		t.Run(network, func(t *testing.T) {
			f, _ := newScriptForwarder(t, 0, nil, nil)
			f.cfg.Timeout = time.Hour
			dialing := make(chan struct{}, 1)
			f.pools[0].dial = func(ctx context.Context) (net.Conn, error) {
				dialing <- struct{}{}
				<-ctx.Done()
				return nil, ctx.Err()
			}
			pc, ln, err := Listen("127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			s := NewServer(f, pc, ln)
			served := make(chan error, 1)
			go func() { served <- s.Serve(context.Background()) }()
			c, err := net.Dial(network, pc.LocalAddr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			q := pack(t, query("a.example", dns.TypeA, 1))
			if network == "tcp" {
				q = append(binary.BigEndian.AppendUint16(nil, uint16(len(q))), q...)
			}
			if _, err := c.Write(q); err != nil {
				t.Fatal(err)
			}
			<-dialing
			closed := make(chan struct{})
			go func() {
				s.Close()
				close(closed)
			}()
			// A bound for the test, not a wait: the dial would hang for an hour.
			bound := time.After(time.Minute)
			for _, done := range []<-chan struct{}{closed, errDone(served)} {
				select {
				case <-done:
				case <-bound:
					t.Fatal("Close or Serve still waiting on the hung dial")
				}
			}
		})
	}
}

// errDone is closed once an error arrives on errc.
func errDone(errc <-chan error) <-chan struct{} {
	done := make(chan struct{})
	go func() {
		<-errc
		close(done)
	}()
	return done
}

// packetConn hides a socket's *net.UDPConn type: the Server serves it with
// the miekg/dns server, as it does a socket bound to a wildcard address.
type packetConn struct{ net.PacketConn }

// TestRejectedAndIgnoredCounted: queries the server answers FORMERR or
// NOTIMP itself are counted in Queries (by transport) and Responses (by
// RCODE), so that these still add up; responses and runts, answered
// nothing, are counted as Ignored. On both UDP paths (the fast path, the
// miekg/dns server of a wildcard socket) and over TCP. Before, none of
// them was counted.
func TestRejectedAndIgnoredCounted(t *testing.T) {
	for _, miekgServer := range []bool{false, true} {
		t.Run(map[bool]string{false: "fast path", true: "miekg server"}[miekgServer], func(t *testing.T) {
			f, _ := newScriptForwarder(t, 0, nil, nil)
			pc, ln, err := Listen("127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			var udp net.PacketConn = pc
			if miekgServer {
				udp = packetConn{pc}
			}
			s := NewServer(f, udp, ln)
			if (s.fast == nil) != miekgServer {
				t.Fatalf("fast path %v, want %v", s.fast != nil, !miekgServer)
			}
			served := make(chan error, 1)
			go func() { served <- s.Serve(context.Background()) }()
			addr := pc.LocalAddr().String()

			twoQuestions := query("a.example", dns.TypeA, 1)
			twoQuestions.Question = append(twoQuestions.Question, twoQuestions.Question[0])
			update := query("a.example", dns.TypeA, 2)
			update.Opcode = dns.OpcodeUpdate
			response := query("a.example", dns.TypeA, 3)
			response.Response = true
			for _, network := range []string{"udp", "tcp"} {
				exchange(t, network, addr, twoQuestions)
				exchange(t, network, addr, update)
				c, err := net.Dial(network, addr)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				for _, m := range [][]byte{pack(t, response), {1, 2, 3, 4, 5}} {
					if network == "tcp" {
						m = append(binary.BigEndian.AppendUint16(nil, uint16(len(m))), m...)
					}
					if _, err := c.Write(m); err != nil {
						t.Fatal(err)
					}
				}
				// Answered on the same socket or connection, after those.
				c.SetDeadline(time.Now().Add(10 * time.Second)) // a bound, not a wait
				co := &dns.Conn{Conn: c}
				if err := co.WriteMsg(query("a.example", dns.TypeA, 4)); err != nil {
					t.Fatal(err)
				}
				if m, err := co.ReadMsg(); err != nil || m.Id != 4 {
					t.Fatalf("%s: %v %v", network, m, err)
				}
			}
			s.Close()
			if err := <-served; err != nil {
				t.Fatal(err)
			}
			st := f.Stats()
			if q, u, tc := st.Queries.Load(), st.QueriesUDP.Load(), st.QueriesTCP.Load(); q != 6 || u != 3 || tc != 3 {
				t.Errorf("Queries %d (UDP %d, TCP %d), want 6 (3, 3)", q, u, tc)
			}
			for rcode, want := range map[int]int64{dns.RcodeFormatError: 2, dns.RcodeNotImplemented: 2, dns.RcodeSuccess: 2} {
				if n := st.Responses[rcode].Load(); n != want {
					t.Errorf("Responses[%s] = %d, want %d", dns.RcodeToString[rcode], n, want)
				}
			}
			if n := st.Ignored.Load(); n != 4 {
				t.Errorf("Ignored = %d, want 4 (a response and a runt on each transport)", n)
			}
		})
	}
}

// outsiderMessages are what a source outside the allow list sends in
// TestDisallowedSourceOnlyRefused: a query, an UPDATE (NOTIMP for an
// allowed source), two questions (FORMERR), bytes that do not unpack
// (FORMERR), and a response (answered nothing). The first four, IDs 1 to
// 4, are to be refused.
func outsiderMessages(t *testing.T) [][]byte {
	update := query("a.example", dns.TypeA, 2)
	update.Opcode = dns.OpcodeUpdate
	twoQuestions := query("a.example", dns.TypeA, 3)
	twoQuestions.Question = append(twoQuestions.Question, twoQuestions.Question[0])
	garbage := append(pack(t, query("a.example", dns.TypeA, 4))[:headerLen], 0xff, 0xff, 0xff)
	response := query("a.example", dns.TypeA, 5)
	response.Response = true
	return [][]byte{pack(t, query("a.example", dns.TypeA, 1)), pack(t, update), pack(t, twoQuestions), garbage, pack(t, response)}
}

// wantOnlyRefused checks what an outsider's outsiderMessages got: REFUSED
// to the four, counted in NotAllowed and nowhere else but the response
// (Ignored).
func wantOnlyRefused(t *testing.T, f *Forwarder, answers []*dns.Msg) {
	t.Helper()
	ids := map[uint16]bool{}
	for _, m := range answers {
		if m.Rcode != dns.RcodeRefused {
			t.Errorf("id %d answered %s, want REFUSED", m.Id, dns.RcodeToString[m.Rcode])
		}
		ids[m.Id] = true
	}
	if len(answers) != 4 || !ids[1] || !ids[2] || !ids[3] || !ids[4] {
		t.Errorf("%d answers (IDs %v), want IDs 1 to 4", len(answers), ids)
	}
	st := f.Stats()
	var responses int64
	for i := range st.Responses {
		responses += st.Responses[i].Load()
	}
	if q, na, ig := st.Queries.Load(), st.NotAllowed.Load(), st.Ignored.Load(); q != 0 || responses != 0 || na != 4 || ig != 1 {
		t.Errorf("Queries %d, Responses %d, NotAllowed %d, Ignored %d; want 0, 0, 4, 1", q, responses, na, ig)
	}
}

// outsiderConn is a UDP socket on which every datagram comes from
// 192.0.2.7:5353 (a source that loopback cannot show), served by the
// miekg/dns server as a wildcard socket is (it is no *net.UDPConn).
type outsiderConn struct {
	in     chan []byte
	out    chan []byte
	closed chan struct{}
	once   sync.Once
}

var outsiderAddr = &net.UDPAddr{IP: net.IPv4(192, 0, 2, 7), Port: 5353}

func (c *outsiderConn) ReadFrom(b []byte) (int, net.Addr, error) {
	select {
	case m := <-c.in:
		return copy(b, m), outsiderAddr, nil
	case <-c.closed:
		return 0, nil, net.ErrClosed
	}
}

func (c *outsiderConn) WriteTo(b []byte, to net.Addr) (int, error) {
	if to.String() != outsiderAddr.String() {
		return 0, errors.New("reply to the wrong address")
	}
	c.out <- bytes.Clone(b)
	return len(b), nil
}

func (c *outsiderConn) Close() error {
	c.once.Do(func() { close(c.closed) })
	return nil
}

func (c *outsiderConn) LocalAddr() net.Addr              { return &net.UDPAddr{IP: net.IPv4zero, Port: 53} }
func (c *outsiderConn) SetDeadline(time.Time) error      { return nil }
func (c *outsiderConn) SetReadDeadline(time.Time) error  { return nil }
func (c *outsiderConn) SetWriteDeadline(time.Time) error { return nil }

// TestDisallowedSourceOnlyRefused: a source outside the allow list gets
// REFUSED to whatever it sends that is answered, counted in NotAllowed
// only (documented as not in Queries), on the path shared by the UDP fast
// path and TCP (serveMessage) and on a wildcard socket's miekg/dns
// server. Before, a message the server rejects itself (an UPDATE, two
// questions, bytes that do not unpack) was answered NOTIMP or FORMERR and
// counted in Queries and Responses as served.
func TestDisallowedSourceOnlyRefused(t *testing.T) {
	allow, err := allowlist.Parse([]string{"198.51.100.0/24"})
	if err != nil {
		t.Fatal(err)
	}
	t.Run("serveMessage", func(t *testing.T) {
		f, _ := newScriptForwarder(t, 0, nil, nil)
		s, _ := startServerFor(t, f)
		s.SetAllow(allow)
		w := &recorder{remote: outsiderAddr}
		for _, m := range outsiderMessages(t) {
			s.serveMessage(w, m)
		}
		wantOnlyRefused(t, f, w.msgs)
	})
	t.Run("miekg server", func(t *testing.T) {
		f, _ := newScriptForwarder(t, 0, nil, nil)
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		c := &outsiderConn{in: make(chan []byte, 8), out: make(chan []byte, 8), closed: make(chan struct{})}
		s := NewServer(f, c, ln)
		if s.fast != nil {
			t.Fatal("served by the fast path")
		}
		s.SetAllow(allow)
		served := make(chan error, 1)
		go func() { served <- s.Serve(context.Background()) }()
		for _, m := range outsiderMessages(t) {
			c.in <- m
		}
		// After the response (answered nothing), a last query: once its
		// answer is out, every message before it has been handled.
		c.in <- pack(t, query("last.example", dns.TypeA, 6))
		var answers []*dns.Msg
		for len(answers) == 0 || answers[len(answers)-1].Id != 6 {
			select {
			case b := <-c.out:
				m := new(dns.Msg)
				if err := m.Unpack(b); err != nil {
					t.Fatal(err)
				}
				answers = append(answers, m)
			case <-time.After(10 * time.Second): // a bound, not a wait
				t.Fatalf("answers so far: %v", answers)
			}
		}
		s.Close()
		if err := <-served; err != nil {
			t.Fatal(err)
		}
		if last := answers[len(answers)-1]; last.Rcode != dns.RcodeRefused {
			t.Errorf("the last query answered %s, want REFUSED", dns.RcodeToString[last.Rcode])
		}
		f.Stats().NotAllowed.Add(-1) // the last query's
		wantOnlyRefused(t, f, answers[:len(answers)-1])
	})
}

// startWildcardServer serves f on the wildcard address (miekg/dns's path
// for UDP) until cleanup, and returns its port.
func startWildcardServer(t *testing.T, f *Forwarder) int {
	t.Helper()
	pc, ln, err := Listen("0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(f, pc, ln)
	done := make(chan error, 1)
	go func() { done <- s.Serve(context.Background()) }()
	t.Cleanup(func() { s.Close(); <-done })
	return pc.LocalAddr().(*net.UDPAddr).Port
}

// TestWildcardLargeQuery: a 700-byte query (EDNS padding) over UDP to a
// server on the wildcard address (miekg/dns's path) is read whole.
func TestWildcardLargeQuery(t *testing.T) {
	f, _ := newScriptForwarder(t, 0, nil, nil)
	port := startWildcardServer(t, f)
	q := query("big.example", dns.TypeA, 11)
	q.SetEdns0(1232, false)
	q.IsEdns0().Option = append(q.IsEdns0().Option, &dns.EDNS0_PADDING{Padding: make([]byte, 650)})
	m := exchange(t, "udp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), q)
	if m.Rcode != dns.RcodeSuccess {
		t.Errorf("a %d-byte query answered %s", q.Len(), dns.RcodeToString[m.Rcode])
	}
}

// headerOnlyFormErr answers every query FORMERR with the header alone, as
// unbound, BIND and dnsmasq answer a query without a question.
func headerOnlyFormErr(q *dns.Msg) [][]byte {
	return [][]byte{packed(&dns.Msg{MsgHdr: dns.MsgHdr{Id: q.Id, Response: true, Rcode: dns.RcodeFormatError}})}
}

// TestQueryWithoutQuestion: a 12-byte query whose header claims one
// question but that holds none unpacks to a message with no question.
// It is answered FORMERR on every path (UDP fast path, TCP, a wildcard
// socket's miekg/dns server) and not forwarded. Forwarded, the resolver's
// header-only FORMERR reached a log line that read the query's first
// question, and the process died of one datagram.
func TestQueryWithoutQuestion(t *testing.T) {
	empty := []byte{0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0}
	wantFormErr := func(t *testing.T, b []byte) {
		t.Helper()
		m := new(dns.Msg)
		if err := m.Unpack(b); err != nil {
			t.Fatal(err)
		}
		if m.Id != 0x1234 || m.Rcode != dns.RcodeFormatError {
			t.Errorf("answer id %#x %s, want 0x1234 FORMERR", m.Id, dns.RcodeToString[m.Rcode])
		}
	}
	exchangeUDP := func(t *testing.T, addr string, q []byte) []byte {
		t.Helper()
		c, err := net.Dial("udp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := c.Write(q); err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(10 * time.Second)) // a bound, not a wait
		b := make([]byte, 512)
		n, err := c.Read(b)
		if err != nil {
			t.Fatal(err)
		}
		return b[:n]
	}
	// The header, then a name with no type or class after it.
	cut := append(slices.Clone(empty), 1, 'a', 7, 'e', 'x', 'a', 'm', 'p', 'l', 'e', 0)
	for _, path := range []string{"udp", "tcp", "wildcard", "cut"} {
		t.Run(path, func(t *testing.T) {
			empty := empty
			if path == "cut" {
				path, empty = "udp", cut
			}
			f, res := newScriptForwarder(t, 100, headerOnlyFormErr, nil)
			var answer []byte
			switch path {
			case "udp", "tcp":
				_, addr := startServerFor(t, f)
				if path == "udp" {
					answer = exchangeUDP(t, addr, empty)
					break
				}
				c, err := net.Dial("tcp", addr)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				c.Write(append([]byte{0, byte(len(empty))}, empty...))
				c.SetReadDeadline(time.Now().Add(10 * time.Second)) // a bound, not a wait
				var l [2]byte
				if answer, err = readTCPFrame(c, &l); err != nil {
					t.Fatal(err)
				}
			case "wildcard":
				answer = exchangeUDP(t, net.JoinHostPort("127.0.0.1", strconv.Itoa(startWildcardServer(t, f))), empty)
			}
			wantFormErr(t, answer)
			if n := len(res.queries()); n != 0 {
				t.Errorf("the resolver was asked %d queries, want none", n)
			}
		})
	}
	t.Run("Exchange", func(t *testing.T) {
		f, _ := newScriptForwarder(t, 100, headerOnlyFormErr, nil)
		m, err := f.Exchange(context.Background(), &dns.Msg{MsgHdr: dns.MsgHdr{Id: 7, RecursionDesired: true}})
		if err != nil {
			t.Fatal(err)
		}
		if m.Rcode != dns.RcodeFormatError {
			t.Errorf("Exchange of a query without a question: %s, want the resolver's FORMERR", dns.RcodeToString[m.Rcode])
		}
	})
}

// brokenConn is a UDP socket whose reads fail for good.
type brokenConn struct{ outsiderConn }

var errSocketGone = errors.New("recvmsg: the socket is gone")

func (c *brokenConn) ReadFrom([]byte) (int, net.Addr, error) { return 0, nil, errSocketGone }

// TestServeEndsWithUDPFailure: a read failure that ends the UDP side ends
// the TCP side too, and Serve returns it, so that the supervisor hears of
// it. Serve had gone on serving TCP alone, every UDP client failed
// without a word.
func TestServeEndsWithUDPFailure(t *testing.T) {
	f, _ := newScriptForwarder(t, 0, nil, nil)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(f, &brokenConn{outsiderConn{closed: make(chan struct{})}}, ln)
	served := make(chan error, 1)
	go func() { served <- s.Serve(context.Background()) }()
	select {
	case err := <-served:
		if !errors.Is(err, errSocketGone) {
			t.Errorf("Serve: %v, want %v", err, errSocketGone)
		}
	case <-time.After(10 * time.Second): // a bound, not a wait
		s.Close()
		<-served
		t.Fatal("Serve did not return when its UDP side failed")
	}
}

// TestShutdownAnswersUDPInFlight: a UDP query the fast path handed on
// before Shutdown is still answered: the reader stops, the socket stays
// open until the answers are out. The socket had been closed first, and
// such a query got nothing at all.
func TestShutdownAnswersUDPInFlight(t *testing.T) {
	hold := make(chan struct{})
	f, res := newScriptForwarder(t, 0, nil, hold)
	pc, ln, err := Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(f, pc, ln)
	if s.fast == nil {
		t.Skip("no UDP fast path on this system")
	}
	served := make(chan error, 1)
	go func() { served <- s.Serve(context.Background()) }()
	c, err := net.Dial("udp", pc.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write(pack(t, query("inflight.example", dns.TypeA, 9))); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second) // bounds, not waits
	for len(res.queries()) == 0 && time.Now().Before(deadline) {
		runtime.Gosched()
	}
	shut := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		shut <- s.Shutdown(ctx)
	}()
	for time.Now().Before(deadline) { // Shutdown has stopped the TCP side
		tc, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			break
		}
		tc.Close()
		runtime.Gosched()
	}
	close(hold)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	b := make([]byte, 512)
	n, err := c.Read(b)
	if err != nil {
		t.Fatalf("the query in flight at Shutdown: %v", err)
	}
	m := new(dns.Msg)
	if err := m.Unpack(b[:n]); err != nil || m.Id != 9 || m.Rcode != dns.RcodeSuccess {
		t.Errorf("answer %v %v, want id 9 NOERROR", m, err)
	}
	if err := <-shut; err != nil {
		t.Errorf("Shutdown: %v", err)
	}
	if err := <-served; err != nil {
		t.Errorf("Serve: %v", err)
	}
}
