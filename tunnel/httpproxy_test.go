package tunnel

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/cgi"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/socksfwd/socksfwd/internal/noproxy"
	"github.com/socksfwd/socksfwd/internal/peertest"
	"github.com/socksfwd/socksfwd/internal/testnet"
	"github.com/socksfwd/socksfwd/socksclient"
	"github.com/socksfwd/socksfwd/socksclient/sockstest"
)

// startHTTPProxy runs an HTTPProxy with cfg through proxies, and returns
// it, its URL and its log.
func startHTTPProxy(t *testing.T, cfg HTTPProxyConfig, proxies ...string) (*HTTPProxy, *url.URL, *logBuf) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return startHTTPProxyOn(t, cfg, ln, proxies...)
}

// startHTTPProxyOn is startHTTPProxy on ln.
func startHTTPProxyOn(t *testing.T, cfg HTTPProxyConfig, ln net.Listener, proxies ...string) (*HTTPProxy, *url.URL, *logBuf) {
	t.Helper()
	var dialers []*socksclient.Dialer
	for _, p := range proxies {
		dialers = append(dialers, &socksclient.Dialer{ProxyAddr: p, HandshakeTimeout: 5 * time.Second})
	}
	logs := &logBuf{}
	cfg.Name = ln.Addr().String()
	cfg.Upstreams = socksclient.NewUpstreams(dialers...)
	cfg.Logger = zerolog.New(logs).Level(zerolog.DebugLevel)
	p := NewHTTPProxy(cfg, ln)
	serveForTest(t, p)
	return p, &url.URL{Scheme: "http", Host: ln.Addr().String()}, logs
}

// target is an HTTP server that answers "hello PATH" and keeps the
// headers of the last request it got. Its response carries a hop-by-hop
// header (named in Connection) that no client may see.
type target struct {
	srv     *httptest.Server
	mu      sync.Mutex
	last    http.Header
	lastURI string
}

func newTarget(t *testing.T, tls bool) *target {
	tg := &target{}
	tg.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tg.mu.Lock()
		tg.last = r.Header.Clone()
		tg.lastURI = r.RequestURI
		tg.mu.Unlock()
		if r.Body != nil {
			io.Copy(io.Discard, r.Body)
		}
		w.Header().Set("Connection", "X-Resp-Hop")
		w.Header().Set("X-Resp-Hop", "1")
		w.Header().Set("X-Resp-End", "1")
		fmt.Fprintf(w, "hello %s", r.URL.Path)
	}))
	if tls {
		tg.srv.StartTLS()
	} else {
		tg.srv.Start()
	}
	t.Cleanup(tg.srv.Close)
	return tg
}

func (tg *target) header() http.Header {
	tg.mu.Lock()
	defer tg.mu.Unlock()
	return tg.last
}

// caFile writes a TLS test server's certificate as PEM, for clients to
// trust (curl --cacert, git's http.sslCAInfo).
func caFile(t *testing.T, srv *httptest.Server) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "ca.pem")
	b := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// clientEnv is an environment for real clients: no proxy inherited, HOME
// in a temporary directory, plus extra.
func clientEnv(t *testing.T, extra ...string) []string {
	return append([]string{"PATH=" + os.Getenv("PATH"), "HOME=" + t.TempDir(), "NO_PROXY=", "no_proxy="}, extra...)
}

// curl runs curl with args and returns its output; a failure fails the
// test.
func curl(t *testing.T, args ...string) string {
	t.Helper()
	cmd := exec.Command(peertest.Require(t, "curl"), append([]string{"-sS", "--max-time", "20"}, args...)...)
	cmd.Env = clientEnv(t)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("curl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// TestHTTPProxyCurlForward: curl -x sends absolute-form requests; the
// target gets end-to-end headers and none of the hop-by-hop ones (those
// named in Connection, Keep-Alive, Proxy-Authorization), curl gets none of
// the target's, and two requests share one kept-alive connection.
func TestHTTPProxyCurlForward(t *testing.T) {
	tg := newTarget(t, false)
	creds, err := ParseProxyCredentials("alice:s3cret:with:colons")
	if err != nil {
		t.Fatal(err)
	}
	p, proxy, logs := startHTTPProxy(t, HTTPProxyConfig{Credentials: creds}, newSocks(t, sockstest.Config{}).Addr())

	out := curl(t, "-i", "-x", proxy.String(), "-U", "alice:s3cret:with:colons",
		"-H", "Connection: X-Hop", "-H", "X-Hop: secret", "-H", "X-End: kept", "-H", "Keep-Alive: timeout=5",
		"-H", "X-Forwarded-For: 192.0.2.1",
		tg.srv.URL+"/one", tg.srv.URL+"/two")
	if !strings.Contains(out, "hello /one") || !strings.Contains(out, "hello /two") {
		t.Fatalf("curl through the proxy:\n%s", out)
	}
	if strings.Contains(out, "X-Resp-Hop") || !strings.Contains(out, "X-Resp-End: 1") {
		t.Errorf("the target's hop-by-hop header reached the client, or its end-to-end one did not:\n%s", out)
	}
	h := tg.header()
	for _, hop := range []string{"X-Hop", "Keep-Alive", "Proxy-Authorization", "Proxy-Connection", "Connection"} {
		if v := h.Values(hop); len(v) > 0 {
			t.Errorf("the target got hop-by-hop header %s: %q", hop, v)
		}
	}
	if h.Get("X-End") != "kept" || h.Get("X-Forwarded-For") != "192.0.2.1" {
		t.Errorf("end-to-end headers lost: %v", h)
	}
	if n := p.Stats().Sessions.Load(); n != 1 {
		t.Errorf("%d client connections for two requests; want one kept alive", n)
	}
	logs.waitForCount(t, `"message":"request ended"`, 2)
	// Counted when the handler returns, after its end line and after curl
	// has the answer: a moment later.
	deadline := time.Now().Add(10 * time.Second) // a bound, not a wait
	for p.Stats().Responses[HTTPForward][2].Load() != 2 && time.Now().Before(deadline) {
		runtime.Gosched()
	}
	if n := p.Stats().Responses[HTTPForward][2].Load(); n != 2 {
		t.Errorf("%d forwarded requests answered 2xx, want 2", n)
	}
	if !strings.Contains(logs.String(), `"status":200`) || !strings.Contains(logs.String(), `"bytes_down":10`) {
		t.Errorf("request end lines:\n%s", logs)
	}
}

// TestHTTPProxyCurlConnect: curl through CONNECT, to an HTTPS server on
// 127.0.0.1 and one on [::1] (curl sends CONNECT [::1]:port), and plain
// HTTP tunnelled with -p; each tunnel ends with a session line like -L's.
func TestHTTPProxyCurlConnect(t *testing.T) {
	tg := newTarget(t, true)
	ca := caFile(t, tg.srv)
	p, proxy, logs := startHTTPProxy(t, HTTPProxyConfig{}, newSocks(t, sockstest.Config{}).Addr())

	if out := curl(t, "-x", proxy.String(), "--cacert", ca, tg.srv.URL+"/secure"); out != "hello /secure" {
		t.Fatalf("https through CONNECT: %q", out)
	}
	plain := newTarget(t, false)
	if out := curl(t, "-p", "-x", proxy.String(), plain.srv.URL+"/tunnelled"); out != "hello /tunnelled" {
		t.Fatalf("http through CONNECT (-p): %q", out)
	}
	logs.waitForCount(t, `"message":"session ended"`, 2)
	if !strings.Contains(logs.String(), `"target":"`+tg.srv.Listener.Addr().String()+`"`) || !strings.Contains(logs.String(), `"bytes_down":`) {
		t.Errorf("no session end line for the tunnel:\n%s", logs)
	}

	ln6, err := net.Listen("tcp", "[::1]:0")
	if err != nil {
		peertest.Missing(t, "no IPv6 loopback: %v", err)
	}
	v6 := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "six") }))
	v6.Listener.Close()
	v6.Listener = ln6
	v6.StartTLS()
	defer v6.Close()
	if out := curl(t, "-x", proxy.String(), "--cacert", caFile(t, v6), v6.URL); out != "six" {
		t.Fatalf("https to [::1] through CONNECT: %q", out)
	}
	logs.waitFor(t, `"target":"`+ln6.Addr().String()+`"`)
	if n := p.Stats().Responses[HTTPConnect][2].Load(); n != 3 {
		t.Errorf("%d CONNECTs answered 2xx, want 3", n)
	}
}

