package rules

import (
	"errors"
	"flag"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

func addrs(ss ...string) []netip.Addr {
	var as []netip.Addr
	for _, s := range ss {
		as = append(as, netip.MustParseAddr(s))
	}
	return as
}

func prefixes(ss ...string) []netip.Prefix {
	var ps []netip.Prefix
	for _, s := range ss {
		ps = append(ps, netip.MustParsePrefix(s))
	}
	return ps
}

// goldenCases is the matrix the golden files and the kernel load test
// cover: both modes, both scopes, with and without IPv6, DNS, --mark,
// --include, --exclude and interfaces.
var goldenCases = []struct {
	name string
	cfg  Config
}{
	{"redirect-local", Config{
		Mode: ModeRedirect, Scope: ScopeLocal, TCPPort: 12345, Mark: 0x438,
		Proxies: addrs("192.0.2.10"), ProxyUsers: []string{"nobody", "0"},
	}},
	{"redirect-local-ipv6-dns-include", Config{
		Mode: ModeRedirect, Scope: ScopeLocal, TCPPort: 12345, DNSPort: 5353, Mark: 0x438,
		Proxies: addrs("192.0.2.10", "2001:db8::10"),
		// Overlapping on purpose: nft refuses overlapping set elements.
		Exclude: prefixes("10.99.0.0/16", "10.99.1.0/24", "224.0.0.1/32", "2001:db8:99::/48"),
		Include: prefixes("10.0.0.0/8", "172.16.0.0/12", "fd00::/8"),
		IPv6:    true,
	}},
	{"redirect-gateway-ipv6-dns", Config{
		Mode: ModeRedirect, Scope: ScopeGateway, TCPPort: 12345, DNSPort: 5353,
		Proxies: addrs("192.0.2.10"), Interfaces: []string{"eth1"}, IPv6: true,
	}},
	{"tproxy-local-ipv6-dns", Config{
		Mode: ModeTProxy, Scope: ScopeLocal, TCPPort: 12345, UDPPort: 12345, DNSPort: 5353, Mark: 0x438,
		Proxies: addrs("192.0.2.10", "2001:db8::10"),
		Exclude: prefixes("10.99.0.0/16"),
		IPv6:    true,
	}},
	{"tproxy-local-nomark-include", Config{
		Mode: ModeTProxy, Scope: ScopeLocal, TCPPort: 12345, UDPPort: 12346,
		Proxies: addrs("192.0.2.10", "192.0.2.11"), ProxyUsers: []string{"nobody"},
		Include: prefixes("10.20.0.0/16"),
		IPv6:    true, RouteMark: 0x2, RouteTable: 200,
	}},
	{"tproxy-gateway-ipv6-dns", Config{
		Mode: ModeTProxy, Scope: ScopeGateway, TCPPort: 12345, UDPPort: 12345, DNSPort: 5353, Mark: 0x438,
		Proxies:    addrs("192.0.2.10", "2001:db8::10"),
		Exclude:    prefixes("192.168.1.0/24", "fd00:1::/64"),
		Include:    prefixes("10.0.0.0/8", "fd00::/8"),
		Interfaces: []string{"eth1", "veth+"},
		IPv6:       true,
	}},
	{"tproxy-gateway-udp", Config{
		Mode: ModeTProxy, Scope: ScopeGateway, UDPPort: 12346,
		Proxies: addrs("192.0.2.10"), TProxyAddr4: netip.MustParseAddr("192.168.1.1"),
	}},
	{"tproxy-local-dns-only", Config{
		Mode: ModeTProxy, Scope: ScopeLocal, DNSPort: 5353, Mark: 0x438,
		Proxies: addrs("192.0.2.10"), IPv6: true,
	}},
}

// goldenFiles renders cfg in every format, by golden file suffix.
func goldenFiles(t *testing.T, cfg Config) map[string]string {
	t.Helper()
	nft, err := NFT(cfg)
	if err != nil {
		t.Fatalf("NFT: %v", err)
	}
	v4, v6, err := IPTables(cfg)
	if err != nil {
		t.Fatalf("IPTables: %v", err)
	}
	files := map[string]string{".nft": nft, ".iptables": v4}
	if cfg.IPv6 {
		files[".ip6tables"] = v6
	} else if v6 != "" {
		t.Errorf("IPTables gave IPv6 rules with IPv6 off:\n%s", v6)
	}
	if routes := Routes(cfg); routes != nil {
		files[".routes"] = strings.Join(routes, "\n") + "\n"
	}
	return files
}

func TestGolden(t *testing.T) {
	want := map[string]bool{}
	for _, tc := range goldenCases {
		t.Run(tc.name, func(t *testing.T) {
			for suffix, got := range goldenFiles(t, tc.cfg) {
				path := filepath.Join("testdata", tc.name+suffix)
				want[filepath.Base(path)] = true
				if *update {
					if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
						t.Fatal(err)
					}
					continue
				}
				golden, err := os.ReadFile(path)
				if err != nil {
					t.Fatalf("%v (go test ./internal/rules/ -run TestGolden -update writes it)", err)
				}
				if got != string(golden) {
					t.Errorf("%s differs from what the rules now say (-update rewrites it):\n%s", path, diffLines(string(golden), got))
				}
			}
		})
	}
	// A golden file no case writes any more would pass for tested output.
	entries, err := os.ReadDir("testdata")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if !want[e.Name()] {
			t.Errorf("testdata/%s belongs to no case: remove it", e.Name())
		}
	}
}

