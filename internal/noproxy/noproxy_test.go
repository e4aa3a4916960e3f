package noproxy

import (
	"net"
	"strconv"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestMatch(t *testing.T) {
	l, err := Parse(" example.com, .corp.internal,*.svc.local , 10.0.0.0/8,192.0.2.7, ::1 ,[2001:db8::1], fd00::/8, git.test:8443, [2001:db8::2]:443, 198.51.100.1:80,,")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		host string
		port uint16
		want bool
	}{
		{"example.com", 80, true},
		{"EXAMPLE.com.", 80, true},
		{"www.example.com", 443, true},
		{"badexample.com", 80, false},
		{"example.com.evil", 80, false},
		{"corp.internal", 80, true}, // a leading dot still matches the name itself
		{"a.b.corp.internal", 80, true},
		{"svc.local", 1, true},
		{"x.svc.local", 1, true},
		{"10.1.2.3", 22, true},
		{"11.0.0.1", 22, false},
		{"192.0.2.7", 1, true},
		{"192.0.2.8", 1, false},
		{"::1", 5, true},
		{"::ffff:10.0.0.1", 5, true}, // mapped: the IPv4 rule
		{"2001:db8::1", 5, true},
		{"fd12::1", 5, true},
		{"fe80::1", 5, false},
		{"git.test", 8443, true},
		{"git.test", 443, false},
		{"2001:db8::2", 443, true},
		{"2001:db8::2", 80, false},
		{"198.51.100.1", 80, true},
		{"198.51.100.1", 81, false},
		{"localhost", 80, false}, // not implied: through SOCKS it is the proxy's
		{"127.0.0.1", 80, false},
		{"10.example.com", 80, true},
		{"10.0.0.1.nip.io", 80, false}, // a name never matches an address rule
	} {
		if got := l.Match(tc.host, tc.port); got != tc.want {
			t.Errorf("Match(%q, %d) = %v, want %v", tc.host, tc.port, got, tc.want)
		}
	}
}

func TestStarAndEmpty(t *testing.T) {
	all, err := Parse("*")
	if err != nil || !all.Match("anything", 1) || !all.Match("::1", 1) {
		t.Errorf("* should match everything: %v", err)
	}
	for _, s := range []string{"", " , ,"} {
		l, err := Parse(s)
		if err != nil || l != nil || l.Match("example.com", 80) {
			t.Errorf("Parse(%q) = %v, %v; want an empty list", s, l, err)
		}
	}
	var none *List
	if none.String() != "" {
		t.Error("a nil list prints as empty")
	}
}

func TestParseErrors(t *testing.T) {
	for _, s := range []string{
		"http://example.com", "exa mple.com", "example.com:0", "example.com:99999", "a..b", "[::1",
		"-:", "10.0.0.0/33", "[fe80::1%eth0]", "*.", ".", "example.com:http",
		"*00", // fuzz: a "*" that starts no "*." is no wildcard
	} {
		if l, err := Parse(s); err == nil {
			t.Errorf("Parse(%q) = %v, want an error", s, l)
		}
	}
}

// FuzzMatch: no entry list and no target (the host of a request from the
// network) makes Parse or Match panic, and an entry naming a host exactly
// always matches that host.
func FuzzMatch(f *testing.F) {
	for _, seed := range []struct{ list, host string }{
		{"example.com", "www.example.com"},
		{".internal,10.0.0.0/8", "10.1.1.1"},
		{"[::1]:443,*", "::1"},
		{"fd00::/8", "fd00::1%eth0"},
		{"a.b:1", "A.B."},
	} {
		f.Add(seed.list, seed.host, uint16(443))
	}
	f.Fuzz(func(t *testing.T, list, host string, port uint16) {
		l, err := Parse(list)
		if err != nil {
			return
		}
		l.Match(host, port)
		if _, _, err := net.SplitHostPort(host); err == nil || strings.TrimSpace(host) != host || strings.Contains(host, ",") {
			return // not one host: the property is about hosts
		}
		exact, err := Parse(net.JoinHostPort(host, strconv.Itoa(int(max(port, 1)))))
		if err == nil && exact != nil && !exact.Match(host, max(port, 1)) {
			t.Fatalf("an entry for %q does not match it", host)
		}
	})
}
