package dnsforward

import (
	"context"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/dns"

	"github.com/socksfwd/socksfwd/internal/allowlist"
	"github.com/socksfwd/socksfwd/internal/bindaddr"
	"github.com/socksfwd/socksfwd/internal/logthrottle"
	"github.com/socksfwd/socksfwd/internal/sockbuf"
)

// Server serves a Forwarder on a UDP socket and a TCP listener bound to
// the same address by the caller (so a bind failure surfaces at start).
// It has the service shape of the tunnel package: Serve, Shutdown, Close.
// The forwarder can be replaced while the sockets stay bound
// (SetForwarder), for a configuration reload.
type Server struct {
	cur   atomic.Pointer[serving]
	allow atomic.Pointer[allowlist.List] // nil: every source
	pc    net.PacketConn
	udp   *dns.Server  // nil when fast serves the socket
	fast  *udpFastPath // nil on a wildcard address
	tcp   *tcpServer

	mu       sync.Mutex
	stopped  bool
	stopping chan struct{} // closed by Shutdown: retired forwarders close now
	retiring sync.WaitGroup

	started   atomic.Bool // Serve was called
	closeOnce sync.Once
}

// serving is a forwarder with the count of queries it is answering, so
// that a replaced one is closed only once they are done.
type serving struct {
	fwd     *Forwarder
	active  atomic.Int64
	retired atomic.Bool
	idle    chan struct{} // closed once retired and no query is active
	once    sync.Once
}

func newServing(fwd *Forwarder) *serving {
	return &serving{fwd: fwd, idle: make(chan struct{})}
}

func (h *serving) leave() {
	if h.active.Add(-1) == 0 && h.retired.Load() {
		h.once.Do(func() { close(h.idle) })
	}
}

func (h *serving) retire() {
	h.retired.Store(true)
	if h.active.Load() == 0 {
		h.once.Do(func() { close(h.idle) })
	}
}

// Listen binds UDP and TCP at one address: TCP on the port UDP got, so
// port 0 works too. DNS clients expect both on the same port. With port 0
// the kernel's UDP choice may be taken for TCP (UDP and TCP ports are
// separate spaces, so the number the kernel found free for UDP may be any
// TCP connection's local port); then another UDP port is tried, a bounded
// number of times. A fixed port is bound once.
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
		pc, err := net.ListenPacket(bindaddr.Network("udp", addr), addr)
		if err != nil {
			return nil, nil, err
		}
		ln, err := net.Listen(bindaddr.Network("tcp", addr), pc.LocalAddr().String())
		if err == nil {
			return pc, ln, nil
		}
		pc.Close()
		if i+1 >= tries {
			return nil, nil, err
		}
	}
}

// NewServer returns a server for fwd on pc (UDP) and ln (TCP). The server
// owns fwd: Shutdown and Close close it.
func NewServer(fwd *Forwarder, pc net.PacketConn, ln net.Listener) *Server {
	if u, ok := pc.(*net.UDPConn); ok {
		sockbuf.Grow(u) // bursts of queries should queue, not drop
	}
	s := &Server{pc: pc, stopping: make(chan struct{})}
	s.cur.Store(newServing(fwd))
	if s.fast = newUDPFastPath(s, pc); s.fast == nil {
		// UDPSize: miekg/dns reads 512 bytes by default, and would cut a
		// larger query (EDNS padding, many options) short. 4 KiB holds any
		// real query, and is what each datagram refused before it reaches
		// miekg/dns costs (refuseOutsiders cannot give its buffer back).
		s.udp = &dns.Server{PacketConn: pc, Handler: s, MsgAcceptFunc: s.acceptUDP, MsgInvalidFunc: s.invalidUDP, UDPSize: 4096,
			DecorateReader: s.refuseOutsiders}
	}
	s.tcp = newTCPServer(ln, s.serveMessage, tcpMaxClients, s.tcpFull)
	return s
}

