package socksclient_test

import (
	"bytes"
	"context"
	"errors"
	"net"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/socksfwd/socksfwd/internal/testnet"
	"github.com/socksfwd/socksfwd/socksclient"
	"github.com/socksfwd/socksfwd/socksclient/sockstest"
)

// associateReader is associate that must succeed, with a batch reader
// of one datagram on the association.
func associateReader(t *testing.T, cfg sockstest.Config) (*socksclient.UDPConn, *socksclient.UDPReadBatch) {
	t.Helper()
	u, err := associate(t, cfg)
	if err != nil {
		t.Fatal(err)
	}
	r, err := u.NewReadBatch([][]byte{make([]byte, socksclient.MaxUDPDatagram)})
	if err != nil {
		t.Fatal(err)
	}
	return u, r
}

func associate(t *testing.T, cfg sockstest.Config) (*socksclient.UDPConn, error) {
	t.Helper()
	srv, err := sockstest.NewServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	d := socksclient.Dialer{ProxyAddr: srv.Addr(), HandshakeTimeout: 5 * time.Second}
	u, err := d.Associate(context.Background())
	if u != nil {
		t.Cleanup(func() { u.Close() })
	}
	return u, err
}

// exchange sends payload to echo through u and returns what came back.
func exchange(t *testing.T, u *socksclient.UDPConn, echo socksclient.Addr, payload []byte) []byte {
	t.Helper()
	buf := make([]byte, socksclient.MaxUDPHeaderLen+len(payload))
	copy(buf[socksclient.MaxUDPHeaderLen:], payload)
	if err := u.WritePacket(buf, socksclient.MaxUDPHeaderLen, echo); err != nil {
		t.Fatal(err)
	}
	u.SetReadDeadline(time.Now().Add(5 * time.Second))
	in := make([]byte, socksclient.MaxUDPDatagram)
	off, n, from, err := u.ReadPacket(in)
	if err != nil {
		t.Fatal(err)
	}
	if from != echo {
		t.Fatalf("reply from %v, want %v", from, echo)
	}
	return in[off:n]
}

func echoAddr(t *testing.T) socksclient.Addr {
	return socksclient.AddrFromAddrPort(testnet.UDPEcho(t).LocalAddr().(*net.UDPAddr).AddrPort())
}

func TestAssociateSizes(t *testing.T) {
	echo := echoAddr(t)
	u, err := associate(t, sockstest.Config{})
	if err != nil {
		t.Fatal(err)
	}
	for _, size := range []int{1, 1400, 9000, 65000, socksclient.MaxUDPDatagram - 10} {
		payload := bytes.Repeat([]byte{byte(size)}, size)
		if got := exchange(t, u, echo, payload); !bytes.Equal(got, payload) {
			t.Fatalf("size %d: got %d bytes back", size, len(got))
		}
	}
	big := make([]byte, socksclient.MaxUDPHeaderLen+socksclient.MaxUDPDatagram-9)
	if err := u.WritePacket(big, socksclient.MaxUDPHeaderLen, echo); !errors.Is(err, socksclient.ErrDatagramTooLarge) {
		t.Fatalf("oversized: %v", err)
	}
	if u.Stats().TooLarge.Load() != 1 {
		t.Fatal("oversized datagram not counted")
	}
}

func TestAssociateFaults(t *testing.T) {
	echo := echoAddr(t)
	tests := []struct {
		name  string
		cfg   sockstest.Config
		count func(*socksclient.UDPStats) int64
	}{
		{"BND.ADDR 0.0.0.0 means the server's address", sockstest.Config{UDPBindUnspecified: true}, nil},
		{"BND.ADDR a name, resolved here", sockstest.Config{UDPBindName: "localhost"}, nil},
		{"FRAG != 0 dropped", sockstest.Config{UDPFragmentCopies: true}, func(s *socksclient.UDPStats) int64 { return s.Fragmented.Load() }},
		{"strangers ignored", sockstest.Config{UDPStrangerCopies: true}, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			u, err := associate(t, tc.cfg)
			if err != nil {
				t.Fatal(err)
			}
			for i := range 3 {
				msg := []byte{byte(i), 'x'}
				if got := exchange(t, u, echo, msg); !bytes.Equal(got, msg) {
					t.Fatalf("got %q, want %q", got, msg)
				}
			}
			if tc.count != nil && tc.count(u.Stats()) == 0 {
				t.Fatal("drop not counted")
			}
		})
	}
}

