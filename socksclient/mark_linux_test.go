package socksclient_test

import (
	"context"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/socksfwd/socksfwd/internal/peertest"
	"github.com/socksfwd/socksfwd/internal/sockmark"
	"github.com/socksfwd/socksfwd/internal/testnet"
	"github.com/socksfwd/socksfwd/socksclient"
	"github.com/socksfwd/socksfwd/socksclient/sockstest"
)

// markOf reads a socket's SO_MARK back from the kernel.
func markOf(t *testing.T, c syscall.Conn) int {
	t.Helper()
	mark, err := sockmark.Of(c)
	if err != nil {
		t.Fatal(err)
	}
	return int(mark)
}

// TestMarkedSockets: with sockmark.Control as the Dialer's Control, the
// proxy connection of a CONNECT and the UDP socket of an association carry
// the mark that keeps a transparent proxy's own traffic out of its rules.
func TestMarkedSockets(t *testing.T) {
	peertest.RequireRoot(t)
	const mark = 0x438
	srv, err := sockstest.NewServer(sockstest.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	d := socksclient.Dialer{ProxyAddr: srv.Addr(), HandshakeTimeout: 5 * time.Second, Control: sockmark.Control(mark)}

	u, err := d.Associate(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	if got := markOf(t, socksclient.RelaySocket(u)); got != mark {
		t.Errorf("association's UDP socket has mark %#x, want %#x", got, mark)
	}

	target, err := socksclient.ParseAddr(testnet.Echo(t).Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c, err := d.DialAddr(context.Background(), target)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got := markOf(t, c.NetConn().(*net.TCPConn)); got != mark {
		t.Errorf("proxy connection has mark %#x, want %#x", got, mark)
	}
}