// tcpFull logs, once per period, that DNS-over-TCP clients wait for room.
func (s *Server) tcpFull() {
	f := s.cur.Load().fwd
	ok, suppressed := f.failLog.Allow("tcp clients full")
	if !ok {
		return
	}
	f.cfg.Logger.Warn().Int("max_clients", cap(s.tcp.room)).Func(logthrottle.Repeats("more_since_last_line", suppressed)).
		Msgf("DNS over TCP: %d clients at once, the most it serves; the next waits until one leaves (one line per %s)", cap(s.tcp.room), failureLogPeriod)
}

// Forwarder is the forwarder answering new queries (for its Stats).
func (s *Server) Forwarder() *Forwarder { return s.cur.Load().fwd }

// SetForwarder makes fwd answer every query that arrives from now on,
// with the sockets kept bound, so a reload loses no query and no client
// sees the port closed. Queries already in progress finish on the
// previous forwarder, which is closed as soon as they are done (or at
// Shutdown, whichever is first). The server owns fwd from now on; after
// Shutdown or Close, fwd is closed at once.
func (s *Server) SetForwarder(fwd *Forwarder) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		fwd.Close()
		return
	}
	old := s.cur.Swap(newServing(fwd))
	old.retire()
	s.retiring.Go(func() {
		select {
		case <-old.idle:
		case <-s.stopping:
		}
		old.fwd.Close()
	})
}

// SetAllow sets the client sources served from now on (nil: every
// source); others are answered REFUSED and counted (Stats.NotAllowed).
func (s *Server) SetAllow(l *allowlist.List) { s.allow.Store(l) }

// ServeDNS implements dns.Handler with the current forwarder.
func (s *Server) ServeDNS(w dns.ResponseWriter, r *dns.Msg) {
	if !s.allow.Load().AllowsAddr(w.RemoteAddr()) {
		s.refuse(w, r)
		return
	}
	h := s.enter()
	defer h.leave()
	h.fwd.ServeDNS(w, r)
}

// refuse answers r, from a source outside the allow list, REFUSED,
// counted in NotAllowed only (not in Queries or Responses).
func (s *Server) refuse(w dns.ResponseWriter, r *dns.Msg) {
	s.cur.Load().fwd.stats.NotAllowed.Add(1)
	w.WriteMsg(rcodeReply(r, dns.RcodeRefused))
}

// enter returns the current forwarder with the query counted as active on
// it; the caller leaves when done.
func (s *Server) enter() *serving {
	for {
		h := s.cur.Load()
		h.active.Add(1)
		// Counted before the check: a forwarder replaced meanwhile either
		// sees this query active or the query sees the replacement.
		if s.cur.Load() == h {
			return h
		}
		h.leave()
	}
}

// answerFromCache answers a UDP query in wire form from the current
// forwarder's cache (see Forwarder.answerWire); false leaves it to
// ServeDNS, which also answers sources outside the allow list.
func (s *Server) answerFromCache(dst, query []byte, from netip.AddrPort) ([]byte, bool) {
	if !s.allow.Load().Allows(from.Addr()) {
		return dst, false
	}
	h := s.enter()
	defer h.leave()
	return h.fwd.answerWire(dst, query)
}

// serveWire answers a UDP query in wire form that the cache did not
// answer through the current forwarder's wire path (see
// Forwarder.serveWire); false leaves it to ServeDNS, which also answers
// sources outside the allow list.
func (s *Server) serveWire(w dns.ResponseWriter, query []byte, from netip.AddrPort) bool {
	if !s.allow.Load().Allows(from.Addr()) {
		return false
	}
	h := s.enter()
	defer h.leave()
	return h.fwd.serveWire(w, query)
}

// acceptUDP is the miekg/dns server's accept function (the wildcard
// address's UDP socket), counting what it answers itself (FORMERR,
// NOTIMP) or ignores, as serveMessage does. It is not told the source:
// messages from sources outside the allow list never reach it (see
// refuseOutsiders).
func (s *Server) acceptUDP(dh dns.Header) dns.MsgAcceptAction {
	action := dns.DefaultMsgAcceptFunc(dh)
	switch action {
	case dns.MsgIgnore:
		s.cur.Load().fwd.stats.Ignored.Add(1)
	case dns.MsgReject:
		s.countRejected(true, dns.RcodeFormatError)
	case dns.MsgRejectNotImplemented:
		s.countRejected(true, dns.RcodeNotImplemented)
	}
	return action
}