// TestAssociateRelayNameUnresolvable: a relay name that does not resolve
// fails the association with an error that names it.
func TestAssociateRelayNameUnresolvable(t *testing.T) {
	srv, err := sockstest.NewServer(sockstest.Config{UDPBindName: "relay.invalid"})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	noDNS := &net.Resolver{PreferGo: true, Dial: func(context.Context, string, string) (net.Conn, error) {
		return nil, errors.New("no DNS server in this test")
	}}
	d := socksclient.Dialer{ProxyAddr: srv.Addr(), HandshakeTimeout: 5 * time.Second, Resolver: noDNS}
	u, err := d.Associate(context.Background())
	if err == nil {
		u.Close()
	}
	if err == nil || !strings.Contains(err.Error(), `UDP relay's name "relay.invalid"`) {
		t.Fatalf("err = %v, want one naming the relay's name", err)
	}
}

// TestAssociateRelayNameBounded: looking up the relay's name is part of
// setting up the association, bounded by HandshakeTimeout, not only by
// the caller's context; and with LookupControl set, it goes through
// sockets with it (a transparent proxy's mark keeps its own capture
// rules off the lookup).
func TestAssociateRelayNameBounded(t *testing.T) {
	srv, err := sockstest.NewServer(sockstest.Config{UDPBindName: "relay.example"})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	// The resolver's own per-try timeout (5 s from resolv.conf) would end
	// the lookup too, with DeadlineExceeded: the handshake's bound cancels
	// it first.
	ended := make(chan error, 16)
	silentDNS := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, _, _ string) (net.Conn, error) {
		<-ctx.Done()
		ended <- ctx.Err()
		return nil, ctx.Err()
	}}
	d := socksclient.Dialer{ProxyAddr: srv.Addr(), HandshakeTimeout: 200 * time.Millisecond, Resolver: silentDNS}
	if u, err := d.Associate(context.Background()); err == nil {
		u.Close()
		t.Fatal("Associate resolved the relay's name with no DNS")
	}
	if err := <-ended; !errors.Is(err, context.Canceled) {
		t.Errorf("the relay's name lookup ended with %v, want cancelled by the handshake timeout", err)
	}

	var mu sync.Mutex
	var marked []string
	d = socksclient.Dialer{ProxyAddr: srv.Addr(), HandshakeTimeout: 5 * time.Second, LookupControl: func(network, address string, _ syscall.RawConn) error {
		mu.Lock()
		defer mu.Unlock()
		marked = append(marked, network+" "+address)
		if _, port, _ := net.SplitHostPort(address); port == "53" {
			return errors.New("no DNS in this test")
		}
		return nil
	}}
	if u, err := d.Associate(context.Background()); err == nil {
		u.Close()
		t.Fatal("Associate resolved the relay's name with every DNS socket refused")
	}
	mu.Lock()
	defer mu.Unlock()
	if !slices.ContainsFunc(marked, func(s string) bool { return strings.HasSuffix(s, ":53") }) {
		t.Errorf("the relay's name was not looked up through sockets with LookupControl; it saw %q", marked)
	}
}

func TestAssociateUnsupported(t *testing.T) {
	for _, cfg := range []sockstest.Config{
		{Reply: socksclient.RepCommandNotSupported},
		{Fault: sockstest.FaultCloseAfterRequest},
	} {
		_, err := associate(t, cfg)
		if !errors.Is(err, socksclient.ErrCommandNotSupported) || !strings.Contains(err.Error(), "udp associate") {
			t.Fatalf("err = %v, want command not supported naming udp associate", err)
		}
	}
}

func TestAssociateControlClosed(t *testing.T) {
	echo := echoAddr(t)
	u, err := associate(t, sockstest.Config{UDPCloseControlAfter: 1})
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, socksclient.MaxUDPHeaderLen+1)
	u.WritePacket(buf, socksclient.MaxUDPHeaderLen, echo)
	in := make([]byte, socksclient.MaxUDPDatagram)
	u.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		// The echo may or may not come back before the association ends;
		// then reads must fail with ErrAssociationClosed, not hang.
		_, _, _, err := u.ReadPacket(in)
		if err == nil {
			continue
		}
		if !errors.Is(err, socksclient.ErrAssociationClosed) {
			t.Fatalf("err = %v, want ErrAssociationClosed", err)
		}
		break
	}
	if u.Alive() {
		t.Fatal("still alive")
	}
}

