package tunnel

import (
	"net/netip"
	"sync"
	"sync/atomic"
)

// relaySet is the UDP relays of a listener's live associations, for a
// transparent listener to tell its own datagrams when capture rules
// bring them back: looked up for every datagram without a lock (a copy
// of the set, replaced as associations start and end, which is rare by
// comparison). A nil *relaySet holds nothing and keeps nothing.
type relaySet struct {
	mu   sync.Mutex
	refs map[netip.AddrPort]int // associations per relay (a proxy may share one)
	now  atomic.Pointer[map[netip.AddrPort]struct{}]
}

func relayKey(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap().WithZone(""), ap.Port())
}

func (r *relaySet) add(ap netip.AddrPort) {
	if r == nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.refs == nil {
		r.refs = make(map[netip.AddrPort]int)
	}
	k := relayKey(ap)
	if r.refs[k]++; r.refs[k] == 1 {
		r.publish()
	}
}

func (r *relaySet) remove(ap netip.AddrPort) {
	if r == nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	k := relayKey(ap)
	if r.refs[k]--; r.refs[k] <= 0 {
		delete(r.refs, k)
		r.publish()
	}
}

// publish makes the lookups see refs; the caller holds mu.
func (r *relaySet) publish() {
	now := make(map[netip.AddrPort]struct{}, len(r.refs))
	for k := range r.refs {
		now[k] = struct{}{}
	}
	r.now.Store(&now)
}

// has reports whether ap is the relay of a live association.
func (r *relaySet) has(ap netip.AddrPort) bool {
	if r == nil {
		return false
	}
	now := r.now.Load()
	if now == nil || len(*now) == 0 {
		return false
	}
	_, ok := (*now)[relayKey(ap)]
	return ok
}
