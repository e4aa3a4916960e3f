package rules

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// TestRulesCapture loads the generated rules into namespaces wired like a
// real host (scope local) or gateway (scope gateway), with a "world"
// namespace behind holding the targets, and checks with real sockets what
// is captured and what is not: TCP and UDP reach stand-in transparent
// listeners with their original destination, DNS reaches the --dns
// stand-in, and the proxies, --exclude, socksfwd's --mark, the gateway's
// own traffic and replies to connections from outside go where they were
// sent. socksfwd itself is not involved: this is about the rules.
func TestRulesCapture(t *testing.T) {
	requireKernelTools(t, "nft", "iptables-nft-restore", "ip6tables-nft-restore")
	for _, format := range []string{"nft", "iptables"} {
		for _, mode := range []string{ModeRedirect, ModeTProxy} {
			for _, scope := range []string{ScopeLocal, ScopeGateway} {
				t.Run(format+"/"+mode+"/"+scope, func(t *testing.T) {
					testCapture(t, format, mode, scope)
				})
			}
		}
	}
}

const (
	captureTCPPort = 12345
	captureUDPPort = 12346
	captureDNSPort = 5353
	ownMark        = 0x438
)

var (
	target4   = netip.MustParseAddr("10.20.0.7")  // captured
	target6   = netip.MustParseAddr("fd00:20::7") // captured
	cone4     = netip.MustParseAddr("10.20.0.10") // full cone: reaches the app first
	cone6     = netip.MustParseAddr("fd00:20::10")
	excluded4 = netip.MustParseAddr("10.20.0.8")     // --exclude
	excluded6 = netip.MustParseAddr("fd00:20::8")    // --exclude
	proxy4    = netip.MustParseAddr("10.20.0.9")     // an upstream proxy
	resolver4 = netip.MustParseAddr("10.0.0.53")     // a DNS server nobody runs
	appNet4   = netip.MustParsePrefix("10.1.0.0/24") // gateway scope: the clients' side
	appNet6   = netip.MustParsePrefix("fd01::/64")
)

