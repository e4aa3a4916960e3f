package dnsforward

import (
	"bytes"
	"encoding/binary"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// FuzzReadTCPFrame: the length-prefixed framing of answers from the
// resolvers. Property: no panic; a frame is read whole or the stream
// fails; and a frame followed by a good one never eats the good one.
func FuzzReadTCPFrame(f *testing.F) {
	good := new(dns.Msg)
	good.SetQuestion("example.", dns.TypeA)
	wire, _ := good.Pack()
	frame := binary.BigEndian.AppendUint16(nil, uint16(len(wire)))
	frame = append(frame, wire...)
	f.Add(frame)
	f.Add([]byte{0, 0})
	f.Add([]byte{0, 5, 1, 2, 3, 4, 5})
	f.Add([]byte{0xff, 0xff, 1})
	f.Add([]byte{0})
	f.Fuzz(func(t *testing.T, b []byte) {
		var lenBuf [2]byte
		r := bytes.NewReader(append(append([]byte{}, b...), frame...))
		first, err := readTCPFrame(r, &lenBuf)
		if err != nil {
			return // the fuzzed bytes cut the stream
		}
		if len(b) >= 2 && int(binary.BigEndian.Uint16(b))+2 == len(b) {
			if !bytes.Equal(first, b[2:]) {
				t.Fatalf("frame % x read as % x", b, first)
			}
			next, err := readTCPFrame(r, &lenBuf)
			if err != nil || !bytes.Equal(next, wire) {
				t.Fatalf("the frame after % x was not read intact: % x %v", b, next, err)
			}
		}
	})
}

// fuzzQuerySeeds are plain queries, with and without EDNS and the DO bit.
func fuzzQuerySeeds(f *testing.F) {
	plain := new(dns.Msg)
	plain.SetQuestion("Www.Example.", dns.TypeA)
	edns := new(dns.Msg)
	edns.SetQuestion("example.", dns.TypeAAAA)
	edns.SetEdns0(1232, true)
	for _, m := range []*dns.Msg{plain, edns} {
		wire, _ := m.Pack()
		f.Add(wire)
	}
}

// FuzzParseQuery: the fast path's reading of queries from the network.
// Property: no panic; what it sends upstream for a query it takes
// (upstreamWire) unpacks, with no EDNS option; a query it takes is one
// miekg/dns reads too, with the same ID and the same cache key, so both
// paths share the cache.
func FuzzParseQuery(f *testing.F) {
	fuzzQuerySeeds(f)
	withSubnet := new(dns.Msg)
	withSubnet.SetQuestion("example.", dns.TypeA)
	withSubnet.SetEdns0(1232, false)
	withSubnet.IsEdns0().Option = []dns.EDNS0{&dns.EDNS0_SUBNET{Code: dns.EDNS0SUBNET, Family: 1, SourceNetmask: 24, Address: []byte{198, 51, 100, 0}}}
	if wire, err := withSubnet.Pack(); err == nil {
		f.Add(wire)
		f.Add(optOwnerPointer(wire))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var k questionKey
		wq, ok := parseQuery(b, &k)
		if !ok {
			return
		}
		up := upstreamWire(b, &k)
		sent := new(dns.Msg)
		if err := sent.Unpack(up); err != nil {
			t.Fatalf("% x: sent upstream as % x, which does not unpack: %v", b, up, err)
		}
		if opt := sent.IsEdns0(); opt != nil && len(opt.Option) > 0 {
			t.Fatalf("% x: sent upstream with options %v", b, opt.Option)
		}
		m := new(dns.Msg)
		if m.Unpack(b) != nil {
			return // e.g. EDNS options miekg/dns rejects; the key is still sound
		}
		var mk questionKey
		if !keyOf(m, &mk) || !bytes.Equal(k.bytes(), mk.bytes()) || wq.id != m.Id {
			t.Fatalf("% x: key % x id %d, miekg/dns: key % x id %d", b, k.bytes(), wq.id, mk.bytes(), m.Id)
		}
	})
}

