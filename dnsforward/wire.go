package dnsforward

import (
	"encoding/binary"
	"errors"

	"github.com/miekg/dns"
	"golang.org/x/net/dns/dnsmessage"
)

// Wire-format limits (RFC 1035 §3.1, §4.1.1).
const (
	headerLen  = 12
	maxNameLen = 255
	// keyLen: a lower-cased name, type, class and the DO bit.
	keyLen = maxNameLen + 5
	// maxMsgLen: offsets into a message fit in a uint16.
	maxMsgLen = 0xFFFF
)

// questionKey is a query's question in wire form: the name as asked (case
// kept, for the reply) and the cache key (name in lower case, type,
// class, DNSSEC OK bit). Built on the stack, so a lookup allocates nothing.
type questionKey struct {
	name [maxNameLen]byte
	nlen int
	key  [keyLen]byte
	klen int
}

// set fills k from a wire-form name; false if the name is too long.
func (k *questionKey) set(name []byte, qtype, qclass uint16, do bool) bool {
	if len(name) > maxNameLen {
		return false
	}
	k.nlen = copy(k.name[:], name)
	for i, c := range name {
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		k.key[i] = c
	}
	n := len(name)
	binary.BigEndian.PutUint16(k.key[n:], qtype)
	binary.BigEndian.PutUint16(k.key[n+2:], qclass)
	k.key[n+4] = 0
	if do {
		k.key[n+4] = 1
	}
	k.klen = n + 5
	return true
}

// bytes is the cache key.
func (k *questionKey) bytes() []byte { return k.key[:k.klen] }

// asked is the question's name as the client wrote it, in wire form.
func (k *questionKey) asked() []byte { return k.name[:k.nlen] }

// wireQuery is what the cache needs of a query read from the network.
type wireQuery struct {
	id uint16
	// udpSize is the most a UDP client takes: its EDNS buffer size, at
	// least 512 (RFC 6891 §6.2.5), or 512 without EDNS.
	udpSize int
}

// parseQuery reads a query as far as the cache key needs, allocating
// nothing. It accepts only the plain case: a standard query with one
// question of a known class, no answer or authority records and at most
// an EDNS(0) OPT record. Anything else reports false and goes to the
// miekg/dns path, which handles it as before.
func parseQuery(msg []byte, k *questionKey) (wireQuery, bool) {
	var p dnsmessage.Parser
	h, err := p.Start(msg)
	if err != nil || h.Response || h.OpCode != 0 {
		return wireQuery{}, false
	}
	// Start read the header, so msg holds at least headerLen bytes.
	qd, an, ns, ar := binary.BigEndian.Uint16(msg[4:]), binary.BigEndian.Uint16(msg[6:]),
		binary.BigEndian.Uint16(msg[8:]), binary.BigEndian.Uint16(msg[10:])
	if qd != 1 || an != 0 || ns != 0 || ar > 1 {
		return wireQuery{}, false
	}
	q, err := p.Question()
	if err != nil || !knownClass(q.Class) {
		return wireQuery{}, false
	}
	nameEnd, ok := plainNameEnd(msg, headerLen)
	if !ok {
		return wireQuery{}, false
	}
	wq := wireQuery{id: h.ID, udpSize: dns.MinMsgSize}
	do := false
	if ar == 1 {
		if p.SkipAllQuestions() != nil || p.SkipAllAnswers() != nil || p.SkipAllAuthorities() != nil {
			return wireQuery{}, false
		}
		rh, err := p.AdditionalHeader()
		// Only EDNS version 0: others are the resolver's to answer BADVERS.
		if err != nil || rh.Type != dnsmessage.TypeOPT || rh.Name.Length != 1 || rh.TTL>>16&0xFF != 0 {
			return wireQuery{}, false
		}
		if p.SkipAdditional() != nil {
			return wireQuery{}, false
		}
		do = rh.TTL&0x8000 != 0
		wq.udpSize = max(int(rh.Class), dns.MinMsgSize)
	}
	if !k.set(msg[headerLen:nameEnd], uint16(q.Type), uint16(q.Class), do) {
		return wireQuery{}, false
	}
	return wq, true
}

// knownClass: the classes a cacheable question may ask for.
func knownClass(c dnsmessage.Class) bool {
	switch c {
	case dnsmessage.ClassINET, dnsmessage.ClassCHAOS, dnsmessage.ClassHESIOD:
		return true
	}
	return false
}

// plainNameEnd returns where the name at off ends, if it is written out
// in labels with no compression pointer (as a question's name is).
func plainNameEnd(msg []byte, off int) (int, bool) {
	start := off
	for off < len(msg) && off-start < maxNameLen {
		c := int(msg[off])
		switch {
		case c == 0:
			return off + 1, true
		case c > 63:
			return 0, false // a pointer or a reserved label type
		}
		off += 1 + c
	}
	return 0, false
}

var errMalformed = errors.New("dns message malformed")

// skipName returns the offset after the (possibly compressed) name at off.
func skipName(msg []byte, off int) (int, error) {
	for off < len(msg) {
		c := int(msg[off])
		switch c & 0xC0 {
		case 0x00:
			if c == 0 {
				return off + 1, nil
			}
			off += 1 + c
		case 0xC0:
			if off+2 > len(msg) {
				return 0, errMalformed
			}
			return off + 2, nil
		default:
			return 0, errMalformed
		}
	}
	return 0, errMalformed
}

// answerLayout walks a packed answer with one question: where its
// question's name ends, and the offsets of the TTL field of every record
// but OPT (whose TTL field holds flags). The cache records these once, so
// that a hit patches TTLs in place.
func answerLayout(msg []byte) (qnameEnd int, ttls []uint16, err error) {
	if len(msg) < headerLen || len(msg) > maxMsgLen {
		return 0, nil, errMalformed
	}
	if binary.BigEndian.Uint16(msg[4:]) != 1 {
		return 0, nil, errMalformed
	}
	qnameEnd, ok := plainNameEnd(msg, headerLen)
	if !ok || qnameEnd+4 > len(msg) {
		return 0, nil, errMalformed
	}
	records := int(binary.BigEndian.Uint16(msg[6:])) + int(binary.BigEndian.Uint16(msg[8:])) + int(binary.BigEndian.Uint16(msg[10:]))
	off := qnameEnd + 4
	for range records {
		if off, err = skipName(msg, off); err != nil {
			return 0, nil, err
		}
		if off+10 > len(msg) {
			return 0, nil, errMalformed
		}
		rrtype := binary.BigEndian.Uint16(msg[off:])
		if rrtype != dns.TypeOPT {
			ttls = append(ttls, uint16(off+4))
		}
		off += 10 + int(binary.BigEndian.Uint16(msg[off+8:]))
		if off > len(msg) {
			return 0, nil, errMalformed
		}
	}
	return qnameEnd, ttls, nil
}
