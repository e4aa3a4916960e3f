package tunnel

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/socksfwd/socksfwd/internal/peertest"
	"github.com/socksfwd/socksfwd/internal/rules"
	"github.com/socksfwd/socksfwd/internal/testnet"
	"github.com/socksfwd/socksfwd/socksclient"
	"github.com/socksfwd/socksfwd/socksclient/sockstest"
)

// cmsg builds one control message as the kernel lays it out.
func cmsg(level, typ int32, data []byte) []byte {
	b := make([]byte, unix.CmsgSpace(len(data)))
	h := (*unix.Cmsghdr)(unsafe.Pointer(&b[0]))
	h.Level, h.Type = level, typ
	h.SetLen(unix.CmsgLen(len(data)))
	copy(b[unix.CmsgLen(0):], data)
	return b
}

func sockaddr4(ap netip.AddrPort) []byte {
	b := make([]byte, unix.SizeofSockaddrInet4)
	binary.NativeEndian.PutUint16(b, unix.AF_INET)
	binary.BigEndian.PutUint16(b[2:], ap.Port())
	a := ap.Addr().As4()
	copy(b[4:], a[:])
	return b
}

func sockaddr6(ap netip.AddrPort) []byte {
	b := make([]byte, unix.SizeofSockaddrInet6)
	binary.NativeEndian.PutUint16(b, unix.AF_INET6)
	binary.BigEndian.PutUint16(b[2:], ap.Port())
	a := ap.Addr().As16()
	copy(b[8:], a[:])
	return b
}

func TestTProxyUDPParseOrigDst(t *testing.T) {
	v4 := netip.MustParseAddrPort("198.51.100.7:53")
	v6 := netip.MustParseAddrPort("[2001:db8::7]:443")
	mapped := netip.MustParseAddrPort("[::ffff:198.51.100.7]:53")
	other := cmsg(unix.SOL_SOCKET, unix.SCM_TIMESTAMP, make([]byte, 16))
	for _, tc := range []struct {
		name string
		oob  []byte
		want netip.AddrPort
		ok   bool
	}{
		{"v4", cmsg(unix.SOL_IP, unix.IP_ORIGDSTADDR, sockaddr4(v4)), v4, true},
		{"v6", cmsg(unix.SOL_IPV6, unix.IPV6_ORIGDSTADDR, sockaddr6(v6)), v6, true},
		{"mapped", cmsg(unix.SOL_IPV6, unix.IPV6_ORIGDSTADDR, sockaddr6(mapped)), v4, true},
		{"after another", append(append([]byte{}, other...), cmsg(unix.SOL_IP, unix.IP_ORIGDSTADDR, sockaddr4(v4))...), v4, true},
		{"none", nil, netip.AddrPort{}, false},
		{"only another", other, netip.AddrPort{}, false},
		{"cut", cmsg(unix.SOL_IP, unix.IP_ORIGDSTADDR, sockaddr4(v4))[:unix.CmsgLen(4)], netip.AddrPort{}, false},
		{"short data", cmsg(unix.SOL_IP, unix.IP_ORIGDSTADDR, sockaddr4(v4)[:8]), netip.AddrPort{}, false},
		{"wrong family", cmsg(unix.SOL_IP, unix.IP_ORIGDSTADDR, sockaddr6(v6)[:16]), netip.AddrPort{}, false},
	} {
		got, ok := parseOrigDst(tc.oob)
		if got != tc.want || ok != tc.ok {
			t.Errorf("%s: got %v %v, want %v %v", tc.name, got, ok, tc.want, tc.ok)
		}
	}
	oob := cmsg(unix.SOL_IPV6, unix.IPV6_ORIGDSTADDR, sockaddr6(v6))
	if n := testing.AllocsPerRun(100, func() { parseOrigDst(oob) }); n != 0 {
		t.Errorf("parseOrigDst allocates %v times", n)
	}
}

