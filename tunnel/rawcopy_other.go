//go:build !unix

package tunnel

import "net"

// copyPooled is the buffered copy where raw non-blocking reads are not to
// be had (Windows sockets are not in non-blocking mode): each direction
// holds a small buffer while it waits.
func (c *copier) copyPooled(src, dst *net.TCPConn) error { return c.copyBuffered(src, dst) }
