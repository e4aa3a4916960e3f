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
	"testing/synctest"
	"time"
	"unsafe"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/socksfwd/socksfwd/internal/allowlist"
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

// TestTProxyUDPArrivedOnLoopback: the packet info's interface index is
// read from IP_PKTINFO or IPV6_PKTINFO, after other control messages too.
func TestTProxyUDPArrivedOnLoopback(t *testing.T) {
	pktinfo4 := func(ifindex int32) []byte {
		b := make([]byte, unix.SizeofInet4Pktinfo)
		binary.NativeEndian.PutUint32(b, uint32(ifindex))
		return cmsg(unix.SOL_IP, unix.IP_PKTINFO, b)
	}
	pktinfo6 := func(ifindex int32) []byte {
		b := make([]byte, unix.SizeofInet6Pktinfo)
		binary.NativeEndian.PutUint32(b[16:], uint32(ifindex))
		return cmsg(unix.SOL_IPV6, unix.IPV6_PKTINFO, b)
	}
	dst := cmsg(unix.SOL_IP, unix.IP_ORIGDSTADDR, sockaddr4(netip.MustParseAddrPort("198.51.100.7:53")))
	for _, tc := range []struct {
		name string
		oob  []byte
		want bool
	}{
		{"v4 lo", pktinfo4(1), true},
		{"v4 eth", pktinfo4(2), false},
		{"v6 lo", pktinfo6(1), true},
		{"v6 eth", pktinfo6(3), false},
		{"after the destination", append(append([]byte{}, dst...), pktinfo4(1)...), true},
		{"none", dst, false},
		{"short", cmsg(unix.SOL_IP, unix.IP_PKTINFO, []byte{1, 0}), false},
	} {
		if got := arrivedOnLoopback(tc.oob); got != tc.want {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
	oob := append(append([]byte{}, dst...), pktinfo6(1)...)
	if n := testing.AllocsPerRun(100, func() { parseOrigDst(oob); arrivedOnLoopback(oob) }); n != 0 {
		t.Errorf("reading the control messages allocates %v times", n)
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
		arrivedOnLoopback(oob)
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
	// Summed with its own checksum in place, a segment sums to all ones.
	return testnet.InetChecksum(append(pseudo, seg...)) == 0
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

// tproxyUDPNetns loads the rules socksfwd prints for a TPROXY UDP
// listener on port (local scope, IPv4 and IPv6, with the mark; startEchoes
// added the routes they need); and, standing
// for the network, a test table that gives the proxy's own datagrams (from
// 127.0.0.1 or fd00:5::1 to UDP ports 7 and 9) the mark, as a proxy on another
// host would not be captured, and sends them to the echo servers: every
// address of 198.51.100.0/24 and 2001:db8::/64 answers there, on ports 7
// and 9 (an echo per port and family, so that two flows from one relay
// socket never map to one NAT tuple).
// Clients send from 127.0.0.2, 127.0.0.3 and fd00:5::2, which the test
// table leaves alone.
func tproxyUDPNetns(t *testing.T, port uint16, e echoes) {
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
	run(t, fmt.Sprintf(`
table inet tproxyudptest {
	chain proxy_mark {
		type route hook output priority mangle - 10; policy accept;
		ip saddr 127.0.0.1 udp dport { 7, 9 } meta mark set %#[1]x
		ip6 saddr fd00:5::1 udp dport { 7, 9 } meta mark set %#[1]x
	}
	chain network {
		type nat hook output priority -100; policy accept;
		meta mark %#[1]x ip daddr 198.51.100.0/24 udp dport 7 dnat ip to %[2]s
		meta mark %#[1]x ip daddr 198.51.100.0/24 udp dport 9 dnat ip to %[3]s
		meta mark %#[1]x ip6 daddr 2001:db8::/64 udp dport 7 dnat ip6 to %[4]s
		meta mark %#[1]x ip6 daddr 2001:db8::/64 udp dport 9 dnat ip6 to %[5]s
	}
}`, tproxyMark, e.v4[0], e.v4[1], e.v6[0], e.v6[1]), "nft", "-f", "-")
}

// startTransparentUDP serves a TransparentUDP on [::]:0 through the
// proxy until the test's end, or until stop (see serveForTest).
func startTransparentUDP(t *testing.T, proxy string) (tu *TransparentUDP, logs *logBuf, stop func()) {
	t.Helper()
	return startTransparentUDPWith(t, proxy, TransparentUDPConfig{})
}

// startTransparentUDPWith is startTransparentUDP with cfg's limits.
func startTransparentUDPWith(t *testing.T, proxy string, cfg TransparentUDPConfig) (*TransparentUDP, *logBuf, func()) {
	t.Helper()
	pc, err := ListenTransparentUDP("[::]:0")
	if err != nil {
		t.Fatal(err)
	}
	logs := &logBuf{}
	cfg.Name = "tproxy-udp"
	cfg.Upstreams = socksclient.NewUpstreams(&socksclient.Dialer{ProxyAddr: proxy, HandshakeTimeout: 5 * time.Second})
	cfg.Logger = zerolog.New(logs)
	tu := NewTransparentUDP(cfg, pc)
	return tu, logs, serveForTest(t, tu)
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
// routeTestNetsToLo, TPROXY's policy routing and the clients' IPv6
// address, and starts the UDP
// echoes that stand for every remote.
func startEchoes(t *testing.T) echoes {
	t.Helper()
	routeTestNetsToLo(t)
	run(t, "", "ip", "-6", "addr", "add", "fd00:5::1/128", "dev", "lo", "nodad")
	run(t, "", "ip", "-6", "addr", "add", "fd00:5::2/128", "dev", "lo", "nodad")
	for _, line := range rules.Routes(rules.Config{Mode: rules.ModeTProxy, Scope: rules.ScopeLocal, UDPPort: 1, IPv6: true}) {
		run(t, "", strings.Fields(line)...)
	}
	var e echoes
	for i := range 2 {
		for _, ip := range []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback} {
			pc, err := testnet.UDPEchoOn(t, &net.UDPAddr{IP: ip})
			if err != nil {
				t.Fatal(err)
			}
			if ap := pc.LocalAddr().(*net.UDPAddr).AddrPort(); ap.Addr().Is4() {
				e.v4[i] = ap
			} else {
				e.v6[i] = ap
			}
		}
	}
	return e
}

// echoes are the echo servers behind remote ports 7 and 9.
type echoes struct{ v4, v6 [2]netip.AddrPort }

// TestTransparentUDPIPv4: datagrams TPROXY sent to the listener reach
// their original destinations through the proxy, and the replies come
// back with the remote's address as their source; a client's two
// destinations share one association, two clients have one each, and the
// reply socket of a remote serves both.
func TestTransparentUDPIPv4(t *testing.T) {
	if !inFreshNetns(t) {
		return
	}
	echo := startEchoes(t)
	proxy := newSocks(t, sockstest.Config{})
	tu, logs, stop := startTransparentUDP(t, proxy.Addr())
	tproxyUDPNetns(t, tu.Addr().(*net.UDPAddr).AddrPort().Port(), echo)

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
	// A reply can reach its client before the goroutine that sent it has
	// counted it: once the listener has stopped (Serve returned, Close
	// waited for every session and reader), the counters are final.
	stop()
	if st.DatagramsUp.Load() != 4 || st.DatagramsDown.Load() != 4 || st.Received.Load() != 4 {
		t.Errorf("received %d, up %d, down %d; want 4 each", st.Received.Load(), st.DatagramsUp.Load(), st.DatagramsDown.Load())
	}
	if st.ReplyBindFailures.Load() != 0 || st.RawReplies.Load() != 0 {
		t.Errorf("bind failures %d, raw replies %d, want none\n%s", st.ReplyBindFailures.Load(), st.RawReplies.Load(), logs)
	}
}

// TestTransparentUDPAllowsHostItself: with an --allow that lists none of
// the host's addresses, a local program's datagram that TPROXY captured
// is served although its source is the host's own non-loopback address:
// it arrived on the loopback interface, which nothing from elsewhere
// reaches. A datagram from that source on another interface is not
// (IPv6 has no martian-source check; here the test hands one over as
// Serve would, marked as not from loopback).
func TestTransparentUDPAllowsHostItself(t *testing.T) {
	if !inFreshNetns(t) {
		return
	}
	echo := startEchoes(t)
	run(t, "", "ip", "addr", "add", "203.0.113.5/32", "dev", "lo")
	allow, err := allowlist.Parse([]string{"10.0.0.0/8"})
	if err != nil {
		t.Fatal(err)
	}
	proxy := newSocks(t, sockstest.Config{})
	tu, logs, _ := startTransparentUDP(t, proxy.Addr())
	tu.SetAllow(allow)
	tproxyUDPNetns(t, tu.Addr().(*net.UDPAddr).AddrPort().Port(), echo)

	exchange(t, appClient(t, "203.0.113.5:0"), "198.51.100.7:7", "from the host's own address")
	if n := tu.Stats().DroppedNotAllowed.Load(); n != 0 {
		t.Errorf("DroppedNotAllowed = %d, want 0\n%s", n, logs)
	}

	dispatchOne(tu, netip.MustParseAddrPort("203.0.113.5:4000"), "198.51.100.7:7")
	if n := tu.Stats().DroppedNotAllowed.Load(); n != 1 {
		t.Errorf("a datagram from the host's address, not on loopback: DroppedNotAllowed = %d, want 1", n)
	}
}

// TestTransparentUDPNotRedirected: a datagram sent straight to the
// listener (no rule sent it) is dropped, counted and logged once, and
// never reaches the proxy.
func TestTransparentUDPNotRedirected(t *testing.T) {
	peertest.RequireRoot(t) // IP_TRANSPARENT
	proxy := newSocks(t, sockstest.Config{})
	tu, logs, _ := startTransparentUDP(t, proxy.Addr())
	c := appClient(t, "127.0.0.1:0")
	port := tu.Addr().(*net.UDPAddr).AddrPort().Port()
	for range 3 {
		if _, err := c.WriteToUDPAddrPort([]byte("straight"), netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port)); err != nil {
			t.Fatal(err)
		}
	}
	// Then a datagram dropped for another cause, with a line of its own:
	// the listener reads its socket in order, so once that line is out,
	// the three before it have been counted.
	big := appClient(t, "[::1]:0")
	if _, err := big.WriteToUDPAddrPort(make([]byte, 65520), netip.AddrPortFrom(netip.IPv6Loopback(), port)); err != nil {
		t.Fatal(err)
	}
	logs.waitFor(t, causeOversize)
	if n := tu.Stats().DroppedNotRedirected.Load(); n != 3 {
		t.Errorf("dropped %d of 3 as not redirected", n)
	}
	if n := strings.Count(logs.String(), causeNotRedirected); n != 1 {
		t.Errorf("%d lines say %q, want 1:\n%s", n, causeNotRedirected, logs)
	}
	if proxy.Handshakes() != 0 || tu.Sessions() != 0 {
		t.Errorf("handshakes %d, sessions %d, want none", proxy.Handshakes(), tu.Sessions())
	}
}

// TestTransparentUDPOwnRelay: a datagram whose original destination is
// the UDP relay of one of the listener's own associations is socksfwd's
// own, brought back by rules that do not leave it out (no --mark, a relay
// on another address than the proxy's): dropped, counted and logged, not
// relayed again through a new association, which would loop and grow.
func TestTransparentUDPOwnRelay(t *testing.T) {
	if !inFreshNetns(t) {
		return
	}
	echo := startEchoes(t)
	proxy := newSocks(t, sockstest.Config{})
	tu, logs, _ := startTransparentUDP(t, proxy.Addr())
	port := tu.Addr().(*net.UDPAddr).AddrPort().Port()
	tproxyUDPNetns(t, port, echo)
	exchange(t, appClient(t, "127.0.0.2:0"), "198.51.100.7:7", "first")
	var relay netip.AddrPort
	for r := range *tu.relays.now.Load() {
		relay = r
	}
	if !relay.IsValid() {
		t.Fatal("no relay recorded for the live association")
	}
	// What rules without socksfwd's mark would do with its own datagram
	// to that relay.
	run(t, fmt.Sprintf(`
table ip owntest {
	chain pre {
		type filter hook prerouting priority mangle - 1; policy accept;
		ip daddr %s udp dport %d tproxy to :%d accept
	}
}`, relay.Addr(), relay.Port(), port), "nft", "-f", "-")
	c := appClient(t, "127.0.0.3:0")
	if _, err := c.WriteToUDPAddrPort([]byte("again"), relay); err != nil {
		t.Fatal(err)
	}
	logs.waitFor(t, "own UDP relays")
	if n := tu.Stats().DroppedOwnRelay.Load(); n != 1 {
		t.Errorf("DroppedOwnRelay = %d, want 1", n)
	}
	if n := tu.Sessions(); n != 1 {
		t.Errorf("%d sessions, want the first client's only", n)
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

// tproxyDante is Dante relaying to IPv6 from fd00:5::1 (startEchoes added
// it): Dante will not send from ::1 to a remote address.
func tproxyDante(t *testing.T) string {
	p := peertest.Dante(t, peertest.DanteOptions{IPv6: true, Extra: "external: fd00:5::1"})
	return p.Addr
}

// TestTransparentUDPIPv6: the same through Dante (the proxy here that
// relays to IPv6): a client's datagrams to two IPv6 destinations (two
// ports of one remote) share
// its one session, and the replies come back from those addresses.
func TestTransparentUDPIPv6(t *testing.T) {
	if !inFreshNetns(t) {
		return
	}
	echo := startEchoes(t)
	dante := tproxyDante(t)
	tu, logs, _ := startTransparentUDP(t, dante)
	tproxyUDPNetns(t, tu.Addr().(*net.UDPAddr).AddrPort().Port(), echo)

	c := appClient(t, "[fd00:5::2]:0")
	exchange(t, c, "[2001:db8::7]:7", "to ::7")
	// Not ::8: through Dante a second remote address got no reply (see
	// the IPv4 test, which covers it through sockstest).
	exchange(t, c, "[2001:db8::7]:9", "to ::7 port 9")
	exchange(t, c, "[2001:db8::7]:7", "to ::7 again")
	st := tu.Stats()
	if st.Sessions.Load() != 1 || st.AssociateFailures.Load() != 0 {
		t.Errorf("%d sessions, %d associate failures; want one session\n%s", st.Sessions.Load(), st.AssociateFailures.Load(), logs)
	}
	if got := st.ReplySockets.Load(); got != 2 {
		t.Errorf("reply sockets = %d, want 2", got)
	}
}

// TestTransparentUDPBindCollision: a local service holds the remote's
// port on the wildcard address, so no reply socket can bind the remote's
// address and port. Replies from that remote still reach the client, with
// its address as their source, through the raw socket; the failure is
// counted and logged once per remote; other flows are untouched. IPv4
// (through sockstest) and IPv6 (through Dante).
func TestTransparentUDPBindCollision(t *testing.T) {
	if !inFreshNetns(t) {
		return
	}
	echo := startEchoes(t)
	for _, tc := range []struct {
		name, service, client, held, free string
		proxy                             func() string
	}{
		{"IPv4", "0.0.0.0:7", "127.0.0.2:0", "198.51.100.7:7", "198.51.100.7:9",
			func() string { return newSocks(t, sockstest.Config{}).Addr() }},
		{"IPv6", "[::]:7", "[fd00:5::2]:0", "[2001:db8::7]:7", "[2001:db8::7]:9",
			func() string { return tproxyDante(t) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			service := appClient(t, tc.service) // a resolver on 0.0.0.0:53, say
			_ = service
			tu, logs, stop := startTransparentUDP(t, tc.proxy())
			tproxyUDPNetns(t, tu.Addr().(*net.UDPAddr).AddrPort().Port(), echo)
			t.Cleanup(func() { run(t, "", "nft", "flush", "ruleset") })

			c := appClient(t, tc.client)
			exchange(t, c, tc.held, "held 1")
			exchange(t, c, tc.free, "free")
			exchange(t, c, tc.held, "held 2")
			st := tu.Stats()
			// Open reply sockets are counted before a reply goes through
			// one, and closed by the stop.
			replySockets := st.ReplySockets.Load()
			stop() // the counters are final (see TestTransparentUDPIPv4)
			if st.ReplyBindFailures.Load() != 1 || st.RawReplies.Load() != 2 || replySockets != 1 {
				t.Errorf("bind failures %d, raw replies %d, reply sockets %d; want 1, 2, 1", st.ReplyBindFailures.Load(), st.RawReplies.Load(), replySockets)
			}
			if st.DatagramsDown.Load() != 3 || st.DroppedReply.Load() != 0 {
				t.Errorf("down %d, dropped replies %d; want 3, 0", st.DatagramsDown.Load(), st.DroppedReply.Load())
			}
			if n := strings.Count(logs.String(), "cannot bind"); n != 1 || !strings.Contains(logs.String(), tc.held) {
				t.Errorf("want one line naming %s, got:\n%s", tc.held, logs)
			}
		})
	}
}

// quietTransparent returns a transparent UDP listener on a plain socket
// that nothing reads, whose upstream is reached through dial: tests in a
// synctest bubble (where a blocked socket read would stop the clock) play
// Serve's part through dispatch.
func quietTransparent(t *testing.T, dial func(ctx context.Context, network, addr string) (net.Conn, error), cfg TransparentUDPConfig) (*TransparentUDP, *logBuf) {
	t.Helper()
	logs := &logBuf{}
	cfg.Name = "tproxy-udp"
	cfg.Upstreams = socksclient.NewUpstreams(&socksclient.Dialer{ProxyAddr: "proxy.test:1080", ProxyDial: dial})
	cfg.Logger = zerolog.New(logs).Level(zerolog.DebugLevel)
	tu := NewTransparentUDP(cfg, testnet.ListenUDP(t, "udp4", "127.0.0.1:0"))
	t.Cleanup(func() { tu.Close() })
	return tu, logs
}

// dispatchOne hands one datagram of src, bound for dst, to tu as Serve
// does with a batch of one.
func dispatchOne(tu *TransparentUDP, src netip.AddrPort, dst string) {
	d := newUDPDispatch()
	tu.dispatch(d, src, false, slotWith([]byte("x")), 0, socksclient.AddrFromAddrPort(netip.MustParseAddrPort(dst)))
	d.flush(slotReader{})
}

// hasClient reports whether src has a session in tu's table.
func hasClient(tu *TransparentUDP, src netip.AddrPort) bool {
	tu.mu.Lock()
	defer tu.mu.Unlock()
	_, ok := tu.sessions[src]
	return ok
}

// TestTransparentUDPSetLimits: a new idle timeout applies to the sessions
// started after it (earlier ones keep theirs), a new bound to the table.
func TestTransparentUDPSetLimits(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		tu, _ := quietTransparent(t, hangingProxy, TransparentUDPConfig{MaxSessions: 4})
		a, b, c := netip.MustParseAddrPort("127.0.0.2:1001"), netip.MustParseAddrPort("127.0.0.2:1002"), netip.MustParseAddrPort("127.0.0.2:1003")
		tu.session(a) // on the default idle timeout, a minute
		const idle = 10 * time.Second
		tu.SetLimits(idle, 4)
		tu.session(b)
		time.Sleep(idle)
		synctest.Wait()
		if !hasClient(tu, a) || hasClient(tu, b) {
			t.Fatalf("after %v: a's session (old timeout) alive %v, b's (new timeout) alive %v; want true, false", idle, hasClient(tu, a), hasClient(tu, b))
		}
		tu.SetLimits(0, 1)
		tu.session(c)
		synctest.Wait()
		if !hasClient(tu, c) || hasClient(tu, a) || tu.Stats().Evicted.Load() != 1 {
			t.Fatalf("with a bound of 1, c's session should have evicted a's; %d sessions, %d evicted", tu.Sessions(), tu.Stats().Evicted.Load())
		}
	})
}

// TestTransparentUDPEvictsIdlest: a new client that finds the table full
// evicts the session idle the longest (not the oldest), counted and logged
// once; every datagram is sent or counted.
func TestTransparentUDPEvictsIdlest(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		tu, logs := quietTransparent(t, hangingProxy, TransparentUDPConfig{MaxSessions: 2})
		a, b, c := netip.MustParseAddrPort("127.0.0.2:1001"), netip.MustParseAddrPort("127.0.0.2:1002"), netip.MustParseAddrPort("127.0.0.2:1003")
		dispatchOne(tu, a, "198.51.100.7:7")
		time.Sleep(time.Second)
		dispatchOne(tu, b, "198.51.100.8:9")
		time.Sleep(time.Second)
		dispatchOne(tu, a, "198.51.100.9:7") // a is the oldest session, b now the idlest
		time.Sleep(time.Second)
		dispatchOne(tu, c, "198.51.100.7:7")
		synctest.Wait()
		if !hasClient(tu, a) || hasClient(tu, b) || !hasClient(tu, c) {
			t.Fatalf("sessions of a %v, b %v, c %v; want b's evicted", hasClient(tu, a), hasClient(tu, b), hasClient(tu, c))
		}
		st := tu.Stats()
		if st.Evicted.Load() != 1 || st.Active.Load() != 2 || st.Sessions.Load() != 3 {
			t.Errorf("evicted %d, active %d, started %d; want 1, 2, 3", st.Evicted.Load(), st.Active.Load(), st.Sessions.Load())
		}
		if n := strings.Count(logs.String(), "UDP session table full; evicting"); n != 1 || !strings.Contains(logs.String(), b.String()) {
			t.Errorf("want one eviction line naming %s:\n%s", b, logs)
		}
		tu.Close()
		checkAccounted(t, &tu.udpTable, 4)
	})
}

// TestTransparentUDPReplySocketsLRU: the reply sockets are bounded by
// MaxReplySockets; a new remote closes the least recently used one, and
// replies from every remote still come back from its address (the evicted
// remote's socket is made again).
func TestTransparentUDPReplySocketsLRU(t *testing.T) {
	if !inFreshNetns(t) {
		return
	}
	echo := startEchoes(t)
	proxy := newSocks(t, sockstest.Config{})
	tu, logs, stop := startTransparentUDPWith(t, proxy.Addr(), TransparentUDPConfig{MaxReplySockets: 2})
	tproxyUDPNetns(t, tu.Addr().(*net.UDPAddr).AddrPort().Port(), echo)
	held := func(remote string) bool {
		tu.replies.mu.Lock()
		defer tu.replies.mu.Unlock()
		return tu.replies.lru.Contains(netip.MustParseAddrPort(remote))
	}

	c := appClient(t, "127.0.0.2:0")
	exchange(t, c, "198.51.100.7:7", "to .7")
	exchange(t, c, "198.51.100.8:7", "to .8")
	exchange(t, c, "198.51.100.7:7", "to .7 again") // .8 is now the least recently used
	exchange(t, c, "198.51.100.9:7", "to .9")
	st := tu.Stats()
	if !held("198.51.100.7:7") || held("198.51.100.8:7") || !held("198.51.100.9:7") {
		t.Errorf("reply sockets held: .7 %v, .8 %v, .9 %v; want .8's closed", held("198.51.100.7:7"), held("198.51.100.8:7"), held("198.51.100.9:7"))
	}
	if n := st.ReplySockets.Load(); n != 2 {
		t.Errorf("%d reply sockets open, want 2", n)
	}
	exchange(t, c, "198.51.100.8:7", "to .8 again")
	if n, l := st.ReplySockets.Load(), tu.replies.Len(); n != 2 || l != 2 {
		t.Errorf("%d reply sockets open, %d held; want 2", n, l)
	}
	stop() // the counters are final (see TestTransparentUDPIPv4)
	if st.DatagramsDown.Load() != 5 || st.DroppedReply.Load() != 0 || st.RawReplies.Load() != 0 {
		t.Errorf("down %d, dropped replies %d, raw %d; want 5, 0, 0\n%s", st.DatagramsDown.Load(), st.DroppedReply.Load(), st.RawReplies.Load(), logs)
	}
}

// TestTransparentUDPReplySocketsExpire: a reply socket unused for the idle
// timeout is closed by the listener's expiry, one still in use is kept.
func TestTransparentUDPReplySocketsExpire(t *testing.T) {
	if !inFreshNetns(t) { // binding a remote's address needs IP_TRANSPARENT
		return
	}
	synctest.Test(t, func(t *testing.T) {
		const idle = 10 * time.Second
		tu, _ := quietTransparent(t, hangingProxy, TransparentUDPConfig{IdleTimeout: idle})
		tu.wg.Go(tu.expireReplies) // as Serve does; it checks every idle/2
		r1, r2 := netip.MustParseAddrPort("198.51.100.7:7"), netip.MustParseAddrPort("198.51.100.8:9")
		first := tu.replies.get(r1)
		if first == nil || first.pc == nil {
			t.Fatalf("no reply socket bound to %s", r1)
		}
		time.Sleep(idle / 2)
		tu.replies.get(r2)
		time.Sleep(idle)
		synctest.Wait()
		st := tu.Stats()
		if n, l := st.ReplySockets.Load(), tu.replies.Len(); n != 1 || l != 1 {
			t.Fatalf("after %v: %d reply sockets open, %d held; want r2's only", idle+idle/2, n, l)
		}
		if _, err := first.pc.WriteToUDPAddrPort([]byte("x"), netip.MustParseAddrPort("127.0.0.2:9")); !errors.Is(err, net.ErrClosed) {
			t.Errorf("the expired socket still writes: %v", err)
		}
		time.Sleep(idle / 2)
		synctest.Wait()
		if n, l := st.ReplySockets.Load(), tu.replies.Len(); n != 0 || l != 0 {
			t.Fatalf("%d reply sockets open, %d held; want none", n, l)
		}
	})
}

// noReplyCapsEnv marks a test binary re-run without CAP_NET_BIND_SERVICE
// and CAP_NET_RAW.
const noReplyCapsEnv = "SOCKSFWD_TEST_NO_REPLY_CAPS"

// TestTransparentUDPReplyLimits: without CAP_NET_BIND_SERVICE (replies
// from remote ports below 1024 cannot bind there) and CAP_NET_RAW (the
// raw-socket fallback), the process says so, one sentence each, for a line
// at start; with them (root), nothing.
func TestTransparentUDPReplyLimits(t *testing.T) {
	peertest.RequireRoot(t)
	if os.Getenv(noReplyCapsEnv) == "" {
		if limits := TransparentUDPReplyLimits(); len(limits) != 0 {
			t.Errorf("as root: %q, want nothing", limits)
		}
		peertest.Require(t, "setpriv")
		rerun(t, noReplyCapsEnv+"=1", "setpriv", "--bounding-set", "-net_bind_service,-net_raw", "--")
		return
	}
	limits := strings.Join(TransparentUDPReplyLimits(), "\n")
	if unprivilegedPortStart() > 1 && !strings.Contains(limits, "CAP_NET_BIND_SERVICE") {
		t.Errorf("without CAP_NET_BIND_SERVICE: %q", limits)
	}
	if !strings.Contains(limits, "CAP_NET_RAW") {
		t.Errorf("without CAP_NET_RAW: %q", limits)
	}
}