// TestHTTPProxyGitClone: git clones over HTTPS (smart HTTP, git
// http-backend behind a TLS server with its own CA) with HTTPS_PROXY set
// to the proxy.
func TestHTTPProxyGitClone(t *testing.T) {
	git := peertest.Require(t, "git")
	out, err := exec.Command(git, "--exec-path").Output()
	if err != nil {
		t.Fatal(err)
	}
	backend := filepath.Join(strings.TrimSpace(string(out)), "git-http-backend")
	if _, err := os.Stat(backend); err != nil {
		peertest.Missing(t, "git-http-backend: %v", err)
	}
	root := t.TempDir()
	env := clientEnv(t, "GIT_CONFIG_NOSYSTEM=1", "GIT_AUTHOR_NAME=t", "GIT_AUTHOR_EMAIL=t@example.invalid",
		"GIT_COMMITTER_NAME=t", "GIT_COMMITTER_EMAIL=t@example.invalid")
	run := func(dir string, extraEnv []string, args ...string) {
		t.Helper()
		cmd := exec.Command(git, args...)
		cmd.Dir, cmd.Env = dir, append(append([]string{}, env...), extraEnv...)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("git %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	work := filepath.Join(root, "work")
	run(root, nil, "init", "-q", "-b", "main", work)
	os.WriteFile(filepath.Join(work, "README"), []byte("through the proxy\n"), 0o644)
	run(work, nil, "add", "README")
	run(work, nil, "commit", "-q", "-m", "first")
	run(root, nil, "clone", "-q", "--bare", work, filepath.Join(root, "repo.git"))

	srv := httptest.NewUnstartedServer(gitBackend(backend, root))
	srv.StartTLS()
	defer srv.Close()
	_, proxy, logs := startHTTPProxy(t, HTTPProxyConfig{}, newSocks(t, sockstest.Config{}).Addr())

	clone := filepath.Join(root, "clone")
	run(root, []string{"HTTPS_PROXY=" + proxy.String(), "GIT_SSL_CAINFO=" + caFile(t, srv)}, "clone", "-q", srv.URL+"/repo.git", clone)
	got, err := os.ReadFile(filepath.Join(clone, "README"))
	if err != nil || string(got) != "through the proxy\n" {
		t.Fatalf("cloned README: %q, %v", got, err)
	}
	logs.waitFor(t, `"message":"session ended"`)
}

// gitBackend serves the repositories under root over smart HTTP, through
// git's own CGI program.
func gitBackend(backend, root string) http.Handler {
	return &cgi.Handler{Path: backend, Env: []string{"GIT_PROJECT_ROOT=" + root, "GIT_HTTP_EXPORT_ALL=1"}}
}

// TestHTTPProxyGoClient: Go's own client with the proxy in its
// Transport, as HTTPS_PROXY sets it, with credentials: HTTPS through
// CONNECT and HTTP forwarded; wrong or missing credentials get 407.
func TestHTTPProxyGoClient(t *testing.T) {
	secure, plain := newTarget(t, true), newTarget(t, false)
	creds, _ := ParseProxyCredentials("bob:pw")
	door, proxy, logs := startHTTPProxy(t, HTTPProxyConfig{Credentials: creds}, newSocks(t, sockstest.Config{}).Addr())
	pool := x509.NewCertPool()
	pool.AddCert(secure.srv.Certificate())
	client := func(user *url.Userinfo) *http.Client {
		u := *proxy
		u.User = user
		tr := &http.Transport{Proxy: http.ProxyURL(&u), TLSClientConfig: &tls.Config{RootCAs: pool}}
		t.Cleanup(tr.CloseIdleConnections)
		return &http.Client{Transport: tr, Timeout: 20 * time.Second}
	}
	get := func(c *http.Client, url string) (int, string, http.Header, error) {
		resp, err := c.Get(url)
		if err != nil {
			return 0, "", nil, err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b), resp.Header, nil
	}

	good := client(url.UserPassword("bob", "pw"))
	for _, u := range []string{secure.srv.URL + "/s", plain.srv.URL + "/p"} {
		code, body, _, err := get(good, u)
		if err != nil || code != http.StatusOK || !strings.HasPrefix(body, "hello /") {
			t.Errorf("GET %s with credentials: %d %q %v", u, code, body, err)
		}
	}

	for _, user := range []*url.Userinfo{nil, url.UserPassword("bob", "wrong"), url.UserPassword("eve", "pw")} {
		c := client(user)
		code, body, h, err := get(c, plain.srv.URL+"/p")
		if err != nil || code != http.StatusProxyAuthRequired || !strings.HasPrefix(h.Get("Proxy-Authenticate"), "Basic ") {
			t.Errorf("GET http with %v: %d %q %v %v; want 407 with Proxy-Authenticate", user, code, body, h, err)
		}
		if strings.Count(strings.TrimSpace(body), "\n") != 0 {
			t.Errorf("407 body is not one line: %q", body)
		}
		if _, _, _, err := get(c, secure.srv.URL+"/s"); err == nil || !strings.Contains(err.Error(), "Proxy Authentication Required") {
			t.Errorf("GET https with %v: %v; want the CONNECT refused with 407", user, err)
		}
	}
	logs.waitFor(t, `"message":"proxy authentication failed"`)
	if strings.Contains(logs.String(), "wrong") {
		t.Errorf("a password reached the log:\n%s", logs)
	}
	// Without credentials (twice: the GET and the CONNECT) is the
	// challenge clients ask for first: counted, logged at debug only.
	if missing, wrong := door.Stats().AuthMissing.Load(), door.Stats().AuthWrong.Load(); missing != 2 || wrong != 4 {
		t.Errorf("407s counted %d missing, %d wrong; want 2 and 4", missing, wrong)
	}
	for _, l := range strings.Split(logs.String(), "\n") {
		if strings.Contains(l, "proxy authentication missing") && !strings.Contains(l, `"level":"debug"`) {
			t.Errorf("a challenge logged above debug: %s", l)
		}
	}
}

// proxyExchange sends a raw request on a new connection and reads the
// response head; the reader holds what follows it.
func proxyExchange(t *testing.T, addr, req string) (*http.Response, *bufio.Reader, net.Conn) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := io.WriteString(c, req); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("response to %q: %v", strings.SplitN(req, "\r\n", 2)[0], err)
	}
	return resp, br, c
}

