package dnsforward

import (
	"bytes"
	"encoding/binary"
	"hash/maphash"
	"slices"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
	"github.com/miekg/dns"
)

// Cache lifetimes beyond the records' own TTLs.
const (
	// servFailTTL: an upstream SERVFAIL is remembered only briefly, so a
	// resolver that recovers is asked again soon.
	servFailTTL = 2 * time.Second
	// maxTTL caps what a record may ask for.
	maxTTL = 24 * time.Hour
)

// cacheEntry is an answer kept packed, with the offsets of its TTL fields
// recorded once, so that a hit is a copy and a few patches: no unpacking,
// packing or allocation.
type cacheEntry struct {
	key      string // the question it answers (questionKey.bytes)
	wire     []byte // the answer, compressed, with the TTLs it arrived with
	qnameEnd int    // where the question's name ends in wire
	ttls     []uint16
	rcode    int
	stored   time.Time
	expires  time.Time
}

// cache is a bounded LRU of answers that honours TTLs, including negative
// answers (RFC 2308: the SOA's TTL capped by its MINIMUM), and counts them
// down in what it serves. It is keyed by a hash of the question; the
// entry's own key settles the rare collision (a miss).
type cache struct {
	lru  *lru.Cache[uint64, *cacheEntry]
	seed maphash.Seed
	now  func() time.Time
}

func newCache(size int) *cache {
	l, err := lru.New[uint64, *cacheEntry](size)
	if err != nil {
		return nil // size <= 0: no cache
	}
	return &cache{lru: l, seed: maphash.MakeSeed(), now: time.Now}
}

// keyOf fills k with the cache key of a query, and reports false for
// queries that are not cacheable: not exactly one question, not a
// standard query, a zone transfer, records in the answer or authority
// section or other than OPT in the additional one (the answer may depend
// on them: IXFR's serial, a TSIG signature), an EDNS version other than 0
// (the resolver answers those BADVERS, which no other query may share).
func keyOf(q *dns.Msg, k *questionKey) bool {
	if len(q.Question) != 1 || q.Opcode != dns.OpcodeQuery || isZoneTransfer(q) ||
		len(q.Answer) > 0 || len(q.Ns) > 0 || slices.ContainsFunc(q.Extra, notOPT) {
		return false
	}
	qu := q.Question[0]
	var name [maxNameLen + 1]byte
	n, err := dns.PackDomainName(dns.Fqdn(qu.Name), name[:], 0, nil, false)
	if err != nil {
		return false
	}
	var flags byte
	if q.CheckingDisabled {
		flags |= keyCD
	}
	if opt := q.IsEdns0(); opt != nil {
		if opt.Version() != 0 {
			return false
		}
		flags |= keyEDNS
		if opt.Do() {
			flags |= keyDO
		}
	}
	return k.set(name[:n], qu.Qtype, qu.Qclass, flags, q.RecursionDesired)
}

func notOPT(rr dns.RR) bool { return rr.Header().Rrtype != dns.TypeOPT }

func (c *cache) hash(k *questionKey) uint64 { return maphash.Bytes(c.seed, k.bytes()) }

// appendAnswer appends the cached answer to k to dst, made the query's
// own: its ID, RD and CD bits, the question's name as the client wrote it
// (case and all), and the TTLs counted down. It returns the answer's
// RCODE.
func (c *cache) appendAnswer(dst []byte, k *questionKey, id uint16) ([]byte, int, bool) {
	h := c.hash(k)
	e, ok := c.lru.Get(h)
	if !ok || e.key != string(k.bytes()) {
		return dst, 0, false
	}
	now := c.now()
	if !now.Before(e.expires) {
		c.lru.Remove(h)
		return dst, 0, false
	}
	base := len(dst)
	dst = append(dst, e.wire...)
	out := dst[base:]
	binary.BigEndian.PutUint16(out, id)
	k.setFlags(out)
	copy(out[headerLen:e.qnameEnd], k.asked()) // the same length: the keys matched
	if elapsed := uint32(now.Sub(e.stored) / time.Second); elapsed > 0 {
		for _, off := range e.ttls {
			ttl := binary.BigEndian.Uint32(e.wire[off:])
			binary.BigEndian.PutUint32(out[off:], ttl-min(ttl, elapsed))
		}
	}
	return dst, e.rcode, true
}

// get returns the cached answer for k, unpacked, with TTLs counted down
// (the ID and question are for the caller to set).
func (c *cache) get(k *questionKey) (*dns.Msg, bool) {
	wire, _, ok := c.appendAnswer(nil, k, 0)
	if !ok {
		return nil, false
	}
	m := new(dns.Msg)
	if m.Unpack(wire) != nil {
		return nil, false
	}
	return m, true
}

// put stores resp for k for as long as its records allow, and reports
// whether that pushed another answer out. resp must not be shared yet:
// packing may write its extended RCODE into its OPT record.
func (c *cache) put(k *questionKey, resp *dns.Msg) (evicted bool) {
	packed := *resp // Pack reads the records only
	packed.Compress = true
	wire, err := packed.Pack()
	if err != nil {
		return false
	}
	return c.putWire(k, wire)
}

// putWire stores the packed answer wire for k (and keeps wire: the caller
// hands it over) for as long as its records allow, and reports whether
// that pushed another answer out. An answer to an RD=0 query is not kept:
// RD=1 queries share the entry, and it may be a refusal or a referral
// (see flightKey); an RD=0 query may still be answered from the cache.
func (c *cache) putWire(k *questionKey, wire []byte) (evicted bool) {
	if !k.rd {
		return false
	}
	l, err := answerLayout(wire, nil)
	// An OPT record only for a query with one (RFC 6891 §7): a resolver
	// that adds one anyway is not replayed.
	if err != nil || !answers(wire, l.qnameEnd, k) || l.opt && !k.edns() {
		return false
	}
	ttl, ok := l.cacheTTL()
	if !ok || ttl <= 0 {
		return false
	}
	now := c.now()
	return c.lru.Add(c.hash(k), &cacheEntry{key: string(k.bytes()), wire: wire, qnameEnd: l.qnameEnd, ttls: l.ttls,
		rcode: l.rcode, stored: now, expires: now.Add(ttl)})
}

// answers reports whether the packed answer's question is k's (name in
// any case, type, class): a hit writes the asked name over the answer's.
func answers(wire []byte, qnameEnd int, k *questionKey) bool {
	name := wire[headerLen:qnameEnd]
	if !equalFoldASCII(name, k.asked()) {
		return false
	}
	return bytes.Equal(wire[qnameEnd:qnameEnd+4], k.key[k.nlen:k.nlen+4])
}
