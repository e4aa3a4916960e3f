package dnsforward

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net"
	"testing"
	"testing/synctest"

	"github.com/miekg/dns"
)

// withOPTAlways answers as dnsmasq does on a TCP connection that has
// carried an EDNS query: with an OPT record (size 1232) whether or not the
// query had one.
func withOPTAlways(q *dns.Msg) *dns.Msg {
	m := echoReply(q)
	if m.IsEdns0() == nil {
		m.SetEdns0(1232, false)
	}
	return m
}

// TestNoOPTForClientWithout: a client whose query has no OPT record gets
// an answer without one (RFC 6891 §7), though the resolver added one, on
// every path: the wire path (the UDP fast path's), the message path, the
// Server's UDP and TCP sockets, the cache and the udp transport; a client
// with EDNS still gets the resolver's OPT, the two kept apart in the
// cache, and the answer stripped of it is cached for the clients without.
// Before, with --dns-cache-size 0 or for any answer not yet cached, `dig
// +noedns` showed the resolver's "udp: 1232".
func TestNoOPTForClientWithout(t *testing.T) {
	for _, cacheSize := range []int{0, 10} {
		t.Run(fmt.Sprintf("tcp cache %d", cacheSize), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				f, res := newScriptForwarder(t, cacheSize, func(q *dns.Msg) [][]byte {
					return [][]byte{packed(withOPTAlways(q))}
				}, nil)
				for round := range 2 {
					for path, ask := range map[string]func(*testing.T, *Forwarder, *dns.Msg) *dns.Msg{
						"wire": askWire, "message": askMsg, "served": func(t *testing.T, f *Forwarder, q *dns.Msg) *dns.Msg { return serve(t, f, q) },
					} {
						m := ask(t, f, query(path+".example", dns.TypeA, 5))
						if m.IsEdns0() != nil || len(m.Answer) != 1 || m.Rcode != dns.RcodeSuccess {
							t.Errorf("round %d, %s path: %s, %d answers, OPT %v; want NOERROR, 1, no OPT",
								round, path, dns.RcodeToString[m.Rcode], len(m.Answer), m.IsEdns0())
						}
						q := query(path+".example", dns.TypeA, 6)
						q.SetEdns0(4096, true)
						if opt := ask(t, f, q).IsEdns0(); opt == nil || opt.UDPSize() != 4096 || !opt.Do() {
							t.Errorf("round %d, %s path: the EDNS client got OPT %v, want the resolver's (echoing 4096, DO)", round, path, opt)
						}
					}
				}
				// 3 names, each with and without EDNS; from the cache the
				// second round.
				if n, want := len(res.queries()), map[int]int{0: 12, 10: 6}[cacheSize]; n != want {
					t.Errorf("the resolver was asked %d times, want %d", n, want)
				}
			})
		})
	}
	t.Run("server", func(t *testing.T) {
		f, _ := newScriptForwarder(t, 10, func(q *dns.Msg) [][]byte {
			return [][]byte{packed(withOPTAlways(q))}
		}, nil)
		addr := startServer(t, f)
		for round := range 2 { // a miss, then a hit
			for _, transport := range []string{"udp", "tcp"} {
				m := exchange(t, transport, addr, query(transport+".example", dns.TypeA, 7))
				if m.IsEdns0() != nil || len(m.Answer) != 1 {
					t.Errorf("round %d over %s: OPT %v, %d answers; want none, 1", round, transport, m.IsEdns0(), len(m.Answer))
				}
			}
		}
	})
	t.Run("udp transport", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			relays := &fakeRelays{setup: func(int) *fakeRelay {
				r := newFakeRelay()
				r.reply = withOPTAlways
				return r
			}}
			f := newFakeUDPForwarder(t, relays, 1)
			t.Cleanup(func() { f.Close() })
			if m := serve(t, f, query("u.example", dns.TypeA, 8)); m.IsEdns0() != nil || len(m.Answer) != 1 {
				t.Errorf("OPT %v, %d answers; want none, 1", m.IsEdns0(), len(m.Answer))
			}
		})
	})
}

// TestStripOPT: the OPT record goes, in place when it is the last record,
// an extended RCODE becoming SERVFAIL; one followed by other records is
// left to miekg/dns (withoutOPT), which keeps them; a cut answer is left
// as it is; none of it allocates.
func TestStripOPT(t *testing.T) {
	glue := func(m *dns.Msg) *dns.Msg {
		m.Extra = append(m.Extra, &dns.A{Hdr: dns.RR_Header{Name: "ns.example.", Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60}, A: net.IPv4(192, 0, 2, 8)})
		return m
	}
	base := func() *dns.Msg { return echoReply(query("a.example", dns.TypeA, 1)) }

	last := base()
	glue(last).SetEdns0(1232, true)
	b := packed(last)
	out, ok := stripOPT(bytes.Clone(b))
	m := new(dns.Msg)
	if err := m.Unpack(out); !ok || err != nil || m.IsEdns0() != nil || len(m.Extra) != 1 || len(m.Answer) != 1 {
		t.Errorf("OPT last: ok %v, %v: %v", ok, err, m)
	}
	buf := make([]byte, len(b))
	if allocs := testing.AllocsPerRun(100, func() {
		copy(buf, b) // stripped in place: the whole answer again
		if _, ok := stripOPT(buf); !ok {
			t.Fatal("not stripped")
		}
	}); allocs != 0 {
		t.Errorf("%v allocations, want 0", allocs)
	}

	ext := base()
	ext.SetEdns0(1232, false)
	ext.Rcode = dns.RcodeBadCookie
	out, ok = stripOPT(packed(ext))
	if err := m.Unpack(out); !ok || err != nil || m.IsEdns0() != nil || m.Rcode != dns.RcodeServerFailure {
		t.Errorf("extended RCODE: ok %v, %v: %s %v", ok, err, dns.RcodeToString[m.Rcode], m.IsEdns0())
	}

	first := base()
	first.SetEdns0(1232, false)
	glue(first)
	b = packed(first)
	if _, ok := stripOPT(b); ok {
		t.Error("an OPT record before another stripped in place")
	}
	if err := m.Unpack(withoutOPT(b)); err != nil || m.IsEdns0() != nil || len(m.Extra) != 1 {
		t.Errorf("OPT before glue: %v: %v", err, m)
	}

	b = packed(last)
	for n := range len(b) - 1 {
		cut := b[:n]
		if n >= headerLen && binary.BigEndian.Uint16(cut[10:]) == 0 {
			continue
		}
		if out, ok := stripOPT(cut); ok || len(out) != n {
			t.Errorf("%d-byte prefix: ok %v, %d bytes", n, ok, len(out))
		}
	}
}
