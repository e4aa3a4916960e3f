//go:build linux

// The Linux Reader and Writer: recvmmsg, sendmmsg and UDP_SEGMENT, made
// as raw system calls (unix.RawSyscall6). The sockets are non-blocking
// and MSG_DONTWAIT is set, so none can block, and skipping the
// scheduler's syscall bookkeeping matters for latency. A Go process that
// went idle puts its monitor thread (sysmon) into a deep sleep, and the
// next ordinary system call wakes it first: a futex wake-up on the path
// of every datagram of a request/response exchange.

package udpbatch

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"strconv"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Reader reads up to len(slots) datagrams per system call.
type Reader struct {
	rc       syscall.RawConn
	msgs     []unix.Mmsghdr
	iovs     []unix.Iovec
	names    []unix.RawSockaddrInet6
	oob      []byte // oobLen per datagram, when control messages are wanted
	oobLen   int
	slots    [][]byte
	headroom int
	n        int
	err      error
	readFn   func(fd uintptr) bool
}

// NewReader reads from c into slots: datagram i lands at slots[i][headroom:],
// leaving headroom bytes before it (for a header written in place). With
// wantAddr false no source addresses are kept (a connected socket).
func NewReader(c *net.UDPConn, slots [][]byte, headroom int, wantAddr bool) (*Reader, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	r := &Reader{
		rc:       rc,
		msgs:     make([]unix.Mmsghdr, len(slots)),
		iovs:     make([]unix.Iovec, len(slots)),
		slots:    slots,
		headroom: headroom,
	}
	if wantAddr {
		r.names = make([]unix.RawSockaddrInet6, len(slots))
	}
	for i := range r.msgs {
		b := slots[i][headroom:]
		r.iovs[i].Base = &b[0]
		r.iovs[i].SetLen(len(b))
		r.msgs[i].Hdr.Iov = &r.iovs[i]
		r.msgs[i].Hdr.SetIovlen(1)
		if wantAddr {
			r.msgs[i].Hdr.Name = (*byte)(unsafe.Pointer(&r.names[i]))
		}
	}
	r.readFn = r.read
	return r, nil
}

// NewControlReader is NewReader, with source addresses, that also keeps
// each datagram's control messages (room for oobLen bytes each), for a
// socket that asked for some (IP_RECVORIGDSTADDR, say): see OOB.
func NewControlReader(c *net.UDPConn, slots [][]byte, headroom, oobLen int) (*Reader, error) {
	r, err := NewReader(c, slots, headroom, true)
	if err != nil {
		return nil, err
	}
	r.oobLen = oobLen
	r.oob = make([]byte, oobLen*len(slots))
	for i := range r.msgs {
		r.msgs[i].Hdr.Control = &r.oob[i*oobLen]
	}
	return r, nil
}

// OOB is datagram i's control messages, as the kernel wrote them.
func (r *Reader) OOB(i int) []byte {
	n := min(int(r.msgs[i].Hdr.Controllen), r.oobLen)
	return r.oob[i*r.oobLen : i*r.oobLen+n]
}

// Read waits for at least one datagram and returns how many it read.
func (r *Reader) Read() (int, error) {
	if err := r.rc.Read(r.readFn); err != nil {
		return 0, err
	}
	return r.n, r.err
}

func (r *Reader) read(fd uintptr) bool {
	for i := range r.msgs {
		r.msgs[i].Hdr.Flags = 0
		if r.names != nil {
			r.msgs[i].Hdr.Namelen = unix.SizeofSockaddrInet6
		}
		if r.oob != nil {
			r.msgs[i].Hdr.SetControllen(r.oobLen)
		}
	}
	n, e := mmsg(unix.SYS_RECVMMSG, fd, r.msgs)
	switch e {
	case unix.EAGAIN:
		return false // wait for the poller
	case 0:
		r.n, r.err = n, nil
	default:
		r.n, r.err = 0, e
	}
	return true
}

// Slot is datagram i's whole slot: headroom, then the payload.
func (r *Reader) Slot(i int) []byte { return r.slots[i][:r.headroom+int(r.msgs[i].Len)] }

// Len is the payload length of datagram i.
func (r *Reader) Len(i int) int { return int(r.msgs[i].Len) }

// Truncated reports whether datagram i was longer than its slot.
func (r *Reader) Truncated(i int) bool { return r.msgs[i].Hdr.Flags&unix.MSG_TRUNC != 0 }

// Addr is the source of datagram i, IPv4-mapped addresses unmapped.
func (r *Reader) Addr(i int) netip.AddrPort { return decodeSockaddr(&r.names[i]) }

