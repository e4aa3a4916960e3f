package main

import (
	"encoding/json"
	"os"
	"regexp"
	"strings"
	"testing"
)

// TestDockerfileGoVersion: the image builds with go.mod's Go.
func TestDockerfileGoVersion(t *testing.T) {
	gomod, err := os.ReadFile("../../go.mod")
	if err != nil {
		t.Fatal(err)
	}
	dockerfile, err := os.ReadFile("../../contrib/docker/Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	want := regexp.MustCompile(`(?m)^go (\S+)$`).FindSubmatch(gomod)
	got := regexp.MustCompile(`(?m)^ARG GO_VERSION=(\S+)$`).FindSubmatch(dockerfile)
	if want == nil || got == nil {
		t.Fatalf("no go line in go.mod (%q) or no ARG GO_VERSION in the Dockerfile (%q)", want, got)
	}
	if string(got[1]) != string(want[1]) {
		t.Errorf("contrib/docker/Dockerfile builds with Go %s, go.mod says %s", got[1], want[1])
	}
}

// TestKubernetesSidecarArgs runs the example pod's two socksfwd command
// lines: the init container's rules and the sidecar's configuration must
// be accepted, and agree on ports and mark.
func TestKubernetesSidecarArgs(t *testing.T) {
	verifyNoLeaks(t)
	manifest, err := os.ReadFile("../../contrib/kubernetes/sidecar.yaml")
	if err != nil {
		t.Fatal(err)
	}
	// Both lists are YAML flow sequences of double-quoted strings: JSON.
	lists := regexp.MustCompile(`(?s)\n\s*args: (\[[^\]]*\])`).FindAllSubmatch(manifest, -1)
	if len(lists) != 2 {
		t.Fatalf("want 2 args lists (rules, sidecar), found %d", len(lists))
	}
	var rulesArgs, sidecarArgs []string
	if err := json.Unmarshal(lists[0][1], &rulesArgs); err != nil {
		t.Fatalf("rules args: %v", err)
	}
	if err := json.Unmarshal(lists[1][1], &sidecarArgs); err != nil {
		t.Fatalf("sidecar args: %v", err)
	}
	// The Secret's upstream; a documentation address, never dialled.
	env := map[string]string{"SOCKSFWD_SERVER": "socks5h://user:pw@192.0.2.1:1080"}
	getenv := func(k string) string { return env[k] }
	runArgs := func(args []string) string {
		t.Helper()
		var out, errOut strings.Builder
		if code := run(append([]string{"socksfwd"}, args...), &out, &errOut, getenv); code != exitOK {
			t.Fatalf("socksfwd %s: exit %d: %s", strings.Join(args, " "), code, errOut.String())
		}
		return out.String()
	}
	rules := runArgs(append([]string{"rules"}, rulesArgs...))
	for _, want := range []string{"meta mark 0x438 return", "redirect to :12345", "redirect to :5353", "elements = { 192.0.2.1 }"} {
		if !strings.Contains(rules, want) {
			t.Errorf("the init container's rules lack %q:\n%s", want, rules)
		}
	}
	config := runArgs(append(sidecarArgs, "--print-config"))
	for _, want := range []string{`transparent = ['12345']`, `dns = '5353'`, `mark = '0x438'`} {
		if !strings.Contains(config, want) {
			t.Errorf("the sidecar's configuration lacks %q:\n%s", want, config)
		}
	}
	// The rules must be made for the listeners the sidecar runs.
	for _, flag := range []string{"--transparent", "--dns", "--dns-upstream", "--mark"} {
		if r, s := flagValue(rulesArgs, flag), flagValue(sidecarArgs, flag); r != s || r == "" {
			t.Errorf("%s: the rules have %q, the sidecar %q", flag, r, s)
		}
	}
}

func flagValue(args []string, flag string) string {
	for i, a := range args {
		if a == flag && i+1 < len(args) {
			return args[i+1]
		}
	}
	return ""
}
