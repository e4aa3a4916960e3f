package socksclient

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/socksfwd/socksfwd/internal/sockbuf"
	"github.com/socksfwd/socksfwd/internal/udpbatch"
)

// MaxUDPHeaderLen is the longest UDP request header (RFC 1928 §7): RSV,
// FRAG, ATYP, a 255-byte name with its length, and the port. Callers that
// want zero-copy sends leave this much headroom before the payload.
const MaxUDPHeaderLen = 2 + 1 + 1 + 1 + MaxNameLen + 2

// MaxUDPDatagram is the largest UDP payload over IPv4 (65535 - 20 - 8); the
// SOCKS header comes out of it.
const MaxUDPDatagram = 65507

var (
	// ErrAssociationClosed: the proxy closed the UDP ASSOCIATE control
	// connection, which ends the association (RFC 1928 §7); a new one is
	// needed. After the owner's own Close, operations report net.ErrClosed
	// instead, as any closed socket does.
	ErrAssociationClosed = errors.New("socks udp associate: the proxy closed the control connection; the association is gone")
	// ErrDatagramTooLarge: payload plus SOCKS header exceed one datagram.
	ErrDatagramTooLarge = errors.New("socks udp: datagram too large for the SOCKS header")
)

// UDPStats counts datagrams an association dropped, by reason, and how
// often its batches waited for a relay on this host (relayroom.go).
type UDPStats struct {
	Fragmented  atomic.Int64 // FRAG != 0, which we do not reassemble
	Malformed   atomic.Int64 // header did not parse
	TooLarge    atomic.Int64 // payload plus header over MaxUDPDatagram
	RelayWaits  atomic.Int64 // batches held until the relay had room
	RelayStalls atomic.Int64 // waits given up: the relay made no room in time
	// WrongPeer: the header named another sender than the peer a read
	// batch was told to expect (UDPReadBatch.OnlyFrom). Relays pass on
	// what anyone sends to their outside port.
	WrongPeer atomic.Int64

	// parent, when set, is added to as well: a listener's totals, current
	// while its associations live rather than when they end.
	parent *UDPStats
}

// add counts one event in the field of s that field picks, and in s's
// parent.
func (s *UDPStats) add(field func(*UDPStats) *atomic.Int64) {
	field(s).Add(1)
	if s.parent != nil {
		field(s.parent).Add(1)
	}
}

func fragmented(s *UDPStats) *atomic.Int64  { return &s.Fragmented }
func malformed(s *UDPStats) *atomic.Int64   { return &s.Malformed }
func tooLarge(s *UDPStats) *atomic.Int64    { return &s.TooLarge }
func relayWaits(s *UDPStats) *atomic.Int64  { return &s.RelayWaits }
func relayStalls(s *UDPStats) *atomic.Int64 { return &s.RelayStalls }
func wrongPeer(s *UDPStats) *atomic.Int64   { return &s.WrongPeer }

// UDPConn is a UDP ASSOCIATE session: a local UDP socket that talks to the
// proxy's relay, alive while the TCP control connection is. It implements
// net.PacketConn (addresses may be Addr values with names, which the proxy
// resolves); WritePacket and ReadPacket are the allocation-free forms.
type UDPConn struct {
	ctrl  net.Conn
	pc    *net.UDPConn
	relay netip.AddrPort
	stats UDPStats

	watchDone chan struct{}
	ended     atomic.Int32 // assocOpen until the proxy or the owner ends it
	closeOnce sync.Once
}

// Who ended an association: the first to do so decides which error later
// operations report.
const (
	assocOpen int32 = iota
	assocEndedByProxy
	assocClosedByOwner
)

