//go:build !unix && !windows

package udpbatch

// msgTrunc: this system reports no cut datagrams.
const msgTrunc = 0

// isMsgSize reports whether a read's error only says the datagram was cut.
func isMsgSize(error) bool { return false }
