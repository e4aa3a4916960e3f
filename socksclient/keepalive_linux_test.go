package socksclient_test

import (
	"context"
	"net"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/socksfwd/socksfwd/socksclient"
	"github.com/socksfwd/socksfwd/socksclient/sockstest"
)

// keepAliveOf reads a TCP socket's keep-alive settings back from the
// kernel: on or off, and the idle time before the first probe (seconds).
func keepAliveOf(t *testing.T, c net.Conn) (on bool, idle int) {
	t.Helper()
	rc, err := c.(syscall.Conn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var ka int
	rc.Control(func(fd uintptr) {
		ka, err = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_KEEPALIVE)
		if err == nil {
			idle, err = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_KEEPIDLE)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	return ka != 0, idle
}

// TestIdleControlsKeptAlive: the control connections that carry nothing
// for long stretches (an association's, a BIND's waiting for its peer)
// get keep-alive probes, so a proxy that vanished ends them; a CONNECT's
// carries the session and gets none.
func TestIdleControlsKeptAlive(t *testing.T) {
	srv, err := sockstest.NewServer(sockstest.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	d := socksclient.Dialer{ProxyAddr: srv.Addr(), HandshakeTimeout: 5 * time.Second}
	wantIdle := int(socksclient.ControlKeepAlive.Idle / time.Second)

	u, err := d.Associate(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	if on, idle := keepAliveOf(t, socksclient.ControlConn(u)); !on || idle != wantIdle {
		t.Errorf("association's control: keep-alive %v after %d s, want on after %d s", on, idle, wantIdle)
	}

	b, err := d.Bind(context.Background(), socksclient.Addr{})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if on, idle := keepAliveOf(t, b.NetConn()); !on || idle != wantIdle {
		t.Errorf("BIND's control: keep-alive %v after %d s, want on after %d s", on, idle, wantIdle)
	}

	echo, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer echo.Close()
	c, err := d.DialContext(context.Background(), "tcp", echo.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if on, _ := keepAliveOf(t, c.(*socksclient.Conn).Conn); on {
		t.Error("CONNECT's connection has keep-alive probes, want none (as ssh -L)")
	}
}
