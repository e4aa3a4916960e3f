//go:build !linux

package udpbatch

import "net"

// Reader reads one datagram per system call here (recvmmsg is Linux's):
// Read returns 1, and datagram 0 lands at slots[0][headroom:].
type Reader struct{ portableReader }

// NewReader reads from c into slots: datagram i lands at slots[i][headroom:],
// leaving headroom bytes before it (for a header written in place). With
// wantAddr false no source addresses are kept (a connected socket).
func NewReader(c *net.UDPConn, slots [][]byte, headroom int, wantAddr bool) (*Reader, error) {
	r, err := newPortableReader(c, slots, headroom, wantAddr)
	if err != nil {
		return nil, err
	}
	return &Reader{*r}, nil
}

// Writer queues datagrams and sends them one system call each here
// (sendmmsg and UDP_SEGMENT are Linux's).
type Writer struct{ portableWriter }

// NewWriter returns a Writer for c that queues up to size datagrams.
func NewWriter(c *net.UDPConn, size int) (*Writer, error) {
	w, err := newPortableWriter(c, size)
	if err != nil {
		return nil, err
	}
	return &Writer{*w}, nil
}
