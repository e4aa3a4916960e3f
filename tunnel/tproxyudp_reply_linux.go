package tunnel

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
	"unsafe"

	"github.com/hashicorp/golang-lru/v2/simplelru"
	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/socksfwd/socksfwd/internal/logthrottle"
)

// replyBindLogEvery: a remote whose reply socket cannot bind is logged
// once, and again at most this often (its socket is remade after idling).
const replyBindLogEvery = time.Hour

// A reply socket that could not bind, and a raw socket that could not be
// made, are tried again after replyRetryMin, doubling up to replyRetryMax:
// a passing failure (EMFILE, ENOBUFS) must not last as long as the flow,
// and one that stays (a local service holds the port) costs a few system
// calls a minute.
const (
	replyRetryMin = time.Second
	replyRetryMax = 30 * time.Second
)

// replySocket carries replies from one remote address to any client: a
// UDP socket bound (transparently) to the remote's address and port. When
// that bind failed, pc is nil and replies go through the raw socket until
// retryAt, when get binds again. An entry is not changed once in the pool
// (a retry replaces it), so senders read pc without the lock.
type replySocket struct {
	pc      *net.UDPConn
	lastUse atomic.Int64  // unix nanos
	retryAt int64         // unix nanos; with pc nil only
	backoff time.Duration // the wait before retryAt
}

// replyPool holds the reply sockets, one per remote address, shared by
// every client, in a bounded LRU; each is closed on eviction, after idling
// for idle, and on close.
type replyPool struct {
	idle    time.Duration
	control func(network, address string, c syscall.RawConn) error
	stats   *TransparentUDPStats
	// logs throttles the bind failures, a key per remote; causeLogs the
	// lines with a key of their own (refused sources, this host's own
	// addresses, each raw socket),
	// which remotes filling logs' keys must not silence.
	logs, causeLogs *logthrottle.Throttle
	logger          zerolog.Logger
	name            string

	mu  sync.Mutex
	lru *simplelru.LRU[netip.AddrPort, *replySocket]
	raw [2]*rawUDPSender // IPv4, IPv6; made on first need
	// rawRetry is when a raw socket that could not be made is tried
	// again, rawBackoff the wait before it (0 once made).
	rawRetry   [2]time.Time
	rawBackoff [2]time.Duration
	// rawUse is when each raw socket last sent: one unused for idle is
	// closed, since the kernel hands a raw UDP socket (filtered, but
	// copied first) every UDP packet the host receives.
	rawUse [2]time.Time
	closed bool
}

func newReplyPool(size int, idle time.Duration, cfg *TransparentUDPConfig, stats *TransparentUDPStats) *replyPool {
	p := &replyPool{
		idle: idle, control: cfg.Control, stats: stats,
		logs: logthrottle.New(replyBindLogEvery), causeLogs: logthrottle.New(replyBindLogEvery), logger: cfg.Logger, name: cfg.Name,
	}
	p.lru, _ = simplelru.NewLRU(size, p.evicted) // size > 0: no error
	return p
}

// evicted runs under p.mu, for an LRU eviction and for Remove.
func (p *replyPool) evicted(_ netip.AddrPort, s *replySocket) {
	if s.pc != nil {
		s.pc.Close()
		p.stats.ReplySockets.Add(-1)
	}
}

// send delivers payload to client with remote as its source. A socket
// evicted between lookup and write is made again, once. A remote no
// reply socket may bind is refused (false), logged once per remote.
func (p *replyPool) send(payload []byte, remote, client netip.AddrPort) bool {
	if !isRemoteSource(remote) {
		p.refuse(remote)
		return false
	}
	for range 2 {
		s := p.get(remote)
		if s == nil {
			return false // closed
		}
		if s.pc == nil {
			return p.sendRaw(payload, remote, client)
		}
		_, err := s.pc.WriteToUDPAddrPort(payload, client)
		if err == nil {
			return true
		}
		if !errors.Is(err, net.ErrClosed) {
			return false
		}
	}
	return false
}

