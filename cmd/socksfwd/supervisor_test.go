package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/socksfwd/socksfwd/internal/testnet"
	"github.com/socksfwd/socksfwd/socksclient"
	"github.com/socksfwd/socksfwd/tunnel"
)

// TestNotToUpstream: a transparent connection whose original destination
// is an upstream proxy is the capture rules taking socksfwd's own
// connection; it is refused, never relayed (which would loop until the
// descriptors run out). Other destinations pass.
func TestNotToUpstream(t *testing.T) {
	s := newSupervisor(zerolog.Nop(), nil)
	s.ups = socksclient.NewUpstreams(&socksclient.Dialer{ProxyAddr: "10.200.0.2:1080"}, &socksclient.Dialer{ProxyAddr: "[2001:db8::2]:1080"}, &socksclient.Dialer{ProxyAddr: "proxy.example:1080"})
	for _, tc := range []struct {
		dst  string
		loop bool
	}{
		{"10.200.0.2:1080", true},
		{"[2001:db8::2]:1080", true},
		{"10.200.0.2:80", false},
		{"198.51.100.7:1080", false},
	} {
		dst := socksclient.AddrFromAddrPort(netip.MustParseAddrPort(tc.dst))
		target := s.notToUpstream(func(net.Conn) (socksclient.Addr, error) { return dst, nil })
		_, err := target(nil)
		if got := errors.Is(err, tunnel.ErrCaptureLoop); got != tc.loop {
			t.Errorf("%s: refused = %v (%v), want %v", tc.dst, got, err, tc.loop)
		}
	}
}

// TestNotToUpstreamByName: an upstream given by name (-S proxy.corp:1080)
// is matched on the address socksfwd connected to, so a capture rule that
// misses the proxy's current address is refused too, not relayed.
func TestNotToUpstreamByName(t *testing.T) {
	proxy := testnet.Serve(t, func(c net.Conn) {}) // hangs up: the dial was made
	port := proxy.Addr().(*net.TCPAddr).AddrPort().Port()
	s := newSupervisor(zerolog.Nop(), nil)
	d := &socksclient.Dialer{ProxyAddr: net.JoinHostPort("localhost", strconv.Itoa(int(port))), HandshakeTimeout: 5 * time.Second}
	s.ups = socksclient.NewUpstreams(d)
	s.ups.DialAddr(context.Background(), socksclient.AddrFromAddrPort(netip.MustParseAddrPort("198.51.100.7:80")))
	for _, tc := range []struct {
		dst  string
		loop bool
	}{
		{fmt.Sprintf("127.0.0.1:%d", port), true},
		{fmt.Sprintf("127.0.0.1:%d", port+1), false},
		{fmt.Sprintf("198.51.100.7:%d", port), false},
	} {
		dst := socksclient.AddrFromAddrPort(netip.MustParseAddrPort(tc.dst))
		_, err := s.notToUpstream(func(net.Conn) (socksclient.Addr, error) { return dst, nil })(nil)
		if got := errors.Is(err, tunnel.ErrCaptureLoop); got != tc.loop {
			t.Errorf("%s: refused = %v (%v), want %v", tc.dst, got, err, tc.loop)
		}
	}
}

func TestListenAddrs(t *testing.T) {
	for _, tc := range []struct {
		spec     string
		want     []string
		optional string
	}{
		{"12345", []string{"127.0.0.1:12345"}, ""},
		{"localhost:12345", []string{"127.0.0.1:12345", "[::1]:12345"}, "[::1]:12345"},
		{"*:53", []string{":53"}, ""},
		{"[::1]:53", []string{"[::1]:53"}, ""},
		{"0.0.0.0:53", []string{"0.0.0.0:53"}, ""},
	} {
		got, optional, err := listenAddrs("--dns", tc.spec)
		if err != nil {
			t.Errorf("%s: %v", tc.spec, err)
			continue
		}
		if len(got) != len(tc.want) {
			t.Errorf("%s: %v, want %v", tc.spec, got, tc.want)
			continue
		}
		for i := range got {
			if got[i] != tc.want[i] {
				t.Errorf("%s: %v, want %v", tc.spec, got, tc.want)
			}
		}
		if tc.optional != "" && !optional[tc.optional] {
			t.Errorf("%s: %s is not optional", tc.spec, tc.optional)
		}
	}
	if _, _, err := listenAddrs("--dns", "a:b:c"); err == nil {
		t.Error("a:b:c accepted")
	}
}

