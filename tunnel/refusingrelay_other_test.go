//go:build !linux

package tunnel

import (
	"net"
	"testing"

	"github.com/socksfwd/socksfwd/internal/peertest"
	"github.com/socksfwd/socksfwd/internal/testnet"
)

// refusingRelay is a loopback UDP port where nothing listens until answer
// starts an echo there. Here the port is one the kernel chose and that was
// closed again: another socket may take it in between, which skips the
// test (fails it under CI=true). On Linux the port is held all along.
type refusingRelay struct {
	addr *net.UDPAddr
}

func newRefusingRelay(t *testing.T) *refusingRelay {
	t.Helper()
	probe := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
	addr := probe.LocalAddr().(*net.UDPAddr)
	probe.Close()
	return &refusingRelay{addr: addr}
}

// answer starts a UDP echo on the relay's address, until cleanup.
func (r *refusingRelay) answer(t *testing.T) {
	t.Helper()
	pc, err := net.ListenUDP("udp4", r.addr)
	if err != nil {
		peertest.Missing(t, "the relay port %v was taken meanwhile: %v", r.addr, err)
	}
	testnet.EchoUDPOn(t, pc)
}
