package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/socksfwd/socksfwd/internal/testnet"
	"github.com/socksfwd/socksfwd/socksclient"
)

// doorSession opens CONNECT echo through the -D door at door with
// user:pass, checks one exchange and returns the session, still open.
func doorSession(t *testing.T, door, user, pass, echo string) (*heldSession, error) {
	t.Helper()
	d := &socksclient.Dialer{ProxyAddr: door, Username: user, Password: pass}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp", echo)
	if err != nil {
		return nil, err
	}
	raw := c.(*socksclient.Conn).NetConn()
	t.Cleanup(func() { raw.Close() })
	raw.SetDeadline(time.Now().Add(60 * time.Second))
	io.WriteString(raw, "ping")
	if _, err := io.ReadFull(raw, make([]byte, 4)); err != nil {
		t.Fatalf("session through the door: %v", err)
	}
	return &heldSession{c: raw}, nil
}

// TestSOCKSDoorSupervised: -D as a supervised listener: a session with
// --socks-auth, a reload that changes the credentials for new clients
// while a session stays open, the door's counters in /metrics, and a
// drain that lets a session finish.
func TestSOCKSDoorSupervised(t *testing.T) {
	verifyNoLeaks(t)
	socks := newSocks(t)
	echo := testnet.Echo(t).Addr().String()
	conf := filepath.Join(t.TempDir(), "socksfwd.toml")
	config := func(pw string) string {
		return fmt.Sprintf("server = [%q]\ndynamic = \"127.0.0.1:0\"\nsocks-auth = \"alice:%s\"\n", socks.Addr(), pw)
	}
	if err := os.WriteFile(conf, []byte(config("one")), 0o600); err != nil {
		t.Fatal(err)
	}
	d := startDaemon(t, "-c", conf, "--admin", "0", "--log-level", "debug")
	d.waitFor("admin on", 1)
	start := d.waitFor("SOCKS5 server on", 1)
	if start["auth"] != true || start["proto"] != "socks" {
		t.Errorf("start line: %v", start)
	}
	door, admin := d.listener("socks"), d.listener("admin")

	held, err := doorSession(t, door, "alice", "one", echo)
	if err != nil {
		t.Fatal(err)
	}
	line := d.reload(conf, config("two"), 1)
	if msg, _ := line["message"].(string); !strings.Contains(msg, "socks-auth") {
		t.Fatalf("reload line: %v", line)
	}
	if _, err := doorSession(t, door, "alice", "one", echo); !errors.Is(err, socksclient.ErrAuthFailed) {
		t.Errorf("old credentials after the reload: %v, want %v", err, socksclient.ErrAuthFailed)
	}
	next, err := doorSession(t, door, "alice", "two", echo)
	if err != nil {
		t.Fatalf("new credentials after the reload: %v", err)
	}
	if err := next.finish(); err != nil {
		t.Error(err)
	}
	if err := held.finish(); err != nil {
		t.Errorf("session held across the reload: %v", err)
	}
	d.waitFor("session ended", 2)

	m := scrape(t, admin)
	for series, want := range map[string]float64{
		`socksfwd_socks_requests_total{listener="` + door + `",command="connect"}`:                       2,
		`socksfwd_socks_handshake_failures_total{listener="` + door + `",reason="wrong_credentials"}`:    1,
		`socksfwd_socks_requests_refused_total{listener="` + door + `",reason="udp_source_not_allowed"}`: 0,
		`socksfwd_socks_udp_dropped_total{listener="` + door + `",reason="upstream_refused"}`:            0,
		`socksfwd_sessions_active{listener="` + door + `",proto="socks"}`:                                0,
		`socksfwd_bytes_total{listener="` + door + `",proto="socks",direction="up"}`:                     16,
	} {
		if got, ok := m[series]; !ok || got != want {
			t.Errorf("%s = %v (present %v), want %v", series, got, ok, want)
		}
	}

	// A session open at SIGTERM finishes; then socksfwd exits 0.
	last, err := doorSession(t, door, "alice", "two", echo)
	if err != nil {
		t.Fatal(err)
	}
	d.drainWith(last)
}

// TestSOCKSAuthTooLong: RFC 1929 carries a user name or password of at
// most 255 bytes, so -D credentials longer than that are a usage error at
// start (no client could ever log in), from the flag and from the file,
// and the error does not quote them; --http's Basic credentials have no
// such limit.
func TestSOCKSAuthTooLong(t *testing.T) {
	verifyNoLeaks(t)
	noEnv := func(string) string { return "" }
	long := strings.Repeat("x", 256)
	file := filepath.Join(t.TempDir(), "auth")
	if err := os.WriteFile(file, []byte(long+":pw\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		args []string
		want int
	}{
		{[]string{"-D", "1080", "--socks-auth", "alice:" + long}, exitUsage},
		{[]string{"-D", "1080", "--socks-auth", long + ":pw"}, exitUsage},
		{[]string{"-D", "1080", "--socks-auth-file", file}, exitUsage},
		{[]string{"-D", "1080", "--socks-auth", strings.Repeat("u", 255) + ":" + strings.Repeat("p", 255)}, exitOK},
		{[]string{"--http", "3128", "--http-auth", "alice:" + long}, exitOK},
		{[]string{"--http", "3128", "--http-auth-file", file}, exitOK},
	}
	for _, tc := range tests {
		var out, errOut strings.Builder
		args := append([]string{"socksfwd", "-S", "p:1", "--print-config"}, tc.args...)
		if got := run(args, &out, &errOut, noEnv); got != tc.want {
			t.Errorf("socksfwd %.60q… = %d, want %d; stderr: %s", tc.args, got, tc.want, errOut.String())
		}
		if tc.want == exitUsage && (!strings.Contains(errOut.String(), "at most 255 bytes") || strings.Contains(errOut.String(), long)) {
			t.Errorf("socksfwd %.60q…: stderr %q, want the limit named and no credential quoted", tc.args, errOut.String())
		}
	}
}
