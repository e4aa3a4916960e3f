package socksclient_test

import (
	"context"
	"testing"
	"time"

	"github.com/socksfwd/socksfwd/internal/testnet"
	"github.com/socksfwd/socksfwd/socksclient"
	"github.com/socksfwd/socksfwd/socksclient/sockstest"
)

// BenchmarkUpstreamsDialAddr: one CONNECT through Upstreams with a single
// upstream (the common -L case), to an echo target on loopback, then
// close; the in-process server's work is in the figure too.
func BenchmarkUpstreamsDialAddr(b *testing.B) {
	srv, err := sockstest.NewServer(sockstest.Config{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { srv.Close() })
	target, err := socksclient.ParseAddr(testnet.Echo(b).Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	ups := socksclient.NewUpstreams(&socksclient.Dialer{ProxyAddr: srv.Addr(), HandshakeTimeout: 5 * time.Second})
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		c, _, err := ups.DialAddr(ctx, target)
		if err != nil {
			b.Fatal(err)
		}
		c.Close()
	}
}
