package socksclient_test

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/socksfwd/socksfwd/internal/peertest"
	"github.com/socksfwd/socksfwd/socksclient"
)

// TestBindDante runs both BIND replies against a real Dante.
func TestBindDante(t *testing.T) {
	if testing.Short() {
		t.Skip("starts danted")
	}
	dante := peertest.Dante(t, peertest.DanteOptions{})
	d := socksclient.Dialer{ProxyAddr: dante.Addr, HandshakeTimeout: 10 * time.Second}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	b, err := d.Bind(ctx, socksclient.Addr{})
	if err != nil {
		t.Fatalf("%v\n%s", err, dante.Proc.Output())
	}
	defer b.Close()
	if b.Addr().Port == 0 || !b.Addr().IP.IsValid() {
		t.Fatalf("first reply address %v", b.Addr())
	}
	peer, err := net.Dial("tcp", b.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer peer.Close()
	conn, err := b.Accept(ctx)
	if err != nil {
		t.Fatalf("%v\n%s", err, dante.Proc.Output())
	}
	defer conn.Close()
	if got, want := conn.BoundAddr().String(), peer.LocalAddr().String(); got != want {
		t.Errorf("second reply names %s, want the peer %s", got, want)
	}
	peer.Write([]byte("from peer"))
	peer.(*net.TCPConn).CloseWrite()
	got, _ := io.ReadAll(io.LimitReader(conn, 9))
	if string(got) != "from peer" {
		t.Fatalf("got %q", got)
	}
	conn.Write([]byte("to peer"))
	conn.CloseWrite()
	got, _ = io.ReadAll(peer)
	if string(got) != "to peer" {
		t.Fatalf("peer got %q", got)
	}
}

// TestBindSSHUnsupported: OpenSSH's ssh -D closes the connection on BIND
// without a reply; that must read as "does not support", not as a bare EOF.
func TestBindSSHUnsupported(t *testing.T) {
	if testing.Short() {
		t.Skip("starts sshd")
	}
	ssh := peertest.SSHDynamic(t, nil)
	d := socksclient.Dialer{ProxyAddr: ssh.Addr, HandshakeTimeout: 10 * time.Second}
	_, err := d.Bind(context.Background(), socksclient.Addr{})
	if !errors.Is(err, socksclient.ErrCommandNotSupported) || !strings.Contains(err.Error(), "the server does not support bind") {
		t.Fatalf("err = %v, want the server does not support bind", err)
	}
}
