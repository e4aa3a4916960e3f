//go:build !linux

package tunnel

import "net"

// copySplice is the pooled copy where there is no splice(2).
func (c *copier) copySplice(src, dst *net.TCPConn) error { return c.copyPooled(src, dst) }