// body reads a response body whole.
func body(t *testing.T, resp *http.Response) string {
	t.Helper()
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestHTTPProxyRefusedTarget: a target that refuses (the proxy answers
// REP 5) is a 502 whose one-line body names the REP code, for CONNECT and
// for a forwarded request alike, and a log line says so.
func TestHTTPProxyRefusedTarget(t *testing.T) {
	closed := testnet.ClosedPort(t)
	p, proxy, logs := startHTTPProxy(t, HTTPProxyConfig{}, newSocks(t, sockstest.Config{}).Addr())
	for _, req := range []string{
		"CONNECT " + closed + " HTTP/1.1\r\nHost: " + closed + "\r\n\r\n",
		"GET http://" + closed + "/x HTTP/1.1\r\nHost: " + closed + "\r\n\r\n",
	} {
		resp, br, _ := proxyExchange(t, proxy.Host, req)
		b := body(t, resp)
		if resp.StatusCode != http.StatusBadGateway || !strings.Contains(b, "REP 0x05") || strings.Count(b, "\n") != 1 {
			t.Errorf("%s: %s %q; want 502 naming REP 0x05 in one line", strings.Fields(req)[0], resp.Status, b)
		}
		// What a client sends behind a CONNECT is no next request.
		if !strings.HasPrefix(req, "CONNECT") {
			continue // kept alive: a peek would wait out the deadline
		}
		if _, err := br.Peek(1); err != io.EOF {
			t.Errorf("the connection of a refused CONNECT stays open (%v)", err)
		}
	}
	logs.waitForCount(t, `"message":"request failed"`, 2)
	if n := strings.Count(logs.String(), `"rep":"connection refused","status":502`); n != 2 {
		t.Errorf("%d failure lines with the status, want 2:\n%s", n, logs)
	}
	if !strings.Contains(logs.String(), `"rep":"connection refused"`) {
		t.Errorf("the failure line does not name the REP:\n%s", logs)
	}
	if n := p.Stats().Failed.Load(); n != 2 {
		t.Errorf("Failed = %d, want 2", n)
	}
}

// TestHTTPProxyHandshakeTimeout: a proxy that never answers the request
// makes a 504.
func TestHTTPProxyHandshakeTimeout(t *testing.T) {
	hung := newSocks(t, sockstest.Config{Fault: sockstest.FaultHangAfterGreeting})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	logs := &logBuf{}
	p := NewHTTPProxy(HTTPProxyConfig{
		Name:      "t",
		Upstreams: socksclient.NewUpstreams(&socksclient.Dialer{ProxyAddr: hung.Addr(), HandshakeTimeout: 200 * time.Millisecond}),
		Logger:    zerolog.New(logs),
	}, ln)
	serveForTest(t, p)
	resp, _, _ := proxyExchange(t, ln.Addr().String(), "CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n")
	if b := body(t, resp); resp.StatusCode != http.StatusGatewayTimeout || !strings.Contains(b, "timed out") {
		t.Errorf("%s %q; want 504 saying the handshake timed out", resp.Status, b)
	}
}

// TestHTTPProxyFailover: a dead first upstream is skipped.
func TestHTTPProxyFailover(t *testing.T) {
	tg := newTarget(t, false)
	p, proxy, _ := startHTTPProxy(t, HTTPProxyConfig{}, testnet.ClosedPort(t), newSocks(t, sockstest.Config{}).Addr())
	resp, _, _ := proxyExchange(t, proxy.Host, "GET "+tg.srv.URL+"/f HTTP/1.1\r\nHost: x\r\n\r\n")
	if b := body(t, resp); resp.StatusCode != http.StatusOK || b != "hello /f" {
		t.Errorf("%s %q past a dead first upstream", resp.Status, b)
	}
	if n := p.Stats().Failed.Load(); n != 0 {
		t.Errorf("Failed = %d after a failover", n)
	}
}

// TestHTTPProxyNoProxy: targets --no-proxy lists are reached directly;
// the others go through the upstream (here a dead one, so they fail).
func TestHTTPProxyNoProxy(t *testing.T) {
	tg := newTarget(t, false)
	echo := testnet.Echo(t).Addr().String()
	list, err := noproxy.Parse("127.0.0.0/8, example.invalid")
	if err != nil {
		t.Fatal(err)
	}
	p, proxy, logs := startHTTPProxy(t, HTTPProxyConfig{NoProxy: list}, testnet.ClosedPort(t))
	resp, _, _ := proxyExchange(t, proxy.Host, "GET "+tg.srv.URL+"/direct HTTP/1.1\r\nHost: x\r\n\r\n")
	if b := body(t, resp); resp.StatusCode != http.StatusOK || b != "hello /direct" {
		t.Errorf("listed target: %s %q", resp.Status, b)
	}
	resp, br, c := proxyExchange(t, proxy.Host, "CONNECT "+echo+" HTTP/1.1\r\n\r\n")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("CONNECT to a listed target: %s", resp.Status)
	}
	io.WriteString(c, "ping")
	c.(*net.TCPConn).CloseWrite()
	if got, err := io.ReadAll(br); string(got) != "ping" {
		t.Errorf("direct tunnel echoed %q, %v", got, err)
	}
	logs.waitFor(t, `"upstream":"direct"`)
	// A name is not an address: localhost goes through the (dead) proxy.
	_, port, _ := net.SplitHostPort(echo)
	resp, _, _ = proxyExchange(t, proxy.Host, "CONNECT localhost:"+port+" HTTP/1.1\r\n\r\n")
	if resp.StatusCode != http.StatusBadGateway {
		t.Errorf("CONNECT to an unlisted name: %s, want 502 from the dead upstream", resp.Status)
	}
	p.SetNoProxy(nil)
	resp, _, _ = proxyExchange(t, proxy.Host, "GET "+tg.srv.URL+"/direct HTTP/1.1\r\nHost: x\r\n\r\n")
	if resp.StatusCode != http.StatusBadGateway {
		t.Errorf("after SetNoProxy(nil): %s, want 502", resp.Status)
	}
}

// TestHTTPProxyHalfCloseDuringDial: a client that half-closes right
// behind its CONNECT and early bytes, before the 200, still gets its
// tunnel (net/http cancels a request's context when the client's side
// reads EOF; the dial must not be tied to it).
func TestHTTPProxyHalfCloseDuringDial(t *testing.T) {
	echo := testnet.Echo(t).Addr().String()
	list, err := noproxy.Parse("127.0.0.0/8")
	if err != nil {
		t.Fatal(err)
	}
	// The dial lasts long enough for the server to read the client's EOF;
	// a cancelled context ends it at once.
	slowDirect := func(ctx context.Context, network, address string) (net.Conn, error) {
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(300 * time.Millisecond):
		}
		return (&net.Dialer{}).DialContext(ctx, network, address)
	}
	_, proxy, _ := startHTTPProxy(t, HTTPProxyConfig{NoProxy: list, Direct: slowDirect})
	c, err := net.DialTimeout("tcp", proxy.Host, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	io.WriteString(c, "CONNECT "+echo+" HTTP/1.1\r\nHost: "+echo+"\r\n\r\nping")
	c.(*net.TCPConn).CloseWrite()
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("CONNECT half-closed before the answer: %s %q", resp.Status, body(t, resp))
	}
	if got, err := io.ReadAll(br); string(got) != "ping" {
		t.Errorf("tunnel echoed %q, %v; want the early bytes", got, err)
	}
}

// TestHTTPProxyDirectTimeout: a direct connect that hangs is cut after
// DirectTimeout and answered 504.
func TestHTTPProxyDirectTimeout(t *testing.T) {
	list, err := noproxy.Parse("192.0.2.0/24")
	if err != nil {
		t.Fatal(err)
	}
	hang := func(ctx context.Context, network, address string) (net.Conn, error) {
		<-ctx.Done() // a black-holed target: only the timeout ends it
		return nil, ctx.Err()
	}
	_, proxy, _ := startHTTPProxy(t, HTTPProxyConfig{NoProxy: list, Direct: hang, DirectTimeout: 100 * time.Millisecond})
	resp, _, _ := proxyExchange(t, proxy.Host, "CONNECT 192.0.2.1:443 HTTP/1.1\r\n\r\n")
	if b := body(t, resp); resp.StatusCode != http.StatusGatewayTimeout {
		t.Errorf("hung direct connect: %s %q, want 504", resp.Status, b)
	}
}

// TestHTTPProxyRedialBusyConnection: a connection to a target that was
// busy with a request when the way to the target changed is not used
// again once the request ends.
func TestHTTPProxyRedialBusyConnection(t *testing.T) {
	arrived, release := make(chan struct{}), make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			close(arrived)
			<-release
		}
		io.WriteString(w, "ok "+r.URL.Path)
	}))
	defer srv.Close()
	list, err := noproxy.Parse("127.0.0.0/8")
	if err != nil {
		t.Fatal(err)
	}
	// Direct while listed; through a dead upstream once not.
	p, proxy, _ := startHTTPProxy(t, HTTPProxyConfig{NoProxy: list}, testnet.ClosedPort(t))
	c, err := net.DialTimeout("tcp", proxy.Host, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	io.WriteString(c, "GET "+srv.URL+"/slow HTTP/1.1\r\nHost: x\r\n\r\n")
	// SetNoProxy comes while the request's connection is busy.
	select {
	case <-arrived:
	case <-time.After(10 * time.Second):
		t.Fatal("the request never reached the target")
	}
	p.SetNoProxy(nil)
	resp, _, _ := proxyExchange(t, proxy.Host, "GET "+srv.URL+"/other HTTP/1.1\r\nHost: x\r\n\r\n")
	if b := body(t, resp); resp.StatusCode != http.StatusBadGateway {
		t.Fatalf("a request after SetNoProxy(nil): %s %q, want 502 from the dead upstream", resp.Status, b)
	}
	close(release)
	resp, err = http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	if b := body(t, resp); b != "ok /slow" {
		t.Fatalf("the busy request: %s %q", resp.Status, b)
	}
	resp, _, _ = proxyExchange(t, proxy.Host, "GET "+srv.URL+"/again HTTP/1.1\r\nHost: x\r\n\r\n")
	if b := body(t, resp); resp.StatusCode != http.StatusBadGateway {
		t.Errorf("the connection dialed directly before SetNoProxy(nil) was used again: %s %q", resp.Status, b)
	}
}

// TestHTTPProxyTunnelHalfCloseAndEarlyBytes: bytes sent right behind the
// CONNECT request, before the 200, reach the target first; the client's
// half-close reaches it as FIN and the echo still comes back.
func TestHTTPProxyTunnelHalfCloseAndEarlyBytes(t *testing.T) {
	echo := testnet.Echo(t).Addr().String()
	_, proxy, logs := startHTTPProxy(t, HTTPProxyConfig{}, newSocks(t, sockstest.Config{}).Addr())
	resp, br, c := proxyExchange(t, proxy.Host, "CONNECT "+echo+" HTTP/1.1\r\nHost: "+echo+"\r\n\r\nearly,")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("CONNECT: %s", resp.Status)
	}
	io.WriteString(c, "late")
	c.(*net.TCPConn).CloseWrite()
	got, err := io.ReadAll(br)
	if err != nil || string(got) != "early,late" {
		t.Fatalf("echo %q, %v; want the early bytes first", got, err)
	}
	logs.waitFor(t, `"bytes_up":10,"bytes_down":10`)
}

