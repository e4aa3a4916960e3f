// Package dnsforward owns DNS: a Forwarder (a miekg/dns dns.Handler) that
// sends every query to resolvers behind the SOCKS5 proxy, so that nothing
// leaks to the local network. The transport is DNS over TCP through
// CONNECT (works through every SOCKS server, ssh -D and Tor included), on a
// small pool of pipelined connections per resolver.
package dnsforward

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/miekg/dns"
	"github.com/rs/zerolog"
	"golang.org/x/sync/singleflight"

	"github.com/socksfwd/socksfwd/internal/logthrottle"
	"github.com/socksfwd/socksfwd/socksclient"
)

// Defaults.
const (
	DefaultTimeout     = 5 * time.Second
	DefaultPoolSize    = 8
	DefaultIdleTimeout = 30 * time.Second
	// DefaultPipelineLimit: queries in flight on one pooled connection.
	// Small enough that a resolver closing a connection (dnsmasq does
	// after 100 queries) strands few queries, large enough that the
	// default pool carries a few hundred at once.
	DefaultPipelineLimit = 32
	// DefaultMaxConcurrent: queries waiting on the resolvers at once.
	// Each costs a goroutine and a few KB; beyond it the forwarder answers
	// REFUSED at once rather than letting a flood pile up to the timeout.
	DefaultMaxConcurrent = 2000
)

// failureLogPeriod: a cause of failure is logged at most once per period,
// with the count of the queries it failed meanwhile.
const failureLogPeriod = 10 * time.Second

// ErrOverloaded: the forwarder already has MaxConcurrent queries waiting
// on the resolvers; ServeDNS answers REFUSED.
var ErrOverloaded = errors.New("dnsforward: too many queries in flight")

// Config describes a Forwarder.
type Config struct {
	// Resolvers behind the proxy, tried in order (at least one).
	Resolvers []socksclient.Addr
	// Upstreams dials the resolvers through the proxies.
	Upstreams *socksclient.Upstreams
	// Timeout bounds a whole query across every attempt and resolver
	// (default DefaultTimeout).
	Timeout time.Duration
	// PoolSize is the most TCP connections per resolver (default
	// DefaultPoolSize).
	PoolSize int
	// PipelineLimit is the most queries in flight on one TCP connection
	// (default DefaultPipelineLimit); beyond it the pool grows, up to
	// PoolSize, and then queries wait for a free slot.
	PipelineLimit int
	// IdleTimeout closes a pooled connection with nothing in flight for
	// this long (default DefaultIdleTimeout).
	IdleTimeout time.Duration
	// MaxConcurrent bounds the queries waiting on the resolvers at once
	// (cache hits do not count); beyond it queries are answered REFUSED
	// and counted (default DefaultMaxConcurrent).
	MaxConcurrent int
	// CacheSize bounds the answer cache: at most this many answers, and
	// at most cacheBytesPerEntry (2 KiB) per answer on average of their
	// bytes; 0 disables it.
	CacheSize int
	// Transport is "tcp" (default: DNS over TCP through CONNECT) or "udp"
	// (one shared UDP ASSOCIATE; truncated answers are asked again over
	// TCP).
	Transport string
	// Stats, when set, is counted into instead of the Forwarder's own, so
	// that counts run on across forwarders that replace each other on one
	// listener (a reload).
	Stats  *Stats
	Logger zerolog.Logger
}

// Stats counts queries by result.
type Stats struct {
	Queries     atomic.Int64
	Answered    atomic.Int64
	ServFail    atomic.Int64 // every resolver failed within the timeout
	Refused     atomic.Int64 // answered REFUSED: MaxConcurrent queries were in flight
	Failovers   atomic.Int64 // an attempt failed and the next resolver was tried
	CacheHits   atomic.Int64
	Resent      atomic.Int64 // tcp: queries sent again after the resolver closed their connection
	Retransmits atomic.Int64 // udp: datagrams sent again (timeout or association ended)
	// udp: read errors that did not end the association (an ICMP port
	// unreachable from the relay reads as ECONNREFUSED).
	UDPReadErrors atomic.Int64
	// Mismatched: answers dropped as not their query's: on tcp, under its
	// ID but to another question (a late answer to an earlier query that
	// had the ID); on udp, from another source than the resolver asked.
	Mismatched atomic.Int64
	// MalformedAnswers: answers from the resolvers that do not parse; on
	// udp dropped (their query is sent again or times out), on tcp failing
	// their query's attempt (dropped when too short to carry an ID).
	MalformedAnswers atomic.Int64
	// Ignored: messages from clients answered nothing, as a resolver
	// does: responses (QR=1) and messages shorter than a header (not in
	// Queries).
	Ignored atomic.Int64

	// Queries by the client's transport; they add up to Queries.
	QueriesUDP, QueriesTCP atomic.Int64
	// Responses counts what clients were sent, by RCODE (extended codes
	// above MaxCountedRcode count under it); they add up to Queries.
	Responses [MaxCountedRcode + 1]atomic.Int64
	// CacheMisses: cacheable queries the cache could not answer;
	// CacheEvictions: answers pushed out of a full cache (in entries or
	// in bytes).
	CacheMisses, CacheEvictions atomic.Int64
	// NotAllowed: queries from sources outside the Server's allow list,
	// answered REFUSED without reaching the forwarder (not in Queries).
	NotAllowed atomic.Int64
	// Association adds up what the udp transport's associations dropped
	// (fragments, malformed headers) and their relay waits.
	Association socksclient.UDPStats
}

