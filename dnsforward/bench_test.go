package dnsforward

import (
	"net"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// packingWriter is a dns.ResponseWriter for benchmarks that does what the
// miekg/dns server's writer does with a reply (packs a message, or takes
// the bytes as they are) and keeps nothing.
type packingWriter struct {
	remote net.Addr
	buf    []byte
	n      int
}

func (w *packingWriter) LocalAddr() net.Addr  { return w.remote }
func (w *packingWriter) RemoteAddr() net.Addr { return w.remote }
func (w *packingWriter) WriteMsg(m *dns.Msg) error {
	out, err := m.PackBuffer(w.buf)
	w.n = len(out)
	return err
}
func (w *packingWriter) Write(b []byte) (int, error) {
	w.n = copy(w.buf, b)
	return len(b), nil
}
func (w *packingWriter) Close() error        { return nil }
func (w *packingWriter) TsigStatus() error   { return nil }
func (w *packingWriter) TsigTimersOnly(bool) {}
func (w *packingWriter) Hijack()             {}

func udpClientWriter() *packingWriter {
	return &packingWriter{remote: &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 40000}, buf: make([]byte, 4096)}
}

// serveLoop serves q once untimed (to fill the cache or dial the pool),
// then b.N times.
func serveLoop(b *testing.B, f *Forwarder, w dns.ResponseWriter, q *dns.Msg) {
	f.ServeDNS(w, q)
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		f.ServeDNS(w, q)
	}
}

// BenchmarkServeCacheHit: a UDP client's query answered from the cache,
// from the unpacked query (what the miekg/dns server hands over) to the
// bytes written.
func BenchmarkServeCacheHit(b *testing.B) {
	_, f := newCachingPair(b)
	q := query("a.example", dns.TypeA, 7)
	q.SetEdns0(1232, false)
	w := udpClientWriter()
	serveLoop(b, f, w, q)
	if w.n == 0 || f.stats.CacheHits.Load() < int64(b.N) {
		b.Fatalf("not answered from the cache: %d hits", f.stats.CacheHits.Load())
	}
}

// BenchmarkServeCacheMiss: a query forwarded through the TCP pool over a
// SOCKS5 CONNECT to an in-process resolver (cache off), one at a time.
func BenchmarkServeCacheMiss(b *testing.B) {
	res := newResolver(b, 0)
	f := newForwarder(b, socks(b).Addr(), 5*time.Second, nil, res.addr)
	q := query("a.example", dns.TypeA, 7)
	w := udpClientWriter()
	serveLoop(b, f, w, q)
	if f.stats.Answered.Load() < int64(b.N) {
		b.Fatalf("answered %d of %d", f.stats.Answered.Load(), b.N)
	}
}

// BenchmarkServerCacheHitUDP: a cache hit end to end through the Server's
// UDP socket on loopback, one query at a time (includes the client's
// system calls).
func BenchmarkServerCacheHitUDP(b *testing.B) {
	_, f := newCachingPair(b)
	benchUDP(b, f)
	if f.stats.CacheHits.Load() < int64(b.N) {
		b.Fatalf("not answered from the cache: %d hits", f.stats.CacheHits.Load())
	}
}

// BenchmarkServerCacheMissUDP: a query forwarded end to end, from the
// Server's UDP socket through the TCP pool over SOCKS5 to an in-process
// resolver and back (cache off), one at a time.
func BenchmarkServerCacheMissUDP(b *testing.B) {
	res := newResolver(b, 0)
	f := newForwarder(b, socks(b).Addr(), 5*time.Second, nil, res.addr)
	benchUDP(b, f)
	if n := res.queries.Load(); n < int64(b.N) {
		b.Fatalf("resolver asked %d times for %d queries", n, b.N)
	}
}

// benchUDP serves f on loopback and times one query and its answer over
// UDP, after one untimed.
func benchUDP(b *testing.B, f *Forwarder) {
	_, addr := startServerFor(b, f)
	c, err := net.Dial("udp", addr)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	q := query("a.example", dns.TypeA, 7)
	wire, _ := q.Pack()
	buf := make([]byte, 1500)
	c.SetDeadline(time.Now().Add(time.Minute))
	ask := func() {
		if _, err := c.Write(wire); err != nil {
			b.Fatal(err)
		}
		if _, err := c.Read(buf); err != nil {
			b.Fatal(err)
		}
	}
	ask()
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		ask()
	}
	b.StopTimer()
}

// BenchmarkServerCacheMissUDPParallel: BenchmarkServerCacheMissUDP with
// many clients at once (each its own socket, one query at a time), so
// that answers come back in bursts.
func BenchmarkServerCacheMissUDPParallel(b *testing.B) {
	res := newResolver(b, 0)
	f := newForwarder(b, socks(b).Addr(), 5*time.Second, nil, res.addr)
	_, addr := startServerFor(b, f)
	wire, _ := query("a.example", dns.TypeA, 7).Pack()
	b.SetParallelism(8)
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		c, err := net.Dial("udp", addr)
		if err != nil {
			b.Error(err)
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(time.Minute))
		buf := make([]byte, 1500)
		for pb.Next() {
			if _, err := c.Write(wire); err != nil {
				b.Error(err)
				return
			}
			if _, err := c.Read(buf); err != nil {
				b.Error(err)
				return
			}
		}
	})
}
