// Package dnsforward owns DNS: a Forwarder (a miekg/dns dns.Handler) that
// sends every query to resolvers behind the SOCKS5 proxy, so that nothing
// leaks to the local network. The transport is DNS over TCP through
// CONNECT (works through every SOCKS server, ssh -D and Tor included), on a
// small pool of pipelined connections per resolver.
package dnsforward

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync/atomic"
	"time"

	"github.com/miekg/dns"
	"github.com/rs/zerolog"
	"golang.org/x/sync/singleflight"

	"github.com/socksfwd/socksfwd/socksclient"
)

// Defaults (DESIGN §4, §5).
const (
	DefaultTimeout     = 5 * time.Second
	DefaultPoolSize    = 4
	DefaultIdleTimeout = 30 * time.Second
)

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
	// IdleTimeout closes a pooled connection with nothing in flight for
	// this long (default DefaultIdleTimeout).
	IdleTimeout time.Duration
	// CacheSize bounds the answer cache (entries); 0 disables it.
	CacheSize int
	// Transport is "tcp" (default: DNS over TCP through CONNECT) or "udp"
	// (one shared UDP ASSOCIATE; truncated answers are asked again over
	// TCP).
	Transport string
	Logger    zerolog.Logger
}

// Stats counts queries by result.
type Stats struct {
	Queries   atomic.Int64
	Answered  atomic.Int64
	ServFail  atomic.Int64 // every resolver failed within the timeout
	Failovers atomic.Int64 // an attempt failed and the next resolver was tried
	CacheHits atomic.Int64
}

// Forwarder answers DNS queries by forwarding them through the proxy.
type Forwarder struct {
	cfg    Config
	pools  []*tcpPool
	udp    *udpTransport // nil for the tcp transport
	cache  *cache        // nil when disabled
	flight singleflight.Group
	stats  Stats
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
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = DefaultIdleTimeout
	}
	f := &Forwarder{cfg: cfg, cache: newCache(cfg.CacheSize)}
	switch cfg.Transport {
	case "", "tcp":
	case "udp":
		f.udp = newUDPTransport(func(ctx context.Context) (*socksclient.UDPConn, error) {
			c, _, err := cfg.Upstreams.Associate(ctx)
			return c, err
		})
	default:
		return nil, fmt.Errorf("dnsforward: unknown transport %q (want tcp or udp)", cfg.Transport)
	}
	for _, r := range cfg.Resolvers {
		resolver := r
		dial := func(ctx context.Context) (net.Conn, error) {
			c, _, err := cfg.Upstreams.DialAddr(ctx, resolver)
			if err != nil {
				return nil, err
			}
			return c, nil
		}
		f.pools = append(f.pools, newTCPPool(dial, cfg.PoolSize, cfg.IdleTimeout))
	}
	return f, nil
}

// Stats returns the live counters.
func (f *Forwarder) Stats() *Stats { return &f.stats }

// Exchange forwards q to the resolvers in order within the whole-query
// timeout. Each attempt gets an equal share of what is left, so a
// blackholed first resolver still leaves time for the next.
func (f *Forwarder) Exchange(ctx context.Context, q *dns.Msg) (*dns.Msg, error) {
	ctx, cancel := context.WithTimeout(ctx, f.cfg.Timeout)
	defer cancel()
	var errs []string
	for i, pool := range f.pools {
		deadline, _ := ctx.Deadline()
		share := time.Until(deadline) / time.Duration(len(f.pools)-i)
		actx, acancel := ctx, context.CancelFunc(func() {})
		if i+1 < len(f.pools) { // the last attempt has the whole rest anyway
			actx, acancel = context.WithTimeout(ctx, share)
		}
		resp, err := f.attempt(actx, i, pool, q)
		acancel()
		if err == nil {
			return resp, nil
		}
		if errors.Is(err, context.DeadlineExceeded) && actx.Err() != nil {
			err = fmt.Errorf("no answer within %s", share.Round(time.Millisecond))
		}
		errs = append(errs, fmt.Sprintf("%s: %v", f.cfg.Resolvers[i], err))
		var noUDP errNoUDPAssociate
		if ctx.Err() != nil || errors.Is(err, net.ErrClosed) || errors.As(err, &noUDP) {
			break
		}
		if i+1 < len(f.pools) {
			f.stats.Failovers.Add(1)
		}
	}
	return nil, errors.New("every resolver failed: " + strings.Join(errs, "; "))
}