// TestHTTPProxyMalformed: what no client should send is answered, never
// panicked on: garbage, an origin-form request, https:// in absolute
// form, CONNECT without a port, a head over the limit; a head dripped
// slower than ReadHeaderTimeout loses the connection.
func TestHTTPProxyMalformed(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	logs := &logBuf{}
	p := NewHTTPProxy(HTTPProxyConfig{Name: "t", Upstreams: socksclient.NewUpstreams(), ReadHeaderTimeout: 300 * time.Millisecond, Logger: zerolog.New(logs)}, ln)
	serveForTest(t, p)
	addr := ln.Addr().String()
	for _, tc := range []struct {
		req    string
		code   int
		parser bool // refused by net/http before ServeHTTP
	}{
		{"\x16\x03\x01garbage\r\n\r\n", http.StatusBadRequest, true},
		{"GET / HTTP/1.1\r\nHost: x\r\n\r\n", http.StatusBadRequest, false},
		{"GET https://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n", http.StatusBadRequest, false},
		{"CONNECT example.com HTTP/1.1\r\nHost: example.com\r\n\r\n", http.StatusBadRequest, false},
		{"CONNECT example.com:0 HTTP/1.1\r\n\r\n", http.StatusBadRequest, false},
		{"GET http://x/ HTTP/1.1\r\nHost: x\r\nX-Big: " + strings.Repeat("a", 2*maxRequestHead) + "\r\n\r\n", http.StatusRequestHeaderFieldsTooLarge, true},
		{"GET http://[::1/ HTTP/1.1\r\nHost: x\r\n\r\n", http.StatusBadRequest, true},
	} {
		before := p.Stats().Responses[HTTPMalformed][4].Load()
		resp, _, _ := proxyExchange(t, addr, tc.req)
		resp.Body.Close()
		if resp.StatusCode != tc.code {
			t.Errorf("%.40q: %s, want %d", tc.req, resp.Status, tc.code)
		}
		// The parser's answer is counted as it is written, before the
		// client can read it.
		if counted := p.Stats().Responses[HTTPMalformed][4].Load() - before; counted != map[bool]int64{true: 1}[tc.parser] {
			t.Errorf("%.40q: counted %d as malformed, want %v", tc.req, counted, tc.parser)
		}
	}
	if ours := p.Stats().Responses[HTTPForward][4].Load() + p.Stats().Responses[HTTPConnect][4].Load(); ours != 4 {
		t.Errorf("the proxy's own 4xx answers counted %d, want 4", ours)
	}
	for _, want := range []string{"request refused by the HTTP parser: 400 Bad Request", "request refused by the HTTP parser: 431 Request Header Fields Too Large"} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("no log line %q in:\n%s", want, logs.String())
		}
	}

	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	io.WriteString(c, "GET http://x/ HTTP/1.1\r\nHost: x\r\n") // and nothing more
	if _, err := io.ReadAll(c); err != nil && errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("a dripped head kept the connection: %v", err)
	}
}

// TestHTTPProxyAdmission: beyond MaxSessions a connection gets a 503 and
// is closed, counted; SetAdmission lifts the bound for new connections.
func TestHTTPProxyAdmission(t *testing.T) {
	echo := testnet.Echo(t).Addr().String()
	p, proxy, logs := startHTTPProxy(t, HTTPProxyConfig{MaxSessions: 1}, newSocks(t, sockstest.Config{}).Addr())
	resp, _, held := proxyExchange(t, proxy.Host, "CONNECT "+echo+" HTTP/1.1\r\n\r\n")
	if resp.StatusCode != http.StatusOK {
		t.Fatal(resp.Status)
	}
	// Each request arrives before the 503 is written, often: still an
	// orderly end (FIN) after the answer, not a reset that could destroy
	// it before the client reads it.
	for range 10 {
		resp, br, c := proxyExchange(t, proxy.Host, "GET http://"+echo+"/ HTTP/1.1\r\nHost: x\r\n\r\n")
		if b := body(t, resp); resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(b, "--max-sessions") {
			t.Errorf("a connection beyond --max-sessions got %s %q, want 503 naming --max-sessions", resp.Status, b)
		}
		if _, err := br.ReadByte(); err != io.EOF {
			t.Errorf("after the 503: %v, want EOF", err)
		}
		c.Close()
	}
	logs.waitFor(t, `"message":"connection rejected"`)
	if n := p.Stats().RejectedFull.Load(); n != 10 {
		t.Errorf("RejectedFull = %d", n)
	}
	p.SetAdmission(0, nil)
	resp, _, _ = proxyExchange(t, proxy.Host, "CONNECT "+echo+" HTTP/1.1\r\n\r\n")
	if resp.StatusCode != http.StatusOK {
		t.Errorf("after SetAdmission(0): %s", resp.Status)
	}
	held.Close()
}

// listenerClosed is a TCP listener that tells when its socket has been
// closed. It keeps the *net.TCPListener's methods (SyscallConn, which
// Shutdown's look at the accept queue uses).
type listenerClosed struct {
	*net.TCPListener
	once   sync.Once
	closed chan struct{}
}

func (l *listenerClosed) Close() error {
	err := l.TCPListener.Close()
	l.once.Do(func() { close(l.closed) })
	return err
}

// TestHTTPProxyShutdownDrains: Shutdown stops accepting at once and lets
// an open tunnel finish; Close cuts one with a reset.
func TestHTTPProxyShutdownDrains(t *testing.T) {
	echo := testnet.Echo(t).Addr().String()
	inner, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	ln := &listenerClosed{TCPListener: inner, closed: make(chan struct{})}
	p, proxy, _ := startHTTPProxyOn(t, HTTPProxyConfig{}, ln, newSocks(t, sockstest.Config{}).Addr())
	resp, br, c := proxyExchange(t, proxy.Host, "CONNECT "+echo+" HTTP/1.1\r\n\r\n")
	if resp.StatusCode != http.StatusOK {
		t.Fatal(resp.Status)
	}
	done := make(chan error, 1)
	go func() { done <- p.Shutdown(context.Background()) }()
	select {
	case <-ln.closed:
	case err := <-done:
		t.Fatalf("Shutdown returned (%v) before closing its listener, with a tunnel open", err)
	case <-time.After(10 * time.Second):
		t.Fatal("still accepting 10 s after Shutdown")
	}
	if probe, err := net.Dial("tcp", proxy.Host); err == nil {
		probe.Close()
		t.Fatal("a connection was accepted after Shutdown closed the listener")
	}
	io.WriteString(c, "still here")
	c.(*net.TCPConn).CloseWrite()
	if got, err := io.ReadAll(br); string(got) != "still here" {
		t.Fatalf("tunnel during the drain: %q, %v", got, err)
	}
	if err := <-done; err != nil {
		t.Errorf("Shutdown: %v", err)
	}

	p2, proxy2, logs2 := startHTTPProxy(t, HTTPProxyConfig{}, newSocks(t, sockstest.Config{}).Addr())
	resp, br, _ = proxyExchange(t, proxy2.Host, "CONNECT "+echo+" HTTP/1.1\r\n\r\n")
	if resp.StatusCode != http.StatusOK {
		t.Fatal(resp.Status)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := p2.Shutdown(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("Shutdown past its deadline: %v", err)
	}
	if _, err := io.ReadAll(br); !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("a cut tunnel read %v, want a reset", err)
	}
	logs2.waitFor(t, "cutting sessions still open")
}

// halfwayTarget answers a request with a 10-byte body, the first half at
// once and the rest once more is closed.
func halfwayTarget(t *testing.T, more <-chan struct{}) net.Listener {
	return testnet.Serve(t, func(c net.Conn) {
		defer c.Close()
		if _, err := http.ReadRequest(bufio.NewReader(c)); err != nil {
			return
		}
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
		<-more
		io.WriteString(c, "world")
	})
}

// TestHTTPProxyClientResetDuringAnswer: a client that resets once its
// answer has begun (curl's Ctrl-C, a tab closed, bytes unread) while the
// target is slow to send the rest is the client's doing: side client,
// counted 4xx (the cancelled read of the answer was blamed on the target).
func TestHTTPProxyClientResetDuringAnswer(t *testing.T) {
	more := make(chan struct{})
	defer close(more)
	streaming := halfwayTarget(t, more)
	p, proxy, logs := startHTTPProxy(t, HTTPProxyConfig{}, newSocks(t, sockstest.Config{}).Addr())
	c, err := net.DialTimeout("tcp", proxy.Host, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(20 * time.Second))
	io.WriteString(c, "GET http://"+streaming.Addr().String()+"/ HTTP/1.1\r\nHost: x\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	first := make([]byte, 5)
	if _, err := io.ReadFull(resp.Body, first); err != nil {
		t.Fatal(err)
	}
	idle := p.whenIdle()
	c.(*net.TCPConn).SetLinger(0)
	c.Close()
	select {
	case <-idle:
	case <-time.After(10 * time.Second):
		t.Fatal("forward still running 10 s after the client's reset")
	}
	st := &p.Stats().Responses[HTTPForward]
	if st[4].Load() != 1 || st[5].Load() != 0 {
		t.Errorf("client reset mid-answer counted 4xx %d, 5xx %d; want one 4xx", st[4].Load(), st[5].Load())
	}
	if !strings.Contains(logs.String(), `"side":"client","cause":"client reset"`) {
		t.Errorf("no line naming the client's reset:\n%s", logs)
	}
}

// TestHTTPProxyCloseCountsForwards: a forwarded request still waiting for
// its answer when the drain runs out is one of the sessions Close says it
// cuts (it counted tunnels only, and said nothing for forwards).
func TestHTTPProxyCloseCountsForwards(t *testing.T) {
	arrived, release := make(chan struct{}), make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		close(arrived)
		<-release
	}))
	defer srv.Close()
	defer close(release)
	p, proxy, logs := startHTTPProxy(t, HTTPProxyConfig{}, newSocks(t, sockstest.Config{}).Addr())
	c, err := net.DialTimeout("tcp", proxy.Host, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, "GET "+srv.URL+"/slow HTTP/1.1\r\nHost: x\r\n\r\n")
	select {
	case <-arrived:
	case <-time.After(10 * time.Second):
		t.Fatal("the request never reached the target")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	p.Shutdown(ctx)
	logs.waitFor(t, `"sessions":1,"message":"cutting sessions still open"`)
}

