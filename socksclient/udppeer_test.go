package socksclient

import (
	"net/netip"
	"testing"
)

// TestHeaderFrom: a reply's header names the expected peer when its
// address and port are the peer's (IPv4-mapped or not), or its port alone
// when the peer is a name; never a name when the peer is an address.
func TestHeaderFrom(t *testing.T) {
	hdr := func(a Addr) []byte {
		b, err := UDPHeader{Addr: a}.AppendTo(nil)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	v4 := Addr{IP: netip.MustParseAddr("192.0.2.1"), Port: 53}
	v6 := Addr{IP: netip.MustParseAddr("2001:db8::1"), Port: 53}
	name := Addr{Name: "resolver.test", Port: 53}
	for _, tc := range []struct {
		name   string
		header Addr
		peer   Addr
		want   bool
	}{
		{"v4 same", v4, v4, true},
		{"v4 other port", Addr{IP: v4.IP, Port: 54}, v4, false},
		{"v4 other address", Addr{IP: netip.MustParseAddr("192.0.2.2"), Port: 53}, v4, false},
		{"v6 same", v6, v6, true},
		{"v6 other address", Addr{IP: netip.MustParseAddr("2001:db8::2"), Port: 53}, v6, false},
		{"v4-mapped for v4", Addr{IP: netip.MustParseAddr("::ffff:192.0.2.1"), Port: 53}, v4, true},
		{"name for an address", name, v4, false},
		{"name peer, any address on its port", v4, name, true},
		{"name peer, v6 on its port", v6, name, true},
		{"name peer, a name on its port", Addr{Name: "other.test", Port: 53}, name, true},
		{"name peer, other port", Addr{IP: v4.IP, Port: 54}, name, false},
	} {
		h := hdr(tc.header)
		n, err := CheckUDPHeader(h)
		if err != nil {
			t.Fatal(err)
		}
		peer := tc.peer
		peer.IP = peer.IP.Unmap() // as OnlyFrom keeps it
		if got := headerFrom(h[:n], peer); got != tc.want {
			t.Errorf("%s: headerFrom = %v, want %v", tc.name, got, tc.want)
		}
		if allocs := testing.AllocsPerRun(10, func() { headerFrom(h[:n], peer) }); allocs != 0 {
			t.Errorf("%s: %v allocations", tc.name, allocs)
		}
	}
}
