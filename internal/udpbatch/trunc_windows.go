package udpbatch

import (
	"errors"

	"golang.org/x/sys/windows"
)

// msgTrunc is the flag a read reports for a datagram cut to its buffer.
const msgTrunc = windows.MSG_TRUNC

// isMsgSize reports whether a read's error only says the datagram was cut:
// Windows fails such a read with WSAEMSGSIZE after filling the buffer.
func isMsgSize(err error) bool { return errors.Is(err, windows.WSAEMSGSIZE) }