// diffLines names the first line where two texts part.
func diffLines(want, got string) string {
	w, g := strings.Split(want, "\n"), strings.Split(got, "\n")
	for i := range max(len(w), len(g)) {
		var wl, gl string
		if i < len(w) {
			wl = w[i]
		}
		if i < len(g) {
			gl = g[i]
		}
		if wl != gl {
			return "line " + strconv.Itoa(i+1) + ":\n  want: " + wl + "\n  got:  " + gl
		}
	}
	return "(same lines)"
}

func TestConfigErrors(t *testing.T) {
	ok := Config{Mode: ModeTProxy, Scope: ScopeLocal, TCPPort: 12345}
	with := func(f func(*Config)) Config { c := ok; f(&c); return c }
	cases := []struct {
		name string
		cfg  Config
		want string
	}{
		{"mode", with(func(c *Config) { c.Mode = "nat" }), `mode "nat"`},
		{"no mode", with(func(c *Config) { c.Mode = "" }), `mode ""`},
		{"scope", with(func(c *Config) { c.Scope = "host" }), `scope "host"`},
		{"no port", with(func(c *Config) { c.TCPPort = 0 }), "nothing to capture"},
		{"port range", with(func(c *Config) { c.TCPPort = 65536 }), "TCP port 65536 out of range"},
		{"negative port", with(func(c *Config) { c.DNSPort = -1 }), "DNS port -1 out of range"},
		{"udp with redirect", with(func(c *Config) { c.Mode = ModeRedirect; c.UDPPort = 12346 }), "REDIRECT is TCP only"},
		{"mark is route mark", with(func(c *Config) { c.Mark = 0x1 }), "mark 0x1 is also the TPROXY route mark"},
		{"mark is set route mark", with(func(c *Config) { c.Mark = 0x7; c.RouteMark = 0x7 }), "mark 0x7 is also"},
		{"route table main", with(func(c *Config) { c.RouteTable = 254 }), "route table 254"},
		{"interfaces local", with(func(c *Config) { c.Interfaces = []string{"eth0"} }), "apply to scope \"gateway\" only"},
		{"nft wildcard interface", with(func(c *Config) { c.Scope = ScopeGateway; c.Interfaces = []string{"veth*"} }), `"veth*"`},
		{"inner wildcard interface", with(func(c *Config) { c.Scope = ScopeGateway; c.Interfaces = []string{"ve+th"} }), `"ve+th"`},
		{"long wildcard interface", with(func(c *Config) { c.Scope = ScopeGateway; c.Interfaces = []string{"abcdefghijklmno+"} }), `"abcdefghijklmno+"`},
		{"bare wildcard interface", with(func(c *Config) { c.Scope = ScopeGateway; c.Interfaces = []string{"+"} }), `"+"`},
		{"long interface", with(func(c *Config) { c.Scope = ScopeGateway; c.Interfaces = []string{"abcdefghijklmnop"} }), "not a Linux interface name"},
		{"include v6 without ipv6", with(func(c *Config) { c.Include = prefixes("fd00::/8") }), "include fd00::/8 is IPv6"},
		{"empty proxy", with(func(c *Config) { c.Proxies = []netip.Addr{{}} }), "proxy address is empty"},
		{"invalid exclude", with(func(c *Config) { c.Exclude = []netip.Prefix{{}} }), "exclude: invalid prefix"},
		{"tproxy addr family", with(func(c *Config) { c.TProxyAddr4 = netip.IPv6Loopback() }), "TPROXY address ::1 is not IPv4"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			nft, err := NFT(tc.cfg)
			if err == nil || !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("NFT error = %v, want ErrConfig with %q", err, tc.want)
			}
			if nft != "" {
				t.Errorf("NFT returned rules with its error")
			}
			v4, v6, err2 := IPTables(tc.cfg)
			if err2 == nil || err2.Error() != err.Error() || v4 != "" || v6 != "" {
				t.Errorf("IPTables = %q, %q, %v; want the same error as NFT", v4, v6, err2)
			}
			if r := Routes(tc.cfg); r != nil {
				t.Errorf("Routes = %q for an invalid config", r)
			}
		})
	}
}