// Associate asks the proxy for a UDP relay. REP 7, or a server that closes
// the connection without replying (OpenSSH's ssh -D), gives an error
// matching ErrCommandNotSupported.
func (d *Dialer) Associate(ctx context.Context) (*UDPConn, error) {
	// DST is the address we will send from; we cannot know it before the
	// relay's address is, so send zeros as RFC 1928 §7 allows.
	conn, reply, err := d.request(ctx, CmdUDPAssociate, Addr{IP: netip.IPv4Unspecified()})
	if err != nil {
		return nil, d.opError(CmdUDPAssociate, "udp", nil, err)
	}
	relay, err := d.relayAddrPort(ctx, substituteUnspecified(reply.Addr, conn), conn)
	if err != nil {
		conn.Close()
		return nil, d.opError(CmdUDPAssociate, "udp", nil, err)
	}
	// A socket connected to the relay: the kernel drops datagrams from
	// anyone else, and sends skip the per-datagram route lookup. Opened
	// through a net.Dialer so that Control (a socket mark) applies before
	// the first datagram leaves.
	pc, err := d.dialRelay(ctx, relay)
	if err != nil {
		conn.Close()
		return nil, d.opError(CmdUDPAssociate, "udp", nil, err)
	}
	sockbuf.Grow(pc)
	KeepControlAlive(conn)
	u := &UDPConn{ctrl: conn, pc: pc, relay: relay, watchDone: make(chan struct{})}
	go u.watchControl()
	return u, nil
}

// relayAddrPort is the relay's address from the reply: as given, or, for
// a name (RFC 1928 allows one in BND.ADDR), resolved here, preferring the
// family of the control connection, by which the proxy is reachable.
func (d *Dialer) relayAddrPort(ctx context.Context, relay Addr, conn net.Conn) (netip.AddrPort, error) {
	if ap, ok := relay.AddrPort(); ok {
		return withProxyZone(ap, conn), nil
	}
	// Part of setting up the association: bounded as the handshake is.
	ctx, cancel := context.WithTimeout(ctx, d.handshakeTimeout())
	defer cancel()
	ips, err := d.lookup(ctx, relay.Name)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("resolving the UDP relay's name %q from the proxy's reply: %w", relay.Name, err)
	}
	ip := ips[0].Unmap()
	if proxy, err := netip.ParseAddrPort(conn.RemoteAddr().String()); err == nil {
		for _, cand := range ips {
			if cand.Unmap().Is4() == proxy.Addr().Unmap().Is4() {
				ip = cand.Unmap()
				break
			}
		}
	}
	return netip.AddrPortFrom(ip, relay.Port), nil
}

// withProxyZone gives a link-local IPv6 relay address the zone (the
// interface) by which the control connection reached the proxy: a SOCKS
// address carries no zone, and a link-local one means nothing without it.
func withProxyZone(ap netip.AddrPort, conn net.Conn) netip.AddrPort {
	a := ap.Addr()
	if !a.Is6() || !a.IsLinkLocalUnicast() || a.Zone() != "" {
		return ap
	}
	if proxy, ok := conn.RemoteAddr().(*net.TCPAddr); ok && proxy.Zone != "" {
		return netip.AddrPortFrom(a.WithZone(proxy.Zone), ap.Port())
	}
	return ap
}

// dialRelay opens the association's UDP socket, connected to relay, with
// Control applied. The relay is an IP address, so nothing is resolved.
func (d *Dialer) dialRelay(ctx context.Context, relay netip.AddrPort) (*net.UDPConn, error) {
	nd := net.Dialer{Control: d.Control}
	c, err := nd.DialContext(ctx, "udp", relay.String())
	if err != nil {
		return nil, err
	}
	return c.(*net.UDPConn), nil
}

// watchControl waits for the control connection to end. The proxy sends
// nothing on it after the reply, so any read result means it is gone; the
// UDP socket is then closed so that readers fail with ErrAssociationClosed,
// and the control connection last, so that a proxy (or test) seeing it
// close knows the association is already marked ended.
func (u *UDPConn) watchControl() {
	defer close(u.watchDone)
	var b [1]byte
	u.ctrl.Read(b[:])
	u.ended.CompareAndSwap(assocOpen, assocEndedByProxy)
	u.pc.Close()
	u.ctrl.Close()
}

// Relay is the proxy's UDP relay address.
func (u *UDPConn) Relay() netip.AddrPort { return u.relay }

// Stats returns the drop counters.
func (u *UDPConn) Stats() *UDPStats { return &u.stats }

