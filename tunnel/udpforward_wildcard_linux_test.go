package tunnel

import (
	"net"
	"testing"
	"time"

	"github.com/socksfwd/socksfwd/socksclient/sockstest"
)

// TestUDPForwardWildcardAnswersFromDestination: a forward on a wildcard
// address answers each client from the address the client sent to, so a
// client that connected its socket to another of the host's addresses
// than the route back would pick (127.0.0.2 here, where the route picks
// 127.0.0.1), as resolvers do, gets its answers, one at a time and in a
// burst. On an IPv4 and a dual-stack socket.
func TestUDPForwardWildcardAnswersFromDestination(t *testing.T) {
	for _, listen := range []string{"0.0.0.0:0", "[::]:0"} {
		t.Run(listen, func(t *testing.T) {
			_, fwd, _ := startUDPForward(t, sockstest.Config{}, udpFwdOpts{listen: listen})
			c, err := net.DialUDP("udp4", nil, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 2), Port: fwd.Port})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			buf := make([]byte, 2048)
			for round, burst := range []int{1, 8} {
				for range burst {
					if _, err := c.Write(make([]byte, 500)); err != nil {
						t.Fatal(err)
					}
				}
				for k := range burst {
					if n, err := c.Read(buf); err != nil || n != 500 {
						t.Fatalf("round %d, echo %d: %d bytes, %v (a connected client takes only answers from 127.0.0.2)", round, k, n, err)
					}
				}
			}
		})
	}
}

// TestUDPForwardWildcardSourceRefused: a destination the kernel will not
// send from (here an IPv6 address the host routes to itself, AnyIP, which
// IPV6_PKTINFO refuses; a directed broadcast or an address the host gave
// up fail alike) leaves the session's replies to the route's choice, the
// first one sent again: before, every reply of the session was dropped.
func TestUDPForwardWildcardSourceRefused(t *testing.T) {
	if !inFreshNetns(t) {
		return
	}
	run(t, "", "ip", "link", "set", "lo", "up")
	run(t, "", "ip", "-6", "route", "add", "local", "2001:db8:77::/64", "dev", "lo")
	f, fwd, _ := startUDPForward(t, sockstest.Config{}, udpFwdOpts{listen: "[::]:0"})
	c := udpClient(t, "udp6")
	to := &net.UDPAddr{IP: net.ParseIP("2001:db8:77::5"), Port: fwd.Port}
	for i := range 3 {
		if err := udpRoundTrip(c, to, []byte("anyip"), 5*time.Second); err != nil {
			t.Fatalf("round trip %d: %v", i, err)
		}
	}
	if n := f.Stats().DroppedReply.Load(); n != 0 {
		t.Errorf("DroppedReply = %d, want 0", n)
	}
}