// A mark equal to the default route mark is fine where nothing is routed
// by mark.
func TestRedirectIgnoresRouteMark(t *testing.T) {
	cfg := Config{Mode: ModeRedirect, Scope: ScopeLocal, TCPPort: 12345, Mark: DefaultRouteMark}
	if _, err := NFT(cfg); err != nil {
		t.Fatal(err)
	}
	if r := Routes(cfg); r != nil {
		t.Errorf("Routes = %q for redirect mode, want nil", r)
	}
}

func TestRoutes(t *testing.T) {
	cfg := Config{Mode: ModeTProxy, Scope: ScopeGateway, UDPPort: 1, IPv6: true, RouteMark: 0x20, RouteTable: 1000}
	want := []string{
		"ip rule add fwmark 0x20 lookup 1000",
		"ip route add local 0.0.0.0/0 dev lo table 1000",
		"ip -6 rule add fwmark 0x20 lookup 1000",
		"ip -6 route add local ::/0 dev lo table 1000",
	}
	if got := Routes(cfg); !slices.Equal(got, want) {
		t.Errorf("Routes = %q, want %q", got, want)
	}
	cfg.UDPPort, cfg.DNSPort = 0, 53 // DNS goes by REDIRECT: no routing needed
	if got := Routes(cfg); got != nil {
		t.Errorf("Routes = %q with DNS capture alone, want nil", got)
	}
}

func TestPrefixNormalisation(t *testing.T) {
	cfg := Config{
		Mode: ModeRedirect, Scope: ScopeLocal, TCPPort: 1, IPv6: true,
		Proxies: addrs("::ffff:192.0.2.1", "192.0.2.1", "fe80::1%eth0"),
		Exclude: prefixes("10.1.2.3/16", "10.0.0.0/8", "::ffff:172.16.0.0/108", "10.0.0.0/8", "2001:db8::/32", "2001:db8:1::/48"),
		Include: prefixes("192.168.0.0/16", "192.168.1.0/24"),
	}
	p, err := newPlan(cfg)
	if err != nil {
		t.Fatal(err)
	}
	v4, v6 := p.families[0], p.families[1]
	if got, want := addrStrings(v4.proxies), []string{"192.0.2.1"}; !slices.Equal(got, want) {
		t.Errorf("IPv4 proxies = %q, want %q (mapped address unmapped, duplicates gone)", got, want)
	}
	if got, want := addrStrings(v6.proxies), []string{"fe80::1"}; !slices.Equal(got, want) {
		t.Errorf("IPv6 proxies = %q, want %q (zone dropped)", got, want)
	}
	if got, want := prefixStrings(v4.skip), []string{"10.0.0.0/8", "172.16.0.0/12", "224.0.0.0/4", "255.255.255.255/32"}; !slices.Equal(got, want) {
		t.Errorf("IPv4 skip = %q, want %q", got, want)
	}
	if got, want := prefixStrings(v6.skip), []string{"2001:db8::/32", "ff00::/8"}; !slices.Equal(got, want) {
		t.Errorf("IPv6 skip = %q, want %q", got, want)
	}
	if got, want := prefixStrings(v4.include), []string{"192.168.0.0/16"}; !slices.Equal(got, want) {
		t.Errorf("IPv4 include = %q, want %q", got, want)
	}
}

