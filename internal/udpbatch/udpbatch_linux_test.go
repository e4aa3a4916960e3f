package udpbatch

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/socksfwd/socksfwd/internal/peertest"
	"github.com/socksfwd/socksfwd/internal/testnet"
)

// impls: the system-call batching Reader and Writer, and the portable
// ones other systems get, tested here too.
var impls = []impl{native, portable}

// portable is the fallback, built on every system.
var portable = impl{
	name: "portable",
	newReader: func(c *net.UDPConn, slots [][]byte, headroom int, wantAddr bool) (reader, error) {
		return newPortableReader(c, slots, headroom, wantAddr)
	},
	newWriter: func(c *net.UDPConn, size int) (writer, error) { return newPortableWriter(c, size) },
}

// A run of equal datagrams to one peer goes as one segmented send
// (UDP_SEGMENT), and one Read takes every datagram waiting (recvmmsg).
func TestBatchesPerSystemCall(t *testing.T) {
	dst := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
	src := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
	w, err := NewWriter(src, 5)
	if err != nil {
		t.Fatal(err)
	}
	for range 5 {
		w.Add(make([]byte, 1200), udpAddr(dst))
	}
	if sent, err := w.Flush(); err != nil || sent != 5 {
		t.Fatalf("Flush = %d, %v", sent, err)
	}
	if w.segmented != 1 {
		t.Errorf("five equal datagrams to one peer went in %d segmented sends, want 1", w.segmented)
	}
	r, err := NewReader(dst, slots(8, 2048), 0, true)
	if err != nil {
		t.Fatal(err)
	}
	// On loopback the datagrams are queued before Flush returns.
	if n, err := r.Read(); err != nil || n != 5 {
		t.Fatalf("Read = %d, %v; want the 5 waiting datagrams at once", n, err)
	}
}

// A flush of runs and lone datagrams to several peers is one system call:
// each run one segmented message, each lone datagram one message.
func TestOneCallForRunsAndLoneDatagrams(t *testing.T) {
	peers := make([]*net.UDPConn, 3)
	for i := range peers {
		peers[i] = testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
	}
	src := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
	w, err := NewWriter(src, 8)
	if err != nil {
		t.Fatal(err)
	}
	for i, n := range []int{2, 1, 3} { // datagrams of 100 bytes to each peer, in a row
		for range n {
			w.Add(make([]byte, 100), udpAddr(peers[i]))
		}
	}
	w.Add(make([]byte, 50), udpAddr(peers[0])) // lone again
	if sent, err := w.Flush(); sent != 7 || err != nil {
		t.Fatalf("Flush = %d, %v", sent, err)
	}
	if w.calls != 1 || w.segmented != 2 {
		t.Errorf("%d system calls and %d segmented messages, want 1 and 2", w.calls, w.segmented)
	}
	// Again, with lone datagrams where runs were: nothing of a run's
	// message (its length, its control message) is left on them.
	w.Add(make([]byte, 30), udpAddr(peers[1]))
	w.Add(make([]byte, 40), udpAddr(peers[2]))
	if sent, err := w.Flush(); sent != 2 || err != nil {
		t.Fatalf("second Flush = %d, %v", sent, err)
	}
	want := [][]int{{100, 100, 50}, {100, 30}, {100, 100, 100, 40}} // each peer's, in order
	for i, sizes := range want {
		r, err := NewReader(peers[i], slots(8, 2048), 0, true)
		if err != nil {
			t.Fatal(err)
		}
		// On loopback the datagrams are queued before Flush returns.
		n, err := r.Read()
		if err != nil || n != len(sizes) {
			t.Fatalf("peer %d: Read = %d, %v; want %d datagrams", i, n, err, len(sizes))
		}
		for k, size := range sizes {
			if r.Len(k) != size {
				t.Errorf("peer %d, datagram %d: %d bytes, want %d", i, k, r.Len(k), size)
			}
		}
	}
}

