//go:build unix

package udpbatch

import "syscall"

// msgTrunc is the flag a read reports for a datagram cut to its buffer.
const msgTrunc = syscall.MSG_TRUNC

// isMsgSize reports whether a read's error only says the datagram was cut
// (Windows reports it so; here the flag does).
func isMsgSize(error) bool { return false }