// With IPv6 off, no IPv6 rule is written and IPv6 passes the nft chains.
func TestNoIPv6RulesWithoutIPv6(t *testing.T) {
	cfg := Config{Mode: ModeTProxy, Scope: ScopeLocal, TCPPort: 1, UDPPort: 2, DNSPort: 3, Proxies: addrs("2001:db8::1")}
	nft, err := NFT(cfg)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{"ip6 ", "ipv6_addr", "[::1]"} {
		if strings.Contains(nft, s) {
			t.Errorf("nft script with IPv6 off contains %q", s)
		}
	}
	if !strings.Contains(nft, "meta nfproto ipv6 return") {
		t.Errorf("nft script with IPv6 off does not pass IPv6 by")
	}
	if _, v6, _ := IPTables(cfg); v6 != "" {
		t.Errorf("ip6tables input with IPv6 off: %q", v6)
	}
}

// TestRemovalAsHeaders: what `socksfwd rules --remove` prints is what each
// rule set's header says removes it, which the kernel tests run.
func TestRemovalAsHeaders(t *testing.T) {
	for _, tc := range goldenCases {
		t.Run(tc.name, func(t *testing.T) {
			headerLines := func(s string, keep func(cmd string) bool) []string {
				var out []string
				for _, l := range strings.Split(s, "\n") {
					if cmd, ok := strings.CutPrefix(l, "#   "); ok && keep(cmd) {
						out = append(out, cmd)
					}
				}
				return out
			}
			command := func(name string) func(string) bool {
				return func(cmd string) bool { return strings.HasPrefix(cmd, name+" ") }
			}
			routeDel := func(cmd string) bool { return strings.HasPrefix(cmd, "ip ") && strings.Contains(cmd, " del ") }
			v4, v6, err := IPTables(tc.cfg)
			if err != nil {
				t.Fatal(err)
			}
			nft, err := NFT(tc.cfg)
			if err != nil {
				t.Fatal(err)
			}
			want := map[string][]string{
				"iptables": headerLines(v4, command("iptables")),
				"nft":      {"nft delete table inet socksfwd"},
				"routes":   headerLines(nft, routeDel),
			}
			if tc.cfg.IPv6 {
				want["ip6tables"] = headerLines(v6, command("ip6tables"))
			}
			for format, w := range want {
				got, err := Removal(tc.cfg, format)
				if err != nil {
					t.Fatalf("%s: %v", format, err)
				}
				if !slices.Equal(got, w) {
					t.Errorf("%s removal:\n%s\nthe header's:\n%s", format, strings.Join(got, "\n"), strings.Join(w, "\n"))
				}
			}
		})
	}
}

// TestRemovalShellWords: the removal lines are shell commands (rules
// --remove | sh), and an interface name may hold what the shell reads
// otherwise; sh reads back the very words of each jump's removal, the
// interface name one word.
func TestRemovalShellWords(t *testing.T) {
	names := []string{"br(1)", "x;id>&2", "a$b", "veth+", "eth0.100"}
	cfg := Config{Mode: ModeTProxy, Scope: ScopeGateway, TCPPort: 12345, Proxies: addrs("192.0.2.10"), Interfaces: names}
	lines, err := Removal(cfg, "iptables")
	if err != nil {
		t.Fatal(err)
	}
	var seen []string
	for _, l := range lines {
		words, err := exec.Command("sh", "-c", "set -- "+l+`; for w in "$@"; do printf '%s\n' "$w"; done`).Output()
		if err != nil {
			t.Fatalf("sh reading %q: %v", l, err)
		}
		w := strings.Split(strings.TrimSuffix(string(words), "\n"), "\n")
		if i := slices.Index(w, "-i"); i >= 0 {
			if i+2 >= len(w) || w[i+2] != "-j" {
				t.Errorf("%q: the interface is not one word: %q", l, w)
				continue
			}
			seen = append(seen, w[i+1])
		}
	}
	if !slices.Equal(seen, names) {
		t.Errorf("sh reads the interfaces %q, want %q:\n%s", seen, names, strings.Join(lines, "\n"))
	}
}