// FuzzHTTPProxyRequest: whatever request net/http parses from the
// network, the proxy answers it (here without upstreams, so every target
// fails) with a status and a one-line body, never a panic; with and
// without credentials.
func FuzzHTTPProxyRequest(f *testing.F) {
	for _, seed := range []string{
		"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n",
		"CONNECT [::1]:443 HTTP/1.1\r\nProxy-Authorization: Basic YTpi\r\n\r\n",
		"CONNECT :0 HTTP/1.1\r\n\r\n",
		"GET http://[2001:db8::1]:8080/x?y HTTP/1.1\r\nHost: h\r\nConnection: x, y\r\nX: 1\r\n\r\n",
		"POST http://h/ HTTP/1.1\r\nContent-Length: 3\r\nProxy-Authorization: Basic !!!\r\n\r\nabc",
		"GET / HTTP/1.0\r\n\r\n",
		"GET ftp://h/ HTTP/1.1\r\nHost: h\r\n\r\n",
		"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n",
	} {
		f.Add([]byte(seed))
	}
	creds, _ := ParseProxyCredentials("a:b")
	var proxies []*HTTPProxy
	for _, c := range []*ProxyCredentials{nil, creds} {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			f.Fatal(err)
		}
		p := NewHTTPProxy(HTTPProxyConfig{Name: "fuzz", Upstreams: socksclient.NewUpstreams(), Credentials: c, Logger: zerolog.Nop()}, ln)
		f.Cleanup(func() { p.Close() })
		proxies = append(proxies, p)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		req, err := http.ReadRequest(bufio.NewReader(strings.NewReader(string(b))))
		if err != nil {
			return
		}
		req.RemoteAddr = "127.0.0.1:1"
		for _, p := range proxies {
			rec := httptest.NewRecorder()
			p.ServeHTTP(rec, req.Clone(context.Background()))
			if rec.Code < 100 || rec.Code > 599 {
				t.Fatalf("status %d", rec.Code)
			}
			if body := strings.TrimSuffix(rec.Body.String(), "\n"); rec.Code != http.StatusOK && strings.Contains(body, "\n") {
				t.Fatalf("%d body of more than one line: %q", rec.Code, body)
			}
		}
	})
}

// TestHTTPProxyViaAndLoop: a forwarded request carries this proxy's Via
// entry after the client's; one that already carries it came back through
// a chain of proxies to this one and is answered 508 rather than
// forwarded around the loop again.
func TestHTTPProxyViaAndLoop(t *testing.T) {
	tg := newTarget(t, false)
	_, proxy, _ := startHTTPProxy(t, HTTPProxyConfig{}, newSocks(t, sockstest.Config{}).Addr())
	resp, _, _ := proxyExchange(t, proxy.Host, "GET "+tg.srv.URL+"/v HTTP/1.1\r\nHost: "+tg.srv.Listener.Addr().String()+"\r\nVia: 1.0 elsewhere\r\n\r\n")
	body(t, resp)
	if via := resp.Header.Values("Via"); len(via) != 1 || via[0] != viaToken {
		t.Errorf("the client got Via %q, want %q", via, viaToken)
	}
	if via := tg.header().Values("Via"); len(via) != 2 || via[0] != "1.0 elsewhere" || via[1] != viaToken {
		t.Errorf("the target got Via %q, want the client's then %q", via, viaToken)
	}
	resp, _, _ = proxyExchange(t, proxy.Host, "GET "+tg.srv.URL+"/again HTTP/1.1\r\nHost: "+tg.srv.Listener.Addr().String()+"\r\nVia: 1.0 a, "+viaToken+"\r\n\r\n")
	text := body(t, resp)
	if resp.StatusCode != http.StatusLoopDetected || !strings.Contains(text, "came back") {
		t.Errorf("a request carrying this proxy's Via: %d %q, want 508", resp.StatusCode, text)
	}
}

// TestHTTPProxyKeepsQuery: the target gets the request target as the
// client wrote it, query parts net/url cannot parse included (RFC 9110:
// a proxy does not rewrite it).
func TestHTTPProxyKeepsQuery(t *testing.T) {
	tg := newTarget(t, false)
	_, proxy, _ := startHTTPProxy(t, HTTPProxyConfig{}, newSocks(t, sockstest.Config{}).Addr())
	const uri = "/q?z=1&a=1;b=2&c=%zz&flag"
	resp, _, _ := proxyExchange(t, proxy.Host, "GET "+tg.srv.URL+uri+" HTTP/1.1\r\nHost: x\r\n\r\n")
	body(t, resp)
	tg.mu.Lock()
	defer tg.mu.Unlock()
	if tg.lastURI != uri {
		t.Errorf("the target got %q, want %q", tg.lastURI, uri)
	}
}

// TestHTTPProxyConnectionNamesVia: Via named in Connection is the
// previous hop's own; only this proxy's entry goes on.
func TestHTTPProxyConnectionNamesVia(t *testing.T) {
	tg := newTarget(t, false)
	_, proxy, _ := startHTTPProxy(t, HTTPProxyConfig{}, newSocks(t, sockstest.Config{}).Addr())
	resp, _, _ := proxyExchange(t, proxy.Host, "GET "+tg.srv.URL+"/v HTTP/1.1\r\nHost: x\r\nConnection: Via\r\nVia: 1.0 internal-hop\r\n\r\n")
	body(t, resp)
	if via := tg.header().Values("Via"); len(via) != 1 || via[0] != viaToken {
		t.Errorf("the target got Via %q, want only %q", via, viaToken)
	}
}

// TestHTTPProxyConnectionNamesForwardingHeader: X-Forwarded-For named in
// Connection is hop-by-hop like any header named there.
func TestHTTPProxyConnectionNamesForwardingHeader(t *testing.T) {
	tg := newTarget(t, false)
	_, proxy, _ := startHTTPProxy(t, HTTPProxyConfig{}, newSocks(t, sockstest.Config{}).Addr())
	resp, _, _ := proxyExchange(t, proxy.Host, "GET "+tg.srv.URL+"/h HTTP/1.1\r\nHost: "+tg.srv.Listener.Addr().String()+
		"\r\nConnection: X-Forwarded-For\r\nX-Forwarded-For: 192.0.2.9\r\nForwarded: for=192.0.2.9\r\n\r\n")
	body(t, resp)
	h := tg.header()
	if v := h.Values("X-Forwarded-For"); len(v) > 0 {
		t.Errorf("X-Forwarded-For named in Connection reached the target: %q", v)
	}
	if h.Get("Forwarded") != "for=192.0.2.9" {
		t.Errorf("Forwarded, not named in Connection, was lost: %v", h)
	}
}

// TestHTTPProxyStatusBelow100: a target's status line with a code below
// 100 is answered 502, not a dropped connection (net/http panics writing
// such a code).
func TestHTTPProxyStatusBelow100(t *testing.T) {
	odd := testnet.Serve(t, func(c net.Conn) {
		c.SetDeadline(time.Now().Add(10 * time.Second))
		br := bufio.NewReader(c)
		if _, err := http.ReadRequest(br); err != nil {
			return
		}
		io.WriteString(c, "HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n")
	}).Addr().String()
	_, proxy, _ := startHTTPProxy(t, HTTPProxyConfig{}, newSocks(t, sockstest.Config{}).Addr())
	resp, _, _ := proxyExchange(t, proxy.Host, "GET http://"+odd+"/ HTTP/1.1\r\nHost: "+odd+"\r\n\r\n")
	if text := body(t, resp); resp.StatusCode != http.StatusBadGateway {
		t.Errorf("status 099 from the target: got %d %q, want 502", resp.StatusCode, text)
	}
}