// TestAllowFor: --allow applies to listeners bound beyond loopback, and to
// transparent ones wherever bound (TPROXY brings other hosts' traffic to a
// listener on 127.0.0.1).
func TestAllowFor(t *testing.T) {
	cfg := defaultConfig()
	cfg.Server, cfg.Local, cfg.Allow = []string{"proxy:1080"}, []string{"1:h:1"}, []string{"10.0.0.0/8"}
	p, err := buildPlan(cfg)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		kind  listenKind
		addr  string
		scope bool
	}{
		{kindTCP, "127.0.0.1:1", false},
		{kindTCP, "[::1]:1", false},
		{kindDNS, "127.0.0.1:53", false},
		{kindTCP, ":1", true},
		{kindUDP, "0.0.0.0:1", true},
		{kindAdmin, "10.1.2.3:9090", true},
		{kindTransparent, "127.0.0.1:12345", true},
		{kindTransparentUDP, "127.0.0.1:12345", true},
	} {
		if got := p.allowFor(listenPlan{kind: c.kind, addr: c.addr}, nil) != nil; got != c.scope {
			t.Errorf("%s %s: allow list applied %t, want %t", c.kind, c.addr, got, c.scope)
		}
	}
	// A socket systemd passed by name is bound where it is, whatever the
	// plan says: its own address decides.
	wild := &net.TCPAddr{IP: net.IPv4zero, Port: 1}
	if p.allowFor(listenPlan{kind: kindTCP, addr: "127.0.0.1:1"}, wild) == nil {
		t.Error("a loopback listener given a socket on 0.0.0.0 takes no allow list")
	}
	if p.allowFor(listenPlan{kind: kindTCP, addr: ":1"}, &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1}) != nil {
		t.Error("a wildcard listener given a loopback socket takes the allow list")
	}
}

// TestUpstreamDownIsAWarning: an upstream going down is logged at warn,
// so that --log-level warn still shows an outage, and with one upstream
// the line promises no other.
func TestUpstreamDownIsAWarning(t *testing.T) {
	verifyNoLeaks(t)
	p := freePort(t)
	d := startDaemon(t, "-S", testnet.ClosedPort(t), "-L", "127.0.0.1:"+p+":192.0.2.1:80")
	d.waitFor("forwarding", 1)
	// The session fails at once, with a reset that may beat the dial's
	// return: only the line matters.
	if c, err := net.DialTimeout("tcp", "127.0.0.1:"+p, 5*time.Second); err == nil {
		defer c.Close()
	}
	line := d.waitFor("upstream is down", 1)
	if line["level"] != "warn" || line["message"] != "upstream is down" {
		t.Errorf("the line: %v; want level warn, and no other upstream to try", line)
	}
}

// TestBindIPv4WildcardIsIPv4Only: -L and --dns 0.0.0.0:P bind IPv4
// alone, as ssh does (Go's own "tcp" would take [::]:P, both families).
func TestBindIPv4WildcardIsIPv4Only(t *testing.T) {
	verifyNoLeaks(t)
	if ln, err := net.Listen("tcp6", "[::1]:0"); err != nil {
		t.Skip("no IPv6 here")
	} else {
		ln.Close()
	}
	echo := testnet.Echo(t).Addr().String()
	p, q := freePort(t), freePort(t)
	d := startDaemon(t, "-S", newSocks(t).Addr(), "-L", "0.0.0.0:"+p+":"+echo, "--dns", "0.0.0.0:"+q, "--dns-upstream", "192.0.2.53", "--allow", "127.0.0.0/8")
	d.waitFor("forwarding", 1)
	d.waitFor("DNS on", 1)
	ln, err := net.Listen("tcp6", "[::]:"+p)
	if err != nil {
		t.Fatalf("-L 0.0.0.0:%s holds the IPv6 port too: %v", p, err)
	}
	ln.Close()
	if ln, err = net.Listen("tcp6", "[::]:"+q); err != nil {
		t.Fatalf("--dns 0.0.0.0:%s holds the IPv6 TCP port too: %v", q, err)
	}
	ln.Close()
	pc, err := net.ListenPacket("udp6", "[::]:"+q)
	if err != nil {
		t.Fatalf("--dns 0.0.0.0:%s holds the IPv6 UDP port too: %v", q, err)
	}
	pc.Close()
	if err := hold(t, "127.0.0.1:"+p).finish(); err != nil {
		t.Errorf("through -L 0.0.0.0:%s over IPv4: %v", p, err)
	}
}

// TestCaptureTargets: what the capture rules send to, for the reload's
// warning: the port, and the address only where the rules name it; a
// listener on 127.0.0.1 or ::1 and one on every address take the same.
func TestCaptureTargets(t *testing.T) {
	plan := func(addrs ...string) *plan {
		p := &plan{}
		for _, a := range addrs {
			p.listens = append(p.listens, listenPlan{kind: kindTransparent, addr: a})
		}
		p.listens = append(p.listens, listenPlan{kind: kindTCP, addr: "127.0.0.1:5432"})
		return p
	}
	same := [][]string{
		{"127.0.0.1:12345"}, {"0.0.0.0:12345"}, {"127.0.0.1:12345", "[::1]:12345"}, {"[::]:12345"},
	}
	want := captureTargets(plan(same[0]...))
	for _, addrs := range same[1:] {
		if got := captureTargets(plan(addrs...)); !slices.Equal(got, want) {
			t.Errorf("%v: %v, want %v as for 127.0.0.1:12345", addrs, got, want)
		}
	}
	for _, addrs := range [][]string{{"127.0.0.1:12346"}, {"10.1.0.1:12345"}, {"127.0.0.2:12345"}} {
		if got := captureTargets(plan(addrs...)); slices.Equal(got, want) {
			t.Errorf("%v: %v, the same as 127.0.0.1:12345", addrs, got)
		}
	}
}