func testCapture(t *testing.T, format, mode, scope string) {
	cfg := Config{
		Mode: mode, Scope: scope, TCPPort: captureTCPPort, DNSPort: captureDNSPort, Mark: ownMark,
		Proxies: []netip.Addr{proxy4},
		Exclude: []netip.Prefix{netip.PrefixFrom(excluded4, 32), netip.PrefixFrom(excluded6, 128)},
		IPv6:    true,
	}
	if mode == ModeTProxy {
		cfg.UDPPort = captureUDPPort
	}
	if scope == ScopeGateway {
		cfg.Interfaces = []string{"g+"} // g0, by the wildcard: iptables "g+", nft "g*"
	}

	// host runs the rules and the stand-in listeners; app sends the
	// traffic (the same namespace in scope local); world holds every
	// target and answers "world".
	world := newNetns(t)
	host := newNetns(t)
	app := host
	addr := func(ns, dev, a string) { inNetns(t, ns, "", "ip", "addr", "add", a, "dev", dev, "nodad") }
	// No duplicate address detection: until it ends, a link-local address
	// cannot send neighbour discovery, which holds the first IPv6 packets.
	noDAD := func(ns string) {
		inNetns(t, ns, "", "sysctl", "-q", "-w", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
	}
	noDAD(world)
	noDAD(host)
	link := func(ns, dev, peerNS, peerDev string) {
		inNetns(t, ns, "", "ip", "link", "add", dev, "type", "veth", "peer", "name", peerDev, "netns", peerNS)
		inNetns(t, ns, "", "ip", "link", "set", dev, "up")
		inNetns(t, peerNS, "", "ip", "link", "set", peerDev, "up")
	}
	link(host, "h0", world, "w0")
	addr(host, "h0", "10.0.0.2/24")
	addr(host, "h0", "fd00::2/64")
	addr(world, "w0", "10.0.0.1/24")
	addr(world, "w0", "fd00::1/64")
	for _, a := range []netip.Addr{target4, excluded4, proxy4, cone4} {
		addr(world, "lo", netip.PrefixFrom(a, 32).String())
	}
	for _, a := range []netip.Addr{target6, excluded6, cone6} {
		addr(world, "lo", netip.PrefixFrom(a, 128).String())
	}
	inNetns(t, host, "", "ip", "route", "add", "default", "via", "10.0.0.1")
	inNetns(t, host, "", "ip", "-6", "route", "add", "default", "via", "fd00::1")
	if scope == ScopeGateway {
		app = newNetns(t)
		noDAD(app)
		link(host, "g0", app, "a0")
		addr(host, "g0", "10.1.0.1/24")
		addr(host, "g0", "fd01::1/64")
		addr(app, "a0", "10.1.0.2/24")
		addr(app, "a0", "fd01::2/64")
		inNetns(t, app, "", "ip", "route", "add", "default", "via", "10.1.0.1")
		inNetns(t, app, "", "ip", "-6", "route", "add", "default", "via", "fd01::1")
		inNetns(t, world, "", "ip", "route", "add", appNet4.String(), "via", "10.0.0.2")
		inNetns(t, world, "", "ip", "-6", "route", "add", appNet6.String(), "via", "fd00::2")
		inNetns(t, host, "", "sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
	}

	switch format {
	case "nft":
		script, err := NFT(cfg)
		if err != nil {
			t.Fatal(err)
		}
		inNetns(t, host, script, "nft", "-f", "-")
	case "iptables":
		v4, v6, err := IPTables(cfg)
		if err != nil {
			t.Fatal(err)
		}
		inNetns(t, host, v4, "iptables-nft-restore", "--noflush")
		inNetns(t, host, v6, "ip6tables-nft-restore", "--noflush")
	}
	for _, line := range Routes(cfg) {
		inNetns(t, host, "", strings.Fields(line)...)
	}

	// The world answers on every address; so do the app's own servers,
	// which the world calls (their replies must not be captured).
	serveTCP(t, world, "tcp", "[::]:80", func(c net.Conn) string { return "world" })
	// Bound to the one address asked, so the answer comes from it.
	serveUDP(t, world, "udp4", netip.AddrPortFrom(excluded4, 9999).String(), "world")
	serveUDP(t, world, "udp", "[::]:7777", "world")
	serveTCP(t, app, "tcp", "[::]:8080", func(c net.Conn) string { return "app" })
	serveUDP(t, app, "udp", "[::]:8080", "app")

	// The stand-ins for socksfwd's listeners, bound where the header says.
	captured := func(c net.Conn) string {
		orig := netip.MustParseAddrPort(c.LocalAddr().String())
		if mode == ModeRedirect {
			var err error
			if orig, err = originalDst(c); err != nil {
				return "original destination: " + err.Error()
			}
		}
		return "captured " + orig.String()
	}
	dnsAnswer := func(net.Conn) string { return "dns" }
	switch {
	case mode == ModeTProxy:
		serveTCP(t, host, "tcp4", "127.0.0.1:12345", captured, transparent)
		serveTCP(t, host, "tcp6", "[::1]:12345", captured, transparent)
		serveTransparentUDP(t, host, "udp4", "127.0.0.1:12346")
		serveTransparentUDP(t, host, "udp6", "[::1]:12346")
	case scope == ScopeLocal:
		serveTCP(t, host, "tcp4", "127.0.0.1:12345", captured)
		serveTCP(t, host, "tcp6", "[::1]:12345", captured)
	default:
		serveTCP(t, host, "tcp", "[::]:12345", captured)
	}
	if scope == ScopeLocal {
		serveTCP(t, host, "tcp4", "127.0.0.1:5353", dnsAnswer)
		serveTCP(t, host, "tcp6", "[::1]:5353", dnsAnswer)
		serveUDP(t, host, "udp4", "127.0.0.1:5353", "dns")
		serveUDP(t, host, "udp6", "[::1]:5353", "dns")
	} else {
		serveTCP(t, host, "tcp", "[::]:5353", dnsAnswer)
		serveUDP(t, host, "udp", "[::]:5353", "dns")
	}

	ap := netip.AddrPortFrom
	checkTCP := func(ns string, to netip.AddrPort, mark int, want string) {
		t.Helper()
		if got, err := askTCP(ns, to, mark); err != nil || got != want {
			t.Errorf("TCP to %s from %s (mark %#x): got %q, %v; want %q", to, ns, mark, got, err, want)
		}
	}
	checkUDP := func(ns string, to netip.AddrPort, want string) {
		t.Helper()
		got, from, err := askUDP(ns, to)
		if err != nil || got != want || from != to {
			t.Errorf("UDP to %s from %s: got %q from %s, %v; want %q from %s", to, ns, got, from, err, want, to)
		}
	}

	// Captured, with the original destination intact.
	checkTCP(app, ap(target4, 80), 0, "captured "+ap(target4, 80).String())
	checkTCP(app, ap(target6, 80), 0, "captured "+ap(target6, 80).String())
	// Left alone: --exclude and the proxies.
	checkTCP(app, ap(excluded4, 80), 0, "world")
	checkTCP(app, ap(excluded6, 80), 0, "world")
	checkTCP(app, ap(proxy4, 80), 0, "world")
	if scope == ScopeLocal {
		// socksfwd's own sockets carry --mark.
		checkTCP(app, ap(target4, 80), ownMark, "world")
		checkTCP(app, ap(target6, 80), ownMark, "world")
	} else {
		// The gateway's own programs are not what scope gateway captures.
		checkTCP(host, ap(target4, 80), 0, "world")
	}
	if mode == ModeTProxy {
		// The stand-in answers from the original destination, through a
		// transparent socket, as socksfwd does.
		checkUDP(app, ap(target4, 9999), "captured "+ap(target4, 9999).String())
		checkUDP(app, ap(target6, 9999), "captured "+ap(target6, 9999).String())
	}
	checkUDP(app, ap(excluded4, 9999), "world")
	if mode == ModeTProxy {
		// A remote the app never sent to reaches it first, through a reply
		// socket as socksfwd's: the app's answer is captured all the same.
		appAddr4, appAddr6 := "10.0.0.2", "fd00::2"
		if scope == ScopeGateway {
			appAddr4, appAddr6 = "10.1.0.2", "fd01::2"
		}
		for _, tc := range []struct{ remote, app netip.AddrPort }{
			{ap(cone4, 7777), netip.MustParseAddrPort(appAddr4 + ":7000")},
			{ap(cone6, 7777), netip.MustParseAddrPort("[" + appAddr6 + "]:7000")},
		} {
			got, err := coneAnswer(host, app, tc.remote, tc.app)
			if want := "captured " + tc.remote.String(); err != nil || got != want {
				t.Errorf("the app's answer to %s, which spoke first: got %q, %v; want %q", tc.remote, got, err, want)
			}
		}
	}
	if mode == ModeTProxy {
		// An app whose port closed before the answer came sends an ICMP
		// error about the flow: it must not reach the remote, which never
		// saw the flow (the proxy did).
		worldNS := world
		world := icmpUnreachableCounter(t, worldNS)
		for _, target := range []netip.AddrPort{ap(target4, 9998), ap(target6, 9998)} {
			closedPortError(t, host, app, target)
		}
		// After them on the way to the world, a datagram it answers.
		checkUDP(app, ap(excluded4, 9999), "world")
		if n := world(); n != 0 {
			t.Errorf("%d ICMP errors about proxied flows reached the remote", n)
		}
		if scope == ScopeLocal {
			// An error about a flow not proxied (here socksfwd's own,
			// marked) goes out as before: path MTU discovery needs them.
			uncapturedPortError(t, worldNS, app, ap(target4, 9997))
			deadline := time.Now().Add(5 * time.Second) // a bound: it is on its way
			for world() != 1 && time.Now().Before(deadline) {
			}
			if n := world(); n != 1 {
				t.Errorf("%d ICMP errors about a flow not proxied reached the remote, want 1", n)
			}
		}
	}
	// DNS goes to --dns, and the answer comes back from the server asked.
	checkUDP(app, ap(resolver4, 53), "dns")
	checkTCP(app, ap(resolver4, 53), 0, "dns")
	if scope == ScopeLocal {
		checkUDP(app, netip.MustParseAddrPort("127.0.0.53:53"), "dns") // a stub resolver
	} else {
		checkUDP(app, netip.MustParseAddrPort("10.1.0.1:53"), "dns") // the gateway itself
	}
	// Servers on the app's side answer the world, though the world's
	// address is one the rules capture: replies are never captured.
	appAddr := netip.MustParseAddr("10.0.0.2")
	if scope == ScopeGateway {
		appAddr = netip.MustParseAddr("10.1.0.2")
	}
	checkTCP(world, ap(appAddr, 8080), 0, "app")
	checkUDP(world, ap(appAddr, 8080), "app")
}

// icmpUnreachableCounter counts, from now on, the ICMP and ICMPv6
// destination-unreachable errors that arrive in ns, and returns the
// function that reads the count.
func icmpUnreachableCounter(t *testing.T, ns string) func() int {
	t.Helper()
	inNetns(t, ns, `table inet probe {
	chain in {
		type filter hook prerouting priority -300; policy accept;
		icmp type destination-unreachable counter
		icmpv6 type destination-unreachable counter
	}
}
`, "nft", "-f", "-")
	return func() int {
		n := 0
		f := strings.Fields(inNetns(t, ns, "", "nft", "list", "chain", "inet", "probe", "in"))
		for i := 0; i+1 < len(f); i++ {
			if f[i] == "packets" {
				v, err := strconv.Atoi(f[i+1])
				if err != nil {
					t.Fatalf("nft counter %q: %v", f[i+1], err)
				}
				n += v
			}
		}
		return n
	}
}

// closedPortError has the app in ns app exchange a datagram with target
// (captured, answered by the stand-in from target's address) and close
// its socket; then an answer comes late, from a transparent socket in
// host bound to target, as socksfwd's does. It returns once the app's
// kernel has sent its ICMP port-unreachable error about it.
func closedPortError(t *testing.T, host, app string, target netip.AddrPort) {
	t.Helper()
	network, counter := "udp4", "OutDestUnreachs"
	if target.Addr().Is6() {
		network, counter = "udp6", "Icmp6OutDestUnreachs"
	}
	sent := func() int {
		t.Helper()
		stats := inNetns(t, app, "", "cat", "/proc/net/snmp", "/proc/net/snmp6")
		return icmpCounter(stats, counter)
	}
	var appAddr netip.AddrPort
	if err := inNS(app, func() error {
		c, err := net.DialUDP(network, nil, net.UDPAddrFromAddrPort(target))
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write([]byte("ask")); err != nil {
			return err
		}
		buf := make([]byte, 1500)
		if _, err := c.Read(buf); err != nil {
			return fmt.Errorf("the captured exchange: %w", err)
		}
		appAddr = c.LocalAddr().(*net.UDPAddr).AddrPort()
		return nil
	}); err != nil {
		t.Fatalf("UDP to %s from %s: %v", target, app, err)
	}
	before := sent()
	sendLate(t, host, network, target, appAddr, transparent)
	deadline := time.Now().Add(5 * time.Second) // a bound: the error is sent at once
	for sent() == before {
		if time.Now().After(deadline) {
			t.Fatalf("%s sent no ICMP error for the late answer from %s to its closed port %s", app, target, appAddr)
		}
	}
}

// uncapturedPortError has the app in ns app send a datagram to target
// with socksfwd's mark (so not captured) and close its socket; then the
// world answers late, from target, to the closed port, and the app's
// kernel sends its ICMP error about the flow toward the world.
func uncapturedPortError(t *testing.T, world, app string, target netip.AddrPort) {
	t.Helper()
	var appAddr netip.AddrPort
	if err := inNS(app, func() error {
		d := net.Dialer{Control: markControl(ownMark)}
		c, err := d.Dial("udp4", target.String())
		if err != nil {
			return err
		}
		defer c.Close()
		appAddr = c.LocalAddr().(*net.UDPAddr).AddrPort()
		_, err = c.Write([]byte("ask"))
		return err
	}); err != nil {
		t.Fatalf("UDP to %s from %s with the mark: %v", target, app, err)
	}
	sendLate(t, world, "udp4", target, appAddr, nil)
}

// sendLate sends a late answer in ns from a socket bound to from (with
// control, when set) to to.
func sendLate(t *testing.T, ns, network string, from, to netip.AddrPort, control controlFunc) {
	t.Helper()
	if err := inNS(ns, func() error {
		c, err := (&net.ListenConfig{Control: control}).ListenPacket(context.Background(), network, from.String())
		if err != nil {
			return err
		}
		defer c.Close()
		_, err = c.WriteTo([]byte("late"), net.UDPAddrFromAddrPort(to))
		return err
	}); err != nil {
		t.Fatalf("the late answer from %s: %v", from, err)
	}
}

// icmpCounter reads one counter from /proc/net/snmp ("Icmp:" heading and
// value lines) or /proc/net/snmp6 (name and value per line).
func icmpCounter(stats, name string) int {
	lines := strings.Split(stats, "\n")
	for i, l := range lines {
		f := strings.Fields(l)
		if len(f) == 2 && f[0] == name {
			n, _ := strconv.Atoi(f[1])
			return n
		}
		if len(f) > 0 && f[0] == "Icmp:" && i+1 < len(lines) {
			values := strings.Fields(lines[i+1])
			for j, h := range f {
				if h == name && j < len(values) {
					n, _ := strconv.Atoi(values[j])
					return n
				}
			}
		}
	}
	return -1
}

// inNS runs f on a thread that has joined namespace ns: sockets f creates
// live there. The thread stays locked, so the runtime ends it with the
// goroutine instead of reusing it in the wrong namespace.
func inNS(ns string, f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		fd, err := unix.Open("/var/run/netns/"+ns, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			errc <- err
			return
		}
		err = unix.Setns(fd, unix.CLONE_NEWNET)
		unix.Close(fd)
		if err != nil {
			errc <- fmt.Errorf("setns %s: %w", ns, err)
			return
		}
		errc <- f()
	}()
	return <-errc
}

// transparent lets a socket take connections and datagrams for any
// address, as socksfwd's TPROXY listeners and reply sockets do.
func transparent(network, address string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		if strings.HasSuffix(network, "6") {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1)
		} else {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TRANSPARENT, 1)
		}
	})
	return errors.Join(err, serr)
}