// TestHTTPProxyUpgrade: a forwarded request the target answers with 101
// becomes a stream both ways; its bytes are counted as a tunnel's, and
// the idle timeout ends it once neither side sends.
func TestHTTPProxyUpgrade(t *testing.T) {
	socks := newSocks(t, sockstest.Config{})
	tgt, err := testnet.ServeOn(t, "127.0.0.1:0", func(c net.Conn) {
		br := bufio.NewReader(c)
		if _, err := http.ReadRequest(br); err != nil {
			return
		}
		io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
		io.Copy(c, br)
	})
	if err != nil {
		t.Fatal(err)
	}
	p, u, logs := startHTTPProxy(t, HTTPProxyConfig{IdleTimeout: 300 * time.Millisecond}, socks.Addr())
	addr := tgt.Addr().String()
	resp, br, c := proxyExchange(t, u.Host, "GET http://"+addr+"/ws HTTP/1.1\r\nHost: "+addr+"\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("status %d, want 101", resp.StatusCode)
	}
	io.WriteString(c, "ping-pong")
	got := make([]byte, len("ping-pong"))
	if _, err := io.ReadFull(br, got); err != nil || string(got) != "ping-pong" {
		t.Fatalf("echo over the upgraded stream: %q, %v", got, err)
	}
	// Nobody sends now: the idle timeout ends the stream (the deadline of
	// 20 s on c bounds the wait).
	if _, err := br.ReadByte(); !errors.Is(err, io.EOF) {
		t.Fatalf("after the idle timeout: %v, want EOF", err)
	}
	if up, down := p.Stats().BytesUp.Load(), p.Stats().BytesDown.Load(); up < 9 || down < 9 {
		t.Errorf("bytes up %d, down %d: the stream's 9 each way are not counted", up, down)
	}
	logs.waitFor(t, `"status":101,"bytes_up":9,"bytes_down":9`)
}

// upgradeTarget answers a request with 101, then runs stream on the
// connection (its buffered reader and the conn).
func upgradeTarget(t *testing.T, stream func(br *bufio.Reader, c net.Conn)) string {
	t.Helper()
	tgt, err := testnet.ServeOn(t, "127.0.0.1:0", func(c net.Conn) {
		br := bufio.NewReader(c)
		if _, err := http.ReadRequest(br); err != nil {
			return
		}
		io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n")
		stream(br, c)
	})
	if err != nil {
		t.Fatal(err)
	}
	return tgt.Addr().String()
}

// upgrade sends an upgrading request for addr through the proxy at proxy
// and wants 101.
func upgrade(t *testing.T, proxy, addr string) (*bufio.Reader, net.Conn) {
	t.Helper()
	resp, br, c := proxyExchange(t, proxy, "GET http://"+addr+"/attach HTTP/1.1\r\nHost: "+addr+"\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n")
	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("status %d, want 101", resp.StatusCode)
	}
	return br, c
}

// TestHTTPProxyUpgradeHalfClose: a client's half-close over a stream after
// a 101 reaches the target, which still answers (Docker's attach ends its
// input so): before, the proxy closed both ways at once and the answer
// was lost.
func TestHTTPProxyUpgradeHalfClose(t *testing.T) {
	socks := newSocks(t, sockstest.Config{})
	addr := upgradeTarget(t, func(br *bufio.Reader, c net.Conn) {
		io.Copy(c, br) // until the client's EOF
		io.WriteString(c, "bye")
		c.Close()
	})
	_, u, _ := startHTTPProxy(t, HTTPProxyConfig{}, socks.Addr())
	br, c := upgrade(t, u.Host, addr)
	io.WriteString(c, "stdin")
	c.(*net.TCPConn).CloseWrite()
	if got, err := io.ReadAll(br); string(got) != "stdinbye" || err != nil {
		t.Fatalf("after the half-close: %q, %v; want the echo, then bye, then EOF", got, err)
	}
}

// TestHTTPProxyUpgradeClientSideEnds: once the target has closed a stream
// after a 101, a client that stays silent is let go by the idle timeout,
// and Close cuts it without one: before, the proxy read from the client
// with no deadline, out of Close's reach, and a drain waited for ever.
func TestHTTPProxyUpgradeClientSideEnds(t *testing.T) {
	socks := newSocks(t, sockstest.Config{})
	addr := upgradeTarget(t, func(br *bufio.Reader, c net.Conn) {
		io.WriteString(c, "hi")
		c.Close()
	})
	for _, idle := range []time.Duration{300 * time.Millisecond, 0} {
		t.Run(fmt.Sprint("idle=", idle), func(t *testing.T) {
			p, u, logs := startHTTPProxy(t, HTTPProxyConfig{IdleTimeout: idle}, socks.Addr())
			br, _ := upgrade(t, u.Host, addr)
			if got, err := io.ReadAll(br); string(got) != "hi" || err != nil {
				t.Fatalf("the target's bytes: %q, %v", got, err)
			}
			if idle > 0 {
				logs.waitFor(t, `"status":101`) // the stream's end line; the client sent nothing
				return
			}
			returnsWithin(t, 10*time.Second, "Close still waits for a stream whose client stays silent", func() { p.Close() })
		})
	}
}

