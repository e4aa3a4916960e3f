package tunnel

import (
	"context"
	"net"
	"syscall"
	"testing"

	"github.com/socksfwd/socksfwd/internal/testnet"
)

// refusingRelay holds a loopback UDP port where no datagram is taken
// until answer starts an echo there: the port never changes hands, so no
// other socket can take it in between.
//
// The port is held by a socket connected to another address (the discard
// port), which the kernel gives only that address's datagrams: one from
// anywhere else finds no socket, and its sender gets an ICMP port
// unreachable, as from a port nothing listens on. Both sockets set
// SO_REUSEADDR, which lets the echo bind the port beside the held one.
type refusingRelay struct {
	addr *net.UDPAddr
}

func reuseAddr(network, address string, c syscall.RawConn) error {
	var serr error
	if err := c.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1)
	}); err != nil {
		return err
	}
	return serr
}

func newRefusingRelay(t *testing.T) *refusingRelay {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}, Control: reuseAddr}
	held, err := d.Dial("udp4", "127.0.0.1:9")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { held.Close() })
	return &refusingRelay{addr: held.LocalAddr().(*net.UDPAddr)}
}

// answer starts a UDP echo on the relay's address, until cleanup.
func (r *refusingRelay) answer(t *testing.T) {
	t.Helper()
	lc := net.ListenConfig{Control: reuseAddr}
	pc, err := lc.ListenPacket(context.Background(), "udp4", r.addr.String())
	if err != nil {
		t.Fatalf("echo on the held relay port %v: %v", r.addr, err)
	}
	testnet.EchoUDPOn(t, pc.(*net.UDPConn))
}
