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

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }
