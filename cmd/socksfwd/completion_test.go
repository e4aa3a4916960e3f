package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/urfave/cli/v2"

	"github.com/socksfwd/socksfwd/internal/peertest"
)

// runOK runs socksfwd with args and returns its standard output; any
// other exit than 0 fails the test.
func runOK(t *testing.T, args ...string) string {
	t.Helper()
	var out, errOut strings.Builder
	if code := run(append([]string{"socksfwd"}, args...), &out, &errOut, func(string) string { return "" }); code != exitOK {
		t.Fatalf("socksfwd %s: exit %d: %s", strings.Join(args, " "), code, errOut.String())
	}
	return out.String()
}

// documentedFlags is every long flag a user can type, top-level and of
// the subcommands, hidden ones apart, read from the command line's
// definitions; every option of the table must be among them.
func documentedFlags(t *testing.T) (visible, hidden []string) {
	t.Helper()
	app := newApp(nil, nil, func(string) string { return "" }, new(mergedConfig))
	flags := slices.Clone(app.Flags)
	for _, c := range app.Commands {
		if !c.Hidden {
			flags = append(flags, c.Flags...)
		}
	}
	for _, f := range flags {
		name := f.Names()[0]
		if vf, ok := f.(cli.VisibleFlag); ok && !vf.IsVisible() {
			hidden = append(hidden, name)
		} else if !slices.Contains(visible, name) {
			visible = append(visible, name)
		}
	}
	visible = append(visible, "help", "version")
	for _, o := range options {
		if !o.hidden && !slices.Contains(visible, o.name) {
			t.Fatalf("option %s has no flag", o.name)
		}
	}
	if len(hidden) == 0 {
		t.Fatal("no hidden option left to check that hidden ones stay out")
	}
	return visible, hidden
}

// topFlags is every name of every visible top-level flag, as typed.
func topFlags() []string {
	app := newApp(nil, nil, func(string) string { return "" }, new(mergedConfig))
	var out []string
	for _, f := range append(app.VisibleFlags(), cli.HelpFlag, cli.VersionFlag) {
		for _, n := range f.Names() {
			if len(n) == 1 {
				out = append(out, "-"+n)
			} else {
				out = append(out, "--"+n)
			}
		}
	}
	return out
}

// TestCompletionScripts: each shell's script names every flag but the
// hidden ones and parses in its shell.
func TestCompletionScripts(t *testing.T) {
	verifyNoLeaks(t)
	visible, hidden := documentedFlags(t)
	// How each script spells a long flag.
	spell := map[string]func(string) string{
		"bash": func(n string) string { return "--" + n },
		"zsh":  func(n string) string { return "--" + n },
		"fish": func(n string) string { return "-l " + n },
	}
	for _, shell := range completionShells {
		t.Run(shell, func(t *testing.T) {
			script := runOK(t, "completion", shell)
			words := strings.FieldsFunc(script, func(r rune) bool {
				return r == ' ' || r == '\t' || r == '\n' || r == '\'' || r == '|' || r == '{' || r == '}' || r == ',' || r == '[' || r == ')' || r == '='
			})
			has := func(name string) bool {
				if shell == "fish" {
					return strings.Contains(script, spell[shell](name)+" ")
				}
				return slices.Contains(words, spell[shell](name))
			}
			for _, name := range visible {
				if !has(name) {
					t.Errorf("--%s is missing", name)
				}
			}
			for _, name := range hidden {
				if has(name) {
					t.Errorf("hidden --%s is offered", name)
				}
			}
			for _, sub := range []string{"rules", "completion"} {
				if !strings.Contains(script, sub) {
					t.Errorf("subcommand %s is missing", sub)
				}
			}
			if strings.Contains(script, "'man'") || slices.Contains(words, "man") {
				t.Error("the hidden man subcommand is offered")
			}
			bin := peertest.Require(t, shell)
			path := filepath.Join(t.TempDir(), "socksfwd."+shell)
			if err := os.WriteFile(path, []byte(script), 0o644); err != nil {
				t.Fatal(err)
			}
			if out, err := exec.Command(bin, "-n", path).CombinedOutput(); err != nil || len(out) > 0 {
				t.Errorf("%s -n: %v\n%s", shell, err, out)
			}
		})
	}
}

