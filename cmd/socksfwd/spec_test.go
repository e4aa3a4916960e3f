package main

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestParseLocal(t *testing.T) {
	tests := []struct {
		spec   string
		binds  []string
		target string
		udp    bool
		err    string
	}{
		{spec: "5432:db.internal:5432", binds: []string{"127.0.0.1:5432"}, target: "db.internal:5432"},
		{spec: "0.0.0.0:80:web:8080", binds: []string{"0.0.0.0:80"}, target: "web:8080"},
		{spec: "*:80:web:8080", binds: []string{":80"}, target: "web:8080"},
		{spec: ":80:web:8080", binds: []string{":80"}, target: "web:8080"},
		{spec: "localhost:80:web:8080", binds: []string{"127.0.0.1:80", "[::1]:80"}, target: "web:8080"},
		{spec: "[::1]:5432:[2001:db8::5]:5432", binds: []string{"[::1]:5432"}, target: "[2001:db8::5]:5432"},
		{spec: "[::]:53:10.0.0.53:53/udp", binds: []string{"[::]:53"}, target: "10.0.0.53:53", udp: true},
		{spec: "8080:web:80/tcp", binds: []string{"127.0.0.1:8080"}, target: "web:80"},
		{spec: "5432:db", err: "want [bind:]port:host:hostport"},
		{spec: "a:b:c:d:e", err: "want [bind:]port:host:hostport"},
		{spec: "x:db:5432", err: "invalid local port"},
		{spec: "1:db:0", err: "invalid target port"},
		{spec: "1:db:70000", err: "invalid target port"},
		{spec: "[::1:5432:db:1", err: "unbalanced"},
		{spec: "1:[fe80::1%eth0]:80", err: "zone"},
	}
	for _, tc := range tests {
		lf, err := parseLocal(tc.spec)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("parseLocal(%q) err = %v, want %q", tc.spec, err, tc.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("parseLocal(%q): %v", tc.spec, err)
			continue
		}
		if !reflect.DeepEqual(lf.Binds, tc.binds) || lf.Target.String() != tc.target || lf.UDP != tc.udp {
			t.Errorf("parseLocal(%q) = %v → %v udp=%v; want %v → %v udp=%v", tc.spec, lf.Binds, lf.Target, lf.UDP, tc.binds, tc.target, tc.udp)
		}
	}
}

func TestParseRemote(t *testing.T) {
	tests := []struct {
		spec, remote, target, err string
	}{
		{spec: "8080:127.0.0.1:80", remote: "0.0.0.0:8080", target: "127.0.0.1:80"},
		{spec: "0:localhost:80", remote: "0.0.0.0:0", target: "localhost:80"},
		{spec: "10.0.0.5:8080:web:80", remote: "10.0.0.5:8080", target: "web:80"},
		{spec: "*:8080:web:80", remote: "0.0.0.0:8080", target: "web:80"},
		{spec: ":8080:web:80", remote: "0.0.0.0:8080", target: "web:80"},
		{spec: "[2001:db8::7]:8080:[::1]:80", remote: "[2001:db8::7]:8080", target: "[::1]:80"},
		{spec: "peer.example:0:[::1]:80", remote: "peer.example:0", target: "[::1]:80"},
		{spec: "8080:web", err: "want [bind_address:]port:host:hostport"},
		{spec: "x:web:80", err: "invalid port"},
		{spec: "70000:web:80", err: "invalid port"},
		{spec: "1:web:0", err: "invalid target port"},
		{spec: "[::1:1:web:80", err: "unbalanced"},
	}
	for _, tc := range tests {
		rf, err := parseRemote(tc.spec)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) || !strings.HasPrefix(err.Error(), "-R ") {
				t.Errorf("parseRemote(%q) err = %v, want -R … %q", tc.spec, err, tc.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("parseRemote(%q): %v", tc.spec, err)
			continue
		}
		if rf.Remote.String() != tc.remote || rf.Target.String() != tc.target {
			t.Errorf("parseRemote(%q) = %v → %v; want %v → %v", tc.spec, rf.Remote, rf.Target, tc.remote, tc.target)
		}
	}
}

