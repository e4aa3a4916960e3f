package tunnel

import (
	"context"
	"fmt"
	"net"
	"os/exec"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/socksfwd/socksfwd/internal/testnet"
	"github.com/socksfwd/socksfwd/socksclient"
	"github.com/socksfwd/socksfwd/socksclient/sockstest"
)

// keepAliveOn reads SO_KEEPALIVE back from the kernel.
func keepAliveOn(t *testing.T, c net.Conn) bool {
	t.Helper()
	rc, err := c.(syscall.Conn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var on int
	rc.Control(func(fd uintptr) { on, err = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_KEEPALIVE) })
	if err != nil {
		t.Fatal(err)
	}
	return on != 0
}

// doorClientConns returns the door's connections from its clients, by the
// client's address.
func doorClientConns(d *SOCKSDoor) map[string]net.Conn {
	f := d.TCPForward
	f.mu.Lock()
	defer f.mu.Unlock()
	conns := make(map[string]net.Conn)
	for c, isClient := range f.conns {
		if isClient {
			conns[c.RemoteAddr().String()] = c
		}
	}
	return conns
}

// TestDoorKeepsIdleControlsAlive: a client's control connection that
// carries nothing while it lasts (UDP ASSOCIATE, a BIND waiting for its
// peer) gets keep-alive probes, so that a client that vanished without a
// word frees its session; a CONNECT's, which carries the session, gets
// none, as ssh -D's do not.
func TestDoorKeepsIdleControlsAlive(t *testing.T) {
	noLeaks(t)
	echo := testnet.Echo(t).Addr().String()
	up := newSocks(t, sockstest.Config{})
	// Bound as socksfwd binds its listeners: no keep-alive by default.
	ln, err := (&net.ListenConfig{KeepAlive: -1}).Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	door, _ := startDoor(t, SOCKSDoorConfig{}, ln, up.Addr())
	d := client(door)
	c, err := d.DialContext(context.Background(), "tcp", echo)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	echoTCP(t, c, "connect")
	b, err := d.Bind(context.Background(), socksclient.Addr{})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	u, err := d.Associate(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	conns := doorClientConns(door)
	if len(conns) != 3 {
		t.Fatalf("%d client connections tracked, want 3", len(conns))
	}
	if keepAliveOn(t, conns[c.LocalAddr().String()]) {
		t.Error("CONNECT's client connection has keep-alive probes, want none")
	}
	if !keepAliveOn(t, conns[b.NetConn().LocalAddr().String()]) {
		t.Error("a waiting BIND's client connection has no keep-alive probes")
	}
	delete(conns, c.LocalAddr().String())
	delete(conns, b.NetConn().LocalAddr().String())
	for _, assoc := range conns {
		if !keepAliveOn(t, assoc) {
			t.Error("UDP ASSOCIATE's client connection has no keep-alive probes")
		}
	}
}

// TestDoorUDPAssociateLinkLocal: a door on an IPv6 link-local address
// answers UDP ASSOCIATE with its relay's address (a SOCKS address has no
// zone: before, the reply could not be written and the client got a
// reset, unlogged), and the client reaches that relay through the zone of
// its control connection.
func TestDoorUDPAssociateLinkLocal(t *testing.T) {
	if !inFreshNetns(t) {
		return
	}
	for _, args := range [][]string{{"link", "set", "lo", "up"}, {"addr", "add", "fe80::1/64", "dev", "lo", "nodad"}} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v %s", args, err, out)
		}
	}
	noLeaks(t)
	echo := udpEchoAddr(t)
	up := newSocks(t, sockstest.Config{})
	ln, err := net.Listen("tcp", "[fe80::1%lo]:0")
	if err != nil {
		t.Fatal(err)
	}
	startDoor(t, SOCKSDoorConfig{}, ln, up.Addr())
	// The listener's address as the kernel gives it back has no zone.
	door := fmt.Sprintf("[fe80::1%%lo]:%d", ln.Addr().(*net.TCPAddr).Port)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	u, err := (&socksclient.Dialer{ProxyAddr: door, HandshakeTimeout: 5 * time.Second}).Associate(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	if relay := u.Relay(); relay.Addr().WithZone("").String() != "fe80::1" {
		t.Fatalf("relay %v, want the door's fe80::1", relay)
	}
	echoUDP(t, u, echo, echo, "link-local")
}