// MaxCountedRcode is the highest RCODE Stats.Responses tells apart
// (BADCOOKIE).
const MaxCountedRcode = dns.RcodeBadCookie

// Forwarder answers DNS queries by forwarding them through the proxy.
type Forwarder struct {
	cfg      Config
	created  time.Time // the monotonic clock's origin for backoffs
	pools    []*tcpPool
	udp      *udpTransport // nil for the tcp transport
	cache    *cache        // nil when disabled
	flight   singleflight.Group
	stats    *Stats
	inFlight atomic.Int64 // queries admitted past the cache, against MaxConcurrent
	failLog  *logthrottle.Throttle
	health   []resolverHealth // by resolver, as pools

	// life is the context every query's derives from: Close cancels it,
	// so that no query waits on a dial, an associate or an answer after.
	life      context.Context
	endLife   context.CancelFunc
	closeOnce sync.Once
}

// New returns a Forwarder; Close releases its connections.
func New(cfg Config) (*Forwarder, error) {
	if len(cfg.Resolvers) == 0 {
		return nil, errors.New("dnsforward: no resolver configured")
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.PoolSize <= 0 {
		cfg.PoolSize = DefaultPoolSize
	}
	if cfg.PipelineLimit <= 0 {
		cfg.PipelineLimit = DefaultPipelineLimit
	}
	cfg.PipelineLimit = min(cfg.PipelineLimit, 1<<16-1) // one connection's ID space
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = DefaultIdleTimeout
	}
	if cfg.MaxConcurrent <= 0 {
		cfg.MaxConcurrent = DefaultMaxConcurrent
	}
	f := &Forwarder{cfg: cfg, created: time.Now(), cache: newCache(cfg.CacheSize), stats: cfg.Stats, failLog: logthrottle.New(failureLogPeriod),
		health: make([]resolverHealth, len(cfg.Resolvers))}
	f.life, f.endLife = context.WithCancel(context.Background())
	if f.stats == nil {
		f.stats = new(Stats)
	}
	switch cfg.Transport {
	case "", "tcp":
	case "udp":
		f.udp = newUDPTransport(func(ctx context.Context) (relayConn, error) {
			c, _, err := cfg.Upstreams.Associate(ctx)
			if err != nil {
				return nil, err // not a typed nil in the interface
			}
			c.CountInto(&f.stats.Association)
			return c, nil
		}, len(cfg.Resolvers), f.stats)
	default:
		return nil, fmt.Errorf("dnsforward: unknown transport %q (want tcp or udp)", cfg.Transport)
	}
	for _, r := range cfg.Resolvers {
		resolver := r
		// The query's own context reaches the proxies: their failover
		// (and hedging) works within the query's deadline, with no
		// shorter timeout of ours per proxy.
		dial := func(ctx context.Context) (net.Conn, error) {
			c, _, err := cfg.Upstreams.DialAddr(ctx, resolver)
			if err != nil {
				return nil, err
			}
			return c, nil
		}
		f.pools = append(f.pools, newTCPPool(dial, cfg.PoolSize, cfg.PipelineLimit, cfg.IdleTimeout, f.stats))
	}
	return f, nil
}

// Stats returns the live counters.
func (f *Forwarder) Stats() *Stats { return f.stats }

// InFlight is the number of queries waiting on the resolvers now.
func (f *Forwarder) InFlight() int64 { return f.inFlight.Load() }

// CacheLen is the number of answers cached now.
func (f *Forwarder) CacheLen() int {
	if f.cache == nil {
		return 0
	}
	return f.cache.len()
}

// countQuery counts a query from a client, by the transport it came on.
func (f *Forwarder) countQuery(udp bool) {
	f.stats.Queries.Add(1)
	if udp {
		f.stats.QueriesUDP.Add(1)
	} else {
		f.stats.QueriesTCP.Add(1)
	}
}