// When the proxy drops the control connection, the association is marked
// ended before its own end of the connection closes: whoever sees that
// close (a proxy, a test) finds it no longer alive.
func TestAssociateClosesControlWhenProxyEnds(t *testing.T) {
	srv, err := sockstest.NewServer(sockstest.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	cutter := testnet.NewCutter(t, srv.Addr())
	d := socksclient.Dialer{ProxyAddr: cutter.Addr(), HandshakeTimeout: 5 * time.Second}
	u, err := d.Associate(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	if !u.Alive() {
		t.Fatal("not alive before the cut")
	}
	if n, err := cutter.CutUpstream(10 * time.Second); n != 1 || err != nil {
		t.Fatalf("cut %d control connections: %v", n, err)
	}
	if u.Alive() {
		t.Fatal("still alive after closing its control connection")
	}
}

// A batch wraps each datagram in place and sends them all; the relay sees
// separate datagrams with their own headers, equal-sized runs included.
func TestUDPBatch(t *testing.T) {
	echo := echoAddr(t)
	u, err := associate(t, sockstest.Config{})
	if err != nil {
		t.Fatal(err)
	}
	b, err := u.NewBatch(8)
	if err != nil {
		t.Fatal(err)
	}
	sizes := []int{1200, 1200, 1200, 5, 9000, 1200, 1200}
	for i, size := range sizes {
		buf := make([]byte, socksclient.MaxUDPHeaderLen+size)
		buf[socksclient.MaxUDPHeaderLen] = byte(i)
		if err := b.Add(buf, socksclient.MaxUDPHeaderLen, echo); err != nil {
			t.Fatal(err)
		}
	}
	if b.Len() != len(sizes) || b.Full() {
		t.Fatalf("Len %d Full %v", b.Len(), b.Full())
	}
	if sent, err := b.Flush(); sent != len(sizes) || err != nil {
		t.Fatalf("Flush = %d, %v", sent, err)
	}
	got := map[int]int{}
	in := make([]byte, socksclient.MaxUDPDatagram)
	u.SetReadDeadline(time.Now().Add(5 * time.Second))
	for len(got) < len(sizes) {
		off, n, from, err := u.ReadPacket(in)
		if err != nil {
			t.Fatalf("after %d echoes: %v", len(got), err)
		}
		if from != echo {
			t.Fatalf("reply from %v", from)
		}
		got[int(in[off])] = n - off
	}
	for i, size := range sizes {
		if got[i] != size {
			t.Fatalf("datagram %d came back with %d bytes, want %d", i, got[i], size)
		}
	}
	// An oversized datagram is refused at Add; after Close, Flush fails.
	big := make([]byte, socksclient.MaxUDPHeaderLen+socksclient.MaxUDPDatagram)
	if err := b.Add(big, socksclient.MaxUDPHeaderLen, echo); !errors.Is(err, socksclient.ErrDatagramTooLarge) {
		t.Fatalf("Add of an oversized datagram: %v", err)
	}
	u.Close()
	b.Add(make([]byte, socksclient.MaxUDPHeaderLen+1), socksclient.MaxUDPHeaderLen, echo)
	if _, err := b.Flush(); err == nil {
		t.Fatal("Flush on a closed association succeeded")
	}
}

func TestDialUDPTarget(t *testing.T) {
	echo := testnet.UDPEcho(t).LocalAddr().String()
	srv, err := sockstest.NewServer(sockstest.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	d := socksclient.Dialer{ProxyAddr: srv.Addr()}
	c, err := d.DialUDP(context.Background(), echo)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("ping"))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 512)
	n, err := c.Read(buf)
	if err != nil || string(buf[:n]) != "ping" {
		t.Fatalf("got %q, %v", buf[:n], err)
	}
	// The relay passes on what anyone sends to its port: Read returns the
	// target's datagrams only.
	stranger := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
	if _, err := stranger.WriteToUDPAddrPort([]byte("injected"), c.Relay()); err != nil {
		t.Fatal(err)
	}
	c.Write([]byte("second"))
	n, err = c.Read(buf)
	if err != nil || string(buf[:n]) != "second" || c.Stats().WrongPeer.Load() != 1 {
		t.Fatalf("got %q, %v, %d from another sender; want the target's second datagram, one dropped", buf[:n], err, c.Stats().WrongPeer.Load())
	}
}

// TestUDPHotPathAllocs: a relayed datagram (write through the association,
// read the reply) allocates nothing.
func TestUDPHotPathAllocs(t *testing.T) {
	echo := echoAddr(t)
	u, err := associate(t, sockstest.Config{})
	if err != nil {
		t.Fatal(err)
	}
	out := make([]byte, socksclient.MaxUDPHeaderLen+64)
	in := make([]byte, socksclient.MaxUDPDatagram)
	u.SetReadDeadline(time.Now().Add(30 * time.Second))
	allocs := testing.AllocsPerRun(200, func() {
		if err := u.WritePacket(out, socksclient.MaxUDPHeaderLen, echo); err != nil {
			t.Fatal(err)
		}
		if _, _, _, err := u.ReadPacket(in); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("%v allocations per datagram, want 0", allocs)
	}
}

// A read batch yields what ReadPacket would: payloads in order, with
// fragments and strangers dropped, and ErrAssociationClosed at the end.
func TestReadBatch(t *testing.T) {
	echo := echoAddr(t)
	for _, cfg := range []sockstest.Config{{}, {UDPFragmentCopies: true}, {UDPStrangerCopies: true}} {
		u, err := associate(t, cfg)
		if err != nil {
			t.Fatal(err)
		}
		slots := [][]byte{make([]byte, socksclient.MaxUDPDatagram), make([]byte, socksclient.MaxUDPDatagram)}
		r, err := u.NewReadBatch(slots)
		if err != nil {
			t.Fatal(err)
		}
		u.SetReadDeadline(time.Now().Add(10 * time.Second))
		var got []string
		for i := range 4 {
			buf := make([]byte, socksclient.MaxUDPHeaderLen+2)
			copy(buf[socksclient.MaxUDPHeaderLen:], []byte{'a' + byte(i), 'x'})
			if err := u.WritePacket(buf, socksclient.MaxUDPHeaderLen, echo); err != nil {
				t.Fatal(err)
			}
			// Read until this datagram's echo is in; a dropped copy
			// may make a read yield nothing.
			for len(got) <= i {
				n, err := r.Read()
				if err != nil {
					t.Fatalf("%+v: %v", cfg, err)
				}
				for j := range n {
					got = append(got, string(r.Payload(j)))
				}
			}
		}
		if want := []string{"ax", "bx", "cx", "dx"}; strings.Join(got, " ") != strings.Join(want, " ") {
			t.Fatalf("%+v: got %q, want %q", cfg, got, want)
		}
		if cfg.UDPFragmentCopies && u.Stats().Fragmented.Load() == 0 {
			t.Fatalf("fragments not counted")
		}
		u.Close()
		if _, err := r.Read(); err == nil {
			t.Fatal("read after Close succeeded")
		}
	}

	u, r := associateReader(t, sockstest.Config{UDPCloseControlAfter: 1})
	buf := make([]byte, socksclient.MaxUDPHeaderLen+1)
	u.WritePacket(buf, socksclient.MaxUDPHeaderLen, echo)
	u.SetReadDeadline(time.Now().Add(10 * time.Second))
	var err error
	for range 10 {
		if _, err = r.Read(); err != nil {
			break
		}
	}
	if !errors.Is(err, socksclient.ErrAssociationClosed) {
		t.Fatalf("err = %v, want ErrAssociationClosed", err)
	}
}

// TestUDPConnOwnClose: after the owner's Close every read and write reports
// net.ErrClosed, not that the proxy ended the association.
func TestUDPConnOwnClose(t *testing.T) {
	echo := echoAddr(t)
	u, r := associateReader(t, sockstest.Config{})
	b, err := u.NewBatch(4)
	if err != nil {
		t.Fatal(err)
	}
	// A read in flight when Close comes (or just after it: either way it
	// must not blame the proxy).
	u.SetReadDeadline(time.Now().Add(time.Minute))
	blocked := make(chan error, 1)
	go func() {
		_, _, _, err := u.ReadPacket(make([]byte, socksclient.MaxUDPDatagram))
		blocked <- err
	}()
	if err := u.Close(); err != nil {
		t.Fatal(err)
	}
	if u.Alive() {
		t.Fatal("Alive after Close")
	}
	buf := make([]byte, socksclient.MaxUDPHeaderLen+1)
	_, _, _, readErr := u.ReadPacket(make([]byte, socksclient.MaxUDPDatagram))
	_, batchReadErr := r.Read()
	b.Add(buf, socksclient.MaxUDPHeaderLen, echo)
	_, flushErr := b.Flush()
	_, writeToErr := u.WriteTo([]byte("x"), echo)
	for name, err := range map[string]error{
		"blocked read": <-blocked,
		"ReadPacket":   readErr,
		"batch Read":   batchReadErr,
		"WritePacket":  u.WritePacket(buf, socksclient.MaxUDPHeaderLen, echo),
		"batch Flush":  flushErr,
		"WriteTo":      writeToErr,
	} {
		if !errors.Is(err, net.ErrClosed) || errors.Is(err, socksclient.ErrAssociationClosed) {
			t.Errorf("%s after Close: %v, want net.ErrClosed", name, err)
		}
	}
}

// TestAssociateAppliesControl: both sockets of an association, the TCP
// control connection and the UDP socket toward the relay, go through
// Control, and the association still carries datagrams.
func TestAssociateAppliesControl(t *testing.T) {
	echo := echoAddr(t)
	srv, err := sockstest.NewServer(sockstest.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	var log controlLog
	d := socksclient.Dialer{ProxyAddr: srv.Addr(), HandshakeTimeout: 5 * time.Second, Control: log.control}
	u, err := d.Associate(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	if got, want := log.String(), "tcp4 "+srv.Addr()+", udp4 "+u.Relay().String(); got != want {
		t.Fatalf("Control saw %q, want %q", got, want)
	}
	if got := exchange(t, u, echo, []byte("marked")); string(got) != "marked" {
		t.Fatalf("echo %q", got)
	}
}

// TestAssociateControlErrorFails: when Control refuses the UDP socket the
// association fails with its error, and the control connection is not
// left open (goleak would see its watcher).
func TestAssociateControlErrorFails(t *testing.T) {
	refused := errors.New("refused by control")
	log := controlLog{fail: func(network string) error {
		if strings.HasPrefix(network, "udp") {
			return refused
		}
		return nil
	}}
	srv, err := sockstest.NewServer(sockstest.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	d := socksclient.Dialer{ProxyAddr: srv.Addr(), HandshakeTimeout: 5 * time.Second, Control: log.control}
	u, err := d.Associate(context.Background())
	if err == nil {
		u.Close()
		t.Fatal("Associate succeeded though Control refused the UDP socket")
	}
	if !errors.Is(err, refused) {
		t.Fatalf("err = %v, want the control's error", err)
	}
}

// TestReadBatchOnlyFrom: with OnlyFrom, a read batch drops and counts what
// the relay passes on from another sender than the peer (the sockstest
// relay, as real ones, passes on what anyone sends to its port), and
// still yields the peer's replies: by address and port, or by port when
// the peer is a name the proxy resolved.
func TestReadBatchOnlyFrom(t *testing.T) {
	echo := echoAddr(t)
	for _, peer := range []socksclient.Addr{echo, {Name: "localhost", Port: echo.Port}} {
		u, r := associateReader(t, sockstest.Config{})
		r.OnlyFrom(peer)
		u.SetReadDeadline(time.Now().Add(10 * time.Second))
		// read returns the next payload that got through.
		read := func() string {
			t.Helper()
			for {
				n, err := r.Read()
				if err != nil {
					t.Fatalf("%v: %v", peer, err)
				}
				if n > 0 {
					return string(r.Payload(0))
				}
			}
		}
		send := func(msg string) {
			t.Helper()
			buf := append(make([]byte, socksclient.MaxUDPHeaderLen), msg...)
			if err := u.WritePacket(buf, socksclient.MaxUDPHeaderLen, peer); err != nil {
				t.Fatal(err)
			}
		}
		send("first") // the relay learns the client's address
		if got := read(); got != "first" {
			t.Fatalf("%v: read %q, want the echo", peer, got)
		}
		stranger := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
		if _, err := stranger.WriteToUDPAddrPort([]byte("injected"), u.Relay()); err != nil {
			t.Fatal(err)
		}
		send("second")
		if got := read(); got != "second" {
			t.Fatalf("%v: read %q, want the echo", peer, got)
		}
		// The injection was sent first; the relay passes datagrams on in
		// order, so it was read and dropped before the echo.
		if n := u.Stats().WrongPeer.Load(); n != 1 {
			t.Fatalf("%v: WrongPeer = %d, want 1", peer, n)
		}
		u.Close()
	}
}