// Writer queues datagrams and sends them with as few system calls as it
// can: runs of equal-sized datagrams to one destination as one segmented
// send where the kernel supports it, the rest with sendmmsg.
type Writer struct {
	rc    syscall.RawConn
	msgs  []unix.Mmsghdr
	iovs  []unix.Iovec
	names []unix.RawSockaddrInet6
	// dests are the queued datagrams' destinations (zero: connected).
	dests []netip.AddrPort
	n     int

	// A flush sends one message per run of datagrams (see run): a lone
	// datagram, or a run as one segmented message with a control message
	// of its own; all of them in one sendmmsg.
	out      []unix.Mmsghdr
	outFirst []int // the first datagram of each message
	// cmsgs holds a run's control messages, cmsgSpace bytes per message:
	// pkt, then UDP_SEGMENT at segOff. With a source (SetSource), pkt is
	// an IP_PKTINFO or IPV6_PKTINFO control message naming it, which a
	// lone datagram carries alone; without, it is empty.
	cmsgs     []byte
	cmsgSpace int
	segOff    int
	pkt       []byte
	v6        bool // the socket is AF_INET6 (a dual-stack wildcard one too)

	// gso is off after the kernel refused segmented sends outright;
	// gsoMax is the largest segment it took or has not refused yet (a
	// route's MTU bounds it).
	gso    bool
	gsoMax int
	// Per-call state for writeFn.
	batch   []unix.Mmsghdr
	sent    int
	err     error
	writeFn func(fd uintptr) bool

	segmented int // segmented messages sent, for tests
	calls     int // sendmmsg calls made, for tests
}

// maxSegments is the kernel's UDP_MAX_SEGMENTS (64 in Linux ≤ 6.8).
const maxSegments = 64

// maxGSOBytes bounds the payload of one segmented send: it must fit one
// IP packet's length field.
const maxGSOBytes = 65535 - 8 - 40

// NewWriter returns a Writer for c that queues up to size datagrams.
func NewWriter(c *net.UDPConn, size int) (*Writer, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	w := &Writer{
		rc:       rc,
		msgs:     make([]unix.Mmsghdr, size),
		iovs:     make([]unix.Iovec, size),
		names:    make([]unix.RawSockaddrInet6, size),
		dests:    make([]netip.AddrPort, size),
		out:      make([]unix.Mmsghdr, size),
		outFirst: make([]int, size+1),
		gso:      true,
		gsoMax:   1 << 16,
	}
	w.layoutCmsgs(nil)
	w.writeFn = w.write
	var serr error
	if err := rc.Control(func(fd uintptr) {
		var domain int
		domain, serr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_DOMAIN)
		w.v6 = domain == unix.AF_INET6
	}); err != nil {
		return nil, err
	}
	if serr != nil {
		return nil, serr
	}
	return w, nil
}

// SetSource makes the datagrams queued from now on leave from src (an
// address of this host), whatever address the route would pick: a socket
// bound to a wildcard address answers a peer from the address the peer
// sent to. The invalid Addr turns it off. Call it with nothing queued: a
// run takes its source at Flush, a lone datagram at Add. A source the
// kernel refuses fails the send (EINVAL, ENETUNREACH, EADDRNOTAVAIL), a
// run's as if its segments were refused; the caller turns it off then.
func (w *Writer) SetSource(src netip.Addr) {
	if !src.IsValid() {
		w.layoutCmsgs(nil)
		return
	}
	level, typ, n := unix.SOL_IP, unix.IP_PKTINFO, unix.SizeofInet4Pktinfo
	if w.v6 {
		level, typ, n = unix.SOL_IPV6, unix.IPV6_PKTINFO, unix.SizeofInet6Pktinfo
	}
	pkt := make([]byte, unix.CmsgSpace(n))
	h := (*unix.Cmsghdr)(unsafe.Pointer(&pkt[0]))
	h.Level, h.Type = int32(level), int32(typ)
	h.SetLen(unix.CmsgLen(n))
	if w.v6 {
		// IPv4 sources IPv4-mapped: the kernel takes those for IPv4
		// peers of a dual-stack socket.
		pi := (*unix.Inet6Pktinfo)(unsafe.Pointer(&pkt[unix.CmsgLen(0)]))
		pi.Addr = src.As16()
	} else {
		pi := (*unix.Inet4Pktinfo)(unsafe.Pointer(&pkt[unix.CmsgLen(0)]))
		pi.Spec_dst = src.Unmap().As4()
	}
	w.layoutCmsgs(pkt)
}

// layoutCmsgs lays out each message's control messages: pkt (nil: none),
// then a UDP_SEGMENT whose segment size messages fills in for a run.
func (w *Writer) layoutCmsgs(pkt []byte) {
	w.pkt = pkt
	w.segOff = len(pkt)
	w.cmsgSpace = len(pkt) + unix.CmsgSpace(2)
	w.cmsgs = make([]byte, len(w.msgs)*w.cmsgSpace)
	for k := range len(w.msgs) {
		c := w.cmsgs[k*w.cmsgSpace:]
		copy(c, pkt)
		h := (*unix.Cmsghdr)(unsafe.Pointer(&c[w.segOff]))
		h.Level = unix.SOL_UDP
		h.Type = unix.UDP_SEGMENT
		h.SetLen(unix.CmsgLen(2))
	}
}