func (f *Forwarder) countResponse(rcode int) {
	f.stats.Responses[min(max(rcode, 0), MaxCountedRcode)].Add(1)
}

// ResolveError is Exchange's error when every resolver failed: one
// attempt per resolver tried, in order.
type ResolveError struct {
	Attempts []AttemptError
}

// AttemptError is one resolver's failure.
type AttemptError struct {
	Resolver string
	Err      error
}

func (e *ResolveError) Error() string {
	var b strings.Builder
	b.WriteString("every resolver failed: ")
	for i, a := range e.Attempts {
		if i > 0 {
			b.WriteString("; ")
		}
		b.WriteString(a.Resolver + ": " + a.Err.Error())
	}
	return b.String()
}

func (e *ResolveError) Unwrap() []error {
	errs := make([]error, len(e.Attempts))
	for i, a := range e.Attempts {
		errs[i] = a.Err
	}
	return errs
}

// cause names the failure without what varies from query to query
// (durations, local ports), so that the log can count repeats of it.
func (e *ResolveError) cause() string {
	var b strings.Builder
	for i, a := range e.Attempts {
		if i > 0 {
			b.WriteString("; ")
		}
		b.WriteString(a.Resolver + ": " + causeOf(a.Err))
	}
	return b.String()
}

// errForwarderClosed: the forwarder was closed; no resolver is tried after
// it. Only this stops Exchange early: a net.ErrClosed from a connection or
// association closed under one query is that attempt's failure.
var errForwarderClosed = fmt.Errorf("dnsforward: the forwarder is closed: %w", net.ErrClosed)

// errNoAnswer: an attempt's share of the deadline passed.
var errNoAnswer = errors.New("no answer in time")

// causeOf is a short, stable name for why an attempt failed.
func causeOf(err error) string {
	var (
		backoff *errBackoff
		stalled *socksclient.DeadlineError
		reply   *socksclient.ReplyError
		noUDP   errNoUDPAssociate
		errno   syscall.Errno
	)
	switch {
	case errors.As(err, &backoff):
		return causeOf(backoff.last) // the same failure, answered without a dial
	case errors.As(err, &stalled) && stalled.AtProxy:
		return "the proxy did not answer in time: " + stalled.Error()
	case errors.Is(err, errAwaitingConn):
		return "no connection to the resolver in time"
	case errors.Is(err, errNoAnswer), errors.Is(err, context.DeadlineExceeded):
		return "no answer in time"
	case errors.Is(err, errStalled):
		return "no answer in time"
	case errors.Is(err, errConnDead):
		return "the resolver closed the connection"
	case errors.Is(err, socksclient.ErrAssociationClosed):
		return "the proxy ended the udp association"
	case errors.As(err, &noUDP):
		return "the proxy has no udp associate"
	case errors.Is(err, errForwarderClosed):
		return "shutting down"
	case errors.Is(err, net.ErrClosed):
		return "the connection closed under the query"
	case errors.As(err, &reply):
		return reply.Error()
	case errors.As(err, &errno):
		return errno.Error()
	}
	msg := err.Error()
	if len(msg) > 120 {
		msg = msg[:120]
	}
	return msg
}

// Exchange forwards q, without EDNS options (see upstreamQuery), to the
// resolvers in order within the whole-query timeout (see tryResolvers),
// until ctx is done or the forwarder is closed.
func (f *Forwarder) Exchange(ctx context.Context, q *dns.Msg) (*dns.Msg, error) {
	ctx, cancel := f.queryContext(ctx)
	defer cancel()
	return f.exchange(ctx, q)
}

// queryContext is ctx, a caller's, ended by Close too. The forwarder's
// own queries (ServeDNS, merged misses) derive from f.life directly.
func (f *Forwarder) queryContext(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(f.life, cancel)
	return ctx, func() {
		stop()
		cancel()
	}
}

