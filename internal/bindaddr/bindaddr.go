// Package bindaddr says which network a listener binds for an address.
package bindaddr

import (
	"net"
	"net/netip"
)

// Network is network ("tcp" or "udp") for addr, IPv4 only ("tcp4") for
// an IPv4 address, written as one or IPv4-mapped: Go binds 0.0.0.0 (and
// ::ffff:0.0.0.0) as [::], both families, where 0.0.0.0 means IPv4 alone
// to ssh -L and to every socket API (an empty host, or "*" made empty, is
// both).
func Network(network, addr string) string {
	host, _, _ := net.SplitHostPort(addr)
	if ip, err := netip.ParseAddr(host); err == nil && ip.Unmap().Is4() {
		return network + "4"
	}
	return network
}