type controlFunc = func(network, address string, c syscall.RawConn) error

// serveTCP answers every connection on address in ns with one line,
// until the test ends.
func serveTCP(t *testing.T, ns, network, address string, answer func(net.Conn) string, control ...controlFunc) {
	t.Helper()
	var ln net.Listener
	if err := inNS(ns, func() (err error) {
		lc := net.ListenConfig{}
		if len(control) > 0 {
			lc.Control = control[0]
		}
		ln, err = lc.Listen(context.Background(), network, address)
		return err
	}); err != nil {
		t.Fatalf("listen %s %s in %s: %v", network, address, ns, err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(10 * time.Second))
				fmt.Fprintf(c, "%s\n", answer(c))
			})
		}
	})
}

// serveUDP answers every datagram on address in ns with answer.
func serveUDP(t *testing.T, ns, network, address, answer string) {
	t.Helper()
	var pc net.PacketConn
	if err := inNS(ns, func() (err error) {
		pc, err = net.ListenPacket(network, address)
		return err
	}); err != nil {
		t.Fatalf("listen %s %s in %s: %v", network, address, ns, err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { pc.Close(); wg.Wait() })
	wg.Go(func() {
		buf := make([]byte, 1500)
		for {
			_, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo([]byte(answer), from)
		}
	})
}

// serveTransparentUDP stands in for socksfwd's TPROXY UDP listener: it
// reads each datagram's original destination and answers from that
// address through a transparent socket bound to it.
func serveTransparentUDP(t *testing.T, ns, network, address string) {
	t.Helper()
	var conn *net.UDPConn
	if err := inNS(ns, func() error {
		pc, err := (&net.ListenConfig{Control: func(n, a string, c syscall.RawConn) error {
			var serr error
			err := c.Control(func(fd uintptr) {
				if strings.HasSuffix(n, "6") {
					serr = unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_RECVORIGDSTADDR, 1)
				} else {
					serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_RECVORIGDSTADDR, 1)
				}
			})
			return errors.Join(err, serr, transparent(n, a, c))
		}}).ListenPacket(context.Background(), network, address)
		if err == nil {
			conn = pc.(*net.UDPConn)
		}
		return err
	}); err != nil {
		t.Fatalf("listen %s %s in %s: %v", network, address, ns, err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { conn.Close(); wg.Wait() })
	wg.Go(func() {
		buf, oob := make([]byte, 1500), make([]byte, 256)
		for {
			_, oobn, _, from, err := conn.ReadMsgUDPAddrPort(buf, oob)
			if err != nil {
				return
			}
			orig, err := origDstFromControl(oob[:oobn])
			answer := "captured " + orig.String()
			if err != nil {
				answer = err.Error()
			}
			// The reply socket is made in ns, bound to the original
			// destination (another namespace's address: IP_TRANSPARENT).
			if err := inNS(ns, func() error {
				lc := net.ListenConfig{Control: transparent}
				rc, err := lc.ListenPacket(context.Background(), network, orig.String())
				if err != nil {
					return err
				}
				defer rc.Close()
				_, err = rc.WriteTo([]byte(answer), net.UDPAddrFromAddrPort(from))
				return err
			}); err != nil {
				t.Errorf("reply from %s to %s: %v", orig, from, err)
			}
		}
	})
}