// A Writer on a wildcard socket with a source set sends every datagram,
// lone and in runs, from that address, not the one the route picks
// (127.0.0.1 on loopback): what a forward on a wildcard address needs to
// answer a client that sent to another of the host's addresses. On an
// IPv4 socket and on a dual-stack one, to an IPv4 peer.
func TestSetSource(t *testing.T) {
	for _, network := range []string{"udp4", "udp"} {
		t.Run(network, func(t *testing.T) {
			peer := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
			bind := "0.0.0.0:0"
			if network == "udp" {
				bind = "[::]:0"
			}
			src := testnet.ListenUDP(t, network, bind)
			w, err := NewWriter(src, 8)
			if err != nil {
				t.Fatal(err)
			}
			w.SetSource(netip.MustParseAddr("127.0.0.2"))
			for _, size := range []int{100, 100, 100, 60} { // a run, then a lone one
				w.Add(make([]byte, size), udpAddr(peer))
			}
			if sent, err := w.Flush(); sent != 4 || err != nil {
				t.Fatalf("Flush = %d, %v", sent, err)
			}
			if w.segmented != 1 {
				t.Errorf("%d segmented messages, want 1", w.segmented)
			}
			r, err := NewReader(peer, slots(8, 2048), 0, true)
			if err != nil {
				t.Fatal(err)
			}
			n, err := r.Read()
			if err != nil || n != 4 {
				t.Fatalf("Read = %d, %v; want 4 datagrams", n, err)
			}
			for i := range n {
				if from := r.Addr(i).Addr().Unmap(); from != netip.MustParseAddr("127.0.0.2") {
					t.Errorf("datagram %d came from %s, want 127.0.0.2", i, from)
				}
			}
		})
	}
}

