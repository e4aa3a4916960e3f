package tunnel

import (
	"net/netip"
	"testing"
)

// TestRelaySet: a relay two associations share (ss-local serves every
// association on one port) stays known until the last one ends; IPv4
// relays are found whether given plain or IPv4-mapped; a nil set holds
// nothing.
func TestRelaySet(t *testing.T) {
	var r relaySet
	shared := netip.MustParseAddrPort("192.0.2.1:1080")
	mapped := netip.MustParseAddrPort("[::ffff:192.0.2.1]:1080")
	if r.has(shared) {
		t.Fatal("an empty set has a relay")
	}
	r.add(shared)
	r.add(mapped)
	r.remove(shared)
	if !r.has(shared) || !r.has(mapped) {
		t.Fatal("a relay still in use by one association is gone")
	}
	r.remove(mapped)
	if r.has(shared) {
		t.Fatal("a relay no association uses is still there")
	}
	var none *relaySet
	none.add(shared)
	if none.has(shared) {
		t.Fatal("a nil set has a relay")
	}
}
