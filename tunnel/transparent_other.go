//go:build !linux

package tunnel

import (
	"context"
	"net"
	"net/netip"
	"syscall"
)

// ListenTransparent needs Linux (REDIRECT and TPROXY are netfilter's).
func ListenTransparent(ctx context.Context, network, addr string, control func(network, address string, c syscall.RawConn) error) (net.Listener, error) {
	return nil, ErrTransparentNeedsLinux
}

// ControlTransparent needs Linux.
func ControlTransparent(network, address string, c syscall.RawConn) error {
	return ErrTransparentNeedsLinux
}

// IsTransparent is false: no socket is transparent here.
func IsTransparent(ln net.Listener) bool { return false }

// OriginalDestination needs Linux.
func OriginalDestination(c net.Conn) (netip.AddrPort, error) {
	return netip.AddrPort{}, ErrTransparentNeedsLinux
}

// isLocalAddr is never reached (OriginalDestination fails first); yes is
// the answer that never relays to ourselves.
func isLocalAddr(netip.Addr) bool { return true }
