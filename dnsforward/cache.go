package dnsforward

import (
	"bytes"
	"encoding/binary"
	"hash/maphash"
	"slices"
	"sync"
	"time"

	"github.com/hashicorp/golang-lru/v2/simplelru"
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

// cacheBytesPerEntry sets the cache's byte budget: the answers' bytes
// (the memory their slices hold: their capacity) may average this much
// per entry. An entry is the answer as the
// resolver sent it over TCP, up to 64 KiB whatever the client's UDP size,
// so the count alone bounds nothing useful (10 000 entries: 640 MiB);
// most answers are a few hundred bytes, DNSSEC ones with their signatures
// one or two KiB. The default 10 000 entries hold at most 20 MiB.
const cacheBytesPerEntry = 2 << 10

// cacheEntry is an answer kept packed, with the offsets of its TTL fields
// recorded once, so that a hit is a copy and a few patches: no unpacking,
// packing or allocation.
type cacheEntry struct {
	key      string // the question it answers (questionKey.bytes)
	wire     []byte // the answer, compressed, with the TTLs it arrived with; its capacity is what the budget counts
	qnameEnd int    // where the question's name ends in wire
	ttls     []uint16
	rcode    int
	stored   time.Time
	expires  time.Time
}

// cache is an LRU of answers bounded in entries and in bytes (see
// cacheBytesPerEntry) that honours TTLs, including negative answers (RFC
// 2308: the SOA's TTL capped by its MINIMUM), and counts them down in
// what it serves. It is keyed by a hash of the question; the entry's own
// key settles the rare collision (a miss).
type cache struct {
	seed maphash.Seed
	now  func() time.Time

	mu     sync.Mutex
	lru    *simplelru.LRU[uint64, *cacheEntry]
	bytes  int // the entries' answers (cap of wire), within budget
	budget int
}

func newCache(size int) *cache {
	if size <= 0 {
		return nil // no cache
	}
	c := &cache{seed: maphash.MakeSeed(), now: time.Now, budget: size * cacheBytesPerEntry}
	// Called with c.mu held, as every use of c.lru is.
	l, err := simplelru.NewLRU(size, func(_ uint64, e *cacheEntry) { c.bytes -= cap(e.wire) })
	if err != nil {
		return nil
	}
	c.lru = l
	return c
}

// len is the number of answers cached.
func (c *cache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lru.Len()
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
	c.mu.Lock()
	e, ok := c.lru.Get(h)
	c.mu.Unlock()
	if !ok || e.key != string(k.bytes()) {
		return dst, 0, false
	}
	// An entry is never changed once cached: it is read without the lock.
	now := c.now()
	if !now.Before(e.expires) {
		c.mu.Lock()
		if cur, ok := c.lru.Peek(h); ok && cur == e { // not a newer answer
			c.lru.Remove(h)
		}
		c.mu.Unlock()
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

// packBufs holds the buffers put packs answers into: miekg/dns packs into
// room for the uncompressed message (plus one byte) and compresses in
// place, so what it returns may hold several times the answer's length.
var packBufs = sync.Pool{New: func() any { b := make([]byte, 0, 4<<10); return &b }}

// maxPackBuf is the largest pack buffer kept for reuse.
const maxPackBuf = 64 << 10

// put stores resp for k for as long as its records allow, and returns
// how many answers that pushed out. resp must not be shared yet: packing
// may write its extended RCODE into its OPT record. The entry keeps a
// right-sized copy of the packed answer, so the byte budget counts what
// it holds.
func (c *cache) put(k *questionKey, resp *dns.Msg) (evicted int) {
	packed := *resp // Pack reads the records only
	packed.Compress = true
	bp := packBufs.Get().(*[]byte)
	defer packBufs.Put(bp)
	wire, err := packed.PackBuffer((*bp)[:cap(*bp)])
	if cap(wire) > cap(*bp) && cap(wire) <= maxPackBuf {
		*bp = wire[:0] // a larger buffer than the pool's: kept for next time
	}
	if err != nil {
		return 0
	}
	return c.putWire(k, bytes.Clone(wire))
}

// putWire stores the packed answer wire for k (and keeps wire: the caller
// hands it over, best right-sized: its capacity counts against the
// budget) for as long as its records allow, and returns how many
// answers that pushed out, least recently used first, to stay within the
// entries and the bytes allowed. An answer to an RD=0 query is not kept:
// RD=1 queries share the entry, and it may be a refusal or a referral
// (see flightKey); an RD=0 query may still be answered from the cache.
// Nor is an answer larger than the whole byte budget.
func (c *cache) putWire(k *questionKey, wire []byte) (evicted int) {
	if !k.rd || cap(wire) > c.budget {
		return 0
	}
	l, err := answerLayout(wire, nil)
	// An OPT record only for a query with one (RFC 6891 §7): the
	// forwarder strips one a resolver adds anyway (stripOPT) before it
	// gets here; one left (an answer miekg/dns cannot rewrite) is not
	// replayed.
	if err != nil || !answers(wire, l.qnameEnd, k) || l.opt && !k.edns() {
		return 0
	}
	ttl, ok := l.cacheTTL()
	if !ok || ttl <= 0 {
		return 0
	}
	now := c.now()
	e := &cacheEntry{key: string(k.bytes()), wire: wire, qnameEnd: l.qnameEnd, ttls: l.ttls,
		rcode: l.rcode, stored: now, expires: now.Add(ttl)}
	h := c.hash(k)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.lru.Remove(h) // an answer replaced is not one pushed out; its bytes go
	if c.lru.Add(h, e) {
		evicted++
	}
	c.bytes += cap(wire)
	for c.bytes > c.budget { // e alone fits: the older ones go first
		c.lru.RemoveOldest()
		evicted++
	}
	return evicted
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