// CountInto has every count of u also added to totals (a listener's, for
// its metrics), from the moment of the call. Call it before u is used.
func (u *UDPConn) CountInto(totals *UDPStats) { u.stats.parent = totals }

// Alive reports whether the control connection still stands.
func (u *UDPConn) Alive() bool { return u.ended.Load() == assocOpen }

// WritePacket sends buf[off:] to dst through the relay. The header is
// written into buf[:off] right before the payload, so nothing is copied;
// off must be at least the header's length (MaxUDPHeaderLen always is).
func (u *UDPConn) WritePacket(buf []byte, off int, dst Addr) error {
	start, err := u.wrap(buf, off, dst)
	if err != nil {
		return err
	}
	_, err = u.pc.Write(buf[start:])
	return u.fail(err)
}

// wrap writes the header for dst into buf right before off and returns
// where the datagram starts.
func (u *UDPConn) wrap(buf []byte, off int, dst Addr) (int, error) {
	hlen := udpHeaderLen(dst)
	if hlen < 0 || off < hlen {
		return 0, fmt.Errorf("socks udp: %d bytes of headroom, need %d", off, hlen)
	}
	if len(buf)-off+hlen > MaxUDPDatagram {
		u.stats.add(tooLarge)
		return 0, ErrDatagramTooLarge
	}
	start := off - hlen
	if _, err := (UDPHeader{Addr: dst}).AppendTo(buf[start:start]); err != nil {
		return 0, err
	}
	return start, nil
}

// UDPBatch queues datagrams for one association and sends them with as
// few system calls as the kernel allows (sendmmsg, and one segmented send
// for a run of equal-sized datagrams). A batch for a relay on this host
// waits, before it goes, until the relay's socket has room for it (see
// relayroom.go). It belongs to one goroutine.
type UDPBatch struct {
	u    *UDPConn
	w    *udpbatch.Writer
	room *relayRoom // nil: the relay is elsewhere
	need int        // what the queued datagrams cost the relay's buffer
}

// NewBatch returns a batch of up to n datagrams for u.
func (u *UDPConn) NewBatch(n int) (*UDPBatch, error) {
	w, err := udpbatch.NewWriter(u.pc, n)
	if err != nil {
		return nil, err
	}
	from := u.pc.LocalAddr().(*net.UDPAddr).AddrPort()
	return &UDPBatch{u: u, w: w, room: newRelayRoom(from, u.relay, &u.stats)}, nil
}

// Conn is the association the batch sends on.
func (b *UDPBatch) Conn() *UDPConn { return b.u }

// Add queues buf[off:] for dst, writing the SOCKS header into buf[:off]
// as WritePacket does. buf must stay untouched until Flush.
func (b *UDPBatch) Add(buf []byte, off int, dst Addr) error {
	start, err := b.u.wrap(buf, off, dst)
	if err != nil {
		return err
	}
	b.w.Add(buf[start:], netip.AddrPort{})
	if b.room != nil {
		b.need += chargedSize(len(buf) - start)
	}
	return nil
}

// Len is the number of queued datagrams; Full reports no room for more.
func (b *UDPBatch) Len() int   { return b.w.Len() }
func (b *UDPBatch) Full() bool { return b.w.Full() }

// Flush sends the queued datagrams and returns how many went. It stops at
// the first failure: the n that went are the first n queued, the one after
// them failed with the error (ErrAssociationClosed once the control
// connection is gone), and the rest were not sent. The queue is empty
// afterwards either way.
func (b *UDPBatch) Flush() (int, error) {
	if b.room != nil && b.need > 0 {
		b.room.wait(b.need)
		b.need = 0
	}
	n, err := b.w.Flush()
	return n, b.u.fail(err)
}

// ReadPacket reads the next datagram from the relay into buf and returns
// where its payload starts and ends and the remote peer that sent it.
// Datagrams from strangers, fragments and malformed headers are dropped and
// counted. Make buf MaxUDPDatagram long to never truncate.
func (u *UDPConn) ReadPacket(buf []byte) (off, n int, from Addr, err error) {
	for {
		// The socket is connected to the relay, so only its datagrams arrive.
		n, err := u.pc.Read(buf)
		if err != nil {
			return 0, 0, Addr{}, u.fail(err)
		}
		if hlen, from, ok := u.unwrap(buf[:n]); ok {
			return hlen, n, from, nil
		}
	}
}