// isRemoteSource reports whether a reply may carry remote as its source.
// Its reply socket is bound to it: a wildcard address or port 0 would
// bind this host's own port (0.0.0.0:53 takes a local resolver's), a
// multicast or broadcast address is no host's. Only a buggy or hostile
// proxy names one.
func isRemoteSource(remote netip.AddrPort) bool {
	a := remote.Addr()
	return remote.Port() != 0 && a.IsValid() && !a.IsUnspecified() && !a.IsMulticast() &&
		a != netip.AddrFrom4([4]byte{255, 255, 255, 255})
}

// refuse logs, once a period, a reply whose source the proxy
// named is no remote's (see isRemoteSource).
func (p *replyPool) refuse(remote netip.AddrPort) {
	// One key for them all: a proxy that names such sources can name
	// any number of them.
	if ok, suppressed := p.causeLogs.Allow("refused source"); ok {
		p.logger.Warn().Str("listener", p.name).Str("remote", remote.String()).Func(logthrottle.Repeats("repeats", suppressed)).
			Msg("UDP reply dropped: the proxy named a wildcard, port 0, multicast or broadcast source, which no reply socket may bind")
	}
}

// get returns remote's reply socket, made if needed; nil once closed. A
// remote whose bind failed is bound again once its back-off is over.
func (p *replyPool) get(remote netip.AddrPort) *replySocket {
	now := time.Now().UnixNano()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil
	}
	prev, ok := p.lru.Get(remote)
	if ok && (prev.pc != nil || now < prev.retryAt) {
		prev.lastUse.Store(now)
		return prev
	}
	s := &replySocket{}
	s.lastUse.Store(now)
	pc, err := p.bind(remote)
	if err != nil {
		// This host's own address is no failure (its replies go by the
		// raw socket, counted there), and shares one log key: a proxy
		// may name any number of its ports.
		local := errors.Is(err, errLocalSource)
		if ok {
			s.backoff = prev.backoff
		} else if !local {
			p.stats.ReplyBindFailures.Add(1) // a remote once per failing streak
		}
		s.backoff = nextRetry(s.backoff)
		s.retryAt = now + int64(s.backoff)
		logs, key := p.logs, remote.String()
		if local {
			logs, key = p.causeLogs, "local source"
		}
		if logNow, suppressed := logs.Allow(key); logNow {
			p.logger.Warn().Err(err).Str("listener", p.name).Str("remote", remote.String()).Func(logthrottle.Repeats("repeats", suppressed)).
				Msg(replyBindFailedLine(err, hasCap(unix.CAP_NET_RAW)))
		}
	} else {
		s.pc = pc
		p.stats.ReplySockets.Add(1)
	}
	p.lru.Add(remote, s) // replaces a failed entry, which holds no socket
	return s
}

// errLocalSource: a reply's source is one of this host's own addresses,
// where no reply socket is bound.
var errLocalSource = errors.New("the address is this host's own")

// replyBindFailedLine says why a reply socket could not bind its remote's
// address and what becomes of the replies: sent from a raw socket when
// the process may open one (CAP_NET_RAW), else dropped and counted.
func replyBindFailedLine(err error, raw bool) string {
	msg := "UDP reply socket cannot bind the remote's address"
	switch {
	case errors.Is(err, unix.EADDRINUSE):
		msg += ": a local service holds that address and port"
	case errors.Is(err, unix.EACCES):
		msg += ": its port is below ip_unprivileged_port_start, which needs CAP_NET_BIND_SERVICE"
	case errors.Is(err, errLocalSource):
		msg = "UDP reply socket not bound: the remote's address is this host's own, where it would take a local service's datagrams"
	}
	if !raw {
		return msg + "; replies from it are dropped and counted (sending them from a raw socket needs CAP_NET_RAW)"
	}
	if errors.Is(err, unix.EADDRINUSE) || errors.Is(err, errLocalSource) || errors.Is(err, unix.EACCES) {
		return msg + "; replies from it go through a raw socket" // a retry would fail the same way
	}
	return msg + "; replies from it go through a raw socket until a retry binds it"
}

