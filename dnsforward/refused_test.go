package dnsforward

import (
	"fmt"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/miekg/dns"
	"github.com/rs/zerolog"
)

// bareRefusal is unbound's answer to a client its access control refuses
// (the default allows only localhost): the query's header with QR and
// REFUSED, and nothing else, not even the question (QDCOUNT 0).
func bareRefusal(q *dns.Msg) *dns.Msg {
	return &dns.Msg{MsgHdr: dns.MsgHdr{Id: q.Id, Response: true, Opcode: q.Opcode,
		RecursionDesired: q.RecursionDesired, Rcode: dns.RcodeRefused}}
}

// wantRefusal checks that m is REFUSED to q, whole: q's ID and question,
// and an OPT record just when q has one.
func wantRefusal(t *testing.T, what string, q, m *dns.Msg) {
	t.Helper()
	if m.Rcode != dns.RcodeRefused || m.Id != q.Id || len(m.Question) != 1 || m.Question[0] != q.Question[0] {
		t.Errorf("%s: %s id %d question %v, want REFUSED id %d question %v",
			what, dns.RcodeToString[m.Rcode], m.Id, m.Question, q.Id, q.Question)
	}
	if opt := q.IsEdns0(); opt != nil {
		wantOPT(t, what, m, opt.Do())
	} else if m.IsEdns0() != nil {
		t.Errorf("%s: OPT %v in the answer to a query without one", what, m.IsEdns0())
	}
}

// refusalLines are the log lines that say a resolver refused queries.
func refusalLines(logs *syncBuffer) []string {
	var out []string
	for _, l := range logs.lines() {
		if strings.Contains(l, "refused the query: check its access control for the proxy's address") {
			out = append(out, l)
		}
	}
	return out
}

// TestBareRefusalAnswersAtOnce: a resolver that refuses the proxy by its
// access control answers REFUSED with no question (unbound): the client
// gets REFUSED at once, with its question (glibc ignores an answer
// without it) and an OPT record if it sent one, on the wire path (the UDP
// fast path's) and the message path, on the tcp and the udp transports;
// the refusal is not cached, and the log says once what to check. Before,
// the udp transport dropped the answer as malformed, so the client waited
// the whole timeout for SERVFAIL ("no answer in time"); the tcp
// transport's wire path passed on the bare header; neither logged a word.
func TestBareRefusalAnswersAtOnce(t *testing.T) {
	queries := func() []*dns.Msg {
		plain := query("a.example", dns.TypeA, 0x1234)
		edns := query("B.Example", dns.TypeAAAA, 0x2345)
		edns.SetEdns0(1232, true)
		return []*dns.Msg{plain, edns}
	}
	for _, cacheSize := range []int{0, 10} {
		t.Run(fmt.Sprintf("tcp cache %d", cacheSize), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				f, res := newScriptForwarder(t, cacheSize, func(q *dns.Msg) [][]byte {
					return [][]byte{packed(bareRefusal(q))}
				}, nil)
				var logs syncBuffer
				f.cfg.Logger = zerolog.New(&logs)
				start := time.Now()
				for round := range 2 { // the second round finds nothing cached
					for _, q := range queries() {
						wantRefusal(t, "wire path", q, askWire(t, f, q.Copy()))
						wantRefusal(t, "message path", q, serve(t, f, q.Copy()))
					}
					if n := len(res.queries()); n != 4*(round+1) {
						t.Errorf("round %d: the resolver was asked %d times, want %d: a refusal is not cached", round, n, 4*(round+1))
					}
				}
				if d := time.Since(start); d != 0 {
					t.Errorf("the refusals took %s, want no wait", d)
				}
				if lines := refusalLines(&logs); len(lines) != 1 || !strings.Contains(lines[0], "192.0.2.53:53") {
					t.Errorf("%d refusal lines, want 1 naming the resolver:\n%s", len(lines), strings.Join(logs.lines(), "\n"))
				}
				if n := f.Stats().Responses[dns.RcodeRefused].Load(); n != 4 {
					t.Errorf("Responses[REFUSED] = %d, want the 4 served (askWire counts none)", n)
				}
			})
		})
	}
	t.Run("udp", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			relays := &fakeRelays{setup: func(int) *fakeRelay {
				r := newFakeRelay()
				r.reply = bareRefusal
				return r
			}}
			f := newFakeUDPForwarder(t, relays, 1)
			t.Cleanup(func() { f.Close() })
			var logs syncBuffer
			f.cfg.Logger = zerolog.New(&logs)
			start := time.Now()
			for _, q := range queries() {
				wantRefusal(t, "udp transport", q, serve(t, f, q.Copy()))
			}
			if d := time.Since(start); d != 0 {
				t.Errorf("the refusals took %s, want no wait (the timeout is 10 s)", d)
			}
			if lines := refusalLines(&logs); len(lines) != 1 {
				t.Errorf("%d refusal lines, want 1:\n%s", len(lines), strings.Join(logs.lines(), "\n"))
			}
			if n := f.Stats().MalformedAnswers.Load(); n != 0 {
				t.Errorf("MalformedAnswers = %d, want 0", n)
			}
		})
	})
}

// TestBareErrorAnswerMatchedByIDOnly: on the udp transport an error answer
// without a question goes to the one query waiting under its ID from that
// resolver; when two wait under it (IDs are unique per question only) it
// goes to neither and counts as malformed.
func TestBareErrorAnswerMatchedByIDOnly(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		relays := &fakeRelays{}
		f := newFakeUDPForwarder(t, relays, 1)
		t.Cleanup(func() { f.Close() })
		tr := f.udp
		one, two := make(chan *dns.Msg, 1), make(chan *dns.Msg, 1)
		tr.mu.Lock()
		tr.pending[udpKey{id: 7, name: "a.example.", qtype: dns.TypeA}] = udpPending{ch: one}
		tr.mu.Unlock()
		bare := &dns.Msg{MsgHdr: dns.MsgHdr{Id: 7, Response: true, Rcode: dns.RcodeFormatError}}
		if _, ok := tr.deliverByID(bare, documentationResolvers(t, 1)[0]); !ok || len(one) != 1 {
			t.Fatal("the one query under the ID did not get the answer")
		}
		tr.mu.Lock()
		tr.pending[udpKey{id: 8, name: "a.example.", qtype: dns.TypeA}] = udpPending{ch: one}
		tr.pending[udpKey{id: 8, name: "b.example.", qtype: dns.TypeA}] = udpPending{ch: two}
		tr.mu.Unlock()
		bare.Id = 8
		if _, ok := tr.deliverByID(bare, documentationResolvers(t, 1)[0]); ok || len(two) != 0 {
			t.Error("an answer for two queries under one ID was delivered")
		}
	})
}
