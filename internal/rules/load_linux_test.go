package rules

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/socksfwd/socksfwd/internal/peertest"
)

// These tests load every golden variant into the kernel, each into a
// network namespace of its own that is deleted afterwards: the rules
// `socksfwd rules` prints are known to load here, not just to look right.

var netnsCount atomic.Int64

// newNetns creates an empty network namespace (loopback up) for one test.
func newNetns(t *testing.T) string {
	t.Helper()
	name := fmt.Sprintf("socksfwd-rules-%d-%d", os.Getpid(), netnsCount.Add(1))
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", name, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", name, err, out)
		}
	})
	inNetns(t, name, "", "ip", "link", "set", "lo", "up")
	return name
}

// inNetns runs argv inside namespace ns with stdin, failing the test on error.
func inNetns(t *testing.T, ns, stdin string, argv ...string) string {
	t.Helper()
	out, err := tryInNetns(ns, stdin, argv...)
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(argv, " "), err, out)
	}
	return out
}

func tryInNetns(ns, stdin string, argv ...string) (string, error) {
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns}, argv...)...)
	cmd.Stdin = strings.NewReader(stdin)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}

func requireKernelTools(t *testing.T, programs ...string) {
	t.Helper()
	peertest.RequireRoot(t)
	for _, p := range append([]string{"ip"}, programs...) {
		peertest.Require(t, p)
	}
}

func TestNFTLoads(t *testing.T) {
	requireKernelTools(t, "nft")
	for _, tc := range goldenCases {
		t.Run(tc.name, func(t *testing.T) {
			script, err := NFT(tc.cfg)
			if err != nil {
				t.Fatal(err)
			}
			ns := newNetns(t)
			path := t.TempDir() + "/rules.nft"
			if err := os.WriteFile(path, []byte(script), 0o644); err != nil {
				t.Fatal(err)
			}
			inNetns(t, ns, "", "nft", "-f", path)
			first := inNetns(t, ns, "", "nft", "list", "table", "inet", "socksfwd")
			// A second load replaces the table rather than adding to it.
			inNetns(t, ns, "", "nft", "-f", path)
			if second := inNetns(t, ns, "", "nft", "list", "table", "inet", "socksfwd"); second != first {
				t.Errorf("a second load changed the table:\nfirst:\n%s\nsecond:\n%s", first, second)
			}
			for _, line := range Routes(tc.cfg) {
				inNetns(t, ns, "", strings.Fields(line)...)
			}
			if routes := Routes(tc.cfg); routes != nil {
				if rules := inNetns(t, ns, "", "ip", "rule", "show"); !strings.Contains(rules, "fwmark") {
					t.Errorf("ip rule show has no fwmark rule after %q:\n%s", routes, rules)
				}
			}
			// Removal's route commands take the routes away again.
			del, err := Removal(tc.cfg, "routes")
			if err != nil {
				t.Fatal(err)
			}
			for _, line := range del {
				inNetns(t, ns, "", strings.Fields(line)...)
			}
			if rules := inNetns(t, ns, "", "ip", "rule", "show"); strings.Contains(rules, "fwmark") {
				t.Errorf("ip rule show still has a fwmark rule after %q:\n%s", del, rules)
			}
			// The removal the header gives leaves nothing behind.
			const remove = "nft delete table inet socksfwd"
			if !strings.Contains(script, "Remove: "+remove) {
				t.Fatalf("the script does not say how to remove it (%q)", remove)
			}
			inNetns(t, ns, "", strings.Fields(remove)...)
			if left := inNetns(t, ns, "", "nft", "list", "ruleset"); strings.Contains(left, "socksfwd") {
				t.Errorf("%q left:\n%s", remove, left)
			}
		})
	}
}

// TestIPTablesLoads loads the iptables-restore inputs with both iptables
// backends Debian ships (nf_tables, the default, and legacy x_tables).
func TestIPTablesLoads(t *testing.T) {
	for _, backend := range []string{"nft", "legacy"} {
		t.Run(backend, func(t *testing.T) {
			requireKernelTools(t, "iptables-"+backend+"-restore", "ip6tables-"+backend+"-restore",
				"iptables-"+backend+"-save", "ip6tables-"+backend+"-save")
			for _, tc := range goldenCases {
				t.Run(tc.name, func(t *testing.T) {
					v4, v6, err := IPTables(tc.cfg)
					if err != nil {
						t.Fatal(err)
					}
					ns := newNetns(t)
					loadIPTables(t, ns, "iptables-"+backend, v4)
					if tc.cfg.IPv6 {
						loadIPTables(t, ns, "ip6tables-"+backend, v6)
					}
				})
			}
		})
	}
}

// loadIPTables loads input with command's restore (command is iptables-nft,
// ip6tables-legacy...), removes it with the commands its header lists, and
// loads it again: the same rules come back.
func loadIPTables(t *testing.T, ns, command, input string) {
	t.Helper()
	save := func() string {
		out := inNetns(t, ns, "", command+"-save")
		var kept []string
		for _, l := range strings.Split(out, "\n") {
			if !strings.HasPrefix(l, "#") { // the dates
				kept = append(kept, l)
			}
		}
		return strings.Join(kept, "\n")
	}
	inNetns(t, ns, input, command+"-restore", "--noflush")
	first := save()
	if !strings.Contains(first, "-j SOCKSFWD_") {
		t.Fatalf("%s-save shows no jump to our chains:\n%s", command, first)
	}

	// The header's removal commands name the plain command (iptables,
	// ip6tables); run them with this backend's.
	plain, _, _ := strings.Cut(command, "-")
	var removed int
	for _, l := range strings.Split(input, "\n") {
		argv, ok := strings.CutPrefix(l, "#   "+plain+" ")
		if !ok {
			continue
		}
		inNetns(t, ns, "", append([]string{command}, strings.Fields(argv)...)...)
		removed++
	}
	if removed == 0 {
		t.Fatalf("the input's header lists no removal command:\n%s", input)
	}
	if left := save(); strings.Contains(left, "SOCKSFWD") {
		t.Errorf("after the header's removal commands:\n%s", left)
	}

	inNetns(t, ns, input, command+"-restore", "--noflush")
	if again := save(); again != first {
		t.Errorf("loading again after removal gave other rules:\nfirst:\n%s\nagain:\n%s", first, again)
	}
}