// nextRetry is the wait after a failure that came after waiting prev (0:
// the first failure): replyRetryMin, doubling up to replyRetryMax.
func nextRetry(prev time.Duration) time.Duration {
	return min(max(2*prev, replyRetryMin), replyRetryMax)
}

// bind opens a UDP socket bound to remote's address and port, which is
// not this host's: IP_TRANSPARENT allows it, SO_REUSEADDR lets it share
// the port with the other reply sockets of that port.
func (p *replyPool) bind(remote netip.AddrPort) (*net.UDPConn, error) {
	// A source that is this host's own (a process beside a proxy on this
	// host, or a proxy naming one): a socket bound there would take the
	// datagrams of a local service on that port, or its port, and nobody
	// reads it. Such replies go by the raw socket. A route lookup that
	// fails leaves the bind to decide, as before.
	if a := remote.Addr().Unmap(); a.IsLoopback() {
		return nil, errLocalSource
	} else if local, err := routesLocal(a); err == nil && local {
		return nil, errLocalSource
	}
	network := "udp4"
	if remote.Addr().Is6() {
		network = "udp6"
	}
	lc := net.ListenConfig{Control: func(network, address string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			if serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); serr != nil {
				return
			}
			if network == "udp6" {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1)
			} else {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TRANSPARENT, 1)
			}
		})
		if err == nil {
			err = serr
		}
		if err == nil && p.control != nil {
			err = p.control(network, address, c)
		}
		return err
	}}
	pc, err := lc.ListenPacket(context.Background(), network, remote.String())
	if err != nil {
		return nil, err
	}
	return pc.(*net.UDPConn), nil
}

// rawLogKeys are causeLogs' keys for a raw socket that cannot be
// made, per family.
var rawLogKeys = [2]string{"raw socket IPv4", "raw socket IPv6"}

// sendRaw sends through the family's raw socket, made on first need; one
// that could not be made is tried again after a back-off.
func (p *replyPool) sendRaw(payload []byte, remote, client netip.AddrPort) bool {
	fam := 0
	if remote.Addr().Is6() {
		fam = 1
	}
	now := time.Now()
	p.mu.Lock()
	p.rawUse[fam] = now
	r := p.raw[fam]
	if r == nil && !p.closed && !now.Before(p.rawRetry[fam]) {
		var err error
		r, err = newRawUDPSender(fam == 1, p.control)
		p.raw[fam] = r
		if err != nil {
			p.rawBackoff[fam] = nextRetry(p.rawBackoff[fam])
			p.rawRetry[fam] = now.Add(p.rawBackoff[fam])
			if ok, suppressed := p.causeLogs.Allow(rawLogKeys[fam]); ok {
				p.logger.Warn().Err(err).Str("listener", p.name).Func(logthrottle.Repeats("repeats", suppressed)).
					Msg("no raw socket for UDP replies whose reply socket cannot bind; they are dropped and counted until a retry makes one")
			}
		} else {
			p.rawBackoff[fam] = 0
		}
	}
	p.mu.Unlock()
	if r == nil {
		return false
	}
	if err := r.send(payload, remote, client); err != nil {
		return false
	}
	p.stats.RawReplies.Add(1)
	return true
}

// expire closes the reply sockets, and the raw ones, unused for idle.
func (p *replyPool) expire() {
	now := time.Now()
	cutoff := now.Add(-p.idle).UnixNano()
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, k := range p.lru.Keys() {
		if s, ok := p.lru.Peek(k); ok && s.lastUse.Load() < cutoff {
			p.lru.Remove(k)
		}
	}
	for i, r := range p.raw {
		if r != nil && now.Sub(p.rawUse[i]) >= p.idle {
			r.close()
			p.raw[i] = nil
		}
	}
}

// Len is the number of remotes held.
func (p *replyPool) Len() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.lru.Len()
}

func (p *replyPool) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed = true
	p.lru.Purge()
	for i, r := range p.raw {
		if r != nil {
			r.close()
			p.raw[i] = nil
		}
	}
}

