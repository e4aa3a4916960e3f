package dnsforward

import (
	"bytes"
	"encoding/binary"
	"errors"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/net/dns/dnsmessage"
)

// Wire-format limits (RFC 1035 §3.1, §4.1.1).
const (
	headerLen  = 12
	maxNameLen = 255
	// keyLen: a lower-cased name, type, class and the key's flag byte.
	keyLen = maxNameLen + 5
	// maxMsgLen: offsets into a message fit in a uint16.
	maxMsgLen = 0xFFFF
)

// The query's bits that select another answer: the key's last byte.
const (
	keyDO   = 1 << iota // DNSSEC OK: signatures in the answer (RFC 3225)
	keyCD               // checking disabled: data the resolver did not validate (RFC 4035 §3.2.2)
	keyEDNS             // an OPT record: the answer has one only then (RFC 6891 §7)
)

// Header flag bits the answer copies from the query (RFC 1035 §4.1.1,
// RFC 4035 §3.1.6, RFC 6840 §5.9): RD in the third byte, CD in the fourth.
const (
	flagRD = 0x01
	flagCD = 0x10
)

// questionKey is a query's question in wire form: the name as asked (case
// kept, for the reply), the cache key (name in lower case, type, class,
// keyDO|keyCD|keyEDNS) and the RD bit the answer echoes. Built on the
// stack, so a lookup allocates nothing.
type questionKey struct {
	name [maxNameLen]byte
	nlen int
	key  [keyLen]byte
	rd   bool
}

// set fills k from a wire-form name; false if the name is too long.
func (k *questionKey) set(name []byte, qtype, qclass uint16, flags byte, rd bool) bool {
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
	k.key[n+4] = flags
	k.rd = rd
	return true
}

// bytes is the cache key.
func (k *questionKey) bytes() []byte { return k.key[:k.nlen+5] }

// flightKey is the key concurrent misses merge under: the cache key and
// the RD bit. A resolver may answer an RD=0 query otherwise (unbound
// refuses it for data it would have to recurse for, BIND answers with a
// referral), so it must neither answer RD=1 queries nor take their
// answer.
func (k *questionKey) flightKey() string {
	var b [keyLen + 1]byte
	n := copy(b[:], k.bytes())
	if k.rd {
		b[n] = 1
	}
	return string(b[:n+1])
}

// asked is the question's name as the client wrote it, in wire form.
func (k *questionKey) asked() []byte { return k.name[:k.nlen] }

// edns reports whether the query has an OPT record.
func (k *questionKey) edns() bool { return k.key[k.nlen+4]&keyEDNS != 0 }

// setFlags makes a packed answer's RD and CD bits the query's: a cached or
// shared answer carries the first asker's.
func (k *questionKey) setFlags(answer []byte) {
	if len(answer) < headerLen {
		return
	}
	answer[2] &^= flagRD
	if k.rd {
		answer[2] |= flagRD
	}
	answer[3] &^= flagCD
	if k.key[k.nlen+4]&keyCD != 0 {
		answer[3] |= flagCD
	}
}

// wireQuery is what the cache needs of a query read from the network.
type wireQuery struct {
	id uint16
	// udpSize is the most a UDP client takes: its EDNS buffer size, at
	// least 512 (RFC 6891 §6.2.5), or 512 without EDNS.
	udpSize int
}

