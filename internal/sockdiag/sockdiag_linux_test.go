package sockdiag

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/socksfwd/socksfwd/internal/testnet"
)

func open(t *testing.T) *Querier {
	t.Helper()
	q, err := Open()
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { q.Close() })
	return q
}

func addrPort(a net.Addr) netip.AddrPort { return a.(*net.UDPAddr).AddrPort() }

func rcvbuf(t *testing.T, c *net.UDPConn) int {
	t.Helper()
	rc, _ := c.SyscallConn()
	var v int
	var err error
	rc.Control(func(fd uintptr) { v, err = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF) })
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// The receiver's queue grows with what is sent to it and its limit is its
// SO_RCVBUF, for a socket bound to the address and for one bound to the
// wildcard (as proxies' relays often are), on IPv4 and IPv6.
func TestUDPReceiver(t *testing.T) {
	q := open(t)
	for _, tc := range []struct{ network, bind, dst string }{
		{"udp4", "127.0.0.1:0", "127.0.0.1"},
		{"udp4", "0.0.0.0:0", "127.0.0.1"},
		{"udp6", "[::1]:0", "::1"},
	} {
		t.Run(tc.bind, func(t *testing.T) {
			rx := testnet.ListenUDP(t, tc.network, tc.bind)
			to := netip.AddrPortFrom(netip.MustParseAddr(tc.dst), addrPort(rx.LocalAddr()).Port())
			tx, err := net.DialUDP(tc.network, nil, net.UDPAddrFromAddrPort(to))
			if err != nil {
				t.Fatal(err)
			}
			defer tx.Close()
			from := addrPort(tx.LocalAddr())

			before, err := q.UDPReceiver(from, to)
			if err != nil {
				t.Fatalf("UDPReceiver: %v", err)
			}
			if before.Queued != 0 || before.Limit != rcvbuf(t, rx) {
				t.Fatalf("idle socket: %+v, want nothing queued and limit %d", before, rcvbuf(t, rx))
			}
			payload := make([]byte, 1200)
			for range 10 {
				if _, err := tx.Write(payload); err != nil {
					t.Fatal(err)
				}
			}
			after, err := q.UDPReceiver(from, to)
			if err != nil {
				t.Fatalf("UDPReceiver: %v", err)
			}
			// The kernel charges each datagram's whole allocation.
			if after.Queued < 10*len(payload) {
				t.Fatalf("after 10 datagrams of %d bytes: %d bytes queued", len(payload), after.Queued)
			}
		})
	}
}

// A query allocates nothing: flow control makes them on the UDP hot path.
func TestUDPReceiverAllocs(t *testing.T) {
	q := open(t)
	rx := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
	from, to := netip.MustParseAddrPort("127.0.0.1:9"), addrPort(rx.LocalAddr())
	if n := testing.AllocsPerRun(100, func() { q.UDPReceiver(from, to) }); n != 0 {
		t.Fatalf("%v allocations per query", n)
	}
}