// rawUDPSender sends UDP datagrams with any source address: a raw socket
// (IPPROTO_UDP) writes the UDP header itself, and the source address is
// chosen per datagram with IP_PKTINFO (IPV6_PKTINFO), which
// IP_TRANSPARENT allows to be another host's. The kernel writes the IP
// header, so it fragments as for any socket. Receiving is filtered out:
// a raw UDP socket would get a copy of every UDP packet.
type rawUDPSender struct {
	v6 bool

	mu   sync.Mutex // guards fd's use and the buffers
	fd   int
	buf  []byte // UDP header, then the payload
	oob  []byte
	name unix.RawSockaddrInet6
	iov  unix.Iovec
	msg  unix.Msghdr
}

// rawSendTimeout bounds a send that finds the socket's buffer full.
const rawSendTimeout = time.Second

func newRawUDPSender(v6 bool, control func(network, address string, c syscall.RawConn) error) (*rawUDPSender, error) {
	family, level, opt, network := unix.AF_INET, unix.SOL_IP, unix.IP_TRANSPARENT, "ip4:udp"
	oobLen := unix.CmsgSpace(unix.SizeofInet4Pktinfo)
	if v6 {
		family, level, opt, network = unix.AF_INET6, unix.SOL_IPV6, unix.IPV6_TRANSPARENT, "ip6:udp"
		oobLen = unix.CmsgSpace(unix.SizeofInet6Pktinfo)
	}
	fd, err := unix.Socket(family, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_UDP)
	if err != nil {
		if errors.Is(err, unix.EPERM) {
			return nil, fmt.Errorf("raw socket for UDP replies (needs CAP_NET_RAW): %w", err)
		}
		return nil, fmt.Errorf("raw socket for UDP replies: %w", err)
	}
	err = setRawOptions(fd, level, opt)
	if err == nil && control != nil {
		err = control(network, "", fdRawConn(fd))
	}
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("raw socket for UDP replies: %w", err)
	}
	r := &rawUDPSender{v6: v6, fd: fd, buf: make([]byte, 8+65535), oob: make([]byte, oobLen)}
	r.msg.Name = (*byte)(unsafe.Pointer(&r.name))
	r.msg.Iov = &r.iov
	r.msg.SetIovlen(1)
	r.msg.Control = &r.oob[0]
	r.msg.SetControllen(oobLen)
	h := (*unix.Cmsghdr)(unsafe.Pointer(&r.oob[0]))
	if v6 {
		h.Level, h.Type = unix.SOL_IPV6, unix.IPV6_PKTINFO
		h.SetLen(unix.CmsgLen(unix.SizeofInet6Pktinfo))
	} else {
		h.Level, h.Type = unix.SOL_IP, unix.IP_PKTINFO
		h.SetLen(unix.CmsgLen(unix.SizeofInet4Pktinfo))
	}
	return r, nil
}

// setRawOptions sets a raw sender's options on fd: IP_TRANSPARENT (opt at
// level), a filter that drops everything received, and the send timeout.
func setRawOptions(fd, level, opt int) error {
	if err := unix.SetsockoptInt(fd, level, opt, 1); err != nil {
		return fmt.Errorf("set IP_TRANSPARENT on the raw socket: %w", err)
	}
	drop := []unix.SockFilter{{Code: unix.BPF_RET | unix.BPF_K, K: 0}}
	if err := unix.SetsockoptSockFprog(fd, unix.SOL_SOCKET, unix.SO_ATTACH_FILTER, &unix.SockFprog{Len: 1, Filter: &drop[0]}); err != nil {
		return fmt.Errorf("attach a drop-all filter to the raw socket: %w", err)
	}
	tv := unix.NsecToTimeval(rawSendTimeout.Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv); err != nil {
		return fmt.Errorf("set SO_SNDTIMEO on the raw socket: %w", err)
	}
	return nil
}