func TestParseServer(t *testing.T) {
	tests := []struct {
		raw, user, pass    string
		addr, wantU, wantP string
		local              bool
		err                string
	}{
		{raw: "proxy", addr: "proxy:1080"},
		{raw: "proxy:9050", addr: "proxy:9050"},
		{raw: "::1", addr: "[::1]:1080"},
		{raw: "[::1]", addr: "[::1]:1080"},
		{raw: "[::1]:1081", addr: "[::1]:1081"},
		// Neither a name nor an address: a name has no colon.
		{raw: "proxy:1080:extra", err: "an IPv6 address in brackets"},
		// Whole, an address (portInBareIPv6 warns of it).
		{raw: "2001:db8::1:1080", addr: "[2001:db8::1:1080]:1080"},
		{raw: "socks5h://proxy", addr: "proxy:1080"},
		{raw: "socks5h://u:p%40ss%3Aw%2Frd%25@[2001:db8::1]:1080/", addr: "[2001:db8::1]:1080", wantU: "u", wantP: "p@ss:w/rd%"},
		{raw: "socks5://proxy:1", addr: "proxy:1", local: true},
		{raw: "socks5h://proxy", user: "alice", pass: "pw", addr: "proxy:1080", wantU: "alice", wantP: "pw"},
		{raw: "socks5h://bob:x@proxy", user: "alice", pass: "pw", addr: "proxy:1080", wantU: "bob", wantP: "x"},
		{raw: "http://proxy:3128", err: `unsupported scheme "http"`},
		{raw: "socks5h://proxy:0", err: "invalid port"},
		{raw: "socks5h://proxy/path", err: "no path"},
		{raw: "socks5h://bob@proxy", err: "has no password"},
		{raw: "socks5h://:1080", err: "want host[:port]"},
		{raw: "alice:s3cret@proxy", addr: "proxy:1080", wantU: "alice", wantP: "s3cret"},
		{raw: "alice:s3cret@proxy:1081", addr: "proxy:1081", wantU: "alice", wantP: "s3cret"},
		{raw: "socks5h://alice:/s3cret@p", err: "no path"},
		{raw: "socks5h://alice:pw9", err: "not a valid URL"},
		{raw: "socks5h://alice:pw9?ss@p", err: "not a valid URL"},
		// A username in the URL takes --server-password-file's password
		// (pass here, with no --server-user); another user's stays away.
		{raw: "socks5h://bob@proxy", pass: "pw", addr: "proxy:1080", wantU: "bob", wantP: "pw"},
		{raw: "socks5h://bob@proxy", user: "alice", pass: "pw", err: "has no password"},
		{raw: "socks5h://proxy", pass: "pw", addr: "proxy:1080"},
		// What a '?' or ',' cut from a password is never shown: the part
		// before the '?' parses as the host, the part after a list's ','
		// as the username.
		{raw: "socks5h://bob:2024?Summer@proxy", err: "no path"},
		{raw: "socks5h://pw9@proxy", err: "has no password"},
	}
	for _, tc := range tests {
		d, err := parseServer(tc.raw, tc.user, tc.pass, 0)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("parseServer(%q) err = %v, want %q", tc.raw, err, tc.err)
			}
			for _, secret := range []string{"s3cret", "pw9", "2024"} {
				if err != nil && strings.Contains(tc.raw, secret) && strings.Contains(err.Error(), secret) {
					t.Errorf("parseServer(%q) err = %v shows the password", tc.raw, err)
				}
			}
			continue
		}
		if err != nil {
			t.Errorf("parseServer(%q): %v", tc.raw, err)
			continue
		}
		if d.ProxyAddr != tc.addr || d.Username != tc.wantU || d.Password != tc.wantP || d.ResolveLocally != tc.local {
			t.Errorf("parseServer(%q) = %s %q %q local=%v", tc.raw, d.ProxyAddr, d.Username, d.Password, d.ResolveLocally)
		}
	}
	// A bare IPv6 proxy is an address, not a password piece after a colon.
	if got := redactURL("2001:db8::a"); got != "2001:db8::a" {
		t.Errorf("redactURL(2001:db8::a) = %s", got)
	}
	if got := redactURL("socks5h://u:secret@proxy"); strings.Contains(got, "secret") {
		t.Errorf("redactURL = %s", got)
	}
	// The bare form keeps its user, and read back says the password is
	// the mark (it had said the user had no password, with no user left).
	if got := redactURL("alice:secret@proxy:1080"); got != "alice:xxxxx@proxy:1080" {
		t.Errorf("redactURL(alice:secret@proxy:1080) = %s, want alice:xxxxx@proxy:1080", got)
	}
	if got := redactURL("cret@proxy:1080"); got != "xxxxx@proxy:1080" { // of "alice:se,cret@proxy:1080"
		t.Errorf("redactURL(cret@proxy:1080) = %s, want xxxxx@proxy:1080", got)
	}
	if _, err := parseServer(redactURL("alice:secret@proxy:1080"), "", "", 0); err == nil || !strings.Contains(err.Error(), redactedMarkHint) {
		t.Errorf("the redacted bare form read back: %v, want %q", err, redactedMarkHint)
	}
}

