package socksclient

import "net"

// RelaySocket exposes an association's UDP socket to the external tests,
// which read socket options (the mark) from it.
func RelaySocket(u *UDPConn) *net.UDPConn { return u.pc }

// ControlConn exposes an association's control connection to the
// external tests, which read its socket options (keep-alive).
func ControlConn(u *UDPConn) net.Conn { return u.ctrl }