// send sends payload from src to dst (one family: the sender's).
func (r *rawUDPSender) send(payload []byte, src, dst netip.AddrPort) error {
	if len(payload) > len(r.buf)-8 {
		return errRawTooLarge
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.fd < 0 {
		return net.ErrClosed
	}
	n := buildUDP(r.buf, payload, src, dst)
	r.iov.Base = &r.buf[0]
	r.iov.SetLen(n)
	data := r.oob[unix.CmsgLen(0):]
	if r.v6 {
		pi := (*unix.Inet6Pktinfo)(unsafe.Pointer(&data[0]))
		*pi = unix.Inet6Pktinfo{Addr: src.Addr().As16()}
		r.name = unix.RawSockaddrInet6{Family: unix.AF_INET6, Addr: dst.Addr().As16()}
		r.msg.Namelen = unix.SizeofSockaddrInet6
	} else {
		pi := (*unix.Inet4Pktinfo)(unsafe.Pointer(&data[0]))
		*pi = unix.Inet4Pktinfo{Spec_dst: src.Addr().As4()}
		sa4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(&r.name))
		*sa4 = unix.RawSockaddrInet4{Family: unix.AF_INET, Addr: dst.Addr().As4()}
		r.msg.Namelen = unix.SizeofSockaddrInet4
	}
	for {
		_, _, e := unix.Syscall(unix.SYS_SENDMSG, uintptr(r.fd), uintptr(unsafe.Pointer(&r.msg)), 0)
		switch e {
		case 0:
			return nil
		case unix.EINTR:
			continue
		}
		return e
	}
}

func (r *rawUDPSender) close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.fd >= 0 {
		unix.Close(r.fd)
		r.fd = -1
	}
}

// errRawTooLarge: a reply longer than a UDP datagram can be.
var errRawTooLarge = errors.New("udp reply too large for a datagram")

// buildUDP writes into b a UDP header from src to dst and the payload,
// with the checksum over the pseudo-header of src's family, and returns
// the length.
func buildUDP(b, payload []byte, src, dst netip.AddrPort) int {
	n := 8 + len(payload)
	binary.BigEndian.PutUint16(b[0:], src.Port())
	binary.BigEndian.PutUint16(b[2:], dst.Port())
	binary.BigEndian.PutUint16(b[4:], uint16(n))
	b[6], b[7] = 0, 0
	copy(b[8:], payload)
	binary.BigEndian.PutUint16(b[6:], udpChecksum(b[:n], src.Addr(), dst.Addr()))
	return n
}

// udpChecksum is the UDP checksum of seg (header with a zero checksum,
// then payload) between src and dst: the ones' complement sum over the
// pseudo-header and seg. Zero is sent as 0xffff (zero means none).
func udpChecksum(seg []byte, src, dst netip.Addr) uint16 {
	var sum uint64
	if src.Is4() {
		s, d := src.As4(), dst.As4()
		sum += uint64(binary.BigEndian.Uint16(s[0:])) + uint64(binary.BigEndian.Uint16(s[2:]))
		sum += uint64(binary.BigEndian.Uint16(d[0:])) + uint64(binary.BigEndian.Uint16(d[2:]))
	} else {
		s, d := src.As16(), dst.As16()
		for i := 0; i < 16; i += 2 {
			sum += uint64(binary.BigEndian.Uint16(s[i:])) + uint64(binary.BigEndian.Uint16(d[i:]))
		}
	}
	sum += unix.IPPROTO_UDP + uint64(len(seg))
	for len(seg) >= 8 {
		v := binary.BigEndian.Uint64(seg)
		sum += v>>48 + v>>32&0xffff + v>>16&0xffff + v&0xffff
		seg = seg[8:]
	}
	for len(seg) >= 2 {
		sum += uint64(binary.BigEndian.Uint16(seg))
		seg = seg[2:]
	}
	if len(seg) == 1 {
		sum += uint64(seg[0]) << 8
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	c := ^uint16(sum)
	if c == 0 {
		c = 0xffff
	}
	return c
}

// fdRawConn gives a control function a plain descriptor.
type fdRawConn int

func (c fdRawConn) Control(f func(fd uintptr)) error { f(uintptr(c)); return nil }
func (c fdRawConn) Read(f func(fd uintptr) bool) error {
	return errors.New("fdRawConn: Read not supported")
}
func (c fdRawConn) Write(f func(fd uintptr) bool) error {
	return errors.New("fdRawConn: Write not supported")
}
