// Package testnet has small loopback servers that tests in several packages
// share: an echo server with half-close, and a server that hands every
// accepted connection to a callback.
package testnet

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/socksfwd/socksfwd/internal/sockbuf"
)

// TB is the part of testing.TB these helpers use, so that callers outside
// a *testing.T (testscript commands, the benchmark driver) can use them.
type TB interface {
	Helper()
	Fatal(args ...any)
	Cleanup(func())
}

// Serve listens on 127.0.0.1 at a free port and runs handle for each
// connection in its own goroutine. The listener, the open connections and
// the goroutines are gone when the test's cleanup runs.
func Serve(t TB, handle func(net.Conn)) net.Listener {
	t.Helper()
	ln, err := ServeOn(t, "127.0.0.1:0", handle)
	if err != nil {
		t.Fatal(err)
	}
	return ln
}

// ServeOn is Serve on addr (which may be of an address family the machine
// lacks: the caller decides whether that skips). A nil handle holds each
// connection open, unread, until the cleanup.
func ServeOn(t TB, addr string, handle func(net.Conn)) (net.Listener, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	var (
		wg     sync.WaitGroup
		mu     sync.Mutex
		conns  = map[net.Conn]struct{}{}
		closed bool
	)
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			if closed { // accepted just as the cleanup ran: it would never be closed
				mu.Unlock()
				c.Close()
				return
			}
			conns[c] = struct{}{}
			if handle != nil {
				wg.Go(func() {
					defer func() {
						mu.Lock()
						delete(conns, c)
						mu.Unlock()
						c.Close()
					}()
					handle(c)
				})
			}
			mu.Unlock()
		}
	})
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		closed = true
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return ln, nil
}

// Echo starts an echo server: it copies everything back, and when the client
// half-closes it half-closes too, so a client can test half-close.
func Echo(t TB) net.Listener {
	return Serve(t, EchoConn)
}

// EchoConn is Echo's handler, for servers started elsewhere (ServeOn, a
// namespace): it copies c back to itself until EOF, then half-closes.
func EchoConn(c net.Conn) {
	io.Copy(c, c)
	c.(*net.TCPConn).CloseWrite()
}

// ClosedPort returns a loopback address nothing listens on.
func ClosedPort(t TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// TCPPair returns the two ends of a loopback TCP connection, the dialer's
// first, both closed at cleanup. The kernel buffers what one end writes, so
// a test can write a whole script before the other end reads any of it.
func TCPPair(t TB) (dialed, accepted *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	acc := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		acc <- c
	}()
	a, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	b := <-acc
	if b == nil {
		a.Close()
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { a.Close(); b.Close() })
	return a.(*net.TCPConn), b.(*net.TCPConn)
}

// SkipTB is TB for helpers that skip a test the machine cannot run.
type SkipTB interface {
	TB
	Skipf(format string, args ...any)
}

// ListenUDP listens on addr (such as "127.0.0.1:0" or "[::1]:0") until
// cleanup; a machine without that network (no IPv6, say) skips the test,
// except under CI=true, where every test must run.
func ListenUDP(t SkipTB, network, addr string) *net.UDPConn {
	t.Helper()
	c, err := net.ListenUDP(network, net.UDPAddrFromAddrPort(netip.MustParseAddrPort(addr)))
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal(fmt.Sprintf("CI=true requires %s: %v", network, err))
		}
		t.Skipf("no %s here: %v", network, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// UDPSink counts the datagrams that reach it, until cleanup.
type UDPSink struct {
	pc *net.UDPConn
	n  atomic.Int64
}

// NewUDPSink starts a sink on 127.0.0.1.
func NewUDPSink(t TB) *UDPSink {
	t.Helper()
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	sockbuf.Grow(pc)
	s := &UDPSink{pc: pc}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 65536)
		for {
			if _, err := pc.Read(buf); err != nil {
				return
			}
			s.n.Add(1)
		}
	}()
	t.Cleanup(func() {
		pc.Close()
		<-done
	})
	return s
}

// Addr is where the sink listens.
func (s *UDPSink) Addr() netip.AddrPort { return s.pc.LocalAddr().(*net.UDPAddr).AddrPort() }

// Count is the number of datagrams received so far.
func (s *UDPSink) Count() int64 { return s.n.Load() }

