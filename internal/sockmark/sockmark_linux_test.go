package sockmark

import (
	"context"
	"net"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/socksfwd/socksfwd/internal/peertest"
)

// markOf reads a socket's SO_MARK back from the kernel.
func markOf(t *testing.T, c syscall.Conn) uint32 {
	t.Helper()
	mark, err := Of(c)
	if err != nil {
		t.Fatal(err)
	}
	return mark
}

func TestControlMarksSockets(t *testing.T) {
	peertest.RequireRoot(t)
	// 0x80000438 and 0xffffffff have the top bit set, which a signed
	// 32-bit round trip would lose (an int mark went negative on 386).
	for _, mark := range []uint32{0x438, 0x80000438, 0xffffffff} {
		if err := Check(mark); err != nil {
			t.Fatalf("Check(%#x): %v", mark, err)
		}
		control := Control(mark)

		pc, err := (&net.ListenConfig{Control: control}).ListenPacket(t.Context(), "udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		if got := markOf(t, pc.(*net.UDPConn)); got != mark {
			t.Errorf("udp socket mark %#x, want %#x", got, mark)
		}
		pc.Close()

		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		c, err := (&net.Dialer{Control: control}).DialContext(t.Context(), "tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		if got := markOf(t, c.(*net.TCPConn)); got != mark {
			t.Errorf("tcp socket mark %#x, want %#x", got, mark)
		}
		c.Close()
		ln.Close()
	}
}

func TestCheckAsRoot(t *testing.T) {
	peertest.RequireRoot(t)
	if err := Check(0x438); err != nil {
		t.Fatal(err)
	}
}

// TestCheckWithoutCapability runs Check in a child that is still root but
// has CAP_NET_ADMIN and CAP_NET_RAW removed from its bounding set, so they
// are gone after exec. Both must go: since Linux 5.17 CAP_NET_RAW alone
// also allows SO_MARK.
func TestCheckWithoutCapability(t *testing.T) {
	peertest.RequireRoot(t)
	setpriv := peertest.Require(t, "setpriv")
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, setpriv, "--bounding-set=-net_admin,-net_raw", "--", os.Args[0])
	cmd.Env = append(os.Environ(), childEnv+"=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child: %v: %s", err, out)
	}
	report := string(out)
	if !strings.HasPrefix(report, "permission=true\n") {
		t.Fatalf("Check without the capability said %q, want a permission error", report)
	}
	if want := "--mark needs CAP_NET_ADMIN (run as root or grant the capability): operation not permitted"; !strings.Contains(report, want) {
		t.Fatalf("Check without the capability said %q, want %q", report, want)
	}
}