// origDstFromControl reads IP_ORIGDSTADDR / IPV6_ORIGDSTADDR.
func origDstFromControl(oob []byte) (netip.AddrPort, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return netip.AddrPort{}, err
	}
	for _, m := range msgs {
		switch {
		case m.Header.Level == unix.SOL_IP && m.Header.Type == unix.IP_ORIGDSTADDR && len(m.Data) >= 8:
			return netip.AddrPortFrom(netip.AddrFrom4([4]byte(m.Data[4:8])), binary.BigEndian.Uint16(m.Data[2:4])), nil
		case m.Header.Level == unix.SOL_IPV6 && m.Header.Type == unix.IPV6_ORIGDSTADDR && len(m.Data) >= 24:
			return netip.AddrPortFrom(netip.AddrFrom16([16]byte(m.Data[8:24])), binary.BigEndian.Uint16(m.Data[2:4])), nil
		}
	}
	return netip.AddrPort{}, errors.New("no original destination in the control messages")
}

// originalDst reads a REDIRECTed connection's original destination:
// SO_ORIGINAL_DST, or IP6T_SO_ORIGINAL_DST (same number) for IPv6.
func originalDst(c net.Conn) (netip.AddrPort, error) {
	raw, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	v6 := netip.MustParseAddrPort(c.LocalAddr().String()).Addr().Unmap().Is6()
	var buf [28]byte // sockaddr_in6; sockaddr_in is shorter
	var errno syscall.Errno
	err = raw.Control(func(fd uintptr) {
		level := unix.SOL_IP
		if v6 {
			level = unix.SOL_IPV6
		}
		size := uint32(len(buf))
		_, _, errno = unix.Syscall6(unix.SYS_GETSOCKOPT, fd, uintptr(level), unix.SO_ORIGINAL_DST,
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&size)), 0)
	})
	if err != nil {
		return netip.AddrPort{}, err
	}
	if errno != 0 {
		return netip.AddrPort{}, errno
	}
	port := binary.BigEndian.Uint16(buf[2:4])
	if v6 {
		return netip.AddrPortFrom(netip.AddrFrom16([16]byte(buf[8:24])), port), nil
	}
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte(buf[4:8])), port), nil
}

