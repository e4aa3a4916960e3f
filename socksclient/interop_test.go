package socksclient_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/socksfwd/socksfwd/internal/peertest"
	"github.com/socksfwd/socksfwd/internal/testnet"
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

// TestSSHTargetFailureKeepsUpstreamUp: ssh -D answers a CONNECT whose
// target fails (a closed port, a name that does not resolve) by closing
// without a reply. That is ErrNoReply, and the proxy, which works, is
// not reported down for it, nor for an app retrying a dead target.
func TestSSHTargetFailureKeepsUpstreamUp(t *testing.T) {
	if testing.Short() {
		t.Skip("starts sshd")
	}
	ssh := peertest.SSHDynamic(t, nil)
	closed, err := socksclient.ParseAddr(testnet.ClosedPort(t))
	if err != nil {
		t.Fatal(err)
	}
	u := socksclient.NewUpstreams(&socksclient.Dialer{ProxyAddr: ssh.Addr, HandshakeTimeout: 10 * time.Second})
	var mu sync.Mutex
	var changes []string
	u.OnStateChange(func(proxy string, up bool, cause error) {
		mu.Lock()
		defer mu.Unlock()
		changes = append(changes, fmt.Sprintf("%s up=%v: %v", proxy, up, cause))
	})
	// An app retrying a dead target: a dozen closes for one target.
	targets := []socksclient.Addr{{Name: "no-such-host.invalid", Port: 80}}
	for range 12 {
		targets = append(targets, closed)
	}
	for _, target := range targets {
		_, _, err := u.DialAddr(context.Background(), target)
		if !errors.Is(err, socksclient.ErrNoReply) {
			t.Errorf("dial %v through ssh -D: %v, want ErrNoReply", target, err)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if len(changes) != 0 || !u.Status()[0].Up {
		t.Errorf("ssh -D reported down for its targets' failures: %q", changes)
	}
}
