//go:build !linux

package tunnel

import "net"

// UDPRepliesFromDestination: elsewhere than Linux a /udp forward on a
// wildcard address answers from the address the route back picks.
const UDPRepliesFromDestination = false

// newWildcardReader is the plain reader: the address each datagram was
// sent to is not read here.
func newWildcardReader(pc *net.UDPConn, slots [][]byte) (datagramReader, error) {
	return newPlainReader(pc, slots)
}
