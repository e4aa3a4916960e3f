package peertest

import (
	"context"
	"io"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/socksfwd/socksfwd/internal/testnet"
	"github.com/socksfwd/socksfwd/socksclient"
)

// TestNetns: sockets made in InNetns live in the namespace (it has only
// its loopback), NewNetns turned duplicate address detection off there,
// and a panic in f reaches the caller.
func TestNetns(t *testing.T) {
	ns := NewNetns(t, "peertest")
	if err := InNetns(ns, func() error {
		ifs, err := net.Interfaces()
		if err != nil {
			return err
		}
		if len(ifs) != 1 || ifs[0].Name != "lo" || ifs[0].Flags&net.FlagUp == 0 {
			t.Errorf("interfaces in a new namespace: %v, want lo alone, up", ifs)
		}
		dad, err := os.ReadFile("/proc/sys/net/ipv6/conf/default/accept_dad")
		if err != nil {
			return err
		}
		if strings.TrimSpace(string(dad)) != "0" {
			t.Errorf("accept_dad = %q in the namespace, want 0", dad)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	func() {
		defer func() {
			if r := recover(); r != "boom" {
				t.Errorf("recovered %v, want the panic of f", r)
			}
		}()
		InNetns(ns, func() error { panic("boom") })
	}()
	if err := InNetns("socksfwd-no-such-namespace", func() error { return nil }); err == nil {
		t.Error("no error joining a namespace that does not exist")
	}
}

// TestPeersInNetns: Dante and dnsmasq start inside a namespace, and Dante
// relays a CONNECT there.
func TestPeersInNetns(t *testing.T) {
	ns := NewNetns(t, "peers")
	var echo net.Listener
	if err := InNetns(ns, func() error {
		ln, err := testnet.ServeOn(t, "127.0.0.1:0", func(c net.Conn) { io.Copy(c, c) })
		echo = ln
		return err
	}); err != nil {
		t.Fatal(err)
	}
	dante := Dante(t, DanteOptions{Netns: ns, Listen: "127.0.0.1"})
	DnsmasqNetns(t, ns, "127.0.0.1:53", map[string]string{"example.internal": "192.0.2.10"})
	var c net.Conn
	if err := InNetns(ns, func() (err error) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c, err = (&socksclient.Dialer{ProxyAddr: dante.Addr}).DialContext(ctx, "tcp", echo.Addr().String())
		return err
	}); err != nil {
		t.Fatalf("%v\n%s", err, dante.Proc.Output())
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	c.Write([]byte("netns"))
	buf := make([]byte, 5)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "netns" {
		t.Fatalf("echo %q, %v", buf, err)
	}
}
