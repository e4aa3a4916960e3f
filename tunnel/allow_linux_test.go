package tunnel

import (
	"fmt"
	"net"
	"testing"

	"github.com/socksfwd/socksfwd/internal/allowlist"
	"github.com/socksfwd/socksfwd/internal/testnet"
	"github.com/socksfwd/socksfwd/socksclient/sockstest"
)

// TestAllowServesHostItself: with an --allow that lists none of the
// host's addresses, a TCP connection from one of them (what a captured
// local program's connection is) is the host itself and served, as
// loopback is; a datagram from one is not (its source may be forged:
// IPv6 has no martian-source check), and is dropped and counted.
func TestAllowServesHostItself(t *testing.T) {
	if !inFreshNetns(t) {
		return
	}
	run(t, "", "ip", "link", "set", "lo", "up")
	run(t, "", "ip", "addr", "add", "203.0.113.5/32", "dev", "lo")
	allow, err := allowlist.Parse([]string{"10.0.0.0/8"})
	if err != nil {
		t.Fatal(err)
	}
	host := net.ParseIP("203.0.113.5")

	ln, err := net.Listen("tcp", "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	echo := testnet.Echo(t).Addr().String()
	f, _, _ := startForwardOn(t, ln, echo, newSocks(t, sockstest.Config{}).Addr())
	f.SetAdmission(0, allow)
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: host}}
	c, err := d.Dial("tcp", fmt.Sprintf("203.0.113.5:%d", ln.Addr().(*net.TCPAddr).Port))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	echoTCP(t, c, "from the host's own address")

	u, fwd, logs := startUDPForward(t, sockstest.Config{}, udpFwdOpts{listen: "0.0.0.0:0"})
	u.SetAllow(allow)
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: host})
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	if _, err := pc.WriteToUDP([]byte("x"), &net.UDPAddr{IP: host, Port: fwd.Port}); err != nil {
		t.Fatal(err)
	}
	logs.waitFor(t, "client source not in --allow")
	if n := u.Stats().DroppedNotAllowed.Load(); n != 1 {
		t.Errorf("DroppedNotAllowed = %d, want 1", n)
	}
}
