package dnsforward

import (
	"context"
	"encoding/binary"
	"net"
	"testing"
	"time"

	"github.com/miekg/dns"
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
