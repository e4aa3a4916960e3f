package dnsforward

import (
	"context"
	"io"
	"testing"
	"time"

	"github.com/miekg/dns"
	"github.com/rs/zerolog"

	"github.com/socksfwd/socksfwd/socksclient"
	"github.com/socksfwd/socksfwd/socksclient/sockstest"
)

// TestBlackholedFirstProxy: with the first of two proxies black-holed
// (it greets, then never answers), queries on either transport are still
// answered within a deadline shorter than the handshake timeout: the
// query's own context reaches the proxies' failover, and no timeout of
// ours per proxy cuts it short.
func TestBlackholedFirstProxy(t *testing.T) {
	for _, transport := range []string{"tcp", "udp"} {
		t.Run(transport, func(t *testing.T) {
			hole, err := sockstest.NewServer(sockstest.Config{Fault: sockstest.FaultHangAfterGreeting})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { hole.Close() })
			resolver := newResolver(t, 0).addr
			if transport == "udp" {
				resolver = udpResolver(t)
			}
			r, err := socksclient.ParseAddr(resolver)
			if err != nil {
				t.Fatal(err)
			}
			f, err := New(Config{
				Resolvers: []socksclient.Addr{r},
				Upstreams: socksclient.NewUpstreams(
					&socksclient.Dialer{ProxyAddr: hole.Addr()},
					&socksclient.Dialer{ProxyAddr: socks(t).Addr()}),
				Timeout:   3 * time.Second, // shorter than the 10 s handshake timeout
				Transport: transport,
				Logger:    zerolog.New(io.Discard),
			})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { f.Close() })
			resp, err := f.Exchange(context.Background(), query("example", dns.TypeA, 7))
			if err != nil || len(resp.Answer) != 1 {
				t.Fatalf("%v %v", resp, err)
			}
		})
	}
}
