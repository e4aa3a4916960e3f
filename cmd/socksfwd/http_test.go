package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/socksfwd/socksfwd/internal/testnet"
)

// httpGet fetches target through the HTTP proxy at proxy, with user:pass
// as proxy credentials when not empty, and returns status and body.
func httpGet(t *testing.T, proxy, userpass, target string) (int, string) {
	t.Helper()
	u := &url.URL{Scheme: "http", Host: proxy}
	if user, pass, ok := strings.Cut(userpass, ":"); ok {
		u.User = url.UserPassword(user, pass)
	}
	tr := &http.Transport{Proxy: http.ProxyURL(u)}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Get(target)
	if err != nil {
		t.Fatalf("GET %s through %s: %v", target, proxy, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// connectThrough opens CONNECT target through the HTTP proxy and checks one
// exchange; the returned session is still open.
func connectThrough(t *testing.T, proxy, userpass, target string) *heldSession {
	t.Helper()
	c, err := net.DialTimeout("tcp", proxy, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(60 * time.Second))
	req := &http.Request{Method: http.MethodConnect, URL: &url.URL{Host: target}, Host: target, Header: http.Header{}}
	if user, pass, ok := strings.Cut(userpass, ":"); ok {
		probe := &http.Request{Header: http.Header{}}
		probe.SetBasicAuth(user, pass)
		req.Header.Set("Proxy-Authorization", probe.Header.Get("Authorization"))
	}
	if err := req.Write(c); err != nil {
		t.Fatal(err)
	}
	// Read the head byte by byte: the echo that follows is the tunnel's.
	resp, err := http.ReadResponse(bufio.NewReaderSize(oneByteReader{c}, 16), req)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("CONNECT %s: %v %v", target, resp, err)
	}
	io.WriteString(c, "ping")
	if _, err := io.ReadFull(c, make([]byte, 4)); err != nil {
		t.Fatalf("tunnel to %s: %v", target, err)
	}
	return &heldSession{c: c}
}

// oneByteReader reads one byte at a time, so a bufio.Reader over it takes
// nothing past what it was asked for.
type oneByteReader struct{ r io.Reader }

func (o oneByteReader) Read(p []byte) (int, error) { return o.r.Read(p[:min(len(p), 1)]) }

// TestHTTPDoor: --http as a supervised listener: requests through the
// upstream with --http-auth, a reload that changes the credentials and
// --no-proxy for new requests while a tunnel stays open, the requests in
// /metrics by kind and status class, and a drain that lets a tunnel
// finish.
func TestHTTPDoor(t *testing.T) {
	verifyNoLeaks(t)
	socks := newSocks(t)
	echo := testnet.Echo(t).Addr().String()
	target := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "hello") }))
	defer target.Close()
	conf := filepath.Join(t.TempDir(), "socksfwd.toml")
	first := fmt.Sprintf("server = [%q]\nhttp = \"127.0.0.1:0\"\nhttp-auth = \"alice:one\"\n", socks.Addr())
	if err := os.WriteFile(conf, []byte(first), 0o600); err != nil {
		t.Fatal(err)
	}
	d := startDaemon(t, "-c", conf, "--admin", "0", "--log-level", "debug")
	d.waitFor("admin on", 1)
	start := d.waitFor("HTTP proxy on", 1)
	if start["auth"] != true || start["proto"] != "http" {
		t.Errorf("start line: %v", start)
	}
	proxy, admin := d.listener("http"), d.listener("admin")

	if code, body := httpGet(t, proxy, "alice:one", target.URL); code != http.StatusOK || body != "hello" {
		t.Fatalf("GET with credentials: %d %q", code, body)
	}
	if code, _ := httpGet(t, proxy, "", target.URL); code != http.StatusProxyAuthRequired {
		t.Fatalf("GET without credentials: %d, want 407", code)
	}
	held := connectThrough(t, proxy, "alice:one", echo)

	// New credentials, and the target's host reached directly: the upstream
	// sees no new request for it.
	line := d.reload(conf, fmt.Sprintf("server = [%q]\nhttp = \"127.0.0.1:0\"\nhttp-auth = \"alice:two\"\nno-proxy = \"127.0.0.1\"\n", socks.Addr()), 1)
	if msg, _ := line["message"].(string); !strings.Contains(msg, "http-auth") || !strings.Contains(msg, "no-proxy") {
		t.Fatalf("reload line: %v", line)
	}
	if code, _ := httpGet(t, proxy, "alice:one", target.URL); code != http.StatusProxyAuthRequired {
		t.Errorf("old credentials after the reload: %d, want 407", code)
	}
	before := socks.Requests()
	if code, body := httpGet(t, proxy, "alice:two", target.URL); code != http.StatusOK || body != "hello" {
		t.Errorf("new credentials after the reload: %d %q", code, body)
	}
	if socks.Requests() != before {
		t.Error("a --no-proxy target went through the upstream")
	}
	if err := held.finish(); err != nil {
		t.Errorf("tunnel held across the reload: %v", err)
	}
	d.waitFor("session ended", 1)

	m := scrapeUntil(t, admin, `socksfwd_sessions_active{listener="`+proxy+`",proto="http"}`, 0)
	for series, want := range map[string]float64{
		`socksfwd_http_requests_total{listener="` + proxy + `",kind="forward",code="2xx"}`:       2,
		`socksfwd_http_requests_total{listener="` + proxy + `",kind="forward",code="4xx"}`:       2,
		`socksfwd_http_requests_total{listener="` + proxy + `",kind="connect",code="2xx"}`:       1,
		`socksfwd_http_auth_failures_total{listener="` + proxy + `",reason="missing"}`:           1,
		`socksfwd_http_auth_failures_total{listener="` + proxy + `",reason="wrong_credentials"}`: 1,
		`socksfwd_http_requests_total{listener="` + proxy + `",kind="connect",code="5xx"}`:       0,
		`socksfwd_http_requests_total{listener="` + proxy + `",kind="timeout",code="4xx"}`:       0,
		`socksfwd_sessions_active{listener="` + proxy + `",proto="http"}`:                        0,
		`socksfwd_bytes_total{listener="` + proxy + `",proto="http",direction="up"}`:             8, // the tunnel's
	} {
		if got, ok := m[series]; !ok || got != want {
			t.Errorf("%s = %v (present %v), want %v", series, got, ok, want)
		}
	}
	// The tunnel's 8, two bodies of 5 and the 407s' one-line bodies.
	if down := m[`socksfwd_bytes_total{listener="`+proxy+`",proto="http",direction="down"}`]; down < float64(18+2*len("proxy authentication")) {
		t.Errorf("bytes down %v", down)
	}

	// A tunnel open at SIGTERM finishes; then socksfwd exits 0.
	last := connectThrough(t, proxy, "alice:two", echo)
	d.drainWith(last)
}

// drainWith sends SIGTERM while the session last is open, finishes it
// during the drain, and expects socksfwd to exit 0 once it has ended.
func (d *daemon) drainWith(last *heldSession) {
	d.t.Helper()
	d.sigs <- syscall.SIGTERM
	d.waitFor("draining sessions", 1)
	if err := last.finish(); err != nil {
		d.t.Errorf("session during the drain: %v", err)
	}
	select {
	case code := <-d.exit:
		d.exit <- code // for the cleanup
		if code != 0 {
			d.t.Errorf("exit %d after the drain", code)
		}
	case <-time.After(20 * time.Second):
		d.t.Fatal("socksfwd did not stop once the session ended")
	}
}
