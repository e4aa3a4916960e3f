//go:build unix

package tunnel

import (
	"net"
	"sync"
	"syscall"
)

// copyPooled reads through the raw socket so that the pooled buffer is taken
// only once the socket is readable; a blocked idle reader holds no buffer.
func (c *copier) copyPooled(src, dst *net.TCPConn) error {
	rc, err := src.SyscallConn()
	if err != nil {
		return c.copyBuffered(src, dst)
	}
	pr := &pooledRead{pool: &smallPool}
	read := pr.read // one closure for the session, not one per read
	for {
		c.armIdle(src)
		if err := rc.Read(read); err != nil {
			if c.stillActive(err) {
				continue
			}
			return c.waitErr(err)
		}
		if eof, err := c.writePooled(pr, dst); eof || err != nil {
			return err
		}
	}
}

// pooledRead is a RawConn.Read callback that takes a buffer only when the
// socket has bytes: a read that would block gives the buffer back and waits
// without one.
type pooledRead struct {
	pool *sync.Pool
	buf  *[]byte
	n    int
	err  error
}

func (p *pooledRead) read(fd uintptr) bool {
	p.buf = p.pool.Get().(*[]byte)
	for {
		p.n, p.err = syscall.Read(int(fd), *p.buf)
		if p.err != syscall.EINTR {
			break
		}
	}
	if p.err == syscall.EAGAIN {
		p.pool.Put(p.buf)
		p.buf = nil
		return false
	}
	return true
}

// writePooled writes what p read to dst and gives the buffer back; eof is
// the end of the source's stream.
func (c *copier) writePooled(p *pooledRead, dst net.Conn) (eof bool, err error) {
	buf, n := p.buf, p.n
	p.buf = nil
	defer p.pool.Put(buf)
	if p.err != nil {
		return false, c.readErr(p.err)
	}
	if n <= 0 {
		return true, nil
	}
	c.r.touch()
	if err := c.write(dst, (*buf)[:n]); err != nil {
		return false, err
	}
	switch {
	case n == smallBufSize && p.pool == &smallPool:
		p.pool = &largePool // the flow fills buffers: go bulk
	case n < smallBufSize && p.pool == &largePool:
		p.pool = &smallPool
	}
	return false, nil
}
