package peertest

import (
	"context"
	"io"
	"net"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/socksfwd/socksfwd/internal/testnet"
	"github.com/socksfwd/socksfwd/socksclient"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// TestPeersServeConnect checks each SOCKS peer starts and relays a CONNECT,
// so a broken peer setup fails here, not as a mystery in an interop test.
func TestPeersServeConnect(t *testing.T) {
	for _, v := range Versions() {
		t.Log("peer:", v)
	}
	echo := testnet.Echo(t).Addr().String()
	peers := map[string]func(t *testing.T) (Peer, socksclient.Dialer){
		"dante": func(t *testing.T) (Peer, socksclient.Dialer) {
			return Dante(t, DanteOptions{}), socksclient.Dialer{}
		},
		"dante-username": func(t *testing.T) (Peer, socksclient.Dialer) {
			return Dante(t, DanteOptions{Username: true}), socksclient.Dialer{Username: TestUser, Password: TestPassword}
		},
		"microsocks": func(t *testing.T) (Peer, socksclient.Dialer) {
			return Microsocks(t, MicrosocksOptions{User: "u", Password: TestPassword}), socksclient.Dialer{Username: "u", Password: TestPassword}
		},
		"ssh-D": func(t *testing.T) (Peer, socksclient.Dialer) {
			return SSHDynamic(t, nil), socksclient.Dialer{}
		},
	}
	for name, start := range peers {
		t.Run(name, func(t *testing.T) {
			p, d := start(t)
			d.ProxyAddr = p.Addr
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			c, err := d.DialContext(ctx, "tcp", echo)
			if err != nil {
				t.Fatalf("%v\n%s", err, p.Proc.Output())
			}
			defer c.Close()
			c.Write([]byte("peer"))
			buf := make([]byte, 4)
			if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "peer" {
				t.Fatalf("echo %q, %v", buf, err)
			}
		})
	}
}

func TestPostgresStarts(t *testing.T) {
	p := Postgres(t)
	c, err := net.Dial("tcp", p.Addr)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
}

func TestShadowsocksAndDnsmasqStart(t *testing.T) {
	ss := Shadowsocks(t)
	dns := Dnsmasq(t, map[string]string{"example.internal": "192.0.2.10"}, nil)
	for _, p := range []Peer{ss, dns} {
		c, err := net.Dial("tcp", p.Addr)
		if err != nil {
			t.Fatalf("%s: %v", p.Proc.Name, err)
		}
		c.Close()
	}
}
