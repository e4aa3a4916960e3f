package tunnel

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/socksfwd/socksfwd/socksclient"
)

// ErrTransparentNeedsLinux is what ListenTransparent and
// OriginalDestination return on other systems.
var ErrTransparentNeedsLinux = errors.New("transparent mode needs Linux")

// ErrNotRedirected refuses a connection whose original destination is the
// transparent listener itself: relaying it would make socksfwd (through
// the proxy) connect to itself, again and again.
var ErrNotRedirected = errors.New("no rule redirected the connection to socksfwd")

// ErrCaptureLoop refuses a transparent connection whose original
// destination is an upstream proxy: the capture rules took socksfwd's own
// connection, and relaying it would loop until descriptors run out.
var ErrCaptureLoop = errors.New("the capture rules took socksfwd's own connection to its proxy; run with --mark N and print the rules with the same mark (or leave the proxy's address out)")

// TransparentTarget returns a TCPForwardConfig.TargetOf for a transparent
// listener bound to listen: each connection goes to its original
// destination, as an IP address (the proxy resolves nothing). A connection
// made straight to the listener is refused with ErrNotRedirected.
func TransparentTarget(listen netip.AddrPort) func(net.Conn) (socksclient.Addr, error) {
	return func(c net.Conn) (socksclient.Addr, error) {
		dst, err := OriginalDestination(c)
		if err != nil {
			return socksclient.Addr{}, err
		}
		if isListener(dst, listen, isLocalAddr) {
			return socksclient.Addr{}, fmt.Errorf("original destination %s is the transparent listener itself: %w", dst, ErrNotRedirected)
		}
		return socksclient.AddrFromAddrPort(dst), nil
	}
}

// isListener reports whether dst reaches the listener bound to listen: the
// same port, and the listener's address or, for a wildcard listener, any
// address of this host. A TPROXY'd destination is not a local address
// even though the accepted socket carries it, so the test asks isLocal
// rather than comparing with the socket's local address; it only runs for
// the listener's own port.
func isListener(dst, listen netip.AddrPort, isLocal func(netip.Addr) bool) bool {
	if dst.Port() != listen.Port() {
		return false
	}
	ip, lip := dst.Addr().Unmap().WithZone(""), listen.Addr().Unmap().WithZone("")
	if lip.IsUnspecified() {
		return isLocal(ip)
	}
	return ip == lip
}
