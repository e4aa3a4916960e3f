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
// 127.0.0.1), as resolvers do, gets its answers: lone ones and a burst
// that goes as one segmented send. On an IPv4 and a dual-stack socket.
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