// markControl sets SO_MARK mark on a socket before it connects.
func markControl(mark int) controlFunc {
	return func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, mark) })
		return errors.Join(err, serr)
	}
}

// askTCP connects from ns to to (with SO_MARK mark when not 0) and reads
// the one line the server says.
func askTCP(ns string, to netip.AddrPort, mark int) (string, error) {
	var line string
	err := inNS(ns, func() error {
		d := net.Dialer{Timeout: 5 * time.Second}
		if mark != 0 {
			d.Control = markControl(mark)
		}
		c, err := d.Dial("tcp", to.String())
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		line, err = bufio.NewReader(c).ReadString('\n')
		line = strings.TrimSuffix(line, "\n")
		return err
	})
	return line, err
}

// coneAnswer: a transparent socket in host, bound to remote, sends to the
// app's socket at appAddr first (as socksfwd's reply socket does for a
// remote the app never sent to); the app answers it and returns what
// comes back from remote.
func coneAnswer(host, app string, remote, appAddr netip.AddrPort) (string, error) {
	network := "udp4"
	if remote.Addr().Is6() {
		network = "udp6"
	}
	var appConn *net.UDPConn
	if err := inNS(app, func() (err error) {
		appConn, err = net.ListenUDP(network, net.UDPAddrFromAddrPort(appAddr))
		return err
	}); err != nil {
		return "", err
	}
	defer appConn.Close()
	appConn.SetDeadline(time.Now().Add(5 * time.Second))
	if err := inNS(host, func() error {
		lc := net.ListenConfig{Control: transparent}
		rc, err := lc.ListenPacket(context.Background(), network, remote.String())
		if err != nil {
			return err
		}
		defer rc.Close()
		_, err = rc.WriteTo([]byte("first"), net.UDPAddrFromAddrPort(appAddr))
		return err
	}); err != nil {
		return "", fmt.Errorf("the remote's first datagram: %w", err)
	}
	buf := make([]byte, 1500)
	n, from, err := appConn.ReadFromUDPAddrPort(buf)
	if err != nil || string(buf[:n]) != "first" || from.Addr().Unmap() != remote.Addr() {
		return "", fmt.Errorf("the app got %q from %s, %v; want %q from %s", buf[:n], from, err, "first", remote)
	}
	if _, err := appConn.WriteToUDPAddrPort([]byte("hello"), remote); err != nil {
		return "", err
	}
	n, from, err = appConn.ReadFromUDPAddrPort(buf)
	if err != nil {
		return "", err
	}
	if from.Addr().Unmap() != remote.Addr() {
		return "", fmt.Errorf("the answer %q came from %s, not %s", buf[:n], from, remote)
	}
	return string(buf[:n]), nil
}

// askUDP sends one datagram from ns to to and returns the answer and
// where it came from.
func askUDP(ns string, to netip.AddrPort) (string, netip.AddrPort, error) {
	var answer string
	var from netip.AddrPort
	err := inNS(ns, func() error {
		c, err := net.ListenUDP("udp", nil)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.WriteToUDPAddrPort([]byte("hello"), to); err != nil {
			return err
		}
		buf := make([]byte, 1500)
		n, f, err := c.ReadFromUDPAddrPort(buf)
		answer, from = string(buf[:n]), netip.AddrPortFrom(f.Addr().Unmap(), f.Port())
		return err
	})
	return answer, from, err
}
