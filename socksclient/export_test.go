package socksclient

import "net"

// RelaySocket exposes an association's UDP socket to the external tests,
// which read socket options (the mark) from it.
func RelaySocket(u *UDPConn) *net.UDPConn { return u.pc }