// TestHTTPProxyForwardStalls: a forwarded request that stops making
// progress (a client that stops sending its body, a target that never
// answers) ends after the idle timeout with one line, rather than holding
// a session and a connection to the target for ever.
func TestHTTPProxyForwardStalls(t *testing.T) {
	socks := newSocks(t, sockstest.Config{})
	silent, err := testnet.ServeOn(t, "127.0.0.1:0", func(c net.Conn) {
		io.Copy(io.Discard, c) // reads the request, never answers
	})
	if err != nil {
		t.Fatal(err)
	}
	tg := newTarget(t, false)
	_, u, logs := startHTTPProxy(t, HTTPProxyConfig{IdleTimeout: 300 * time.Millisecond}, socks.Addr())

	resp, _, _ := proxyExchange(t, u.Host, "GET http://"+silent.Addr().String()+"/ HTTP/1.1\r\nHost: x\r\n\r\n")
	if resp.StatusCode != http.StatusGatewayTimeout {
		t.Errorf("a target that never answers: %s, want 504", resp.Status)
	}
	// Its line names the upstream and the status, as the other lines do.
	logs.waitFor(t, `"upstream":"`+socks.Addr()+`","method":"GET","status":504`)

	c, err := net.DialTimeout("tcp", u.Host, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	io.WriteString(c, "POST "+tg.srv.URL+"/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nx")
	// The answer, if any, and then the end: not a connection held open.
	if _, err := io.ReadAll(c); err != nil {
		t.Fatalf("a client that stopped sending its body: %v, want the connection ended\n%s", err, logs)
	}
	logs.waitForCount(t, `"message":"request failed"`, 2) // one line each
}

// TestHTTPProxyConnectAuthRefusalCloses: a CONNECT refused 407 ends the
// connection: what the client sent behind it (a TLS ClientHello) is no
// next request.
func TestHTTPProxyConnectAuthRefusalCloses(t *testing.T) {
	creds, err := ParseProxyCredentials("alice:pw")
	if err != nil {
		t.Fatal(err)
	}
	_, u, _ := startHTTPProxy(t, HTTPProxyConfig{Credentials: creds}, newSocks(t, sockstest.Config{}).Addr())
	resp, br, _ := proxyExchange(t, u.Host, "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n\x16\x03\x01\x00\x05hello")
	if resp.StatusCode != http.StatusProxyAuthRequired {
		t.Fatalf("status %d, want 407", resp.StatusCode)
	}
	body(t, resp)
	if rest, err := io.ReadAll(br); len(rest) != 0 || err != nil {
		t.Fatalf("after the 407: %q, %v; want the connection closed", rest, err)
	}
}

// TestHTTPProxyMaxForwards: an OPTIONS or TRACE whose Max-Forwards is 0
// is answered here and reaches no target; a higher one goes on one less;
// other methods pass it unchanged (RFC 9110 §7.6.2).
func TestHTTPProxyMaxForwards(t *testing.T) {
	tg := newTarget(t, false)
	_, proxy, _ := startHTTPProxy(t, HTTPProxyConfig{}, newSocks(t, sockstest.Config{}).Addr())
	host := tg.srv.Listener.Addr().String()

	resp, _, _ := proxyExchange(t, proxy.Host, "OPTIONS "+tg.srv.URL+"/o HTTP/1.1\r\nHost: "+host+"\r\nMax-Forwards: 0\r\n\r\n")
	body(t, resp)
	if resp.StatusCode != http.StatusOK || !strings.Contains(resp.Header.Get("Allow"), "CONNECT") || tg.header() != nil {
		t.Errorf("OPTIONS with Max-Forwards 0: %s, Allow %q, target saw %v; want 200 from the proxy", resp.Status, resp.Header.Get("Allow"), tg.header())
	}

	resp, _, _ = proxyExchange(t, proxy.Host, "TRACE "+tg.srv.URL+"/t HTTP/1.1\r\nHost: "+host+
		"\r\nMax-Forwards: 0\r\nX-Mine: 7\r\nCookie: secret=1\r\nAuthorization: Basic c2VjcmV0\r\n\r\n")
	text := body(t, resp)
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "message/http" ||
		!strings.HasPrefix(text, "TRACE "+tg.srv.URL+"/t HTTP/1.1\r\nHost: "+host+"\r\n") || !strings.Contains(text, "X-Mine: 7\r\n") ||
		strings.Contains(text, "secret") || strings.Contains(text, "c2VjcmV0") || tg.header() != nil {
		t.Errorf("TRACE with Max-Forwards 0: %s %q, target saw %v; want the request echoed without credentials", resp.Status, text, tg.header())
	}

	resp, _, _ = proxyExchange(t, proxy.Host, "OPTIONS "+tg.srv.URL+"/o HTTP/1.1\r\nHost: "+host+"\r\nMax-Forwards: 3\r\n\r\n")
	body(t, resp)
	if got := tg.header().Get("Max-Forwards"); resp.StatusCode != http.StatusOK || got != "2" {
		t.Errorf("OPTIONS with Max-Forwards 3: %s, the target got Max-Forwards %q, want 2", resp.Status, got)
	}
	resp, _, _ = proxyExchange(t, proxy.Host, "GET "+tg.srv.URL+"/g HTTP/1.1\r\nHost: "+host+"\r\nMax-Forwards: 0\r\n\r\n")
	body(t, resp)
	if got := tg.header().Get("Max-Forwards"); got != "0" {
		t.Errorf("GET with Max-Forwards 0: the target got %q, want it unchanged (0)", got)
	}
}

// TestHTTPProxyParserRefusalOnKeepAlive: net/http's own 400 for the second
// request of a keep-alive connection (sent after the first answer, or
// pipelined behind it) is counted and logged as the first one is.
func TestHTTPProxyParserRefusalOnKeepAlive(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	logs := &logBuf{}
	p := NewHTTPProxy(HTTPProxyConfig{Name: "t", Upstreams: socksclient.NewUpstreams(), Logger: zerolog.New(logs)}, ln)
	serveForTest(t, p)
	const ours = "GET / HTTP/1.1\r\nHost: x\r\n\r\n"           // the handler's own 400, keep-alive
	const bad = "GET http://[::1/ HTTP/1.1\r\nHost: x\r\n\r\n" // net/http's 400
	for _, pipelined := range []bool{false, true} {
		before := p.Stats().Responses[HTTPMalformed][4].Load()
		c, err := net.DialTimeout("tcp", ln.Addr().String(), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		br := bufio.NewReader(c)
		if pipelined {
			io.WriteString(c, ours+bad)
		} else {
			io.WriteString(c, ours)
		}
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		if !pipelined {
			io.WriteString(c, bad)
		}
		resp, err = http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		c.Close()
		got := p.Stats().Responses[HTTPMalformed][4].Load() - before
		if resp.StatusCode != 400 || got != 1 {
			t.Errorf("pipelined=%v: second answer %s, counted %d as malformed, want 400 counted 1", pipelined, resp.Status, got)
		}
	}
	if !strings.Contains(logs.String(), "refused by the HTTP parser") {
		t.Errorf("no log line for either refusal:\n%s", logs)
	}
}

// TestHTTPProxyParserRefusalHTTP10: net/http's 417 to a request with an
// Expect it cannot meet is counted, written "HTTP/1.0 417" to an
// HTTP/1.0 client too.
func TestHTTPProxyParserRefusalHTTP10(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := NewHTTPProxy(HTTPProxyConfig{Name: "t", Upstreams: socksclient.NewUpstreams(), Logger: zerolog.Nop()}, ln)
	serveForTest(t, p)
	for _, proto := range []string{"HTTP/1.1", "HTTP/1.0"} {
		before := p.Stats().Responses[HTTPMalformed][4].Load()
		resp, _, _ := proxyExchange(t, ln.Addr().String(), "GET http://x/ "+proto+"\r\nHost: x\r\nExpect: something\r\n\r\n")
		resp.Body.Close()
		if got := p.Stats().Responses[HTTPMalformed][4].Load() - before; resp.StatusCode != 417 || got != 1 {
			t.Errorf("%s: %s, counted %d as malformed; want 417 counted once", proto, resp.Status, got)
		}
	}
}

// eofListener tells, through sawEOF, when the server has read a client's
// FIN: net/http cancels the request's context right then.
type eofListener struct {
	net.Listener
	sawEOF chan struct{}
	once   sync.Once
}

func (l *eofListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &eofConn{Conn: c, l: l}, nil
}

type eofConn struct {
	net.Conn
	l *eofListener
}

func (c *eofConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if err == io.EOF {
		c.l.once.Do(func() { close(c.l.sawEOF) })
	}
	return n, err
}

// TestHTTPProxyHalfCloseAfterRequest: a client that half-closes right
// behind its request (nc -N, an HTTP/1.0 client, a script sending
// Connection: close) gets the target's answer: the target, which answers
// only once the proxy has read the FIN, gets the request once, and the
// client reads 200 and the body.
func TestHTTPProxyHalfCloseAfterRequest(t *testing.T) {
	for _, req := range []string{
		"POST /order HTTP/1.1\r\nHost: HOST\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
		"GET /page HTTP/1.0\r\nHost: HOST\r\n\r\n",
		"GET /page HTTP/1.1\r\nHost: HOST\r\nConnection: close\r\n\r\n",
	} {
		inner, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ln := &eofListener{Listener: inner, sawEOF: make(chan struct{})}
		var mu sync.Mutex
		var got []string
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			b, _ := io.ReadAll(r.Body)
			mu.Lock()
			got = append(got, r.Method+" "+r.URL.Path+" "+string(b))
			mu.Unlock()
			<-ln.sawEOF
			io.WriteString(w, "done")
		}))
		p, proxy, _ := startHTTPProxyOn(t, HTTPProxyConfig{}, ln, newSocks(t, sockstest.Config{}).Addr())
		host := srv.Listener.Addr().String()
		method, rest, _ := strings.Cut(strings.ReplaceAll(req, "HOST", host), " ")
		c, err := net.DialTimeout("tcp", proxy.Host, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(20 * time.Second))
		io.WriteString(c, method+" http://"+host+rest)
		c.(*net.TCPConn).CloseWrite()
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatalf("%s: %v", method, err)
		}
		if b := body(t, resp); resp.StatusCode != http.StatusOK || b != "done" {
			t.Errorf("%.30q half-closed behind the request: %s %q, want 200 \"done\"", req, resp.Status, b)
		}
		c.Close()
		mu.Lock()
		if len(got) != 1 {
			t.Errorf("%.30q: the target got %q, want the request once", req, got)
		}
		mu.Unlock()
		srv.Close()
		p.Close()
		if n := p.Stats().Responses[HTTPForward][2].Load(); n != 1 {
			t.Errorf("%.30q: counted %d 2xx, want 1", req, n)
		}
	}
}

// TestHTTPProxyClientGoneDuringDial: a client that resets its connection
// while its target is being dialed is the client's doing: the answer's
// write fails, one info line names the client's side, and the request
// counts as 4xx, not as a gateway failure (5xx).
func TestHTTPProxyClientGoneDuringDial(t *testing.T) {
	list, err := noproxy.Parse("127.0.0.0/8")
	if err != nil {
		t.Fatal(err)
	}
	dialing, proceed := make(chan struct{}), make(chan struct{})
	held := func(ctx context.Context, network, address string) (net.Conn, error) {
		close(dialing)
		<-proceed
		return (&net.Dialer{}).DialContext(ctx, network, address)
	}
	big := strings.Repeat("x", 1<<20)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, big) }))
	defer srv.Close()
	p, proxy, logs := startHTTPProxy(t, HTTPProxyConfig{NoProxy: list, Direct: held})
	c, err := net.DialTimeout("tcp", proxy.Host, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(c, "GET "+srv.URL+"/big HTTP/1.1\r\nHost: x\r\n\r\n")
	<-dialing
	idle := p.whenIdle() // the request is in the handler now
	c.(*net.TCPConn).SetLinger(0)
	c.Close() // a reset: gone for good
	close(proceed)
	<-idle
	if !strings.Contains(logs.String(), `"side":"client","cause":"client reset"`) {
		t.Errorf("no line naming the client's reset:\n%s", logs)
	}
	st := &p.Stats().Responses[HTTPForward]
	if st[4].Load() != 1 || st[5].Load() != 0 || st[2].Load() != 0 {
		t.Errorf("counted 2xx %d, 4xx %d, 5xx %d; want one 4xx", st[2].Load(), st[4].Load(), st[5].Load())
	}
}

