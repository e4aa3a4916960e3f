package udpbatch

import (
	"bytes"
	"errors"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/socksfwd/socksfwd/internal/testnet"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// reader and writer are what Reader and Writer offer, so that one test
// runs against every implementation built here: on Linux the system-call
// batching one and the portable one (which other systems get), elsewhere
// the portable one.
type reader interface {
	Read() (int, error)
	Slot(i int) []byte
	Len(i int) int
	Truncated(i int) bool
	Addr(i int) netip.AddrPort
}

type writer interface {
	Len() int
	Full() bool
	Add(b []byte, to netip.AddrPort)
	Flush() (int, error)
}

type impl struct {
	name      string
	newReader func(c *net.UDPConn, slots [][]byte, headroom int, wantAddr bool) (reader, error)
	newWriter func(c *net.UDPConn, size int) (writer, error)
}

// native is what NewReader and NewWriter build on this system.
var native = impl{
	name: "native",
	newReader: func(c *net.UDPConn, slots [][]byte, headroom int, wantAddr bool) (reader, error) {
		return NewReader(c, slots, headroom, wantAddr)
	},
	newWriter: func(c *net.UDPConn, size int) (writer, error) { return NewWriter(c, size) },
}

// forEachImpl runs test against the native implementation and, where it
// is not the portable one already, the portable one too.
func forEachImpl(t *testing.T, test func(t *testing.T, im impl)) {
	for _, im := range impls {
		t.Run(im.name, func(t *testing.T) { test(t, im) })
	}
}

func (im impl) reader(t *testing.T, c *net.UDPConn, slots [][]byte, headroom int, wantAddr bool) reader {
	t.Helper()
	r, err := im.newReader(c, slots, headroom, wantAddr)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func (im impl) writer(t *testing.T, c *net.UDPConn, size int) writer {
	t.Helper()
	w, err := im.newWriter(c, size)
	if err != nil {
		t.Fatal(err)
	}
	return w
}

func udpAddr(c *net.UDPConn) netip.AddrPort { return c.LocalAddr().(*net.UDPAddr).AddrPort() }

func slots(n, size int) [][]byte {
	s := make([][]byte, n)
	for i := range s {
		s[i] = make([]byte, size)
	}
	return s
}

// readAll reads until want datagrams arrived (or a second passed) and
// returns their payloads and sources.
func readAll(t *testing.T, r reader, c *net.UDPConn, want, headroom int, wantAddr bool) ([][]byte, []netip.AddrPort) {
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
			if wantAddr {
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
	forEachImpl(t, func(t *testing.T, im impl) {
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
				w := im.writer(t, src, len(tc.sizes))
				var want [][]byte
				for i, n := range tc.sizes {
					b := bytes.Repeat([]byte{byte(i + 1)}, n)
					want = append(want, b)
					w.Add(b, udpAddr(dst))
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
				r := im.reader(t, dst, slots(8, 16+65536), 16, true)
				got, from := readAll(t, r, dst, len(want), 16, true)
				for i := range want {
					if !bytes.Equal(got[i], want[i]) {
						t.Fatalf("datagram %d: %d bytes %x…, want %d bytes of %x", i, len(got[i]), got[i][:min(4, len(got[i]))], len(want[i]), i+1)
					}
					if from[i] != udpAddr(src) {
						t.Fatalf("datagram %d from %v, want %v", i, from[i], src.LocalAddr())
					}
				}
			})
		}
	})
}

// Destinations change mid-batch: each run goes to its own peer, and a
// dual-stack socket reaches IPv4 peers too.
func TestWriterSeveralDestinations(t *testing.T) {
	forEachImpl(t, func(t *testing.T, im impl) {
		for _, network := range []string{"udp4", "udp"} {
			t.Run(network, func(t *testing.T) {
				bind := "127.0.0.1:0"
				if network == "udp" {
					bind = "[::]:0"
				}
				src := testnet.ListenUDP(t, network, bind)
				a := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
				b := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
				w := im.writer(t, src, 8)
				order := []*net.UDPConn{a, a, b, b, a, b}
				for i, c := range order {
					w.Add([]byte{byte(i)}, udpAddr(c))
				}
				if sent, err := w.Flush(); err != nil || sent != len(order) {
					t.Fatalf("Flush = %d, %v", sent, err)
				}
				for _, c := range []*net.UDPConn{a, b} {
					r := im.reader(t, c, slots(8, 64), 0, true)
					var want []byte
					for i, o := range order {
						if o == c {
							want = append(want, byte(i))
						}
					}
					got, from := readAll(t, r, c, len(want), 0, true)
					for i := range want {
						if len(got[i]) != 1 || got[i][0] != want[i] {
							t.Fatalf("%v got %v, want %v", c.LocalAddr(), got, want)
						}
						if !from[i].Addr().Is4() || from[i].Port() != udpAddr(src).Port() {
							t.Fatalf("source %v, want 127.0.0.1:%d unmapped", from[i], udpAddr(src).Port())
						}
					}
				}
			})
		}
	})
}

func TestIPv6(t *testing.T) {
	forEachImpl(t, func(t *testing.T, im impl) {
		dst := testnet.ListenUDP(t, "udp6", "[::1]:0")
		src := testnet.ListenUDP(t, "udp6", "[::1]:0")
		w := im.writer(t, src, 4)
		for range 3 {
			w.Add([]byte("hello"), udpAddr(dst))
		}
		if sent, err := w.Flush(); err != nil || sent != 3 {
			t.Fatalf("Flush = %d, %v", sent, err)
		}
		r := im.reader(t, dst, slots(4, 64), 0, true)
		_, from := readAll(t, r, dst, 3, 0, true)
		if from[0] != udpAddr(src) {
			t.Fatalf("from %v, want %v", from[0], src.LocalAddr())
		}
	})
}

// A connected socket needs no addresses: the writer sends with none and
// the reader keeps none.
func TestConnected(t *testing.T) {
	forEachImpl(t, func(t *testing.T, im impl) {
		dst := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
		src, err := net.DialUDP("udp4", nil, dst.LocalAddr().(*net.UDPAddr))
		if err != nil {
			t.Fatal(err)
		}
		defer src.Close()
		w := im.writer(t, src, 4)
		w.Add([]byte("ab"), netip.AddrPort{})
		w.Add([]byte("cd"), netip.AddrPort{})
		if sent, err := w.Flush(); err != nil || sent != 2 {
			t.Fatalf("Flush = %d, %v", sent, err)
		}
		// Reply to the connected socket and read it with a no-address reader.
		dst.WriteToUDP([]byte("xyz"), src.LocalAddr().(*net.UDPAddr))
		r := im.reader(t, src, slots(2, 64), 0, false)
		got, _ := readAll(t, r, src, 1, 0, false)
		if string(got[0]) != "xyz" {
			t.Fatalf("got %q", got[0])
		}
	})
}

// A datagram longer than its slot is reported cut, with the slot's worth
// of it, after the headroom.
func TestTruncated(t *testing.T) {
	forEachImpl(t, func(t *testing.T, im impl) {
		dst := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
		dst.WriteToUDP(bytes.Repeat([]byte{7}, 100), dst.LocalAddr().(*net.UDPAddr))
		r := im.reader(t, dst, slots(2, 50), 10, true)
		n, err := r.Read()
		if err != nil || n != 1 || !r.Truncated(0) {
			t.Fatalf("Read = %d, %v, truncated %v; want 1 truncated datagram", n, err, n > 0 && r.Truncated(0))
		}
		if s := r.Slot(0); len(s) != 50 || r.Len(0) != 40 || s[10] != 7 {
			t.Fatalf("slot of %d bytes, Len %d; want the 50-byte slot holding 40 bytes of the datagram", len(s), r.Len(0))
		}
	})
}

// Flush stops at the first datagram that fails (here one too large for
// UDP), so that what went is always the first sent queued: a caller that
// sends the rest again, or hands them on, then neither duplicates a
// datagram nor skips one. A flush that went on past the failure would
// report 4 sent out of 0, 1, 3 and 4, and a caller taking the first 4 as
// sent would send 4 twice and never count 2.
func TestFlushStopsAtTheFirstFailure(t *testing.T) {
	forEachImpl(t, func(t *testing.T, im impl) {
		dst := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
		src := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
		w := im.writer(t, src, 8)
		to := udpAddr(dst)
		datagrams := [][]byte{{0, 0}, {1, 1}, make([]byte, 70_000), {3, 3}, {4, 4}}
		for _, d := range datagrams {
			w.Add(d, to)
		}
		sent, err := w.Flush()
		if sent != 2 || err == nil || isClosed(err) {
			t.Fatalf("Flush = %d, %v; want 2 sent and the error of the oversized third", sent, err)
		}
		if w.Len() != 0 {
			t.Fatalf("Len %d after Flush, want an empty queue", w.Len())
		}
		// What arrives after the first two is the next flush's datagram:
		// nothing queued behind the failure went (loopback keeps order).
		w.Add([]byte{9, 9}, to)
		if sent, err := w.Flush(); sent != 1 || err != nil {
			t.Fatalf("next Flush = %d, %v; want 1, nil", sent, err)
		}
		r := im.reader(t, dst, slots(8, 64), 0, false)
		got, _ := readAll(t, r, dst, 3, 0, false)
		for i, want := range []byte{0, 1, 9} {
			if len(got[i]) != 2 || got[i][0] != want {
				t.Fatalf("datagram %d to arrive is %v, want %v (arrived: %v)", i, got[i], []byte{want, want}, got)
			}
		}
	})
}

// A closed socket ends a blocked Read with net.ErrClosed, and Flush stops.
func TestClosed(t *testing.T) {
	forEachImpl(t, func(t *testing.T, im impl) {
		c := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
		r := im.reader(t, c, slots(2, 64), 0, true)
		w := im.writer(t, c, 2)
		done := make(chan error)
		go func() { _, err := r.Read(); done <- err }()
		c.Close()
		if err := <-done; !isClosed(err) {
			t.Fatalf("Read after Close: %v", err)
		}
		w.Add([]byte("x"), udpAddr(c))
		w.Add([]byte("y"), udpAddr(c))
		if sent, err := w.Flush(); sent != 0 || !isClosed(err) {
			t.Fatalf("Flush after Close = %d, %v", sent, err)
		}
	})
}

func isClosed(err error) bool { return errors.Is(err, net.ErrClosed) }
