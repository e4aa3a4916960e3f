package udpbatch

import (
	"bytes"
	"errors"
	"net"
	"net/netip"
	"slices"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/socksfwd/socksfwd/internal/testnet"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func slots(n, size int) [][]byte {
	s := make([][]byte, n)
	for i := range s {
		s[i] = make([]byte, size)
	}
	return s
}

// readAll reads until want datagrams arrived (or a second passed) and
// returns their payloads and sources.
func readAll(t *testing.T, r *Reader, c *net.UDPConn, want int, headroom int) ([][]byte, []netip.AddrPort) {
	t.Helper()
	var got [][]byte
	var from []netip.AddrPort
	c.SetReadDeadline(time.Now().Add(time.Second))
	defer c.SetReadDeadline(time.Time{})
	for len(got) < want {
		n, err := r.Read()
		if err != nil {
			t.Fatalf("read after %d of %d datagrams: %v", len(got), want, err)
		}
		for i := 0; i < n; i++ {
			if r.Truncated(i) {
				t.Fatalf("datagram %d truncated", len(got))
			}
			got = append(got, bytes.Clone(r.Slot(i)[headroom:]))
			if r.names != nil {
				from = append(from, r.Addr(i))
			}
			if len(r.Slot(i)) != headroom+r.Len(i) {
				t.Fatalf("slot length %d, want %d", len(r.Slot(i)), headroom+r.Len(i))
			}
		}
	}
	return got, from
}

// The writer's grouping (segmented runs, sendmmsg for the rest) must be
// invisible to the receiver: every datagram arrives whole, in order, with
// its own size.
func TestWriterSendsEveryDatagramWhole(t *testing.T) {
	for _, tc := range []struct {
		name  string
		sizes []int
	}{
		{"one", []int{1200}},
		{"equal run", []int{1200, 1200, 1200, 1200, 1200}},
		{"run ending shorter", []int{1200, 1200, 1200, 7}},
		{"shorter then longer", []int{1200, 7, 1200, 1200}},
		{"mixed", []int{1, 1400, 9000, 9000, 65000, 3, 3, 3}},
		{"empty datagram", []int{0, 5, 5}},
		{"empty datagrams", []int{0, 0, 0}},
		{"empty after a run", []int{5, 5, 0, 5}},
		{"longer than a run may be", slices.Repeat([]int{1210}, 60)},
		{"over 64 segments", slices.Repeat([]int{100}, 100)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dst := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
			src := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
			w, err := NewWriter(src, len(tc.sizes))
			if err != nil {
				t.Fatal(err)
			}
			var want [][]byte
			for i, n := range tc.sizes {
				b := bytes.Repeat([]byte{byte(i + 1)}, n)
				want = append(want, b)
				w.Add(b, dst.LocalAddr().(*net.UDPAddr).AddrPort())
			}
			if !w.Full() || w.Len() != len(tc.sizes) {
				t.Fatalf("Len %d Full %v after %d adds", w.Len(), w.Full(), len(tc.sizes))
			}
			sent, err := w.Flush()
			if err != nil || sent != len(tc.sizes) {
				t.Fatalf("Flush = %d, %v; want %d, nil", sent, err, len(tc.sizes))
			}
			if w.Len() != 0 {
				t.Fatalf("Len %d after Flush", w.Len())
			}
			if tc.name == "equal run" && w.segmented == 0 {
				t.Errorf("five equal datagrams to one peer went without a segmented send (UDP_SEGMENT)")
			}
			r, err := NewReader(dst, slots(8, 16+65536), 16, true)
			if err != nil {
				t.Fatal(err)
			}
			got, from := readAll(t, r, dst, len(want), 16)
			for i := range want {
				if !bytes.Equal(got[i], want[i]) {
					t.Fatalf("datagram %d: %d bytes %x…, want %d bytes of %x", i, len(got[i]), got[i][:min(4, len(got[i]))], len(want[i]), i+1)
				}
				if from[i] != src.LocalAddr().(*net.UDPAddr).AddrPort() {
					t.Fatalf("datagram %d from %v, want %v", i, from[i], src.LocalAddr())
				}
			}
		})
	}
}

// Destinations change mid-batch: each run goes to its own peer, and a
// dual-stack socket reaches IPv4 peers too.
func TestWriterSeveralDestinations(t *testing.T) {
	for _, network := range []string{"udp4", "udp"} {
		t.Run(network, func(t *testing.T) {
			bind := "127.0.0.1:0"
			if network == "udp" {
				bind = "[::]:0"
			}
			src := testnet.ListenUDP(t, network, bind)
			a := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
			b := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
			w, _ := NewWriter(src, 8)
			order := []*net.UDPConn{a, a, b, b, a, b}
			for i, c := range order {
				w.Add([]byte{byte(i)}, c.LocalAddr().(*net.UDPAddr).AddrPort())
			}
			if sent, err := w.Flush(); err != nil || sent != len(order) {
				t.Fatalf("Flush = %d, %v", sent, err)
			}
			for _, c := range []*net.UDPConn{a, b} {
				r, _ := NewReader(c, slots(8, 64), 0, true)
				var want []byte
				for i, o := range order {
					if o == c {
						want = append(want, byte(i))
					}
				}
				got, from := readAll(t, r, c, len(want), 0)
				for i := range want {
					if len(got[i]) != 1 || got[i][0] != want[i] {
						t.Fatalf("%v got %v, want %v", c.LocalAddr(), got, want)
					}
					if !from[i].Addr().Is4() || from[i].Port() != uint16(src.LocalAddr().(*net.UDPAddr).Port) {
						t.Fatalf("source %v, want 127.0.0.1:%d unmapped", from[i], src.LocalAddr().(*net.UDPAddr).Port)
					}
				}
			}
		})
	}
}

