// Package sockbuf sizes socket buffers. UDP relay sockets are enlarged: a
// relay that falls behind for a moment loses datagrams at its own socket
// when the buffers are the system's default (about 208 KiB on Linux); on
// Linux root may exceed net.core.rmem_max with SO_RCVBUFFORCE, others get
// what the sysctl allows. TCP sockets to a peer on this host are capped
// instead (LoopbackTCPSize), on Linux, where that was measured.
package sockbuf

import "net/netip"

// Size is what UDP relay sockets ask for in each direction.
const Size = 4 << 20

// minGrowSize is the smallest size growTo tries: below it a system's
// default is as good.
const minGrowSize = 64 << 10

// LoopbackTCPSize is what a TCP socket whose peer is on this host asks for
// in each direction (the kernel doubles it for its bookkeeping). Over
// loopback the round trip is tens of microseconds, so even 10 Gbit/s needs
// well under 128 KiB in flight; left to autotuning, the relay's sockets
// grow to megabytes and queue that much, and the bytes have left the CPU
// caches by the time they are read. Through Dante on this project's 2-core
// bench machine the cap raised throughput by 30-45 % (README, Performance).
// Peers on other hosts keep autotuning: a capped buffer would cap a long
// path's throughput at the buffer per round trip.
const LoopbackTCPSize = 128 << 10

// growTo asks set for Size, then half as much each time the system
// refuses, down to minGrowSize: the BSDs refuse a buffer above their
// limit (kern.ipc.maxsockbuf) where Linux clamps it. It returns the size
// set took, or 0 when it took none.
func growTo(set func(bytes int) error) int {
	for n := Size; n >= minGrowSize; n /= 2 {
		if set(n) == nil {
			return n
		}
	}
	return 0
}

// isLoopback reports whether an "ip:port" names a loopback address; a name,
// or an unspecified address (which takes peers from anywhere), does not.
func isLoopback(address string) bool {
	ap, err := netip.ParseAddrPort(address)
	return err == nil && ap.Addr().Unmap().IsLoopback()
}
