// Package sockdiag asks the kernel how full another process's UDP socket
// on this host is, through NETLINK_SOCK_DIAG (what ss(8) reads). socksfwd
// uses it to hold datagrams back from a proxy's relay socket on this host
// that has no room for them: over loopback no link paces a burst, and a
// relay with the kernel's default buffer drops most of one.
//
// Only Linux has socket diagnostics: elsewhere Open fails with an error
// matching errors.ErrUnsupported, and callers do without.
package sockdiag

import "errors"

// Mem is a socket's receive memory as the kernel accounts it: the bytes
// it charges for queued datagrams (each costs its whole allocation, about
// twice the payload of a 1200-byte one) against its limit.
type Mem struct {
	Queued int    // sk_rmem_alloc
	Limit  int    // sk_rcvbuf
	Drops  uint32 // datagrams dropped so far
}

// ErrNoSocket: no socket on this host receives what the query describes.
var ErrNoSocket = errors.New("sockdiag: no such socket on this host")