// attempt asks resolver i once over the configured transport. On the udp
// transport a truncated answer is asked again over TCP (DESIGN §4).
func (f *Forwarder) attempt(ctx context.Context, i int, pool *tcpPool, q *dns.Msg) (*dns.Msg, error) {
	if f.udp == nil {
		return pool.exchange(ctx, q)
	}
	resp, err := f.udp.exchange(ctx, f.cfg.Resolvers[i], q)
	if err == nil && resp.Truncated {
		return pool.exchange(ctx, q)
	}
	return resp, err
}

// Resolve answers q from the cache or by Exchange, merging identical
// concurrent misses into one upstream query.
func (f *Forwarder) Resolve(ctx context.Context, q *dns.Msg) (*dns.Msg, error) {
	k, cacheable := keyOf(q)
	if !cacheable || f.cache == nil {
		return f.Exchange(ctx, q)
	}
	if m, ok := f.cache.get(k); ok {
		f.stats.CacheHits.Add(1)
		return answerFor(q, m), nil
	}
	// Do, not DoChan: no goroutine per miss. The shared query is bounded by
	// the forwarder's timeout, not by the first caller's context.
	v, err, shared := f.flight.Do(fmt.Sprintf("%s|%d|%d|%t", k.name, k.qtype, k.qclass, k.do), func() (any, error) {
		resp, err := f.Exchange(context.Background(), q)
		if err == nil {
			f.cache.put(k, resp)
		}
		return resp, err
	})
	if err != nil {
		return nil, err
	}
	m := v.(*dns.Msg)
	if shared {
		m = m.Copy() // other callers hold the same message
	}
	return answerFor(q, m), nil
}

// answerFor makes a shared or cached answer q's own: its ID and question.
func answerFor(q, m *dns.Msg) *dns.Msg {
	m.Id = q.Id
	m.Question = append(m.Question[:0], q.Question...)
	return m
}

// ServeDNS implements dns.Handler: forward, or SERVFAIL with one log line
// naming the reason. Never a silent drop.
func (f *Forwarder) ServeDNS(w dns.ResponseWriter, r *dns.Msg) {
	f.stats.Queries.Add(1)
	resp, err := f.Resolve(context.Background(), r)
	if err != nil {
		f.stats.ServFail.Add(1)
		ev := f.cfg.Logger.Info().Err(err).Str("client", w.RemoteAddr().String())
		if len(r.Question) > 0 {
			ev = ev.Str("name", r.Question[0].Name).Str("type", dns.TypeToString[r.Question[0].Qtype])
		}
		ev.Msg("DNS query failed; answering SERVFAIL")
		m := new(dns.Msg)
		m.SetRcode(r, dns.RcodeServerFailure)
		w.WriteMsg(m)
		return
	}
	f.stats.Answered.Add(1)
	if _, udp := w.RemoteAddr().(*net.UDPAddr); udp {
		// A UDP client gets what fits its buffer, with TC=1 if cut, and
		// retries over TCP for the whole answer (RFC 7766 §5).
		size := dns.MinMsgSize
		if opt := r.IsEdns0(); opt != nil {
			size = int(opt.UDPSize())
		}
		resp.Truncate(size)
	}
	w.WriteMsg(resp)
}

// Close closes every pooled connection and the UDP association.
func (f *Forwarder) Close() error {
	if f.udp != nil {
		f.udp.close()
	}
	for _, p := range f.pools {
		p.close()
	}
	return nil
}
