//go:build linux

package sockdiag

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"sync"

	"golang.org/x/sys/unix"
)

// Layout of the kernel's structures (linux/inet_diag.h, sock_diag.h).
const (
	nlmsgHdrLen     = 16
	reqLen          = 56 // struct inet_diag_req_v2
	diagMsgLen      = 72 // struct inet_diag_msg
	attrSkMeminfo   = 7  // INET_DIAG_SKMEMINFO
	meminfoRmem     = 0  // SK_MEMINFO_RMEM_ALLOC
	meminfoRcvbuf   = 1  // SK_MEMINFO_RCVBUF
	meminfoDrops    = 8  // SK_MEMINFO_DROPS
	respBufLen      = 1024
	queryTimeoutSec = 1 // the kernel answers within the send; this only guards a lost answer
)

// Querier asks about sockets; it is safe for concurrent use (queries take
// turns on one netlink socket).
type Querier struct {
	mu   sync.Mutex
	fd   int
	seq  uint32
	req  [nlmsgHdrLen + reqLen]byte
	resp [respBufLen]byte
}

// Open returns a Querier, or an error where the kernel has no socket
// diagnostics (or a sandbox forbids netlink).
func Open() (*Querier, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return nil, fmt.Errorf("sockdiag: %w", err)
	}
	tv := unix.Timeval{Sec: queryTimeoutSec}
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("sockdiag: %w", err)
	}
	if err := unix.Connect(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("sockdiag: %w", err)
	}
	return &Querier{fd: fd}, nil
}

// Close releases the netlink socket.
func (q *Querier) Close() error { return unix.Close(q.fd) }

// UDPReceiver reports the receive memory of the UDP socket on this host
// that a datagram from `from` to `to` would be delivered to: the kernel
// looks it up as it would for such a datagram, so a relay bound to a
// wildcard address is found too. Both addresses are of one family.
func (q *Querier) UDPReceiver(from, to netip.AddrPort) (Mem, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.seq++
	q.encode(from, to)
	if err := retryEINTR(func() error { return unix.Send(q.fd, q.req[:], 0) }); err != nil {
		return Mem{}, fmt.Errorf("sockdiag: %w", err)
	}
	for range 4 { // skip answers to earlier queries that timed out
		var n int
		err := retryEINTR(func() (err error) { n, err = unix.Read(q.fd, q.resp[:]); return err })
		if err != nil {
			return Mem{}, fmt.Errorf("sockdiag: %w", err)
		}
		m, seq, err := parse(q.resp[:n])
		if seq == q.seq {
			return m, err
		}
	}
	return Mem{}, errors.New("sockdiag: no answer to the query")
}

// retryEINTR makes a call again when a signal interrupted it (the Go
// runtime's preemption signal can; a socket with a receive timeout is not
// restarted by the kernel).
func retryEINTR(call func() error) error {
	for {
		if err := call(); err != unix.EINTR {
			return err
		}
	}
}

// encode writes the request: a netlink header and struct inet_diag_req_v2
// asking for one UDP socket with its memory counters.
func (q *Querier) encode(from, to netip.AddrPort) {
	b := q.req[:]
	clear(b)
	ne := binary.NativeEndian
	ne.PutUint32(b[0:], uint32(len(b)))
	ne.PutUint16(b[4:], unix.SOCK_DIAG_BY_FAMILY)
	ne.PutUint16(b[6:], unix.NLM_F_REQUEST)
	ne.PutUint32(b[8:], q.seq)
	r := b[nlmsgHdrLen:]
	r[0] = unix.AF_INET
	if to.Addr().Is6() && !to.Addr().Is4In6() {
		r[0] = unix.AF_INET6
	}
	r[1] = unix.IPPROTO_UDP
	r[2] = 1 << (attrSkMeminfo - 1) // idiag_ext
	ne.PutUint32(r[4:], ^uint32(0)) // every state
	// struct inet_diag_sockid. The kernel's UDP lookup takes "src" as the
	// datagram's source and "dst" as the receiving socket's address.
	id := r[8:]
	binary.BigEndian.PutUint16(id[0:], from.Port())
	binary.BigEndian.PutUint16(id[2:], to.Port())
	putAddr(id[4:20], from.Addr())
	putAddr(id[20:36], to.Addr())
	ne.PutUint32(id[40:], ^uint32(0)) // INET_DIAG_NOCOOKIE
	ne.PutUint32(id[44:], ^uint32(0))
}

func putAddr(dst []byte, a netip.Addr) {
	if a.Is4() || a.Is4In6() {
		b := a.Unmap().As4()
		copy(dst, b[:])
		return
	}
	b := a.As16()
	copy(dst, b[:])
}

// parse reads one answer: the socket's memory, or the kernel's error.
func parse(m []byte) (Mem, uint32, error) {
	ne := binary.NativeEndian
	if len(m) < nlmsgHdrLen {
		return Mem{}, 0, errors.New("sockdiag: short answer")
	}
	seq := ne.Uint32(m[8:])
	switch ne.Uint16(m[4:]) {
	case unix.NLMSG_ERROR:
		if len(m) < nlmsgHdrLen+4 {
			return Mem{}, seq, errors.New("sockdiag: short error")
		}
		switch errno := unix.Errno(-int32(ne.Uint32(m[nlmsgHdrLen:]))); errno {
		case unix.ENOENT:
			return Mem{}, seq, ErrNoSocket
		default:
			return Mem{}, seq, fmt.Errorf("sockdiag: %w", errno)
		}
	case unix.SOCK_DIAG_BY_FAMILY:
	default:
		return Mem{}, seq, errors.New("sockdiag: unexpected answer")
	}
	if len(m) < nlmsgHdrLen+diagMsgLen {
		return Mem{}, seq, errors.New("sockdiag: short answer")
	}
	for attrs := m[nlmsgHdrLen+diagMsgLen:]; len(attrs) >= 4; {
		l, typ := int(ne.Uint16(attrs)), ne.Uint16(attrs[2:])
		if l < 4 || l > len(attrs) {
			break
		}
		if v := attrs[4:l]; typ == attrSkMeminfo && len(v) >= 4*(meminfoRcvbuf+1) {
			mem := Mem{Queued: int(ne.Uint32(v[4*meminfoRmem:])), Limit: int(ne.Uint32(v[4*meminfoRcvbuf:]))}
			if len(v) >= 4*(meminfoDrops+1) {
				mem.Drops = ne.Uint32(v[4*meminfoDrops:])
			}
			return mem, seq, nil
		}
		attrs = attrs[min((l+3)&^3, len(attrs)):]
	}
	return Mem{}, seq, errors.New("sockdiag: answer without memory counters")
}