// TestPasswordFileWithURLUser: --server-password-file gives its password
// to a -S URL that names only its user (the password kept out of ps, as
// curl's -U); with no user anywhere, it is refused.
func TestPasswordFileWithURLUser(t *testing.T) {
	pw := filepath.Join(t.TempDir(), "pw")
	if err := os.WriteFile(pw, []byte("s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	ds, err := buildDialers(&Config{Server: []string{"socks5h://bob@proxy:1080"}, ServerPasswordFile: pw})
	if err != nil || len(ds) != 1 || ds[0].Username != "bob" || ds[0].Password != "s3cret" {
		t.Fatalf("buildDialers = %v, %v; want bob with the file's password", ds, err)
	}
	if _, err := buildDialers(&Config{Server: []string{"proxy:1080"}, ServerPasswordFile: pw}); err == nil || !strings.Contains(err.Error(), "needs a user") {
		t.Fatalf("a password file and no user anywhere: %v", err)
	}
}

// TestSecretFileOfOneLine: a secret file with a line break left after its
// one trailing newline is stripped (a blank last line) is refused at start
// rather than failing every login; a CRLF line is one line.
func TestSecretFileOfOneLine(t *testing.T) {
	dir := t.TempDir()
	for content, want := range map[string]string{"bob:pw\r\n": "bob:pw", "bob:pw": "bob:pw", "bob:pw\n\n": "", "bob:pw\r\n\r\n": "", "bob\npw": ""} {
		f := filepath.Join(dir, "auth")
		if err := os.WriteFile(f, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		got, err := readSecret("--socks-auth-file", f)
		if want == "" && (err == nil || !strings.Contains(err.Error(), "more than one line")) {
			t.Errorf("%q: %q, %v; want refused as more than one line", content, got, err)
		} else if want != "" && (got != want || err != nil) {
			t.Errorf("%q: %q, %v; want %q", content, got, err, want)
		}
	}
}

// TestPortInBareIPv6: an IPv6 address without brackets whose last group
// reads as a port is warned of; ::1 and names are not.
func TestPortInBareIPv6(t *testing.T) {
	if w := portInBareIPv6("2001:db8::1:1080"); !strings.Contains(w, "write [2001:db8::1]:1080") {
		t.Errorf("2001:db8::1:1080: %q", w)
	}
	for _, s := range []string{"::1", "[::1]:1080", "proxy:1080", "socks5h://[2001:db8::1]:1080", "2001:db8::a", "fd00::10", "2001:db8::53"} {
		if w := portInBareIPv6(s); w != "" {
			t.Errorf("%s: %q, want no warning", s, w)
		}
	}
}

// TestRemoteUDPRefused: -R with /udp says -R is TCP only, not that the
// target port is invalid.
func TestRemoteUDPRefused(t *testing.T) {
	if _, err := parseRemote("8080:127.0.0.1:80/udp"); err == nil || !strings.Contains(err.Error(), "TCP only") {
		t.Errorf("parseRemote(…/udp) = %v, want an error saying -R is TCP only", err)
	}
}