// TestHTTPProxyTargetClosesEarly: a target that closes before its
// Content-Length is all sent: the client gets the status, the headers and
// the bytes that came, then the end of the connection, so that it sees
// the truncation; one info line names the cause on the target's side,
// and the request counts as 5xx, not 2xx.
func TestHTTPProxyTargetClosesEarly(t *testing.T) {
	short := testnet.Serve(t, func(c net.Conn) {
		defer c.Close()
		if _, err := http.ReadRequest(bufio.NewReader(c)); err != nil {
			return
		}
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"+strings.Repeat("y", 300))
	})
	p, proxy, logs := startHTTPProxy(t, HTTPProxyConfig{}, newSocks(t, sockstest.Config{}).Addr())
	resp, _, _ := proxyExchange(t, proxy.Host, "GET http://"+short.Addr().String()+"/ HTTP/1.1\r\nHost: x\r\n\r\n")
	b, err := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK || resp.ContentLength != 1000 || len(b) != 300 || err != io.ErrUnexpectedEOF {
		t.Errorf("got %s, Content-Length %d, %d bytes, %v; want 200, 1000, the 300 sent and the truncation", resp.Status, resp.ContentLength, len(b), err)
	}
	logs.waitFor(t, `"cause":"target closed early`)
	if !strings.Contains(logs.String(), `"level":"info","error":"upstream read: unexpected EOF","side":"upstream"`) {
		t.Errorf("the line does not name the target's side at info:\n%s", logs)
	}
	st := &p.Stats().Responses[HTTPForward]
	if st[2].Load() != 0 || st[5].Load() != 1 {
		t.Errorf("counted 2xx %d, 5xx %d; want one 5xx", st[2].Load(), st[5].Load())
	}
}

// TestHTTPProxyStreamsSizedAnswer: an answer with a Content-Length
// reaches the client as it arrives: the head and the first bytes before
// the target sends the rest.
func TestHTTPProxyStreamsSizedAnswer(t *testing.T) {
	rest := make(chan struct{})
	slow := testnet.Serve(t, func(c net.Conn) {
		defer c.Close()
		if _, err := http.ReadRequest(bufio.NewReader(c)); err != nil {
			return
		}
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n0123456789")
		<-rest
		io.WriteString(c, strings.Repeat("z", 20))
	})
	_, proxy, _ := startHTTPProxy(t, HTTPProxyConfig{}, newSocks(t, sockstest.Config{}).Addr())
	c, err := net.DialTimeout("tcp", proxy.Host, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, "GET http://"+slow.Addr().String()+"/ HTTP/1.1\r\nHost: x\r\n\r\n")
	// Not a wait for the proxy: the bound on a failure, which would
	// otherwise hang until the target sends the rest (never).
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	first := make([]byte, 10)
	if err == nil {
		_, err = io.ReadFull(resp.Body, first)
	}
	close(rest)
	if err != nil || string(first) != "0123456789" {
		t.Fatalf("before the target sent the rest: %q, %v; want the head and the first 10 bytes", first, err)
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if b, err := io.ReadAll(resp.Body); err != nil || len(b) != 20 {
		t.Errorf("the rest: %d bytes, %v", len(b), err)
	}
}

// TestHTTPProxyHeadTimeout: a client that stalls in the middle of its
// request head, or sends nothing, loses the connection after
// ReadHeaderTimeout, counted (kind timeout, 4xx) and logged once per
// period; a keep-alive connection idle between requests ends without
// either.
func TestHTTPProxyHeadTimeout(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	logs := &logBuf{}
	p := NewHTTPProxy(HTTPProxyConfig{Name: "t", Upstreams: socksclient.NewUpstreams(), ReadHeaderTimeout: 200 * time.Millisecond,
		KeepAlive: 200 * time.Millisecond, Logger: zerolog.New(logs)}, ln)
	serveForTest(t, p)
	// ended sends what, then waits for the server to close the connection.
	ended := func(what string) {
		t.Helper()
		c, err := net.DialTimeout("tcp", ln.Addr().String(), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(c, what)
		if _, err := io.ReadAll(c); err != nil {
			t.Fatalf("after %q: %v, want the connection closed", what, err)
		}
	}
	timeouts := &p.Stats().Responses[HTTPTimeout]
	ended("GET http://x/ HTTP/1.1\r\nHost: x\r\n") // and nothing more
	if n := timeouts[4].Load(); n != 1 {
		t.Errorf("a head stalled halfway: counted %d, want 1", n)
	}
	ended("GET http://x/ HTTP/1.1\r\n")
	if n := timeouts[4].Load(); n != 2 {
		t.Errorf("a second stalled head: counted %d in all, want 2", n)
	}
	if n := strings.Count(logs.String(), `"cause":"request head timeout"`); n != 1 {
		t.Errorf("%d lines for two timeouts, want 1 (throttled):\n%s", n, logs)
	}
	// Opened and never used (a browser's spare connection): no request,
	// so not counted as one; a debug line.
	ended("")
	if n := timeouts[4].Load(); n != 2 {
		t.Errorf("a connection that sent nothing counted as a request head timeout (%d in all)", n)
	}
	if !strings.Contains(logs.String(), `"level":"debug"`) || !strings.Contains(logs.String(), "no request came") {
		t.Errorf("no debug line for the unused connection:\n%s", logs)
	}
	// Answered (the handler's own 400, kept alive), then idle.
	before := timeouts[4].Load()
	ended("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	if n := timeouts[4].Load(); n != before {
		t.Errorf("a keep-alive connection idle between requests counted as a head timeout (%d, then %d)", before, n)
	}
}

// TestHTTPProxyClientGaveUp: a client that gives up on a target slow to
// answer (a long poll, curl --max-time) releases the target's connection
// and its --max-sessions slot: at once for a reset, after the half-close
// wait for a FIN (which may be a half-close from a client still reading).
// The request counts 4xx, the client's doing.
func TestHTTPProxyClientGaveUp(t *testing.T) {
	for _, reset := range []bool{true, false} {
		got, released := make(chan struct{}), make(chan struct{})
		slow := testnet.Serve(t, func(c net.Conn) {
			defer c.Close()
			if _, err := http.ReadRequest(bufio.NewReader(c)); err != nil {
				return
			}
			close(got)
			io.Copy(io.Discard, c) // never answers; ends when the proxy lets go
			close(released)
		})
		p, proxy, logs := startHTTPProxy(t, HTTPProxyConfig{MaxSessions: 1, halfCloseWait: 200 * time.Millisecond}, newSocks(t, sockstest.Config{}).Addr())
		c, err := net.DialTimeout("tcp", proxy.Host, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(c, "GET http://"+slow.Addr().String()+"/long-poll HTTP/1.1\r\nHost: x\r\n\r\n")
		<-got
		idle := p.whenIdle() // the request is in the handler now
		if reset {
			c.(*net.TCPConn).SetLinger(0)
		}
		c.Close()
		select {
		case <-released:
		case <-time.After(10 * time.Second):
			t.Fatalf("reset %v: the target's connection is held after the client left (%d active)", reset, p.Stats().Active.Load())
		}
		<-idle
		if !strings.Contains(logs.String(), `"side":"client"`) {
			t.Errorf("reset %v: no line naming the client:\n%s", reset, logs)
		}
		if n := p.Stats().Responses[HTTPForward][4].Load(); n != 1 {
			t.Errorf("reset %v: %d forwards counted 4xx, want 1 (5xx: %d)", reset, n, p.Stats().Responses[HTTPForward][5].Load())
		}
	}
}

// TestHTTPProxyHalfCloseDuringAnswer: a client that half-closes once its
// answer has begun reads it to the end, however long past the half-close
// wait it streams.
func TestHTTPProxyHalfCloseDuringAnswer(t *testing.T) {
	graceOver := make(chan struct{})
	more := make(chan struct{})
	streaming := halfwayTarget(t, more)
	_, proxy, _ := startHTTPProxy(t, HTTPProxyConfig{halfCloseWait: time.Nanosecond, afterGrace: func() { close(graceOver) }},
		newSocks(t, sockstest.Config{}).Addr())
	c, err := net.DialTimeout("tcp", proxy.Host, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	io.WriteString(c, "GET http://"+streaming.Addr().String()+"/ HTTP/1.1\r\nHost: x\r\n\r\n")
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	first := make([]byte, 5)
	if _, err := io.ReadFull(resp.Body, first); err != nil {
		t.Fatal(err)
	}
	c.(*net.TCPConn).CloseWrite()
	<-graceOver // the proxy read the FIN and its wait is over
	close(more)
	rest, err := io.ReadAll(resp.Body)
	if got := string(first) + string(rest); err != nil || got != "helloworld" {
		t.Fatalf("the half-closed client read %q (%v), want the whole answer", got, err)
	}
}