// invalidUDP counts what the miekg/dns server could not read: too short
// for a header, ignored; else answered FORMERR.
func (s *Server) invalidUDP(m []byte, _ error) {
	if len(m) < headerLen {
		s.cur.Load().fwd.stats.Ignored.Add(1)
		return
	}
	s.countRejected(true, dns.RcodeFormatError)
}

// countRejected counts a query the server answered rcode itself.
func (s *Server) countRejected(udp bool, rcode int) {
	f := s.cur.Load().fwd
	f.countQuery(udp)
	f.countResponse(rcode)
}

// serveMessage answers one query's bytes as the miekg/dns server does:
// its accept function first (responses ignored, other opcodes NOTIMP,
// odd section counts FORMERR), then ServeDNS with the unpacked message,
// FORMERR if it does not unpack. Too short for a header: no answer. A
// NOTIMP or FORMERR has an OPT record when the query reads and has one.
// A source outside the allow list gets REFUSED for anything it is
// answered, counted in NotAllowed, never NOTIMP or FORMERR.
func (s *Server) serveMessage(w dns.ResponseWriter, q []byte) {
	if len(q) < headerLen {
		s.cur.Load().fwd.stats.Ignored.Add(1)
		return
	}
	dh := dns.Header{Id: binary.BigEndian.Uint16(q), Bits: binary.BigEndian.Uint16(q[2:]),
		Qdcount: binary.BigEndian.Uint16(q[4:]), Ancount: binary.BigEndian.Uint16(q[6:]),
		Nscount: binary.BigEndian.Uint16(q[8:]), Arcount: binary.BigEndian.Uint16(q[10:])}
	action := dns.DefaultMsgAcceptFunc(dh)
	if action == dns.MsgIgnore {
		s.cur.Load().fwd.stats.Ignored.Add(1)
		return
	}
	req := new(dns.Msg)
	if req.Unpack(q) == nil {
		if action == dns.MsgAccept {
			s.ServeDNS(w, req)
			return
		}
	} else {
		action = dns.MsgReject
		req = &dns.Msg{MsgHdr: dns.MsgHdr{Id: dh.Id, Opcode: int(dh.Bits>>11) & 0xF,
			RecursionDesired: dh.Bits&(1<<8) != 0, CheckingDisabled: dh.Bits&(1<<4) != 0}}
	}
	if !s.allow.Load().AllowsAddr(w.RemoteAddr()) {
		s.refuse(w, req)
		return
	}
	m := new(dns.Msg)
	m.SetRcodeFormatError(req)
	if action == dns.MsgRejectNotImplemented {
		m.Opcode = req.Opcode
		m.Rcode = dns.RcodeNotImplemented
	}
	if opt := req.IsEdns0(); opt != nil { // a query that reads, with OPT (RFC 6891 §7)
		m.SetEdns0(ednsUDPSize, opt.Do())
	}
	_, udp := w.RemoteAddr().(*net.UDPAddr)
	s.countRejected(udp, m.Rcode)
	w.WriteMsg(m)
}

// refuseOutsiders is the miekg/dns server's reader decorator (the
// wildcard address's UDP socket): a message from a source outside the
// allow list is answered by serveMessage from the reading goroutine
// (REFUSED, or nothing for a response), never handed to the server,
// whose accept function would answer FORMERR or NOTIMP without knowing
// the source.
func (s *Server) refuseOutsiders(r dns.Reader) dns.Reader {
	pr, ok := r.(dns.PacketConnReader)
	if !ok {
		return r // not miekg/dns's own reader: nothing to decorate safely
	}
	return outsiderReader{PacketConnReader: pr, s: s}
}

// outsiderReader is refuseOutsiders' reader.
type outsiderReader struct {
	dns.PacketConnReader
	s *Server
}