func TestIPv6(t *testing.T) {
	dst := testnet.ListenUDP(t, "udp6", "[::1]:0")
	src := testnet.ListenUDP(t, "udp6", "[::1]:0")
	w, _ := NewWriter(src, 4)
	for i := 0; i < 3; i++ {
		w.Add([]byte("hello"), dst.LocalAddr().(*net.UDPAddr).AddrPort())
	}
	if sent, err := w.Flush(); err != nil || sent != 3 {
		t.Fatalf("Flush = %d, %v", sent, err)
	}
	r, _ := NewReader(dst, slots(4, 64), 0, true)
	_, from := readAll(t, r, dst, 3, 0)
	if from[0] != src.LocalAddr().(*net.UDPAddr).AddrPort() {
		t.Fatalf("from %v, want %v", from[0], src.LocalAddr())
	}
}

// A connected socket needs no addresses: the writer sends with none and
// the reader keeps none.
func TestConnected(t *testing.T) {
	dst := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
	src, err := net.DialUDP("udp4", nil, dst.LocalAddr().(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	w, _ := NewWriter(src, 4)
	w.Add([]byte("ab"), netip.AddrPort{})
	w.Add([]byte("cd"), netip.AddrPort{})
	if sent, err := w.Flush(); err != nil || sent != 2 {
		t.Fatalf("Flush = %d, %v", sent, err)
	}
	// Reply to the connected socket and read it with a no-address reader.
	dst.WriteToUDP([]byte("xyz"), src.LocalAddr().(*net.UDPAddr))
	r, _ := NewReader(src, slots(2, 64), 0, false)
	got, _ := readAll(t, r, src, 1, 0)
	if string(got[0]) != "xyz" {
		t.Fatalf("got %q", got[0])
	}
}

func TestTruncated(t *testing.T) {
	dst := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
	dst.WriteToUDP(make([]byte, 100), dst.LocalAddr().(*net.UDPAddr))
	r, _ := NewReader(dst, slots(2, 50), 10, true)
	n, err := r.Read()
	if err != nil || n != 1 || !r.Truncated(0) {
		t.Fatalf("Read = %d, %v, truncated %v; want 1 truncated datagram", n, err, n > 0 && r.Truncated(0))
	}
}

// A closed socket ends a blocked Read with net.ErrClosed, and Flush stops.
func TestClosed(t *testing.T) {
	c := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
	r, _ := NewReader(c, slots(2, 64), 0, true)
	w, _ := NewWriter(c, 2)
	done := make(chan error)
	go func() { _, err := r.Read(); done <- err }()
	c.Close()
	if err := <-done; !isClosed(err) {
		t.Fatalf("Read after Close: %v", err)
	}
	w.Add([]byte("x"), c.LocalAddr().(*net.UDPAddr).AddrPort())
	if _, err := w.Flush(); !isClosed(err) {
		t.Fatalf("Flush after Close: %v", err)
	}
}

// A refused send (the ICMP port unreachable of an earlier datagram,
// pending on a connected socket) drops that datagram only; Flush reports
// the error and still sends the rest.
func TestFlushGoesOnAfterARefusedDatagram(t *testing.T) {
	dead := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
	deadAddr := dead.LocalAddr().(*net.UDPAddr)
	dead.Close()
	src, err := net.DialUDP("udp4", nil, deadAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	src.Write([]byte("provoke the ICMP error")) // on loopback it is queued before Write returns
	w, _ := NewWriter(src, 4)
	for i := 0; i < 4; i++ {
		w.Add([]byte{byte(i), 1, 2}, netip.AddrPort{})
	}
	sent, err := w.Flush()
	if sent < 1 || !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("Flush = %d, %v; want ECONNREFUSED and the datagrams after it sent", sent, err)
	}
}

func TestNoAllocations(t *testing.T) {
	dst := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
	src := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
	w, _ := NewWriter(src, 8)
	r, _ := NewReader(dst, slots(8, 2048), 64, true)
	to := dst.LocalAddr().(*net.UDPAddr).AddrPort()
	payload := make([]byte, 1200)
	allocs := testing.AllocsPerRun(200, func() {
		for i := 0; i < 8; i++ {
			w.Add(payload, to)
		}
		w.Flush()
		for got := 0; got < 8; {
			n, err := r.Read()
			if err != nil {
				t.Fatal(err)
			}
			for i := 0; i < n; i++ {
				_ = r.Addr(i)
			}
			got += n
		}
	})
	if allocs != 0 {
		t.Fatalf("%.1f allocations per batch, want 0", allocs)
	}
}

func isClosed(err error) bool { return errors.Is(err, net.ErrClosed) }