// A full receiver's drops are counted.
func TestUDPReceiverDrops(t *testing.T) {
	q := open(t)
	rx := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
	tx, err := net.DialUDP("udp4", nil, rx.LocalAddr().(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Close()
	payload := make([]byte, 1200)
	n := 2*rcvbuf(t, rx)/len(payload) + 1 // more than fits, whatever each costs
	for range n {
		tx.Write(payload)
	}
	m, err := q.UDPReceiver(addrPort(tx.LocalAddr()), addrPort(rx.LocalAddr()))
	if err != nil {
		t.Fatal(err)
	}
	if m.Drops == 0 || m.Queued < m.Limit/2 {
		t.Fatalf("after %d datagrams into a %d-byte buffer: %+v", n, m.Limit, m)
	}
}

// Nobody receives on a port no socket has: ErrNoSocket.
func TestUDPReceiverNone(t *testing.T) {
	q := open(t)
	rx := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
	to := addrPort(rx.LocalAddr())
	rx.Close()
	_, err := q.UDPReceiver(netip.MustParseAddrPort("127.0.0.1:9"), to)
	if !errors.Is(err, ErrNoSocket) {
		t.Fatalf("closed socket: %v, want ErrNoSocket", err)
	}
}

// Queries from many goroutines take turns on the one netlink socket and
// each gets its own answer.
func TestUDPReceiverConcurrent(t *testing.T) {
	q := open(t)
	type pair struct {
		from, to netip.AddrPort
		limit    int
	}
	var pairs []pair
	for i := range 4 {
		rx := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
		rx.SetReadBuffer(64<<10 + i*16<<10) // a distinct limit each
		tx, err := net.DialUDP("udp4", nil, rx.LocalAddr().(*net.UDPAddr))
		if err != nil {
			t.Fatal(err)
		}
		defer tx.Close()
		pairs = append(pairs, pair{addrPort(tx.LocalAddr()), addrPort(rx.LocalAddr()), rcvbuf(t, rx)})
	}
	var wg sync.WaitGroup
	for _, p := range pairs {
		wg.Go(func() {
			for range 200 {
				m, err := q.UDPReceiver(p.from, p.to)
				if err != nil || m.Limit != p.limit {
					t.Errorf("%v: %+v %v, want limit %d", p.to, m, err, p.limit)
					return
				}
			}
		})
	}
	wg.Wait()
}

// parse turns the kernel's error answer into ErrNoSocket or the errno, and
// reads the counters from a socket answer.
func TestParse(t *testing.T) {
	ne := binary.NativeEndian
	errAnswer := func(errno unix.Errno) []byte {
		b := make([]byte, nlmsgHdrLen+4)
		ne.PutUint16(b[4:], unix.NLMSG_ERROR)
		ne.PutUint32(b[8:], 7)
		ne.PutUint32(b[nlmsgHdrLen:], uint32(-int32(errno)))
		return b
	}
	if _, seq, err := parse(errAnswer(unix.ENOENT)); !errors.Is(err, ErrNoSocket) || seq != 7 {
		t.Fatalf("ENOENT: seq %d, %v", seq, err)
	}
	if _, _, err := parse(errAnswer(unix.EPERM)); !errors.Is(err, unix.EPERM) {
		t.Fatalf("EPERM: %v", err)
	}

	b := make([]byte, nlmsgHdrLen+diagMsgLen+4+9*4)
	ne.PutUint16(b[4:], unix.SOCK_DIAG_BY_FAMILY)
	ne.PutUint32(b[8:], 9)
	attr := b[nlmsgHdrLen+diagMsgLen:]
	ne.PutUint16(attr, uint16(len(attr)))
	ne.PutUint16(attr[2:], attrSkMeminfo)
	ne.PutUint32(attr[4+4*meminfoRmem:], 4096)
	ne.PutUint32(attr[4+4*meminfoRcvbuf:], 212992)
	ne.PutUint32(attr[4+4*meminfoDrops:], 3)
	m, seq, err := parse(b)
	if err != nil || seq != 9 || m != (Mem{Queued: 4096, Limit: 212992, Drops: 3}) {
		t.Fatalf("socket answer: %+v seq %d %v", m, seq, err)
	}
	for n := range len(b) {
		if _, _, err := parse(b[:n]); err == nil {
			t.Fatalf("answer cut to %d bytes parsed", n)
		}
	}
}

// FuzzParse: no answer, however malformed, makes parse panic, and only an
// answer long enough to hold the counters parses. Seeds: testdata/fuzz.
func FuzzParse(f *testing.F) {
	f.Fuzz(func(t *testing.T, b []byte) {
		if _, _, err := parse(b); err == nil && len(b) < nlmsgHdrLen+diagMsgLen+4+4*(meminfoRcvbuf+1) {
			t.Fatalf("parsed a %d-byte answer", len(b))
		}
	})
}