// parseQuery reads a query as far as the cache key needs, allocating
// nothing. It accepts only the plain case: a standard query with one
// question of a known class, not a zone transfer, no answer or authority
// records and at most an EDNS(0) OPT record. Anything else reports false and goes to the
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
	if err != nil || !knownClass(q.Class) || isTransferType(uint16(q.Type)) {
		return wireQuery{}, false
	}
	nameEnd, ok := plainNameEnd(msg, headerLen)
	if !ok {
		return wireQuery{}, false
	}
	wq := wireQuery{id: h.ID, udpSize: dns.MinMsgSize}
	var flags byte
	if h.CheckingDisabled {
		flags |= keyCD
	}
	if ar == 1 {
		if p.SkipAllQuestions() != nil || p.SkipAllAnswers() != nil || p.SkipAllAuthorities() != nil {
			return wireQuery{}, false
		}
		rh, err := p.AdditionalHeader()
		// Only EDNS version 0: others are the resolver's to answer BADVERS.
		// The owner must be the root written out, one zero byte, as
		// upstreamWire reads the record at fixed offsets: a compression
		// pointer to a zero byte reads as the root too, two bytes long.
		if err != nil || rh.Type != dnsmessage.TypeOPT || msg[nameEnd+4] != 0 || rh.TTL>>16&0xFF != 0 {
			return wireQuery{}, false
		}
		if p.SkipAdditional() != nil {
			return wireQuery{}, false
		}
		flags |= keyEDNS
		if rh.TTL&0x8000 != 0 {
			flags |= keyDO
		}
		wq.udpSize = max(int(rh.Class), dns.MinMsgSize)
	}
	if !k.set(msg[headerLen:nameEnd], uint16(q.Type), uint16(q.Class), flags, h.RecursionDesired) {
		return wireQuery{}, false
	}
	return wq, true
}

// upstreamWire is a plain query (see parseQuery, which filled k) as the
// forwarder sends it: its OPT record without options (see
// upstreamQuery). A new slice only when there were options to drop.
func upstreamWire(query []byte, k *questionKey) []byte {
	if !k.edns() {
		return query
	}
	// parseQuery saw the OPT record right after the question: a root
	// name, then type, class, TTL and RDLENGTH.
	opt := headerLen + k.nlen + 4
	if opt+11 > len(query) || binary.BigEndian.Uint16(query[opt+9:]) == 0 {
		return query
	}
	out := bytes.Clone(query[:opt+11])
	binary.BigEndian.PutUint16(out[opt+9:], 0)
	return out
}

// truncatedWire is an answer, whose RCODE is rcode, cut to its header and
// the question of the plain query (see parseQuery, which filled k), with
// TC=1, and an OPT record if the query had one (RFC 6891 §7): what a UDP
// client gets of an answer too large for it that cannot be cut record by
// record (RFC 2181 §9).
func truncatedWire(answer []byte, k *questionKey, rcode int) []byte {
	out := headerAndQuestion(answer, k, rcode)
	out[2] |= 0x02 // TC
	return out
}

// questionlessError reports whether answer is an error answer without a
// question (QDCOUNT 0) and its RCODE (the header's four bits): unbound
// refuses a client its access control does not allow so (REFUSED, header
// only), and servers answer FORMERR or NOTIMP so to a query they cannot
// read. Matched by ID alone, it is that query's answer. NOERROR and
// NXDOMAIN say something of a name, so without the question they answer
// nothing.
func questionlessError(answer []byte) (rcode int, ok bool) {
	if len(answer) < headerLen || binary.BigEndian.Uint16(answer[4:]) != 0 {
		return 0, false
	}
	rcode = int(answer[3] & 0xF)
	return rcode, rcode != dns.RcodeSuccess && rcode != dns.RcodeNameError
}

// headerAndQuestion is an answer's header, with RCODE rcode, and the
// question of the plain query (see parseQuery, which filled k), with an
// OPT record if the query had one (RFC 6891 §7) and nothing else: what a
// client gets of a questionless error answer (see questionlessError), whose
// question stub resolvers check (glibc ignores an answer whose question is
// not its query's), and the base of truncatedWire.
func headerAndQuestion(answer []byte, k *questionKey, rcode int) []byte {
	out := make([]byte, headerLen, headerLen+k.nlen+4+optLen)
	copy(out, answer[:headerLen])
	binary.BigEndian.PutUint16(out[4:], 1)
	clear(out[6:headerLen])
	out = append(out, k.asked()...)
	out = append(out, k.key[k.nlen:k.nlen+4]...)
	if !k.edns() {
		return out
	}
	binary.BigEndian.PutUint16(out[10:], 1)
	// Root owner, type OPT, our UDP size, then the TTL: the RCODE's upper
	// bits, version 0 and DO (RFC 6891 §6.1.3), and no RDATA.
	out = append(out, 0)
	out = binary.BigEndian.AppendUint16(out, dns.TypeOPT)
	out = binary.BigEndian.AppendUint16(out, ednsUDPSize)
	ttl := uint32(rcode>>4&0xFF) << 24
	if k.key[k.nlen+4]&keyDO != 0 {
		ttl |= 0x8000
	}
	out = binary.BigEndian.AppendUint32(out, ttl)
	return binary.BigEndian.AppendUint16(out, 0)
}

