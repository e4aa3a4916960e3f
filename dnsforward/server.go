package dnsforward

import (
	"context"
	"errors"
	"net"
	"sync"

	"github.com/miekg/dns"

	"github.com/socksfwd/socksfwd/internal/sockbuf"
)

// Server serves one Forwarder on a UDP socket and a TCP listener bound to
// the same address by the caller (so a bind failure surfaces at start).
// It has the service shape of the tunnel package: Serve, Shutdown, Close.
type Server struct {
	fwd *Forwarder
	udp *dns.Server
	tcp *dns.Server

	closeOnce sync.Once
}

// Listen binds UDP and TCP at one address: TCP on the port UDP got, so
// port 0 works too. DNS clients expect both on the same port. With port 0
// the kernel's UDP choice may be taken for TCP (by any connection's local
// port); then another UDP port is tried, a bounded number of times.
func Listen(addr string) (net.PacketConn, net.Listener, error) {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, nil, err
	}
	tries := 1
	if port == "0" {
		tries = 20
	}
	for i := 0; ; i++ {
		pc, err := net.ListenPacket("udp", addr)
		if err != nil {
			return nil, nil, err
		}
		ln, err := net.Listen("tcp", pc.LocalAddr().String())
		if err == nil {
			return pc, ln, nil
		}
		pc.Close()
		if i+1 >= tries {
			return nil, nil, err
		}
	}
}

// NewServer returns a server for fwd on pc (UDP) and ln (TCP).
func NewServer(fwd *Forwarder, pc net.PacketConn, ln net.Listener) *Server {
	if u, ok := pc.(*net.UDPConn); ok {
		sockbuf.Grow(u) // bursts of queries should queue, not drop
	}
	return &Server{
		fwd: fwd,
		udp: &dns.Server{PacketConn: pc, Handler: fwd},
		tcp: &dns.Server{Listener: ln, Handler: fwd},
	}
}

// Addr is the listening address.
func (s *Server) Addr() net.Addr { return s.udp.PacketConn.LocalAddr() }

// Serve answers queries until Shutdown or Close, or until ctx is done.
func (s *Server) Serve(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() { s.Close() })
	defer stop()
	errc := make(chan error, 2)
	var wg sync.WaitGroup
	for _, srv := range []*dns.Server{s.udp, s.tcp} {
		wg.Go(func() { errc <- srv.ActivateAndServe() })
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		if err != nil && !errors.Is(err, net.ErrClosed) {
			return err
		}
	}
	return nil
}

// Shutdown stops both listeners and waits for queries in progress until ctx
// is done, then closes the forwarder's connections.
func (s *Server) Shutdown(ctx context.Context) error {
	var err error
	s.closeOnce.Do(func() {
		err = errors.Join(s.udp.ShutdownContext(ctx), s.tcp.ShutdownContext(ctx))
		// Also close the sockets ourselves: a server not started yet
		// ignores ShutdownContext and would otherwise start later.
		s.udp.PacketConn.Close()
		s.tcp.Listener.Close()
		s.fwd.Close()
	})
	if errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	return nil
}

// Close stops at once.
func (s *Server) Close() error {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	s.Shutdown(ctx)
	return nil
}
