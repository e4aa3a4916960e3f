package main

import (
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/socksfwd/socksfwd/internal/rules"
	"github.com/socksfwd/socksfwd/socksclient"
)

// TestResolveListens: a listener bound by host name is checked, and sent
// to, at the address socksfwd binds for that name. Before, rules took a
// name for "every address": TPROXY rules sent to 127.0.0.1 while the
// listener was on the name's 10.1.0.1, and every captured connection was
// dropped without a word.
func TestResolveListens(t *testing.T) {
	lanbox := func(network, addr string) (*net.TCPAddr, error) {
		if addr != "lanbox:12345" {
			t.Fatalf("resolved %q, want only the named bind", addr)
		}
		return &net.TCPAddr{IP: net.ParseIP("10.1.0.1"), Port: 12345}, nil // 16 bytes, as the resolver gives
	}
	listens := []listenPlan{
		{kind: kindTransparent, addr: "lanbox:12345", spec: "--transparent lanbox:12345"},
		{kind: kindDNS, addr: ":5353", spec: "--dns *:5353"},
		{kind: kindTransparentUDP, addr: "127.0.0.1:12346", spec: "--transparent 127.0.0.1:12346/udp"},
	}
	got, err := resolveListensWith(lanbox, listens)
	if err != nil {
		t.Fatal(err)
	}
	if got[0].addr != "10.1.0.1:12345" || got[1].addr != ":5353" || got[2].addr != "127.0.0.1:12346" {
		t.Fatalf("resolved binds %q, %q, %q", got[0].addr, got[1].addr, got[2].addr)
	}
	if listens[0].addr != "lanbox:12345" {
		t.Error("the plan's own listeners were changed")
	}
	// TPROXY to 10.1.0.1 finds the listener; to 127.0.0.1 it does not.
	at := netip.MustParseAddr("10.1.0.1")
	if err := checkListenersTake(rules.Config{Mode: rules.ModeTProxy, Scope: rules.ScopeGateway, TCPPort: 12345, TProxyAddr4: at}, got[:1]); err != nil {
		t.Errorf("TPROXY to the listener's address: %v", err)
	}
	err = checkListenersTake(rules.Config{Mode: rules.ModeTProxy, Scope: rules.ScopeGateway, TCPPort: 12345}, got[:1])
	if err == nil || !strings.Contains(err.Error(), "no --transparent listener is there (10.1.0.1:12345)") {
		t.Errorf("TPROXY to 127.0.0.1 with the listener on lanbox's 10.1.0.1: %v", err)
	}
}

// TestPrimaryOfInterfaces: the gateway REDIRECT warning is spared when the
// listener's address is the primary IPv4 address of every --interface.
func TestPrimaryOfInterfaces(t *testing.T) {
	for _, c := range []struct {
		addr  string
		names []string
		want  bool
	}{
		{"127.0.0.1", []string{"lo"}, true},
		{"127.0.0.2", []string{"lo"}, false},
		{"127.0.0.1", nil, false},
		{"127.0.0.1", []string{"lo", "no-such-if0"}, false},
		{"127.0.0.1", []string{"lo+"}, false},
		{"::1", []string{"lo"}, false},
	} {
		if got := primaryOfInterfaces(netip.MustParseAddr(c.addr), c.names); got != c.want {
			t.Errorf("primaryOfInterfaces(%s, %q) = %v, want %v", c.addr, c.names, got, c.want)
		}
	}
}

// TestOwnLookupsCaptured: with a proxy given by name, DNS captured in
// scope local and neither --mark nor --proxy-user, the rules take
// socksfwd's own lookups of the proxy into the capture that needs the
// proxy; the warning says so, and how out. With a mark it speaks only of
// a local stub resolver, whose queries carry no mark.
func TestOwnLookupsCaptured(t *testing.T) {
	p := &plan{dialers: []*socksclient.Dialer{{ProxyAddr: "proxy.example:1080"}}}
	rc := rules.Config{Scope: rules.ScopeLocal, DNSPort: 5353}
	if w := resolverCaptureWarning(rc, p); !strings.Contains(w, "capture socksfwd's own lookups of it too") || !strings.Contains(w, "Give --mark N") {
		t.Errorf("without a mark: %q", w)
	}
	for _, rc := range []rules.Config{
		{Scope: rules.ScopeLocal, DNSPort: 5353, Mark: 0x438},
		{Scope: rules.ScopeLocal, DNSPort: 5353, ProxyUsers: []string{"socksfwd"}},
	} {
		if w := resolverCaptureWarning(rc, p); strings.Contains(w, "own lookups") || !strings.Contains(w, "a local stub resolver") {
			t.Errorf("mark %#x, proxy users %v: %q", rc.Mark, rc.ProxyUsers, w)
		}
	}
}