// unwrap parses a datagram from the relay and returns where its payload
// starts and who sent it; fragments and malformed headers are counted and
// not ok.
func (u *UDPConn) unwrap(d []byte) (hlen int, from Addr, ok bool) {
	h, hlen, err := ParseUDPHeader(d)
	if err != nil {
		u.stats.add(malformed)
		return 0, Addr{}, false
	}
	if h.Frag != 0 {
		u.stats.add(fragmented)
		return 0, Addr{}, false
	}
	return hlen, h.Addr, true
}

// WriteDatagram sends d, a datagram that already carries its SOCKS header
// (what a SOCKS server's own client sent to it), to the proxy's relay as it
// is: a server chaining UDP ASSOCIATE to this one passes datagrams on
// without unwrapping them.
func (u *UDPConn) WriteDatagram(d []byte) error {
	_, err := u.pc.Write(d)
	return u.fail(err)
}

// ReadDatagram reads the next datagram from the relay into buf, header
// and all, and returns its length; fragments and malformed headers are
// dropped and counted as ReadPacket does. It allocates nothing.
func (u *UDPConn) ReadDatagram(buf []byte) (int, error) {
	for {
		n, err := u.pc.Read(buf)
		if err != nil {
			return 0, u.fail(err)
		}
		if _, err := CheckUDPHeader(buf[:n]); err == nil {
			return n, nil
		} else if errors.Is(err, ErrFragmented) {
			u.stats.add(fragmented)
		} else {
			u.stats.add(malformed)
		}
	}
}

// CheckUDPHeader reports the length of the SOCKS header that starts d, or
// why d cannot be relayed: ErrFragmented for FRAG != 0, a *ProtocolError
// for a malformed header. Unlike ParseUDPHeader it allocates nothing,
// which a relay that only passes datagrams on needs.
func CheckUDPHeader(d []byte) (int, error) {
	if len(d) < 5 {
		return 0, errTruncated("udp header")
	}
	alen, err := addrLen(d[3], d[4])
	if err != nil {
		return 0, relabel(err, "udp header")
	}
	if len(d) < 3+alen {
		return 0, errTruncated("udp header")
	}
	if d[2] != 0 {
		return 0, ErrFragmented
	}
	return 3 + alen, nil
}

// UDPReadBatch reads datagrams from the relay, as many per system call as
// are waiting (recvmmsg), into slots given once; datagrams that ReadPacket
// would drop are dropped and counted the same way. It belongs to one
// goroutine.
type UDPReadBatch struct {
	u        *UDPConn
	r        *udpbatch.Reader
	payloads [][]byte
	peer     Addr // with only: the sender Read lets through
	only     bool
}

// NewReadBatch returns a reader into slots, each of which should be
// MaxUDPDatagram long to never truncate.
func (u *UDPConn) NewReadBatch(slots [][]byte) (*UDPReadBatch, error) {
	r, err := udpbatch.NewReader(u.pc, slots, 0, false)
	if err != nil {
		return nil, err
	}
	return &UDPReadBatch{u: u, r: r, payloads: make([][]byte, 0, len(slots))}, nil
}

// OnlyFrom has Read drop, and count as WrongPeer, datagrams whose header
// names another sender than peer: another IP address or port, or only
// another port when peer is a name (the proxy resolved it, so its address
// is not known here). A relay passes on replies from whoever reaches its
// outside port, so an association used for one target needs this to keep
// off-path senders out. Call it before the first Read.
func (b *UDPReadBatch) OnlyFrom(peer Addr) {
	peer.IP = peer.IP.Unmap()
	b.peer, b.only = peer, true
}

