package allowlist

import (
	"net"
	"net/netip"
	"testing"

	"go.uber.org/goleak"
)

func TestAllows(t *testing.T) {
	l, err := Parse([]string{"10.0.0.0/8", "192.0.2.7", "fd00::/8", "::ffff:198.51.100.0/120"})
	if err != nil {
		t.Fatal(err)
	}
	for ip, want := range map[string]bool{
		"10.1.2.3": true, "11.0.0.1": false, "192.0.2.7": true, "192.0.2.8": false,
		"fd12::1": true, "fe80::1": false, "127.0.0.1": true, "::1": true,
		"::ffff:10.9.9.9": true, "198.51.100.9": true, "198.51.101.9": false,
	} {
		if got := l.Allows(netip.MustParseAddr(ip)); got != want {
			t.Errorf("Allows(%s) = %t, want %t", ip, got, want)
		}
	}
	var none *List
	if !none.Allows(netip.MustParseAddr("203.0.113.1")) || !none.AllowsAddr(&net.TCPAddr{IP: net.ParseIP("203.0.113.1")}) {
		t.Error("a nil list refuses a source")
	}
	if l.AllowsAddr(&net.UDPAddr{IP: net.ParseIP("203.0.113.1"), Port: 53}) {
		t.Error("AllowsAddr allows a source outside the list")
	}
	if _, err := Parse([]string{"10.0.0.0/33"}); err == nil {
		t.Error("Parse took a bad prefix")
	}
}

// TestAllowsHostAddresses: a source that is one of the host's own
// addresses is the host itself, served whatever the list says (a program
// on the host whose connection a transparent rule captured keeps its
// source address); a neighbour on the same subnet is not. A refused source
// reads the host's addresses at most once per hostRefresh.
func TestAllowsHostAddresses(t *testing.T) {
	reads := 0
	addrs := []net.Addr{
		&net.IPNet{IP: net.ParseIP("203.0.113.5").To4(), Mask: net.CIDRMask(24, 32)},
		&net.IPNet{IP: net.ParseIP("2001:db8::5"), Mask: net.CIDRMask(64, 128)},
	}
	hostAddrs = func() ([]net.Addr, error) { reads++; return addrs, nil }
	thisHost = hostSet{}
	t.Cleanup(func() { hostAddrs, thisHost = net.InterfaceAddrs, hostSet{} })

	l, err := Parse([]string{"10.0.0.0/8"})
	if err != nil {
		t.Fatal(err)
	}
	for ip, want := range map[string]bool{
		"203.0.113.5": true, "::ffff:203.0.113.5": true, "2001:db8::5": true,
		"203.0.113.6": false, "2001:db8::6": false, "10.0.0.1": true,
	} {
		if got := l.Allows(netip.MustParseAddr(ip)); got != want {
			t.Errorf("Allows(%s) = %t, want %t", ip, got, want)
		}
	}
	if reads != 1 {
		t.Errorf("the host's addresses were read %d times for two refused sources, want once", reads)
	}
	// An address added later is seen once the copy is older than
	// hostRefresh.
	addrs = append(addrs, &net.IPNet{IP: net.ParseIP("198.51.100.9").To4(), Mask: net.CIDRMask(32, 32)})
	thisHost.read = thisHost.read.Add(-hostRefresh)
	if !l.Allows(netip.MustParseAddr("198.51.100.9")) {
		t.Error("an address the host took after the last read is refused")
	}
}

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }
