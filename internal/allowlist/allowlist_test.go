package allowlist

import (
	"net"
	"net/netip"
	"testing"
	"testing/synctest"

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
	for _, bad := range []string{"10.0.0.0/33", "::ffff:0:0/95", "::ffff:0.0.0.0/0"} {
		// An IPv4-mapped prefix wider than the mapped range matched
		// nothing, silently.
		if _, err := Parse([]string{bad}); err == nil {
			t.Errorf("Parse took the bad prefix %s", bad)
		}
	}
}

// TestAllowsHostAddresses: a TCP connection from one of the host's own
// addresses is the host itself, served whatever the list says (a program
// on the host whose connection a transparent rule captured keeps its
// source address); a neighbour on the same subnet is not, a datagram with
// a host address as its source is not (it may be forged: IPv6 has no
// martian-source check), and a link-local source never is (another link
// may use the same address). The host's addresses are read at most once
// per hostRefresh, and an address it gave up is refused once they are
// read again.
func TestAllowsHostAddresses(t *testing.T) {
	reads := 0
	addrs := []netip.Addr{
		netip.MustParseAddr("203.0.113.5"), netip.MustParseAddr("2001:db8::5"), netip.MustParseAddr("fe80::5"),
	}
	hostAddrs = func() ([]netip.Addr, error) { reads++; return addrs, nil }
	thisHost = hostSet{}
	t.Cleanup(func() { hostAddrs, thisHost = defaultHostAddrs, hostSet{} })

	l, err := Parse([]string{"10.0.0.0/8"})
	if err != nil {
		t.Fatal(err)
	}
	tcp := func(ip, zone string) net.Addr { return &net.TCPAddr{IP: net.ParseIP(ip), Port: 40000, Zone: zone} }
	for _, c := range []struct {
		a    net.Addr
		want bool
	}{
		{tcp("203.0.113.5", ""), true}, {tcp("::ffff:203.0.113.5", ""), true}, {tcp("2001:db8::5", ""), true},
		{tcp("203.0.113.6", ""), false}, {tcp("2001:db8::6", ""), false}, {tcp("10.0.0.1", ""), true},
		{tcp("fe80::5", "eth0"), false},
		{&net.UDPAddr{IP: net.ParseIP("2001:db8::5"), Port: 53}, false},
		{&net.UDPAddr{IP: net.ParseIP("203.0.113.5"), Port: 53}, false},
	} {
		if got := l.AllowsAddr(c.a); got != c.want {
			t.Errorf("AllowsAddr(%s %v) = %t, want %t", c.a.Network(), c.a, got, c.want)
		}
	}
	if l.Allows(netip.MustParseAddr("203.0.113.5")) {
		t.Error("Allows (a source with no proof it is the host's) took a host address")
	}
	if reads != 1 {
		t.Errorf("the host's addresses were read %d times within hostRefresh, want once", reads)
	}
	// Given up, and read again once the copy is old.
	addrs = addrs[1:]
	thisHost.read = thisHost.read.Add(-hostRefresh)
	if l.AllowsAddr(tcp("203.0.113.5", "")) {
		t.Error("an address the host gave up is still taken for the host's")
	}
}

// TestAllowsHostAddressesWhileFirstRead: connections that come while the
// host's addresses are read for the first time wait for that read rather
// than find no copy and be refused.
func TestAllowsHostAddressesWhileFirstRead(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		release := make(chan struct{})
		hostAddrs = func() ([]netip.Addr, error) {
			<-release
			return []netip.Addr{netip.MustParseAddr("203.0.113.5")}, nil
		}
		thisHost = hostSet{}
		t.Cleanup(func() { hostAddrs, thisHost = defaultHostAddrs, hostSet{} })
		l, err := Parse([]string{"10.0.0.0/8"})
		if err != nil {
			t.Fatal(err)
		}
		from := &net.TCPAddr{IP: net.ParseIP("203.0.113.5"), Port: 40000}
		results := make(chan bool, 4)
		go func() { results <- l.AllowsAddr(from) }()
		synctest.Wait() // the first caller reads
		for range 3 {
			go func() { results <- l.AllowsAddr(from) }()
		}
		synctest.Wait() // the others have come while it does
		close(release)
		for range 4 {
			if !<-results {
				t.Fatal("a connection from a host address was refused while the first read ran")
			}
		}
	})
}

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// TestAllowsDatagram: a datagram that arrived on the loopback interface
// is the host's, whatever its source; another is held to the prefixes.
func TestAllowsDatagram(t *testing.T) {
	l, err := Parse([]string{"10.0.0.0/8"})
	if err != nil {
		t.Fatal(err)
	}
	host := netip.MustParseAddr("203.0.113.5")
	if !l.AllowsDatagram(host, true) || l.AllowsDatagram(host, false) || !l.AllowsDatagram(netip.MustParseAddr("10.1.2.3"), false) {
		t.Error("AllowsDatagram: want the loopback interface's datagram and a listed source served, no other")
	}
}