// Read waits for datagrams and returns how many of those it read carry a
// payload (possibly none, when every one was dropped). Payload(i) is the
// i-th, valid until the next Read. The error is ErrAssociationClosed once
// the control connection is gone; one the socket reported while the
// association is alive (ECONNREFUSED, an ICMP error for a datagram sent
// earlier) is passed on as it is, and the next Read may well succeed.
func (b *UDPReadBatch) Read() (int, error) {
	n, err := b.r.Read()
	if err != nil {
		return 0, b.u.fail(err)
	}
	b.payloads = b.payloads[:0]
	for i := range n {
		d := b.r.Slot(i)
		// The header is only checked, not parsed into an Addr: a name in
		// it would cost an allocation, and the sender is compared in place.
		hlen, err := CheckUDPHeader(d)
		switch {
		case errors.Is(err, ErrFragmented):
			b.u.stats.add(fragmented)
		case err != nil:
			b.u.stats.add(malformed)
		case b.only && !headerFrom(d[:hlen], b.peer):
			b.u.stats.add(wrongPeer)
		default:
			b.payloads = append(b.payloads, d[hlen:])
		}
	}
	return len(b.payloads), nil
}

// headerFrom reports whether hdr, a checked UDP request header, names
// peer (an IP address unmapped, or a name): its address and port, or its
// port alone when peer is a name.
func headerFrom(hdr []byte, peer Addr) bool {
	if binary.BigEndian.Uint16(hdr[len(hdr)-2:]) != peer.Port {
		return false
	}
	if peer.Name != "" {
		return true
	}
	switch AddrType(hdr[3]) {
	case AddrIPv4:
		return netip.AddrFrom4([4]byte(hdr[4:8])) == peer.IP
	case AddrIPv6:
		return netip.AddrFrom16([16]byte(hdr[4:20])).Unmap() == peer.IP
	}
	return false // a name: the relay would have resolved it to reach peer
}

// Payload is the i-th datagram's payload from the last Read.
func (b *UDPReadBatch) Payload(i int) []byte { return b.payloads[i] }

// fail turns the socket's error once the association has ended into the
// reason: ErrAssociationClosed when the proxy ended it, net.ErrClosed when
// the owner closed it (a normal end its read loops can tell apart).
func (u *UDPConn) fail(err error) error {
	if err == nil {
		return nil
	}
	switch u.ended.Load() {
	case assocEndedByProxy:
		return ErrAssociationClosed
	case assocClosedByOwner:
		if !errors.Is(err, net.ErrClosed) {
			return fmt.Errorf("socks udp associate: closed: %w", net.ErrClosed)
		}
	}
	return err
}

// ReadFrom implements net.PacketConn; addr is an Addr. The datagram is
// read into p and its payload moved to the front, so p must hold the
// header too (MaxUDPHeaderLen more than the payload).
func (u *UDPConn) ReadFrom(p []byte) (int, net.Addr, error) {
	off, n, from, err := u.ReadPacket(p)
	if err != nil {
		return 0, nil, err
	}
	return copy(p, p[off:n]), from, nil
}

