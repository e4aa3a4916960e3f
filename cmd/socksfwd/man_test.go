package main

import (
	"bytes"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"

	"github.com/socksfwd/socksfwd/internal/peertest"
)

// namesFlag matches --name as a whole flag: not the start of a longer one.
func namesFlag(text, name string) bool {
	return regexp.MustCompile(`--` + regexp.QuoteMeta(name) + `([^a-z0-9-]|$)`).MatchString(text)
}

// TestManPage: the page names every flag but the hidden ones, and groff
// renders it without a warning, the names intact (no hyphenation).
func TestManPage(t *testing.T) {
	verifyNoLeaks(t)
	page := runOK(t, "man")
	visible, hidden := documentedFlags(t)
	for _, name := range visible {
		if name == "help" || name == "version" {
			continue // urfave's own, not documented as options
		}
		if !namesFlag(page, name) {
			t.Errorf("--%s is missing", name)
		}
	}
	for _, name := range hidden {
		if namesFlag(page, name) {
			t.Errorf("hidden --%s is documented", name)
		}
	}
	// What markdown could eat of a usage: a bracketed part ("host[:port]
	// (port 53)" reads as a link), and urfave's ="" after a flag.
	bracketed := regexp.MustCompile(`\[[^\[\]]*\]`)
	for _, o := range options {
		if o.hidden {
			continue
		}
		line := regexp.MustCompile(`(?m)^\\fB--` + regexp.QuoteMeta(o.name) + `[\\,].*$`).FindString(page)
		if line == "" {
			t.Errorf("--%s has no line of its own", o.name)
		}
		for _, part := range bracketed.FindAllString(o.usage, -1) {
			if !strings.Contains(line, part) {
				t.Errorf("--%s: %q of its usage is lost: %s", o.name, part, line)
			}
		}
	}
	if strings.Contains(page, `=""`) {
		t.Error(`the page writes a value as =""`)
	}
	for _, r := range page {
		if r >= 0x80 {
			t.Fatalf("the page holds %q: formatters that read it as Latin-1 would garble it", r)
		}
	}
	groff := peertest.Require(t, "groff")
	// -ww: every warning; -P-cbou: plain text, no overstriking.
	cmd := exec.Command(groff, "-man", "-Tutf8", "-ww", "-P-cbou")
	cmd.Stdin = strings.NewReader(page)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	text, err := cmd.Output()
	if err != nil || stderr.Len() > 0 {
		t.Fatalf("groff: %v\n%s", err, stderr.String())
	}
	for _, name := range visible {
		if name != "help" && name != "version" && !namesFlag(string(text), name) {
			t.Errorf("--%s does not come out whole in the rendered page", name)
		}
	}
	for _, l := range strings.Split(string(text), "\n") {
		if strings.HasSuffix(l, "\u2010") {
			t.Errorf("a word is hyphenated: %q", l)
		}
	}
	for _, section := range []string{"NAME", "SYNOPSIS", "DESCRIPTION", "GLOBAL OPTIONS", "COMMANDS", "ENVIRONMENT", "EXIT STATUS"} {
		if !regexp.MustCompile(`(?m)^` + section + `$`).Match(text) {
			t.Errorf("no %s section in the rendered page", section)
		}
	}
}

// TestManPageCommitted: docs/socksfwd.1 is what `make man` makes now.
func TestManPageCommitted(t *testing.T) {
	verifyNoLeaks(t)
	committed, err := os.ReadFile("../../docs/socksfwd.1")
	if err != nil {
		t.Fatal(err)
	}
	if string(committed) != runOK(t, "man") {
		t.Fatal("docs/socksfwd.1 differs from the flag definitions: run make man")
	}
}
