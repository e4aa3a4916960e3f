//go:build unix

package tunnel

import (
	"context"
	"io"
	"net"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/socksfwd/socksfwd/internal/testnet"
	"github.com/socksfwd/socksfwd/socksclient"
	"github.com/socksfwd/socksfwd/socksclient/sockstest"
)

// TestShutdownServesQueuedConnections: connections the kernel completed
// before Shutdown, still waiting in the listener's accept queue, are
// served like any live session; closing the listener at once would reset
// them.
func TestShutdownServesQueuedConnections(t *testing.T) {
	echo := testnet.Echo(t).Addr().String()
	proxy := newSocks(t, sockstest.Config{})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	target, _ := socksclient.ParseAddr(echo)
	f := NewTCPForward(TCPForwardConfig{
		Name: ln.Addr().String(), Target: target,
		Upstreams: socksclient.NewUpstreams(&socksclient.Dialer{ProxyAddr: proxy.Addr(), HandshakeTimeout: 5 * time.Second}),
		Logger:    zerolog.Nop(),
	}, ln)
	// Five clients connect while nothing accepts: they wait in the queue.
	const queued = 5
	var clients []net.Conn
	for range queued {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		clients = append(clients, c)
	}
	// Serving starts and the shutdown comes at once.
	served := make(chan error, 1)
	go func() { served <- f.Serve(context.Background()) }()
	shut := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		shut <- f.Shutdown(ctx)
	}()
	for i, c := range clients {
		c.Write([]byte("q"))
		c.(*net.TCPConn).CloseWrite()
		got, err := io.ReadAll(c)
		if err != nil || string(got) != "q" {
			t.Errorf("queued client %d: %q, %v; want its echo", i, got, err)
		}
	}
	if err := <-shut; err != nil {
		t.Errorf("Shutdown: %v", err)
	}
	if err := <-served; err != nil {
		t.Errorf("Serve: %v", err)
	}
}