// FuzzAnswerLayout: the walk that finds the TTL fields of answers.
// Property: no panic; the offsets lie inside the message; where miekg/dns
// reads every record of the message, the RCODE and TC bit are the ones it
// reads and the offsets hold the TTLs of its records other than OPT, in
// order.
func FuzzAnswerLayout(f *testing.F) {
	fuzzQuerySeeds(f)
	answer := answerA("a.example.")
	answer.Ns = append(answer.Ns, &dns.SOA{Hdr: dns.RR_Header{Name: "example.", Rrtype: dns.TypeSOA, Class: dns.ClassINET, Ttl: 300},
		Ns: "ns.example.", Mbox: "admin.example.", Minttl: 30})
	answer.SetEdns0(1232, true)
	answer.Compress = true
	wire, _ := answer.Pack()
	f.Add(wire)
	f.Fuzz(func(t *testing.T, b []byte) {
		l, err := answerLayout(b, nil)
		if err != nil {
			return
		}
		ttls := l.ttls
		if l.qnameEnd > len(b) {
			t.Fatalf("question ends at %d of %d", l.qnameEnd, len(b))
		}
		for _, off := range ttls {
			if int(off)+4 > len(b) {
				t.Fatalf("TTL at %d of %d", off, len(b))
			}
		}
		m := new(dns.Msg)
		if m.Unpack(b) != nil || len(m.Answer)+len(m.Ns)+len(m.Extra) != int(binary.BigEndian.Uint16(b[6:]))+int(binary.BigEndian.Uint16(b[8:]))+int(binary.BigEndian.Uint16(b[10:])) {
			return
		}
		if l.rcode != m.Rcode || l.truncated != m.Truncated {
			t.Fatalf("% x: rcode %d truncated %v, miekg/dns reads %d %v", b, l.rcode, l.truncated, m.Rcode, m.Truncated)
		}
		var want []uint32
		for _, sec := range [][]dns.RR{m.Answer, m.Ns, m.Extra} {
			for _, rr := range sec {
				if rr.Header().Rrtype != dns.TypeOPT {
					want = append(want, rr.Header().Ttl)
				}
			}
		}
		if len(want) != len(ttls) {
			t.Fatalf("% x: %d TTL fields, miekg/dns reads %d records", b, len(ttls), len(want))
		}
		for i, off := range ttls {
			if got := binary.BigEndian.Uint32(b[off:]); got != want[i] {
				t.Fatalf("% x: TTL %d at %d, miekg/dns reads %d", b, got, off, want[i])
			}
		}
	})
}

// FuzzServeMessage: a query's bytes from the network, through the server's
// whole path (accept, unpack, cache, forward) to a resolver that answers by
// the query's ID: header-only FORMERR or REFUSED (as unbound answers what
// it will not take), or the usual answer. Property: no panic; a message
// that is answered is answered with its own ID.
func FuzzServeMessage(f *testing.F) {
	fuzzQuerySeeds(f)
	f.Add([]byte{0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0})            // QDCOUNT 1, no question
	f.Add([]byte{0x12, 0x35, 0x01, 0x00, 0, 0, 0, 0, 0, 0, 0, 0})            // no question at all
	f.Add([]byte{0x12, 0x36, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 1, 'a', 0}) // a name, no type or class
	two := new(dns.Msg)
	two.SetQuestion("a.example.", dns.TypeA)
	two.Question = append(two.Question, two.Question[0])
	if wire, err := two.Pack(); err == nil {
		f.Add(wire)
	}
	fwd, _ := newScriptForwarder(f, 100, func(q *dns.Msg) [][]byte {
		switch q.Id % 3 {
		case 0:
			return [][]byte{packed(&dns.Msg{MsgHdr: dns.MsgHdr{Id: q.Id, Response: true, Rcode: dns.RcodeFormatError}})}
		case 1:
			return [][]byte{packed(&dns.Msg{MsgHdr: dns.MsgHdr{Id: q.Id, Response: true, Rcode: dns.RcodeRefused}})}
		}
		if len(q.Question) != 1 {
			return [][]byte{packed(&dns.Msg{MsgHdr: dns.MsgHdr{Id: q.Id, Response: true, Rcode: dns.RcodeFormatError}})}
		}
		return [][]byte{packed(echoReply(q))}
	}, nil)
	fwd.cfg.Timeout = time.Second
	s := &Server{stopping: make(chan struct{})} // serveMessage needs no socket
	s.cur.Store(newServing(fwd))
	f.Fuzz(func(t *testing.T, b []byte) {
		w := &recorder{}
		s.serveMessage(w, b)
		for _, m := range w.msgs {
			if id := binary.BigEndian.Uint16(b); m.Id != id {
				t.Fatalf("% x: answered with ID %#x, want %#x", b, m.Id, id)
			}
		}
	})
}