// optLen is an OPT record without options.
const optLen = 11

// stripOPT removes the OPT record from a packed answer, in place: for a
// client whose query had none (RFC 6891 §7), when the resolver added one
// anyway (dnsmasq does on a TCP connection that has carried an EDNS
// query). The RCODE's upper bits go with the record: an extended RCODE
// becomes SERVFAIL, which a client without EDNS can read. It allocates
// nothing. false, with msg as it was, when msg does not read or its OPT
// record is not the last record: moving the records after it could break
// their compression pointers (miekg/dns can rewrite it; see withoutOPT).
func stripOPT(msg []byte) ([]byte, bool) {
	if len(msg) < headerLen {
		return msg, false
	}
	ar := int(binary.BigEndian.Uint16(msg[10:]))
	if ar == 0 {
		return msg, true // the usual answer to a query without EDNS
	}
	qd := int(binary.BigEndian.Uint16(msg[4:]))
	before := int(binary.BigEndian.Uint16(msg[6:])) + int(binary.BigEndian.Uint16(msg[8:]))
	off := headerLen
	var err error
	for range qd {
		if off, err = skipName(msg, off); err != nil || off+4 > len(msg) {
			return msg, false
		}
		off += 4
	}
	for i := range before + ar {
		start := off
		if off, err = skipName(msg, off); err != nil || off+10 > len(msg) {
			return msg, false
		}
		rrtype := binary.BigEndian.Uint16(msg[off:])
		ext := msg[off+4] // an OPT record's TTL starts with the RCODE's upper bits
		end := off + 10 + int(binary.BigEndian.Uint16(msg[off+8:]))
		if end > len(msg) {
			return msg, false
		}
		if rrtype == dns.TypeOPT && i >= before {
			if i != before+ar-1 {
				return msg, false
			}
			binary.BigEndian.PutUint16(msg[10:], uint16(ar-1))
			if ext != 0 {
				msg[3] = msg[3]&^0xF | dns.RcodeServerFailure
			}
			return msg[:start], true
		}
		off = end
	}
	return msg, true
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

// soleQuestion returns where the name of msg's question ends, when msg
// has exactly one question, its name plain (see plainNameEnd) and its
// type and class there.
func soleQuestion(msg []byte) (nameEnd int, ok bool) {
	if len(msg) < headerLen || binary.BigEndian.Uint16(msg[4:]) != 1 {
		return 0, false
	}
	nameEnd, ok = plainNameEnd(msg, headerLen)
	return nameEnd, ok && nameEnd+4 <= len(msg)
}

// equalFoldASCII compares wire-form names as DNS does: ASCII letters in
// any case (RFC 4343), every other byte as it is. (bytes.EqualFold folds
// Unicode too: "\u212as" and "kſ" would be one name.)
func equalFoldASCII(a, b []byte) bool {
	if len(a) != len(b) {
		return false
	}
	for i, c := range a {
		d := b[i]
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		if 'A' <= d && d <= 'Z' {
			d += 'a' - 'A'
		}
		if c != d {
			return false
		}
	}
	return true
}

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

// layout is what the cache and the forwarder need of a packed answer.
type layout struct {
	qnameEnd int      // where the question's name ends
	ttls     []uint16 // offsets of the TTL field of every record but OPT
	rcode    int      // with OPT's extended bits
	answers  int      // records in the answer section
	// minTTL is the least TTL in the answer and authority sections.
	minTTL uint32
	// soa: the first SOA record of the authority section, its TTL and
	// MINIMUM (RFC 2308 §5).
	soa            bool
	soaTTL, soaMin uint32
	truncated      bool
	// typed: the answer section has a record of the question's type (not
	// only a CNAME chain towards it).
	typed bool
	opt   bool // an OPT record
}

// answerLayout walks a packed answer with one question and records the
// layout of its records, their TTL fields appended to ttls. The cache
// records the offsets once, so that a hit patches TTLs in place.
func answerLayout(msg []byte, ttls []uint16) (layout, error) {
	l := layout{ttls: ttls, minTTL: ^uint32(0)}
	if len(msg) < headerLen || len(msg) > maxMsgLen {
		return l, errMalformed
	}
	if binary.BigEndian.Uint16(msg[4:]) != 1 {
		return l, errMalformed
	}
	var ok bool
	if l.qnameEnd, ok = plainNameEnd(msg, headerLen); !ok || l.qnameEnd+4 > len(msg) {
		return l, errMalformed
	}
	flags := binary.BigEndian.Uint16(msg[2:])
	l.rcode = int(flags & 0xF)
	l.truncated = flags&(1<<9) != 0
	an, ns := int(binary.BigEndian.Uint16(msg[6:])), int(binary.BigEndian.Uint16(msg[8:]))
	records := an + ns + int(binary.BigEndian.Uint16(msg[10:]))
	l.answers = an
	qtype := binary.BigEndian.Uint16(msg[l.qnameEnd:])
	off := l.qnameEnd + 4
	ext := 0 // the extended RCODE's upper 8 bits
	var err error
	for i := range records {
		if off, err = skipName(msg, off); err != nil {
			return l, err
		}
		if off+10 > len(msg) {
			return l, errMalformed
		}
		rrtype := binary.BigEndian.Uint16(msg[off:])
		ttl := binary.BigEndian.Uint32(msg[off+4:])
		rdata := off + 10
		off = rdata + int(binary.BigEndian.Uint16(msg[off+8:]))
		if off > len(msg) {
			return l, errMalformed
		}
		if rrtype == dns.TypeOPT {
			l.opt = true
			if i >= an+ns {
				ext = int(ttl >> 24) // the last OPT's, as miekg/dns reads it
			}
			continue
		}
		l.ttls = append(l.ttls, uint16(rdata-6))
		if i < an+ns {
			l.minTTL = min(l.minTTL, ttlValue(ttl))
		}
		if i < an && (rrtype == qtype || qtype == dns.TypeANY) {
			l.typed = true
		}
		// SOA RDATA ends with MINIMUM, after two names and four other
		// 32-bit fields.
		if i >= an && i < an+ns && rrtype == dns.TypeSOA && !l.soa && off-rdata >= 22 {
			l.soa, l.soaTTL, l.soaMin = true, ttlValue(ttl), ttlValue(binary.BigEndian.Uint32(msg[off-4:]))
		}
	}
	l.rcode |= ext << 4
	return l, nil
}

// ttlValue is a TTL field as RFC 2181 §8 has it read: a value with the
// most significant bit set counts as zero. (The SOA's MINIMUM, a TTL for
// negative answers, is read so too.)
func ttlValue(field uint32) uint32 {
	if field >= 1<<31 {
		return 0
	}
	return field
}

// cacheTTL is how long an answer may be cached: as long as its records
// allow, a negative answer (NXDOMAIN, or NODATA: no record of the type
// asked, perhaps after a CNAME chain) as long as its SOA and its records
// allow (RFC 2308 §3, §5: the least of the SOA's TTL, its MINIMUM and the
// chain's TTLs), both capped at maxTTL; a SERVFAIL briefly; never a
// truncated answer, another RCODE or a negative answer without an SOA.
func (l *layout) cacheTTL() (time.Duration, bool) {
	if l.truncated {
		return 0, false
	}
	switch l.rcode {
	case dns.RcodeServerFailure:
		return servFailTTL, true
	case dns.RcodeSuccess, dns.RcodeNameError:
	default:
		return 0, false
	}
	ttl := l.minTTL
	// A NOERROR answer with records but none of the type asked and an SOA
	// is NODATA at the end of a CNAME chain; without the SOA it is kept as
	// a positive answer, as before.
	if l.rcode == dns.RcodeNameError || l.answers == 0 || !l.typed && l.soa {
		if !l.soa {
			return 0, false
		}
		ttl = min(ttl, l.soaTTL, l.soaMin)
	}
	return time.Duration(min(ttl, uint32(maxTTL/time.Second))) * time.Second, true
}
