package testnet

import (
	"encoding/binary"
	"net/netip"

	"golang.org/x/sys/unix"
)

// InjectICMPUnreachable sends to 127.0.0.1 an ICMP destination unreachable
// with code, quoting a UDP datagram from → to, as a router or firewall on
// the way to would; mtu is the next hop's MTU that code 4 (fragmentation
// needed) carries. It needs a raw socket (CAP_NET_RAW); the error says so
// when there is none.
func InjectICMPUnreachable(code byte, mtu uint16, from, to netip.AddrPort) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_ICMP)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	inner := make([]byte, 28) // the quoted IPv4 header and UDP header
	inner[0], inner[8], inner[9] = 0x45, 64, unix.IPPROTO_UDP
	binary.BigEndian.PutUint16(inner[2:], 28+5)
	f4, t4 := from.Addr().As4(), to.Addr().As4()
	copy(inner[12:], f4[:])
	copy(inner[16:], t4[:])
	binary.BigEndian.PutUint16(inner[10:], InetChecksum(inner[:20]))
	binary.BigEndian.PutUint16(inner[20:], from.Port())
	binary.BigEndian.PutUint16(inner[22:], to.Port())
	binary.BigEndian.PutUint16(inner[24:], 8+5)
	msg := append([]byte{3, code, 0, 0, 0, 0, 0, 0}, inner...)
	binary.BigEndian.PutUint16(msg[6:], mtu)
	binary.BigEndian.PutUint16(msg[2:], InetChecksum(msg))
	return unix.Sendto(fd, msg, 0, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}})
}

// InetChecksum is the Internet checksum (RFC 1071) of b.
func InetChecksum(b []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return ^uint16(s)
}
