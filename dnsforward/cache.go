package dnsforward

import (
	"strings"
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

// cacheKey is a question: name (lower case), type, class and the DNSSEC OK
// bit, which changes what an answer holds.
type cacheKey struct {
	name   string
	qtype  uint16
	qclass uint16
	do     bool
}

type cacheEntry struct {
	msg     *dns.Msg
	stored  time.Time
	expires time.Time
}

// cache is a bounded LRU of answers that honours TTLs, including negative
// answers (RFC 2308: the SOA's TTL capped by its MINIMUM), and counts them
// down in what it serves.
type cache struct {
	lru *lru.Cache[cacheKey, *cacheEntry]
	now func() time.Time
}

func newCache(size int) *cache {
	l, err := lru.New[cacheKey, *cacheEntry](size)
	if err != nil {
		return nil // size <= 0: no cache
	}
	return &cache{lru: l, now: time.Now}
}

// keyOf returns the cache key of a query, and false for queries that are
// not cacheable (not exactly one question, not a standard query).
func keyOf(q *dns.Msg) (cacheKey, bool) {
	if len(q.Question) != 1 || q.Opcode != dns.OpcodeQuery {
		return cacheKey{}, false
	}
	qu := q.Question[0]
	k := cacheKey{name: strings.ToLower(qu.Name), qtype: qu.Qtype, qclass: qu.Qclass}
	if opt := q.IsEdns0(); opt != nil {
		k.do = opt.Do()
	}
	return k, true
}

// get returns a copy of the cached answer for k with TTLs counted down.
func (c *cache) get(k cacheKey) (*dns.Msg, bool) {
	e, ok := c.lru.Get(k)
	if !ok {
		return nil, false
	}
	now := c.now()
	if !now.Before(e.expires) {
		c.lru.Remove(k)
		return nil, false
	}
	m := e.msg.Copy()
	elapsed := uint32(now.Sub(e.stored) / time.Second)
	for _, sec := range [][]dns.RR{m.Answer, m.Ns, m.Extra} {
		for _, rr := range sec {
			h := rr.Header()
			if h.Rrtype == dns.TypeOPT {
				continue
			}
			if h.Ttl > elapsed {
				h.Ttl -= elapsed
			} else {
				h.Ttl = 0
			}
		}
	}
	return m, true
}

// put stores resp for k for as long as its records allow, and reports
// whether that pushed another answer out.
func (c *cache) put(k cacheKey, resp *dns.Msg) (evicted bool) {
	ttl, ok := cacheTTL(resp)
	if !ok || ttl <= 0 {
		return false
	}
	now := c.now()
	return c.lru.Add(k, &cacheEntry{msg: resp.Copy(), stored: now, expires: now.Add(ttl)})
}

// cacheTTL is how long resp may be cached.
func cacheTTL(resp *dns.Msg) (time.Duration, bool) {
	if resp.Truncated {
		return 0, false
	}
	switch resp.Rcode {
	case dns.RcodeServerFailure:
		return servFailTTL, true
	case dns.RcodeSuccess, dns.RcodeNameError:
	default:
		return 0, false
	}
	if resp.Rcode == dns.RcodeSuccess && len(resp.Answer) > 0 {
		ttl := uint32(maxTTL / time.Second)
		for _, sec := range [][]dns.RR{resp.Answer, resp.Ns} {
			for _, rr := range sec {
				ttl = min(ttl, rr.Header().Ttl)
			}
		}
		return time.Duration(ttl) * time.Second, true
	}
	// NXDOMAIN or NODATA: the SOA in the authority section says how long
	// (RFC 2308 §5); without one, do not cache.
	for _, rr := range resp.Ns {
		if soa, ok := rr.(*dns.SOA); ok {
			return time.Duration(min(soa.Hdr.Ttl, soa.Minttl)) * time.Second, true
		}
	}
	return 0, false
}