func (r outsiderReader) ReadUDP(conn *net.UDPConn, timeout time.Duration) ([]byte, *dns.SessionUDP, error) {
	for {
		m, session, err := r.PacketConnReader.ReadUDP(conn, timeout)
		if err != nil || r.s.allow.Load().AllowsAddr(session.RemoteAddr()) {
			return m, session, err
		}
		r.s.serveMessage(&outsiderWriter{udp: conn, session: session}, m)
	}
}

func (r outsiderReader) ReadPacketConn(conn net.PacketConn, timeout time.Duration) ([]byte, net.Addr, error) {
	for {
		m, from, err := r.PacketConnReader.ReadPacketConn(conn, timeout)
		if err != nil || r.s.allow.Load().AllowsAddr(from) {
			return m, from, err
		}
		r.s.serveMessage(&outsiderWriter{pc: conn, to: from}, m)
	}
}

// outsiderWriter is the dns.ResponseWriter of a message outsiderReader
// answers: through the session (a *net.UDPConn, so that the reply
// leaves from the address the message came to), or to the sender.
type outsiderWriter struct {
	udp     *net.UDPConn
	session *dns.SessionUDP
	pc      net.PacketConn
	to      net.Addr
}

func (w *outsiderWriter) LocalAddr() net.Addr {
	if w.udp != nil {
		return w.udp.LocalAddr()
	}
	return w.pc.LocalAddr()
}

func (w *outsiderWriter) RemoteAddr() net.Addr {
	if w.udp != nil {
		return w.session.RemoteAddr()
	}
	return w.to
}

func (w *outsiderWriter) WriteMsg(m *dns.Msg) error {
	b, err := m.Pack()
	if err != nil {
		return err
	}
	_, err = w.Write(b)
	return err
}

func (w *outsiderWriter) Write(b []byte) (int, error) {
	if w.udp != nil {
		return dns.WriteToSessionUDP(w.udp, b, w.session)
	}
	return w.pc.WriteTo(b, w.to)
}

func (w *outsiderWriter) Close() error        { return nil }
func (w *outsiderWriter) TsigStatus() error   { return nil }
func (w *outsiderWriter) TsigTimersOnly(bool) {}
func (w *outsiderWriter) Hijack()             {}

// Addr is the listening address.
func (s *Server) Addr() net.Addr { return s.pc.LocalAddr() }

// Serve answers queries until Shutdown or Close, or until ctx is done.
func (s *Server) Serve(ctx context.Context) error {
	s.started.Store(true)
	stop := context.AfterFunc(ctx, func() { s.Close() })
	defer stop()
	errc := make(chan error, 2)
	var wg sync.WaitGroup
	// A failure that ends one transport ends the other too, so that Serve
	// returns it: half a DNS server, answering TCP only, would fail every
	// UDP client without a word.
	run := func(serve func() error) {
		wg.Go(func() {
			err := serve()
			if err != nil && !errors.Is(err, net.ErrClosed) {
				s.Close()
			}
			errc <- err
		})
	}
	if s.fast != nil {
		run(s.fast.serve)
	} else {
		run(s.udp.ActivateAndServe)
	}
	run(s.tcp.run)
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
// is done, then closes the forwarders (the current one and any replaced
// one still finishing queries), which fails whatever is left at once.
func (s *Server) Shutdown(ctx context.Context) error {
	var err error
	s.closeOnce.Do(func() {
		if s.udp != nil {
			err = s.udp.ShutdownContext(ctx)
		}
		err = errors.Join(err, s.tcp.shutdown(ctx))
		if s.fast != nil && s.started.Load() {
			// The reader stops; the queries it handed on are answered
			// (until ctx is done) on the socket, still open.
			s.pc.SetReadDeadline(aLongTimeAgo)
			err = errors.Join(err, s.fast.wait(ctx))
		}
		// Also close the UDP socket ourselves: a miekg/dns server not
		// started yet ignores ShutdownContext and would otherwise start
		// later.
		s.pc.Close()
		s.mu.Lock()
		s.stopped = true
		close(s.stopping)
		s.mu.Unlock()
		s.retiring.Wait()
		s.cur.Load().fwd.Close()
		// TCP answers still due past ctx fail now that the forwarders
		// are closed; their goroutines end here.
		s.tcp.wait()
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