// Len is the number of queued datagrams.
func (w *Writer) Len() int { return w.n }

// Full reports whether the queue has no room left.
func (w *Writer) Full() bool { return w.n == len(w.msgs) }

// Add queues b for to (the zero AddrPort on a connected socket). b must
// stay untouched until Flush returns. Add on a full Writer panics.
func (w *Writer) Add(b []byte, to netip.AddrPort) {
	i := w.n
	w.n++
	w.iovs[i].Base = nil
	if len(b) > 0 {
		w.iovs[i].Base = &b[0]
	}
	w.iovs[i].SetLen(len(b))
	w.dests[i] = to
	m := &w.msgs[i].Hdr
	*m = unix.Msghdr{Iov: &w.iovs[i]}
	m.SetIovlen(1)
	if to.IsValid() {
		m.Name = (*byte)(unsafe.Pointer(&w.names[i]))
		m.Namelen = encodeSockaddr(&w.names[i], to)
	}
	if w.pkt != nil { // read-only for the kernel: one copy serves every datagram
		m.Control = &w.pkt[0]
		m.SetControllen(len(w.pkt))
	}
}

// Flush sends the queued datagrams in order and empties the queue. It
// stops at the first datagram that fails, so the datagrams that went are
// always the first sent queued: the one at index sent failed with err, and
// those after it were not tried. So a caller knows exactly which datagrams to
// send again or count as lost: a flush that went on past a failure would
// leave a gap that a count cannot describe.
func (w *Writer) Flush() (sent int, err error) {
	defer func() { w.n = 0 }()
	for i := 0; i < w.n; {
		m := w.messages(i)
		done, e := w.sendBatch(w.out[:m])
		for k := range done {
			if w.outFirst[k+1]-w.outFirst[k] > 1 {
				w.segmented++
			}
		}
		sent += w.outFirst[done] - i
		if e == nil {
			return sent, nil
		}
		// Message done failed, and those after it were not tried.
		first, end := w.outFirst[done], w.outFirst[done+1]
		if end-first > 1 && errors.Is(e, unix.EMSGSIZE) {
			// An earlier datagram's error may be pending on the socket (an
			// ICMP "fragmentation needed" on a connected one), reported by
			// this send and so consumed: sending the run once more tells
			// that from the kernel refusing its segments.
			var again int
			if again, e = w.sendBatch(w.out[done : done+1]); again == 1 {
				w.segmented++
				sent += end - first
				i = end
				continue
			}
		}
		if end-first == 1 || !w.refusedGSO(e, int(w.iovs[first].Len)) {
			return sent, e
		}
		// The kernel refused segmentation, not the datagrams: send
		// them one by one, then the rest as before.
		n, e := w.sendBatch(w.msgs[first:end])
		sent += n
		if e != nil {
			return sent, e
		}
		i = end
	}
	return sent, nil
}

// messages builds the messages for the datagrams from i on into out, one
// per run, and returns how many; outFirst[k] is the first datagram of
// message k, outFirst[m] the end.
func (w *Writer) messages(i int) int {
	m := 0
	for i < w.n {
		j := i + 1
		if w.gso {
			j = w.run(i)
		}
		w.out[m] = w.msgs[i]
		if j-i > 1 {
			c := w.cmsgs[m*w.cmsgSpace : (m+1)*w.cmsgSpace]
			binary.NativeEndian.PutUint16(c[w.segOff+unix.CmsgLen(0):], uint16(w.iovs[i].Len))
			h := &w.out[m].Hdr
			h.SetIovlen(j - i)
			h.Control = &c[0]
			h.SetControllen(len(c))
		}
		w.outFirst[m] = i
		m++
		i = j
	}
	w.outFirst[m] = w.n
	return m
}

// refusedGSO reports whether err is the kernel refusing a segmented send
// (rather than the datagrams' fate), and learns not to try it again.
func (w *Writer) refusedGSO(err error, size int) bool {
	switch {
	case errors.Is(err, unix.EINVAL), errors.Is(err, unix.EMSGSIZE):
		// Segments larger than the route's MTU (EMSGSIZE from recent
		// kernels, EINVAL from older ones), or more than the kernel's
		// limit: smaller ones may still go. (A run never holds more than
		// maxGSOBytes, so EMSGSIZE is not the run's total.)
		w.gsoMax = size - 1
		return true
	case errors.Is(err, unix.EIO), errors.Is(err, unix.ENOPROTOOPT), errors.Is(err, unix.EOPNOTSUPP):
		w.gso = false // no checksum offload, or no UDP_SEGMENT at all
		return true
	}
	return false
}