func FuzzTProxyUDPParseOrigDst(f *testing.F) {
	f.Add(cmsg(unix.SOL_IP, unix.IP_ORIGDSTADDR, sockaddr4(netip.MustParseAddrPort("198.51.100.7:53"))))
	f.Add(cmsg(unix.SOL_IPV6, unix.IPV6_ORIGDSTADDR, sockaddr6(netip.MustParseAddrPort("[2001:db8::7]:443"))))
	f.Add(append(cmsg(unix.SOL_SOCKET, 1, []byte{1, 2, 3}), cmsg(unix.SOL_IP, unix.IP_ORIGDSTADDR, sockaddr4(netip.MustParseAddrPort("10.0.0.1:1")))...))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, oob []byte) {
		if ap, ok := parseOrigDst(oob); ok && (!ap.IsValid() || ap.Addr().Is4In6()) {
			t.Fatalf("ok with %v", ap)
		}
	})
}

// checksumOK verifies a UDP segment's checksum the way a receiver does:
// the sum over pseudo-header and segment, checksum included, is all ones.
func checksumOK(seg []byte, src, dst netip.Addr) bool {
	var pseudo []byte
	if src.Is4() {
		s, d := src.As4(), dst.As4()
		pseudo = append(append(pseudo, s[:]...), d[:]...)
		pseudo = append(pseudo, 0, unix.IPPROTO_UDP, byte(len(seg)>>8), byte(len(seg)))
	} else {
		s, d := src.As16(), dst.As16()
		pseudo = append(append(pseudo, s[:]...), d[:]...)
		pseudo = binary.BigEndian.AppendUint32(pseudo, uint32(len(seg)))
		pseudo = append(pseudo, 0, 0, 0, unix.IPPROTO_UDP)
	}
	all := append(pseudo, seg...)
	if len(all)%2 == 1 {
		all = append(all, 0)
	}
	var sum uint32
	for i := 0; i < len(all); i += 2 {
		sum += uint32(all[i])<<8 | uint32(all[i+1])
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return sum == 0xffff
}

func TestTProxyUDPChecksum(t *testing.T) {
	b := make([]byte, 8+2000)
	for _, pair := range [][2]string{
		{"198.51.100.7:7", "127.0.0.2:40000"},
		{"[2001:db8::7]:53", "[fd00:5::2]:1234"},
	} {
		src, dst := netip.MustParseAddrPort(pair[0]), netip.MustParseAddrPort(pair[1])
		for _, size := range []int{0, 1, 7, 8, 9, 512, 1999} {
			payload := make([]byte, size)
			for i := range payload {
				payload[i] = byte(i*7 + size)
			}
			n := buildUDP(b, payload, src, dst)
			seg := b[:n]
			if binary.BigEndian.Uint16(seg[0:]) != src.Port() || binary.BigEndian.Uint16(seg[2:]) != dst.Port() || int(binary.BigEndian.Uint16(seg[4:])) != n {
				t.Fatalf("%v→%v: header % x", src, dst, seg[:8])
			}
			if !checksumOK(seg, src.Addr(), dst.Addr()) {
				t.Errorf("%v→%v, %d bytes: bad checksum %#04x", src, dst, size, binary.BigEndian.Uint16(seg[6:]))
			}
		}
	}
}

// tproxyMark is the --mark of the namespace tests.
const tproxyMark = 0x438

// tproxyUDPNetns prepares the namespace of a transparent UDP test: the
// rules socksfwd prints for a TPROXY UDP listener on port (local scope,
// IPv4 and IPv6, with the mark) and the routes they need; and, standing
// for the network, a test table that gives the proxy's own datagrams (from
// 127.0.0.1 or ::1 to UDP ports 7 and 9) the mark, as a proxy on another
// host would not be captured, and sends them to the echo servers: every
// address of 198.51.100.0/24 and 2001:db8::/64 answers there.
// Clients send from 127.0.0.2, 127.0.0.3 and fd00:5::2, which the test
// table leaves alone.
func tproxyUDPNetns(t *testing.T, port uint16, echo4, echo6 netip.AddrPort) {
	t.Helper()
	cfg := rules.Config{
		Mode: rules.ModeTProxy, Scope: rules.ScopeLocal, UDPPort: int(port), Mark: tproxyMark, IPv6: true,
		Proxies: []netip.Addr{netip.MustParseAddr("127.0.0.1")},
	}
	script, err := rules.NFT(cfg)
	if err != nil {
		t.Fatal(err)
	}
	run(t, script, "nft", "-f", "-")
	for _, line := range rules.Routes(cfg) {
		run(t, "", strings.Fields(line)...)
	}
	run(t, fmt.Sprintf(`
table inet tproxyudptest {
	chain proxy_mark {
		type route hook output priority mangle - 10; policy accept;
		ip saddr 127.0.0.1 udp dport { 7, 9 } meta mark set %#[1]x
		ip6 saddr ::1 udp dport { 7, 9 } meta mark set %#[1]x
	}
	chain network {
		type nat hook output priority -100; policy accept;
		meta mark %#[1]x ip daddr 198.51.100.0/24 udp dport { 7, 9 } dnat ip to %[2]s
		meta mark %#[1]x ip6 daddr 2001:db8::/64 udp dport { 7, 9 } dnat ip6 to %[3]s
	}
}`, tproxyMark, echo4, echo6), "nft", "-f", "-")
}

// startTransparentUDP serves a TransparentUDP on [::]:0 through the
// proxy until the test's end.
func startTransparentUDP(t *testing.T, proxy string) (*TransparentUDP, *logBuf) {
	t.Helper()
	pc, err := ListenTransparentUDP("[::]:0")
	if err != nil {
		t.Fatal(err)
	}
	logs := &logBuf{}
	tu := NewTransparentUDP(TransparentUDPConfig{
		Name:      "tproxy-udp",
		Upstreams: socksclient.NewUpstreams(&socksclient.Dialer{ProxyAddr: proxy, HandshakeTimeout: 5 * time.Second}),
		Logger:    zerolog.New(logs),
	}, pc)
	served := make(chan error, 1)
	go func() { served <- tu.Serve(context.Background()) }()
	t.Cleanup(func() {
		tu.Close()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return tu, logs
}

// appClient is an application socket on addr.
func appClient(t *testing.T, addr string) *net.UDPConn {
	t.Helper()
	pc, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.MustParseAddrPort(addr)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	return pc
}

// exchange sends msg from c to dst and checks that the echo comes back
// with dst as its source.
func exchange(t *testing.T, c *net.UDPConn, dst, msg string) {
	t.Helper()
	to := netip.MustParseAddrPort(dst)
	if _, err := c.WriteToUDPAddrPort([]byte(msg), to); err != nil {
		t.Fatalf("send to %s: %v", dst, err)
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 2048)
	n, from, err := c.ReadFromUDPAddrPort(buf)
	if err != nil {
		t.Fatalf("%s → %s: no reply: %v", c.LocalAddr(), dst, err)
	}
	from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
	if from != to || string(buf[:n]) != msg {
		t.Fatalf("%s → %s: reply %q from %s, want %q from %s", c.LocalAddr(), dst, buf[:n], from, msg, to)
	}
}

// startEchoes brings the namespace's loopback up, with the routes of
// routeTestNetsToLo and the clients' IPv6 address, and starts the UDP
// echoes that stand for every remote.
func startEchoes(t *testing.T) (echo4, echo6 netip.AddrPort) {
	t.Helper()
	routeTestNetsToLo(t)
	run(t, "", "ip", "-6", "addr", "add", "fd00:5::2/128", "dev", "lo", "nodad")
	e4, err := testnet.UDPEchoOn(t, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	e6, err := testnet.UDPEchoOn(t, &net.UDPAddr{IP: net.IPv6loopback})
	if err != nil {
		t.Fatal(err)
	}
	return e4.LocalAddr().(*net.UDPAddr).AddrPort(), e6.LocalAddr().(*net.UDPAddr).AddrPort()
}

// TestTransparentUDPIPv4: datagrams TPROXY sent to the listener reach
// their original destinations through the proxy, and the replies come
// back with the remote's address as their source; a client's two
// destinations share one association, two clients have one each, and the
// reply socket of a remote serves both.
func TestTransparentUDPIPv4(t *testing.T) {
	if !inFreshNetns(t) {
		return
	}
	echo4, echo6 := startEchoes(t)
	proxy := newSocks(t, sockstest.Config{})
	tu, logs := startTransparentUDP(t, proxy.Addr())
	tproxyUDPNetns(t, tu.Addr().(*net.UDPAddr).AddrPort().Port(), echo4, echo6)

	a := appClient(t, "127.0.0.2:0")
	exchange(t, a, "198.51.100.7:7", "a to .7")
	exchange(t, a, "198.51.100.8:9", "a to .8")
	exchange(t, a, "198.51.100.7:7", "a to .7 again") // the fast path, on a live association
	if n := proxy.Handshakes(); n != 1 {
		t.Errorf("one client, two destinations: %d associations, want 1", n)
	}
	b := appClient(t, "127.0.0.3:0")
	exchange(t, b, "198.51.100.7:7", "b to .7")
	if n := proxy.Handshakes(); n != 2 {
		t.Errorf("two clients: %d associations, want 2", n)
	}
	st := tu.Stats()
	if got := tu.Sessions(); got != 2 {
		t.Errorf("sessions = %d, want 2", got)
	}
	if got := st.ReplySockets.Load(); got != 2 {
		t.Errorf("reply sockets = %d, want 2 (one per remote, shared)", got)
	}
	if st.DatagramsUp.Load() != 4 || st.DatagramsDown.Load() != 4 || st.Received.Load() != 4 {
		t.Errorf("received %d, up %d, down %d; want 4 each", st.Received.Load(), st.DatagramsUp.Load(), st.DatagramsDown.Load())
	}
	if st.ReplyBindFailures.Load() != 0 || st.RawReplies.Load() != 0 {
		t.Errorf("bind failures %d, raw replies %d, want none\n%s", st.ReplyBindFailures.Load(), st.RawReplies.Load(), logs)
	}
}

// TestTransparentUDPNotRedirected: a datagram sent straight to the
// listener (no rule sent it) is dropped, counted and logged once, and
// never reaches the proxy.
func TestTransparentUDPNotRedirected(t *testing.T) {
	peertest.RequireRoot(t) // IP_TRANSPARENT
	proxy := newSocks(t, sockstest.Config{})
	tu, logs := startTransparentUDP(t, proxy.Addr())
	c := appClient(t, "127.0.0.1:0")
	port := tu.Addr().(*net.UDPAddr).AddrPort().Port()
	for range 3 {
		if _, err := c.WriteToUDPAddrPort([]byte("straight"), netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port)); err != nil {
			t.Fatal(err)
		}
	}
	logs.waitFor(t, "not redirected")
	deadline := time.After(10 * time.Second)
	for tu.Stats().DroppedNotRedirected.Load() < 3 {
		select {
		case <-deadline:
			t.Fatalf("dropped %d of 3", tu.Stats().DroppedNotRedirected.Load())
		case <-time.After(10 * time.Millisecond):
		}
	}
	if n := strings.Count(logs.String(), "\n"); n != 1 {
		t.Errorf("%d log lines, want 1:\n%s", n, logs)
	}
	if proxy.Handshakes() != 0 || tu.Sessions() != 0 {
		t.Errorf("handshakes %d, sessions %d, want none", proxy.Handshakes(), tu.Sessions())
	}
}

// TestListenTransparentUDPWithoutPermission: without CAP_NET_ADMIN the
// listener is refused with an error that says what is missing.
func TestListenTransparentUDPWithoutPermission(t *testing.T) {
	if os.Geteuid() == 0 && os.Getenv(noNetAdminEnv) == "" {
		peertest.Require(t, "setpriv")
		rerun(t, noNetAdminEnv+"=1", "setpriv", "--bounding-set", "-net_admin,-net_raw", "--")
		return
	}
	pc, err := ListenTransparentUDP("127.0.0.1:0")
	if err == nil {
		pc.Close()
		t.Fatal("no error without CAP_NET_ADMIN")
	}
	if !errors.Is(err, ErrTransparentUDPNeedsNetAdmin) || !strings.Contains(err.Error(), "CAP_NET_ADMIN") {
		t.Errorf("err = %v, want ErrTransparentUDPNeedsNetAdmin", err)
	}
}