// exchange is Exchange with ctx derived from f.life.
func (f *Forwarder) exchange(ctx context.Context, q *dns.Msg) (*dns.Msg, error) {
	q = upstreamQuery(q)
	var resp *dns.Msg
	err := f.tryResolvers(ctx, func(ctx context.Context, i int, failover bool) (err error) {
		resp, err = f.attempt(ctx, i, failover, q)
		if err == nil && (resp.Rcode == dns.RcodeRefused || questionlessErrorMsg(resp)) {
			f.logErrorAnswer(i, resp.Rcode, len(resp.Question) == 0, func() (string, uint16) {
				if len(q.Question) == 0 { // Exchange's callers may send one so
					return "", 0
				}
				return q.Question[0].Name, q.Question[0].Qtype
			})
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	if questionlessErrorMsg(resp) {
		// The query's answer all the same (see questionlessError), made
		// whole: the question, and an OPT record if the query had one.
		resp.Question = slices.Clone(q.Question)
		if opt := q.IsEdns0(); opt != nil && resp.IsEdns0() == nil {
			resp.SetEdns0(ednsUDPSize, opt.Do())
		}
	}
	if q.IsEdns0() == nil {
		dropOPT(resp) // before it is cached or shared: see stripOPT
	}
	return resp, nil
}

// dropOPT is stripOPT for an unpacked answer.
func dropOPT(m *dns.Msg) {
	m.Extra = slices.DeleteFunc(m.Extra, func(rr dns.RR) bool { return rr.Header().Rrtype == dns.TypeOPT })
	if m.Rcode > 0xF { // an extended RCODE: told only in an OPT record
		m.Rcode = dns.RcodeServerFailure
	}
}

// withoutOPT is the packed answer without its OPT record (see stripOPT),
// in place when it can be, else rewritten by miekg/dns; as it is when it
// does not read.
func withoutOPT(answer []byte) []byte {
	if out, ok := stripOPT(answer); ok {
		return out
	}
	m := new(dns.Msg)
	if m.Unpack(answer) != nil {
		return answer
	}
	dropOPT(m)
	m.Compress = true
	out, err := m.Pack()
	if err != nil {
		return answer
	}
	return out
}

// questionlessErrorMsg is questionlessError for an unpacked answer.
func questionlessErrorMsg(m *dns.Msg) bool {
	return len(m.Question) == 0 && m.Rcode != dns.RcodeSuccess && m.Rcode != dns.RcodeNameError
}

// logErrorAnswer logs, at most once per period for each resolver and
// RCODE, that resolver i answered a query REFUSED, or another error RCODE
// without the question (see questionlessError); question names the query
// (called only for a line). The client gets that answer: no failover, as
// for any answer, but the cause is not the forwarder's, and unbound's
// refusal by access control (REFUSED, header only) is otherwise silent.
func (f *Forwarder) logErrorAnswer(i, rcode int, questionless bool, question func() (string, uint16)) {
	resolver := f.cfg.Resolvers[i].String()
	rc := dns.RcodeToString[rcode]
	ok, suppressed := f.failLog.Allow("answer " + rc + " from " + resolver)
	if !ok {
		return
	}
	name, qtype := question()
	ev := f.cfg.Logger.Warn().Str("resolver", resolver).Str("rcode", rc).Bool("without_question", questionless).
		Str("name", name).Str("type", dns.TypeToString[qtype]).Func(logthrottle.Repeats("more_since_last_line", suppressed))
	if rcode == dns.RcodeRefused {
		ev.Msgf("resolver %s refused the query: check its access control for the proxy's address; "+
			"the client gets REFUSED (further refusals: one line per %s)", resolver, failureLogPeriod)
		return
	}
	ev.Msgf("resolver %s answered %s without the question; the client gets %s with it (one line per %s)",
		resolver, rc, rc, failureLogPeriod)
}

// exchangeWire is Exchange for a query in wire form on the tcp
// transport: the answer comes back in wire form, unparsed but for a check
// that it is well formed, with the query's ID, and without an OPT record
// unless edns, which says whether the query has one.
func (f *Forwarder) exchangeWire(ctx context.Context, query []byte, edns bool) ([]byte, error) {
	var answer []byte
	err := f.tryResolvers(ctx, func(ctx context.Context, i int, failover bool) (err error) {
		answer, err = f.pools[i].exchangeWire(ctx, query, failover)
		if err == nil && !wellFormed(answer) {
			f.stats.MalformedAnswers.Add(1)
			err = errMalformedAnswer
		}
		if err == nil && answer[3]&0xF != dns.RcodeSuccess {
			rcode, questionless := questionlessError(answer)
			if questionless || rcode == dns.RcodeRefused {
				f.logErrorAnswer(i, rcode, questionless, func() (string, uint16) { return wireQuestion(query) })
			}
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	if !edns {
		answer = withoutOPT(answer) // before it is cached or shared
	}
	return answer, nil
}

// upstreamQuery is q as the forwarder sends it: its OPT record, if any,
// without options, q itself when there are none. The forwarder is the
// resolver's client, not the app's stand-in, and answers are shared
// through the cache and merged misses: a COOKIE is between a client and
// its server (RFC 7873), a CLIENT-SUBNET makes the answer one client's
// (RFC 7871), and no other option is part of the cache key either.
func upstreamQuery(q *dns.Msg) *dns.Msg {
	i := slices.IndexFunc(q.Extra, hasEDNSOptions)
	if i < 0 {
		return q
	}
	c := *q // q is the caller's: a shallow copy with new OPT records
	c.Extra = slices.Clone(q.Extra)
	for j, rr := range c.Extra[i:] {
		if hasEDNSOptions(rr) {
			opt := *rr.(*dns.OPT)
			opt.Option = nil
			c.Extra[i+j] = &opt
		}
	}
	return &c
}

func hasEDNSOptions(rr dns.RR) bool {
	opt, ok := rr.(*dns.OPT)
	return ok && len(opt.Option) > 0
}

// wellFormed reports whether an answer parses: as the cache reads
// answers, or else as miekg/dns does (an answer without a question, say).
func wellFormed(answer []byte) bool {
	var ttls [32]uint16
	if _, err := answerLayout(answer, ttls[:0]); err == nil {
		return true
	}
	return new(dns.Msg).Unpack(answer) == nil
}

// tryResolvers calls try for each resolver i within the whole-query
// timeout, until one succeeds, in the order resolverOrder gives: the
// configured order, failing resolvers in backoff last. Each attempt gets
// an equal share of what is left, so a blackholed first resolver still
// leaves time for the next; failover says another resolver is left to
// try after this one. The error is a *ResolveError.
func (f *Forwarder) tryResolvers(ctx context.Context, try func(ctx context.Context, i int, failover bool) error) error {
	ctx, cancel := context.WithTimeout(ctx, f.cfg.Timeout)
	defer cancel()
	decided := time.Now()
	var buf [8]int
	order, first := f.resolverOrder(buf[:0], decided)
	var attempts []AttemptError // made only when an attempt fails
	for pos, i := range order {
		deadline, _ := ctx.Deadline()
		share := time.Until(deadline) / time.Duration(len(order)-pos)
		failover := pos+1 < len(order)
		actx, acancel := ctx, context.CancelFunc(func() {})
		if failover { // the last attempt has the whole rest anyway
			actx, acancel = context.WithTimeout(ctx, share)
		}
		answersBefore := f.health[i].answers.Load()
		err := try(actx, i, failover)
		acancel()
		if err == nil {
			f.answered(i)
			return nil
		}
		if isContextErr(err) && f.life.Err() != nil {
			err = errForwarderClosed
		}
		if errors.Is(err, context.DeadlineExceeded) && actx.Err() != nil && !notResolversSilence(err) {
			err = fmt.Errorf("%w (within %s)", errNoAnswer, share.Round(time.Millisecond))
		}
		if countsAgainstResolver(err) {
			f.failed(i, answersBefore, decided, pos >= first, err)
		}
		attempts = append(attempts, AttemptError{Resolver: f.cfg.Resolvers[i].String(), Err: err})
		var noUDP errNoUDPAssociate
		if ctx.Err() != nil || errors.Is(err, errForwarderClosed) || errors.As(err, &noUDP) {
			break
		}
		if failover {
			f.stats.Failovers.Add(1)
		}
	}
	return &ResolveError{Attempts: attempts}
}

// attempt asks resolver i over the configured transport. On the udp
// transport a truncated answer is asked again over TCP. failover says
// another resolver is left to try (see tcpPool.exchange).
func (f *Forwarder) attempt(ctx context.Context, i int, failover bool, q *dns.Msg) (*dns.Msg, error) {
	pool := f.pools[i]
	if f.udp == nil {
		return pool.exchange(ctx, q, failover)
	}
	resp, err := f.udp.exchange(ctx, i, f.cfg.Resolvers[i], q)
	if err == nil && resp.Truncated {
		return pool.exchange(ctx, q, failover)
	}
	return resp, err
}

// Resolve answers q from the cache or by Exchange, merging identical
// concurrent misses into one upstream query. Beyond MaxConcurrent
// queries waiting on the resolvers it fails at once with ErrOverloaded.
func (f *Forwarder) Resolve(ctx context.Context, q *dns.Msg) (*dns.Msg, error) {
	ctx, cancel := f.queryContext(ctx)
	defer cancel()
	var k questionKey
	return f.resolve(ctx, q, &k, f.cache != nil && keyOf(q, &k))
}

// resolve is Resolve with q's cache key worked out (k, when cacheable)
// and ctx derived from f.life.
func (f *Forwarder) resolve(ctx context.Context, q *dns.Msg, k *questionKey, cacheable bool) (*dns.Msg, error) {
	if cacheable {
		if m, ok := f.cache.get(k); ok {
			f.stats.CacheHits.Add(1)
			return answerFor(q, m), nil
		}
		f.stats.CacheMisses.Add(1)
	}
	if f.inFlight.Add(1) > int64(f.cfg.MaxConcurrent) {
		f.inFlight.Add(-1)
		return nil, ErrOverloaded
	}
	defer f.inFlight.Add(-1)
	if !cacheable {
		return f.exchange(ctx, q)
	}
	// Do, not DoChan: no goroutine per miss. The shared query is bounded by
	// the forwarder's timeout and life, not by the first caller's context.
	v, err, shared := f.flight.Do(k.flightKey(), func() (any, error) {
		resp, err := f.exchange(f.life, q)
		if err == nil {
			f.stats.CacheEvictions.Add(int64(f.cache.put(k, resp)))
		}
		return resp, err
	})
	if err != nil {
		return nil, err
	}
	var m *dns.Msg
	switch v := v.(type) {
	case *dns.Msg:
		m = v
		if shared {
			m = m.Copy() // other callers hold the same message
		}
	case []byte: // a query in wire form asked first (resolveWire)
		m = new(dns.Msg)
		if err := m.Unpack(v); err != nil {
			return nil, fmt.Errorf("%w: %v", errMalformedAnswer, err)
		}
	}
	return answerFor(q, m), nil
}

// resolveWire is resolve for a plain query in wire form (see parseQuery)
// with its key k, on the tcp transport: the answer in wire form, made the
// query's own (its ID, the name as asked), never unpacked or packed, and
// its RCODE (a cache hit knows it without reading the answer again).
func (f *Forwarder) resolveWire(query []byte, k *questionKey) ([]byte, int, error) {
	id := binary.BigEndian.Uint16(query)
	if f.cache != nil {
		if out, rcode, ok := f.cache.appendAnswer(nil, k, id); ok {
			f.stats.CacheHits.Add(1)
			return out, rcode, nil
		}
		f.stats.CacheMisses.Add(1)
	}
	if f.inFlight.Add(1) > int64(f.cfg.MaxConcurrent) {
		f.inFlight.Add(-1)
		return nil, 0, ErrOverloaded
	}
	defer f.inFlight.Add(-1)
	upstream := upstreamWire(query, k)
	var answer []byte
	if f.cache == nil {
		var err error
		if answer, err = f.exchangeWire(f.life, upstream, k.edns()); err != nil {
			return nil, 0, err
		}
	} else {
		v, err, shared := f.flight.Do(k.flightKey(), func() (any, error) {
			answer, err := f.exchangeWire(f.life, upstream, k.edns())
			if err == nil {
				f.stats.CacheEvictions.Add(int64(f.cache.putWire(k, bytes.Clone(answer))))
			}
			return answer, err
		})
		if err != nil {
			return nil, 0, err
		}
		switch v := v.(type) {
		case []byte:
			answer = v
			if shared {
				answer = bytes.Clone(v) // other callers hold the same bytes
			}
		case *dns.Msg: // a query of the message path asked first (resolve)
			m := v.Copy()
			m.Compress = true // unpacked, it may exceed 64 KiB written out in full
			if answer, err = m.Pack(); err != nil {
				return nil, 0, fmt.Errorf("packing the shared answer: %w", err)
			}
		}
		binary.BigEndian.PutUint16(answer, id)
		k.setFlags(answer)
		if end, ok := soleQuestion(answer); ok && equalFoldASCII(answer[headerLen:end], k.asked()) {
			copy(answer[headerLen:], k.asked()) // the leader's answer may have another case
		}
	}
	if rcode, ok := questionlessError(answer); ok {
		// The query's answer all the same (never cached: putWire wants
		// the question), made whole for the client.
		answer = headerAndQuestion(answer, k, rcode)
	}
	return answer, rcodeOf(answer), nil
}

// wireQuestion is the name and type of a query in wire form's question,
// for a log line ("", 0 when it does not read).
func wireQuestion(query []byte) (string, uint16) {
	end, ok := soleQuestion(query)
	if !ok {
		return "", 0
	}
	name, _, err := dns.UnpackDomainName(query, headerLen)
	if err != nil {
		return "", 0
	}
	return name, binary.BigEndian.Uint16(query[end:])
}

// rcodeOf is an answer's RCODE, with OPT's extended bits when the answer
// reads as the cache reads answers, else the header's four bits.
func rcodeOf(answer []byte) int {
	var ttls [32]uint16
	if l, err := answerLayout(answer, ttls[:0]); err == nil {
		return l.rcode
	}
	return int(answer[3] & 0xF)
}

// answerFor makes a shared or cached answer q's own: its ID, RD and CD
// bits, and question.
func answerFor(q, m *dns.Msg) *dns.Msg {
	m.Id = q.Id
	m.RecursionDesired = q.RecursionDesired
	m.CheckingDisabled = q.CheckingDisabled
	m.Question = append(m.Question[:0], q.Question...)
	return m
}

// replyBufs holds buffers for packed replies from the cache; most answers
// fit the size they start with.
var replyBufs = sync.Pool{New: func() any { b := make([]byte, 0, 1232); return &b }}

// clientUDPSize is the most a UDP client takes: its EDNS buffer size (at
// least 512), or 512 without EDNS.
func clientUDPSize(r *dns.Msg) int {
	if opt := r.IsEdns0(); opt != nil {
		return max(int(opt.UDPSize()), dns.MinMsgSize)
	}
	return dns.MinMsgSize
}

// writeCached answers r from the cache with the packed answer as it is,
// when there is one and it fits the client; false leaves r to the
// general path (which truncates an answer too large for a UDP client).
func (f *Forwarder) writeCached(w dns.ResponseWriter, r *dns.Msg, k *questionKey, udp bool) bool {
	bp := replyBufs.Get().(*[]byte)
	defer replyBufs.Put(bp)
	out, rcode, ok := f.cache.appendAnswer((*bp)[:0], k, r.Id)
	*bp = out[:0]
	if !ok || udp && len(out) > clientUDPSize(r) {
		return false
	}
	f.stats.CacheHits.Add(1)
	f.stats.Answered.Add(1)
	f.countResponse(rcode)
	w.Write(out)
	return true
}

// answerWire answers a UDP client's query in wire form from the cache:
// the reply appended to dst, counted as ServeDNS counts a hit. false, with
// nothing counted, when the query is not plain (see parseQuery), not
// cached, or its answer exceeds what the client takes; ServeDNS handles
// those.
func (f *Forwarder) answerWire(dst, query []byte) ([]byte, bool) {
	if f.cache == nil {
		return dst, false
	}
	var k questionKey
	wq, ok := parseQuery(query, &k)
	if !ok {
		return dst, false
	}
	out, rcode, ok := f.cache.appendAnswer(dst, &k, wq.id)
	if !ok || len(out)-len(dst) > wq.udpSize {
		return dst, false
	}
	f.countQuery(true)
	f.stats.CacheHits.Add(1)
	f.stats.Answered.Add(1)
	f.countResponse(rcode)
	return out, true
}

// ServeDNS implements dns.Handler: forward, or answer SERVFAIL (every
// resolver failed), REFUSED (too many queries in flight, or a zone
// transfer) or FORMERR (not one question). Never a silent drop. Failures
// are logged one line per cause per period, with the count of queries
// that failed the same way since the last line.
func (f *Forwarder) ServeDNS(w dns.ResponseWriter, r *dns.Msg) {
	_, udp := w.RemoteAddr().(*net.UDPAddr)
	f.countQuery(udp)
	if len(r.Question) != 1 || r.Question[0].Qtype == 0 || r.Question[0].Qclass == 0 {
		// The header's count passes the accept function, but the message
		// holds no question (miekg/dns lowers the count to what it read),
		// or one cut before its type and class (which it reads as 0):
		// FORMERR, as unbound answers, and nothing to forward. Forwarded,
		// the resolver's refusal read as its access control's.
		f.answerRcode(w, r, dns.RcodeFormatError)
		return
	}
	if isZoneTransfer(r) {
		// A transfer is a stream of messages (RFC 5936 §2.2) and an IXFR's
		// answer depends on the client's serial: neither is one answer to
		// forward, cache or share. REFUSED, as unbound answers transfers:
		// a policy, not a query type this server cannot parse (NOTIMP).
		f.answerRcode(w, r, dns.RcodeRefused)
		return
	}
	var k questionKey
	cacheable := f.cache != nil && keyOf(r, &k)
	if cacheable && f.writeCached(w, r, &k, udp) {
		return
	}
	resp, err := f.resolve(f.life, r, &k, cacheable)
	if err != nil {
		f.answerFailure(w, r, err)
		return
	}
	f.stats.Answered.Add(1)
	f.countResponse(resp.Rcode)
	if udp {
		// A UDP client gets what fits its buffer, with TC=1 if cut, and
		// retries over TCP for the whole answer (RFC 7766 §5). Truncate
		// compresses an answer that does not fit uncompressed.
		resp.Truncate(clientUDPSize(r))
	} else {
		// Answers arrive compressed and are unpacked: written out in full,
		// one may exceed the 65535 bytes a TCP message can hold.
		resp.Compress = true
	}
	w.WriteMsg(resp)
}

// answerFailure answers r SERVFAIL (every resolver failed) or REFUSED
// (too many queries in flight), counted and logged.
func (f *Forwarder) answerFailure(w dns.ResponseWriter, r *dns.Msg, err error) {
	rcode := dns.RcodeServerFailure
	if errors.Is(err, ErrOverloaded) {
		rcode = dns.RcodeRefused
		f.stats.Refused.Add(1)
	} else {
		f.stats.ServFail.Add(1)
	}
	f.logFailure(err, rcode, w, r)
	f.answerRcode(w, r, rcode)
}

// answerRcode answers r with rcode and nothing else, counted.
func (f *Forwarder) answerRcode(w dns.ResponseWriter, r *dns.Msg, rcode int) {
	f.countResponse(rcode)
	w.WriteMsg(rcodeReply(r, rcode))
}

// ednsUDPSize is the UDP payload size stated in the answers the
// forwarder makes itself: what the UDP fast path reads a query into, the
// size that avoids fragmentation.
const ednsUDPSize = udpSlotLen

// rcodeReply is the answer to r with rcode and no records but, when r has
// one, an OPT record (RFC 6891 §7) with r's DO bit (RFC 3225 §3).
func rcodeReply(r *dns.Msg, rcode int) *dns.Msg {
	m := new(dns.Msg)
	m.SetRcode(r, rcode)
	if opt := r.IsEdns0(); opt != nil {
		m.SetEdns0(ednsUDPSize, opt.Do())
	}
	return m
}

// isZoneTransfer reports whether q asks for a zone transfer (AXFR, IXFR).
func isZoneTransfer(q *dns.Msg) bool {
	return len(q.Question) == 1 && isTransferType(q.Question[0].Qtype)
}

func isTransferType(qtype uint16) bool { return qtype == dns.TypeAXFR || qtype == dns.TypeIXFR }

// serveWire answers a plain UDP query in wire form (see parseQuery) on
// the tcp transport as ServeDNS would, moving the query's and the
// answer's bytes without unpacking or packing them (but to truncate an
// answer too large for the client, or to answer a failure). false, with
// nothing counted or written, leaves the query to ServeDNS.
func (f *Forwarder) serveWire(w dns.ResponseWriter, query []byte) bool {
	if f.udp != nil {
		return false // the udp transport matches answers by unpacked question
	}
	var k questionKey
	wq, ok := parseQuery(query, &k)
	if !ok {
		return false
	}
	f.countQuery(true)
	answer, rcode, err := f.resolveWire(query, &k)
	if err != nil {
		r := new(dns.Msg)
		if r.Unpack(query) != nil {
			r = &dns.Msg{MsgHdr: dns.MsgHdr{Id: wq.id}}
		}
		f.answerFailure(w, r, err)
		return true
	}
	f.stats.Answered.Add(1)
	f.countResponse(rcode)
	if len(answer) > wq.udpSize {
		// Rare: cut as ServeDNS does, TC=1 when records had to go.
		m := new(dns.Msg)
		if m.Unpack(answer) == nil {
			m.Truncate(wq.udpSize)
			w.WriteMsg(m)
			return true
		}
		// Records miekg/dns cannot read cannot be cut one by one: the
		// header and question only; the client asks again over TCP.
		answer = truncatedWire(answer, &k, rcode)
	}
	w.Write(answer)
	return true
}

// logFailure logs the first query failed by a cause in each period, with
// how many more it failed since the previous line.
func (f *Forwarder) logFailure(err error, rcode int, w dns.ResponseWriter, r *dns.Msg) {
	cause := err.Error()
	if rerr, ok := errors.AsType[*ResolveError](err); ok {
		cause = rerr.cause()
	}
	ok, suppressed := f.failLog.Allow(cause)
	if !ok {
		return
	}
	ev := f.cfg.Logger.Info().Err(err).Str("client", w.RemoteAddr().String())
	if len(r.Question) > 0 {
		ev = ev.Str("name", r.Question[0].Name).Str("type", dns.TypeToString[r.Question[0].Qtype])
	}
	ev.Func(logthrottle.Repeats("more_since_last_line", suppressed)).Msgf("DNS query failed; answering %s (further queries failing the same way: one line per %s)",
		dns.RcodeToString[rcode], failureLogPeriod)
}

// Close closes every pooled connection and the UDP association; queries
// still in flight, waiting on a dial or an associate included, fail at
// once. Idempotent.
func (f *Forwarder) Close() error {
	f.closeOnce.Do(func() {
		f.endLife()
		if f.udp != nil {
			f.udp.close()
		}
		for _, p := range f.pools {
			p.close()
		}
	})
	return nil
}