// run returns the end of the run of datagrams starting at i that can go as
// one segmented send: same destination, same size (the last may be
// shorter), within the kernel's limits. Empty datagrams never join a run:
// segmentation cannot produce them.
func (w *Writer) run(i int) int {
	size := w.iovs[i].Len
	if size == 0 || int(size) > w.gsoMax || w.dests[i].IsValid() && w.dests[i].Port() == 0 {
		// Port 0 (a peer that sent from it, spoofed or odd) fails with
		// EINVAL, which must not read as the kernel refusing segmentation.
		return i + 1
	}
	total := size
	j := i + 1
	for ; j < w.n && j-i < maxSegments; j++ {
		if w.dests[j] != w.dests[i] || w.iovs[j].Len > size || w.iovs[j].Len == 0 || total+w.iovs[j].Len > maxGSOBytes {
			break
		}
		total += w.iovs[j].Len
		if w.iovs[j].Len < size {
			j++ // a shorter datagram ends the run
			break
		}
	}
	return j
}

// sendBatch sends msgs in order, stopping at the first the kernel
// refuses; it returns how many went (all before that one) and the error.
func (w *Writer) sendBatch(msgs []unix.Mmsghdr) (sent int, err error) {
	for sent < len(msgs) {
		w.batch = msgs[sent:]
		if err := w.do(); err != nil {
			// sendmmsg reports an error only when its first message
			// failed; after a later failure it returns the count before
			// it, and the next call starts at the failed one.
			return sent, err
		}
		if w.sent <= 0 { // not for a call with messages to send; never spin on it
			return sent, errNothingSent
		}
		sent += w.sent
	}
	return sent, nil
}

// errNothingSent: sendmmsg reported success without sending a datagram.
var errNothingSent = errors.New("udpbatch: sendmmsg sent nothing and reported no error")

// do runs one sendmmsg of batch through the poller.
func (w *Writer) do() error {
	w.sent, w.err = 0, nil
	if err := w.rc.Write(w.writeFn); err != nil {
		return err
	}
	return w.err
}

func (w *Writer) write(fd uintptr) bool {
	n, e := mmsg(unix.SYS_SENDMMSG, fd, w.batch)
	switch e {
	case unix.EAGAIN:
		return false
	case 0:
		w.sent = n
	default:
		w.err = e
	}
	w.calls++
	return true
}

// mmsg is one non-blocking recvmmsg or sendmmsg (trap) of msgs on fd, made
// raw (see the package comment). An interrupted call, not expected when
// nothing blocks, is made again rather than reported.
func mmsg(trap, fd uintptr, msgs []unix.Mmsghdr) (int, unix.Errno) {
	for {
		n, _, e := unix.RawSyscall6(trap, fd, uintptr(unsafe.Pointer(&msgs[0])), uintptr(len(msgs)), unix.MSG_DONTWAIT, 0, 0)
		if e != unix.EINTR {
			return int(n), e
		}
	}
}

func decodeSockaddr(sa *unix.RawSockaddrInet6) netip.AddrPort {
	switch sa.Family {
	case unix.AF_INET:
		sa4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		port := binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&sa4.Port))[:])
		return netip.AddrPortFrom(netip.AddrFrom4(sa4.Addr), port)
	case unix.AF_INET6:
		port := binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:])
		a := netip.AddrFrom16(sa.Addr)
		if a.Is4In6() {
			return netip.AddrPortFrom(a.Unmap(), port)
		}
		if sa.Scope_id != 0 {
			a = a.WithZone(strconv.FormatUint(uint64(sa.Scope_id), 10))
		}
		return netip.AddrPortFrom(a, port)
	}
	return netip.AddrPort{}
}

// encodeSockaddr writes ap as AF_INET for an IPv4 address (which Linux
// takes on IPv4 and dual-stack sockets alike) and AF_INET6 otherwise.
func encodeSockaddr(sa *unix.RawSockaddrInet6, ap netip.AddrPort) uint32 {
	*sa = unix.RawSockaddrInet6{}
	if ap.Addr().Is4() {
		sa4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		sa4.Family = unix.AF_INET
		binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&sa4.Port))[:], ap.Port())
		sa4.Addr = ap.Addr().As4()
		return unix.SizeofSockaddrInet4
	}
	sa.Family = unix.AF_INET6
	binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:], ap.Port())
	sa.Addr = ap.Addr().As16()
	if z := ap.Addr().Zone(); z != "" {
		if id, err := strconv.ParseUint(z, 10, 32); err == nil {
			sa.Scope_id = uint32(id)
		} else if ifi, err := net.InterfaceByName(z); err == nil {
			sa.Scope_id = uint32(ifi.Index)
		}
	}
	return unix.SizeofSockaddrInet6
}