// WriteTo implements net.PacketConn. addr may be an Addr (names are sent
// to the proxy to resolve), a *net.UDPAddr, or anything whose String is
// host:port.
func (u *UDPConn) WriteTo(p []byte, addr net.Addr) (int, error) {
	var dst Addr
	switch a := addr.(type) {
	case Addr:
		dst = a
	case *Addr:
		dst = *a
	case *net.UDPAddr:
		dst = AddrFromAddrPort(a.AddrPort())
	default:
		var err error
		if dst, err = ParseAddr(addr.String()); err != nil {
			return 0, err
		}
	}
	buf := make([]byte, MaxUDPHeaderLen+len(p))
	copy(buf[MaxUDPHeaderLen:], p)
	if err := u.WritePacket(buf, MaxUDPHeaderLen, dst); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Close ends the association: the control connection and the socket.
// Operations after it, and those it interrupts, report net.ErrClosed.
func (u *UDPConn) Close() error {
	u.closeOnce.Do(func() {
		// Before anything is closed, so no operation it interrupts can see
		// the control connection's end and blame the proxy.
		u.ended.CompareAndSwap(assocOpen, assocClosedByOwner)
		u.ctrl.Close()
		u.pc.Close()
	})
	<-u.watchDone
	return nil
}

func (u *UDPConn) LocalAddr() net.Addr                { return u.pc.LocalAddr() }
func (u *UDPConn) SetDeadline(t time.Time) error      { return u.pc.SetDeadline(t) }
func (u *UDPConn) SetReadDeadline(t time.Time) error  { return u.pc.SetReadDeadline(t) }
func (u *UDPConn) SetWriteDeadline(t time.Time) error { return u.pc.SetWriteDeadline(t) }

var _ net.PacketConn = (*UDPConn)(nil)

// udpHeaderLen is the encoded header length for dst, -1 if it cannot be
// encoded.
func udpHeaderLen(dst Addr) int {
	switch {
	case dst.Name != "":
		if len(dst.Name) > MaxNameLen {
			return -1
		}
		return 3 + 2 + len(dst.Name) + 2
	case dst.IP.Is4():
		return 3 + 1 + 4 + 2
	case dst.IP.Is6():
		return 3 + 1 + 16 + 2
	}
	return -1
}

// UDPTargetConn is an association used for one fixed target: a net.Conn
// whose Write sends to the target and whose Read returns what comes back.
type UDPTargetConn struct {
	*UDPConn
	target Addr
}

// DialUDP associates and fixes the target ("host:port"; names are
// resolved by the proxy).
func (d *Dialer) DialUDP(ctx context.Context, target string) (*UDPTargetConn, error) {
	dst, err := ParseAddr(target)
	if err != nil {
		return nil, d.opError(CmdUDPAssociate, "udp", nil, err)
	}
	u, err := d.Associate(ctx)
	if err != nil {
		return nil, err
	}
	dst.IP = dst.IP.Unmap()
	return &UDPTargetConn{UDPConn: u, target: dst}, nil
}

// Read returns the payload of the next datagram from the target. Others
// are dropped and counted as WrongPeer: a relay passes on what anyone
// sends to its outside port. The target's port alone is compared when it
// is a name (the proxy resolved it).
func (c *UDPTargetConn) Read(p []byte) (int, error) {
	for {
		n, from, err := c.ReadFrom(p)
		if err != nil {
			return n, err
		}
		if a := from.(Addr); a.Port == c.target.Port && (c.target.Name != "" || a.Name == "" && a.IP.Unmap() == c.target.IP) {
			return n, nil
		}
		c.stats.add(wrongPeer)
	}
}

// Write sends p to the target.
func (c *UDPTargetConn) Write(p []byte) (int, error) { return c.WriteTo(p, c.target) }

// RemoteAddr is the target.
func (c *UDPTargetConn) RemoteAddr() net.Addr { return c.target }

var _ net.Conn = (*UDPTargetConn)(nil)

// IsICMPError reports whether err, from a read or a send on an
// association's socket (connected to the relay), is an ICMP error the
// kernel queued for an earlier datagram: the relay's port unreachable
// (ECONNREFUSED), a host or network unreachable or a firewall's
// "administratively prohibited" on the way (EHOSTUNREACH, ENETUNREACH,
// EHOSTDOWN; EACCES for IPv6), a protocol unreachable
// (ENOPROTOOPT), a parameter problem (EPROTO), or "fragmentation needed"
// (IPv4) and "packet too big" (IPv6) from a router with a smaller MTU on
// the way (EMSGSIZE). Each is reported once, and the relay may go on
// taking other datagrams: it ends neither the socket nor the association.
func IsICMPError(err error) bool { return isErrno(err, icmpErrnos[:]) }

var icmpErrnos = [...]syscall.Errno{syscall.ECONNREFUSED, syscall.EHOSTUNREACH, syscall.ENETUNREACH,
	syscall.EHOSTDOWN, syscall.EACCES, syscall.ENOPROTOOPT, syscall.EPROTO, syscall.EMSGSIZE}

// isErrno reports whether err is one of errnos.
func isErrno(err error, errnos []syscall.Errno) bool {
	for _, e := range errnos {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}