// UDPEcho starts a UDP echo server on 127.0.0.1 and returns its address.
func UDPEcho(t TB) *net.UDPConn {
	t.Helper()
	pc, err := UDPEchoOn(t, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	return pc
}

// UDPEchoOn is UDPEcho on addr (which may be of an address family the
// machine lacks: the caller decides whether that skips).
func UDPEchoOn(t TB, addr *net.UDPAddr) (*net.UDPConn, error) {
	pc, err := net.ListenUDP("udp", addr)
	if err != nil {
		return nil, err
	}
	sockbuf.Grow(pc)
	EchoUDPOn(t, pc)
	return pc, nil
}

// EchoUDPOn echoes every datagram pc reads to its sender until cleanup,
// which closes pc.
func EchoUDPOn(t TB, pc *net.UDPConn) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 65536)
		for {
			n, from, err := pc.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			pc.WriteToUDPAddrPort(buf[:n], from)
		}
	}()
	t.Cleanup(func() {
		pc.Close()
		<-done
	})
}

// Join copies between a and b both ways until both directions end,
// passing each half-close on (a plain Close where the conn has no
// CloseWrite). Between TCP sockets io.Copy splices.
func Join(a, b net.Conn) {
	var wg sync.WaitGroup
	wg.Go(func() { copyHalf(a, b) })
	copyHalf(b, a)
	wg.Wait()
}

func copyHalf(dst, src net.Conn) {
	io.Copy(dst, src)
	if cw, ok := dst.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	} else {
		dst.Close()
	}
}

// Cutter is a TCP relay whose connections a test can cut at once, to play
// a proxy or network that drops a connection mid-stream.
type Cutter struct {
	ln    net.Listener
	mu    sync.Mutex
	pairs map[*cutPair]struct{}
}

// cutPair is one relayed connection: the client's side and the target's.
type cutPair struct {
	client, up net.Conn
	// upstreamCut: CutUpstream owns closing client.
	upstreamCut atomic.Bool
	// clientDone is closed when the client's side has ended (the client
	// closed it, or the relay broke).
	clientDone chan struct{}
}

// NewCutter relays 127.0.0.1:<free port> to target until cleanup.
func NewCutter(t TB, target string) *Cutter {
	c := &Cutter{pairs: map[*cutPair]struct{}{}}
	c.ln = Serve(t, func(client net.Conn) {
		up, err := net.Dial("tcp", target)
		if err != nil {
			return
		}
		p := &cutPair{client: client, up: up, clientDone: make(chan struct{})}
		c.mu.Lock()
		c.pairs[p] = struct{}{}
		c.mu.Unlock()
		defer func() {
			c.mu.Lock()
			delete(c.pairs, p)
			c.mu.Unlock()
			up.Close()
		}()
		go func() {
			io.Copy(up, client)
			up.Close()
			close(p.clientDone)
		}()
		io.Copy(client, up)
		if !p.upstreamCut.Load() {
			client.Close()
		}
		<-p.clientDone
	})
	return c
}

// Addr is the relay's address.
func (c *Cutter) Addr() string { return c.ln.Addr().String() }

// Cut closes every relayed connection and reports how many there were.
func (c *Cutter) Cut() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	for p := range c.pairs {
		p.client.Close()
		p.up.Close()
	}
	return len(c.pairs)
}

// CutUpstream plays the target dropping every relayed connection: it
// closes the target's side and sends the client an end of stream, then
// waits up to timeout for each client to close its side, the sign that
// it has seen the end. It reports how many connections it cut, or
// ErrClientKeptOpen when a client did not close in time.
func (c *Cutter) CutUpstream(timeout time.Duration) (int, error) {
	c.mu.Lock()
	pairs := make([]*cutPair, 0, len(c.pairs))
	for p := range c.pairs {
		p.upstreamCut.Store(true)
		pairs = append(pairs, p)
	}
	c.mu.Unlock()
	for _, p := range pairs {
		if cw, ok := p.client.(interface{ CloseWrite() error }); ok {
			cw.CloseWrite()
		}
		p.up.Close()
	}
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	var err error
	for _, p := range pairs {
		select {
		case <-p.clientDone:
		case <-deadline.C:
			err = ErrClientKeptOpen
		}
		if err != nil {
			break
		}
	}
	for _, p := range pairs {
		p.client.Close()
	}
	return len(pairs), err
}

// ErrClientKeptOpen: after CutUpstream, a client did not close its side.
var ErrClientKeptOpen = errors.New("testnet: the client kept the cut connection open")
