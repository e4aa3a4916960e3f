package main

import (
	"context"
	"net"
	"testing"

	"github.com/socksfwd/socksfwd/internal/peertest"
	"github.com/socksfwd/socksfwd/internal/sockmark"
)

// TestMarkTopBit: a mark with the top bit set passes the start-up check
// and reaches the upstream socket whole (as an int it went negative where
// int is 32 bits, and was refused as out of range).
func TestMarkTopBit(t *testing.T) {
	peertest.RequireRoot(t) // CAP_NET_ADMIN for SO_MARK
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	for _, mark := range []Mark{0x80000000, 0xffffffff} {
		if err := checkMark(&plan{cfg: Config{Mark: mark}}); err != nil {
			t.Fatalf("checkMark(%#x): %v", uint32(mark), err)
		}
		d, err := parseServer(ln.Addr().String(), "", "", mark)
		if err != nil {
			t.Fatal(err)
		}
		c, err := (&net.Dialer{Control: d.Control}).DialContext(context.Background(), "tcp", ln.Addr().String())
		if err != nil {
			t.Fatalf("mark %#x: %v", uint32(mark), err)
		}
		got, err := sockmark.Of(c.(*net.TCPConn))
		c.Close()
		if err != nil || got != uint32(mark) {
			t.Errorf("socket mark %#x (%v), want %#x", got, err, uint32(mark))
		}
	}
}