// A run whose segments are larger than the route's MTU is refused as a
// segmented send (EMSGSIZE, or EINVAL from older kernels): its datagrams
// go one by one instead (the kernel fragments them), and the Writer
// segments no larger ones again.
// In a namespace of its own, with a loopback MTU of 1300.
func TestRefusedSegmentationSendsOneByOne(t *testing.T) {
	ns := peertest.NewNetns(t, "gso")
	if out, err := exec.Command("ip", "-n", ns, "link", "set", "lo", "mtu", "1300").CombinedOutput(); err != nil {
		t.Fatalf("ip link set lo mtu: %v %s", err, out)
	}
	err := peertest.InNetns(ns, func() error {
		dst, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			return err
		}
		defer dst.Close()
		src, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			return err
		}
		defer src.Close()
		w, err := NewWriter(src, 4)
		if err != nil {
			return err
		}
		for range 4 {
			w.Add(make([]byte, 1400), udpAddr(dst))
		}
		if sent, err := w.Flush(); sent != 4 || err != nil {
			return fmt.Errorf("Flush = %d, %v; want 4 sent", sent, err)
		}
		if w.segmented != 0 || w.gsoMax != 1399 {
			return fmt.Errorf("%d segmented messages, largest segment now %d; want 0 and 1399", w.segmented, w.gsoMax)
		}
		r, err := NewReader(dst, slots(8, 2048), 0, true)
		if err != nil {
			return err
		}
		if n, err := r.Read(); err != nil || n != 4 || r.Len(0) != 1400 {
			return fmt.Errorf("Read = %d, %v; want the 4 datagrams of 1400 bytes", n, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// An EMSGSIZE that was pending on a connected socket (an ICMP
// "fragmentation needed" for an earlier datagram) and surfaces on a run
// is not the kernel refusing segmentation: the run goes segmented, and
// the Writer keeps segmenting. In a namespace of its own (the ICMP
// lowers the path MTU to 1000 there).
func TestPendingMessageTooLongIsNotARefusal(t *testing.T) {
	ns := peertest.NewNetns(t, "emsgsize")
	err := peertest.InNetns(ns, func() error {
		dst, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			return err
		}
		defer dst.Close()
		src, err := net.DialUDP("udp4", nil, dst.LocalAddr().(*net.UDPAddr))
		if err != nil {
			return err
		}
		defer src.Close()
		// On loopback the ICMP error is handled before the call returns.
		if err := testnet.InjectICMPUnreachable(4, 1000, udpAddr(src), udpAddr(dst)); err != nil {
			return fmt.Errorf("a raw ICMP socket: %w", err)
		}
		w, err := NewWriter(src, 4)
		if err != nil {
			return err
		}
		for _, size := range []int{200, 900} {
			for range 4 {
				w.Add(make([]byte, size), netip.AddrPort{})
			}
			if sent, err := w.Flush(); sent != 4 || err != nil {
				return fmt.Errorf("%d bytes: Flush = %d, %v; want 4 sent", size, sent, err)
			}
		}
		if w.segmented != 2 || w.gsoMax != 1<<16 {
			return fmt.Errorf("%d segmented messages, largest segment %d; want 2 and unchanged", w.segmented, w.gsoMax)
		}
		r, err := NewReader(dst, slots(16, 2048), 0, true)
		if err != nil {
			return err
		}
		if n, err := r.Read(); err != nil || n != 8 {
			return fmt.Errorf("Read = %d, %v; want the 8 datagrams", n, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// Datagrams to port 0 (which the kernel refuses with EINVAL) never go as
// a segmented send: that EINVAL would read as the kernel refusing
// segmentation and turn it off for the Writer, for everyone.
func TestPortZeroKeepsSegmentation(t *testing.T) {
	dst := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
	src := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
	w, err := NewWriter(src, 8)
	if err != nil {
		t.Fatal(err)
	}
	for range 4 {
		w.Add(make([]byte, 100), netip.MustParseAddrPort("127.0.0.1:0"))
	}
	if sent, err := w.Flush(); sent != 0 || !errors.Is(err, unix.EINVAL) {
		t.Fatalf("Flush to port 0 = %d, %v; want 0 sent and EINVAL", sent, err)
	}
	for range 4 {
		w.Add(make([]byte, 100), udpAddr(dst))
	}
	if sent, err := w.Flush(); sent != 4 || err != nil {
		t.Fatalf("Flush = %d, %v", sent, err)
	}
	if w.segmented != 1 {
		t.Errorf("four equal datagrams to one peer after a send to port 0 went in %d segmented sends, want 1", w.segmented)
	}
}

// A refused send (the ICMP port unreachable of an earlier datagram,
// pending on a connected socket) stops Flush at the datagram it surfaced
// on, whether that one was to go in a segmented send or alone; the error
// is consumed, so the next Flush sends.
func TestFlushStopsAtARefusedDatagram(t *testing.T) {
	forEachImpl(t, func(t *testing.T, im impl) {
		for _, sizes := range [][]int{{3, 3, 3, 3}, {3, 5, 7, 9}} {
			dead := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
			deadAddr := dead.LocalAddr().(*net.UDPAddr)
			dead.Close()
			src, err := net.DialUDP("udp4", nil, deadAddr)
			if err != nil {
				t.Fatal(err)
			}
			defer src.Close()
			src.Write([]byte("provoke the ICMP error")) // on loopback it is queued before Write returns
			w := im.writer(t, src, 4)
			for _, n := range sizes {
				w.Add(make([]byte, n), netip.AddrPort{})
			}
			if sent, err := w.Flush(); sent != 0 || !errors.Is(err, syscall.ECONNREFUSED) {
				t.Fatalf("sizes %v: Flush = %d, %v; want 0 sent and ECONNREFUSED", sizes, sent, err)
			}
			if w.Len() != 0 {
				t.Fatalf("sizes %v: Len %d after Flush", sizes, w.Len())
			}
			w.Add([]byte{1}, netip.AddrPort{})
			if sent, err := w.Flush(); sent != 1 || err != nil {
				t.Fatalf("sizes %v: next Flush = %d, %v; want 1, nil", sizes, sent, err)
			}
		}
	})
}

// A batch allocates nothing, written or read (the portable kind too, on
// Linux at least).
func TestNoAllocations(t *testing.T) {
	forEachImpl(t, func(t *testing.T, im impl) {
		dst := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
		src := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
		w := im.writer(t, src, 8)
		r := im.reader(t, dst, slots(8, 2048), 64, true)
		to := udpAddr(dst)
		payload := make([]byte, 1200)
		allocs := testing.AllocsPerRun(200, func() {
			for range 8 {
				w.Add(payload, to)
			}
			w.Flush()
			for got := 0; got < 8; {
				n, err := r.Read()
				if err != nil {
					t.Fatal(err)
				}
				for i := range n {
					_ = r.Addr(i)
				}
				got += n
			}
		})
		if allocs != 0 {
			t.Fatalf("%.1f allocations per batch, want 0", allocs)
		}
	})
}

// TestControlMessages: a control reader hands back each datagram's
// control messages (IP_PKTINFO here), read after read.
func TestControlMessages(t *testing.T) {
	dst := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
	rc, err := dst.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	rc.Control(func(fd uintptr) { err = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_PKTINFO, 1) })
	if err != nil {
		t.Fatal(err)
	}
	r, err := NewControlReader(dst, slots(4, 2048), 0, 64)
	if err != nil {
		t.Fatal(err)
	}
	src := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
	payload := []byte("ping")
	for range 3 {
		if _, err := src.WriteToUDPAddrPort(payload, udpAddr(dst)); err != nil {
			t.Fatal(err)
		}
		n, err := r.Read()
		if err != nil || n != 1 {
			t.Fatalf("read %d, %v", n, err)
		}
		msgs, err := unix.ParseSocketControlMessage(r.OOB(0))
		if err != nil || len(msgs) != 1 || msgs[0].Header.Type != unix.IP_PKTINFO {
			t.Fatalf("control messages %v, %v; want one IP_PKTINFO", msgs, err)
		}
	}
}