// TestCompletionBash runs the bash function as bash's completion would,
// word by word, and checks what it offers.
func TestCompletionBash(t *testing.T) {
	verifyNoLeaks(t)
	dir := t.TempDir()
	script := filepath.Join(dir, "socksfwd.bash")
	if err := os.WriteFile(script, []byte(runOK(t, "completion", "bash")), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"abc.toml", "abd.toml"} {
		if err := os.WriteFile(filepath.Join(dir, f), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	top := topFlags()
	if !slices.Contains(top, "--dns-upstream") || !slices.Contains(top, "-S") || slices.Contains(top, "--relay-copy") {
		t.Fatalf("top-level flags %q", top)
	}
	tests := []struct {
		words []string // the command line so far; the last one is being completed
		want  []string
	}{
		{[]string{"socksfwd", "--log-le"}, []string{"--log-level"}},
		{[]string{"socksfwd", "--log-level", ""}, []string{"debug", "info", "warn", "error"}},
		{[]string{"socksfwd", "--log-level", "=", "w"}, []string{"warn"}}, // --log-level=w
		{[]string{"socksfwd", "--dns-up"}, []string{"--dns-upstream"}},
		{[]string{"socksfwd", "-S", ""}, nil}, // a value: no flags offered
		{[]string{"socksfwd", "-S", "p:1", "-"}, top},
		{[]string{"socksfwd", "r"}, []string{"rules"}},
		{[]string{"socksfwd", "-S", "p:1", "comp"}, []string{"completion"}},
		{[]string{"socksfwd", "rules", "--mo"}, []string{"--mode"}},
		{[]string{"socksfwd", "rules", "--scope", "g"}, []string{"gateway"}},
		{[]string{"socksfwd", "-L", "1:h:2", "rules", "--format", "ip"}, []string{"iptables", "ip6tables"}},
		{[]string{"socksfwd", "-c", "rules", "--mo"}, nil}, // "rules" is -c's file here: no rules flags
		{[]string{"socksfwd", "rules", ""}, nil},
		{[]string{"socksfwd", "completion", ""}, []string{"bash", "zsh", "fish"}},
		{[]string{"socksfwd", "-c", filepath.Join(dir, "ab")}, []string{filepath.Join(dir, "abc.toml"), filepath.Join(dir, "abd.toml")}},
		{[]string{"socksfwd", "--server-password-file", filepath.Join(dir, "abc")}, []string{filepath.Join(dir, "abc.toml")}},
	}
	for _, tc := range tests {
		// bash sources the script, then calls the function as completion
		// does: COMP_WORDS and COMP_CWORD set, COMPREPLY read back.
		args := append([]string{"-c", `source "$1"; shift; COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); _socksfwd; printf '%s\n' "${COMPREPLY[@]}"`, "bash", script}, tc.words...)
		cmd := exec.Command("bash", args...)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil || stderr.Len() > 0 {
			t.Errorf("%q: %v: %s", tc.words, err, stderr.String())
			continue
		}
		got := strings.Fields(string(out))
		if !sameSet(got, tc.want) {
			t.Errorf("%q: offered %q, want %q", tc.words, got, tc.want)
		}
	}
}

// TestCompletionFish asks fish itself what it completes, when fish is
// installed.
func TestCompletionFish(t *testing.T) {
	verifyNoLeaks(t)
	peertest.Require(t, "fish")
	script := filepath.Join(t.TempDir(), "socksfwd.fish")
	if err := os.WriteFile(script, []byte(runOK(t, "completion", "fish")), 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		line string
		want []string
	}{
		{"socksfwd --log-le", []string{"--log-level"}},
		{"socksfwd --log-level ", []string{"debug", "info", "warn", "error"}},
		{"socksfwd --dns-transport=u", []string{"--dns-transport=udp"}},
		{"socksfwd ru", []string{"rules"}},
		{"socksfwd -c x.toml comp", []string{"completion"}},
		{"socksfwd rules --scope ", []string{"local", "gateway"}},
		{"socksfwd completion ", []string{"bash", "zsh", "fish"}},
	}
	for _, tc := range tests {
		// The working directory is empty: file names would show up in
		// completions that must not offer them.
		cmd := exec.Command("fish", "--no-config", "-c", "source $argv[1]; complete -C $argv[2]", script, tc.line)
		cmd.Dir = t.TempDir()
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Errorf("%q: %v: %s", tc.line, err, out)
			continue
		}
		var got []string
		for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			if w, _, _ := strings.Cut(l, "\t"); w != "" {
				got = append(got, w)
			}
		}
		if !sameSet(got, tc.want) {
			t.Errorf("%q: offered %q, want %q", tc.line, got, tc.want)
		}
	}
}

func sameSet(a, b []string) bool {
	a, b = slices.Sorted(slices.Values(a)), slices.Sorted(slices.Values(b))
	return slices.Equal(a, b)
}

func TestCompletionUsage(t *testing.T) {
	verifyNoLeaks(t)
	for _, args := range [][]string{{"completion"}, {"completion", "tcsh"}, {"completion", "bash", "zsh"}} {
		var out, errOut strings.Builder
		if code := run(append([]string{"socksfwd"}, args...), &out, &errOut, func(string) string { return "" }); code != exitUsage {
			t.Errorf("socksfwd %v: exit %d, want %d; stderr: %s", args, code, exitUsage, errOut.String())
		}
		if !strings.Contains(errOut.String(), "bash") {
			t.Errorf("socksfwd %v: the error does not name the shells: %s", args, errOut.String())
		}
	}
}

func TestChoicesOf(t *testing.T) {
	tests := []struct {
		usage string
		want  []string
	}{
		{"debug | info | warn | error (env SOCKSFWD_LOG_LEVEL)", []string{"debug", "info", "warn", "error"}},
		{"tcp (DNS over TCP through CONNECT, works everywhere) | udp (one UDP ASSOCIATE)", []string{"tcp", "udp"}},
		{"bash|zsh|fish", []string{"bash", "zsh", "fish"}},
		{"connect | bind | udp (UDP ASSOCIATE and DNS over it) | dns-udp | dns-tcp (a check not to run; repeatable)", []string{"connect", "bind", "udp", "dns-udp", "dns-tcp"}},
		{"upstream SOCKS5 server, repeat for failover: host:port | socks5h://[user[:pass]@]host[:port] | socks5://…", nil},
		{"cached DNS answers (0 disables the cache)", nil},
		{"", nil},
	}
	for _, tc := range tests {
		if got := choicesOf(tc.usage); !slices.Equal(got, tc.want) {
			t.Errorf("choicesOf(%q) = %q, want %q", tc.usage, got, tc.want)
		}
	}
}
