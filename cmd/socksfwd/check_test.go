package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/miekg/dns"
	"github.com/rogpeppe/go-internal/testscript"

	"github.com/socksfwd/socksfwd/dnsforward"
	"github.com/socksfwd/socksfwd/internal/peertest"
	"github.com/socksfwd/socksfwd/internal/testnet"
	"github.com/socksfwd/socksfwd/socksclient"
	"github.com/socksfwd/socksfwd/socksclient/sockstest"
)

// runCheck runs `socksfwd check args… --json` in this process and
// returns the exit code and the parsed report.
func runCheck(t *testing.T, args ...string) (int, checkReport, string) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	argv := append([]string{"socksfwd", "check", "--json"}, args...)
	code := run(argv, &stdout, &stderr, func(string) string { return "" })
	var r checkReport
	if err := json.Unmarshal(stdout.Bytes(), &r); err != nil {
		t.Fatalf("exit %d, stdout is not a report: %v\n%s\nstderr: %s", code, err, stdout.String(), stderr.String())
	}
	return code, r, stderr.String()
}

// stepOf finds a step of upstream i; want names one that must be there.
func stepOf(t *testing.T, r checkReport, i int, step string) stepReport {
	t.Helper()
	for _, s := range r.Upstreams[i].Steps {
		if s.Step == step {
			return s
		}
	}
	t.Fatalf("upstream %d has no %s step: %+v", i, step, r.Upstreams[i].Steps)
	return stepReport{}
}

// dnsTestServer is a resolver on loopback, UDP and TCP on one port,
// answering every A question with 192.0.2.10.
func dnsTestServer(t *testing.T) string {
	t.Helper()
	return dnsTestServerWith(t, dns.HandlerFunc(func(w dns.ResponseWriter, q *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(q)
		if q.Question[0].Qtype == dns.TypeA {
			m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: q.Question[0].Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60}, A: net.IPv4(192, 0, 2, 10)})
		}
		w.WriteMsg(m)
	}))
}

// dnsTestServerWith is a resolver on loopback, UDP and TCP on one port,
// answering with handler.
func dnsTestServerWith(t *testing.T, handler dns.Handler) string {
	t.Helper()
	pc, ln, err := dnsforward.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	servers := []*dns.Server{{PacketConn: pc, Handler: handler}, {Listener: ln, Handler: handler}}
	var wg sync.WaitGroup
	for _, s := range servers {
		started := make(chan struct{})
		s.NotifyStartedFunc = func() { close(started) }
		wg.Go(func() { s.ActivateAndServe() })
		<-started
	}
	t.Cleanup(func() {
		for _, s := range servers {
			s.Shutdown()
		}
		wg.Wait()
	})
	return pc.LocalAddr().String()
}

func socksServer(t *testing.T, cfg sockstest.Config) string {
	t.Helper()
	srv, err := sockstest.NewServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return srv.Addr()
}

// TestCheckAllWorks: against a server that does everything, every check
// passes, with the addresses and DNS answers in the report.
func TestCheckAllWorks(t *testing.T) {
	verifyNoLeaks(t)
	resolver := dnsTestServer(t)
	echo := testnet.Echo(t).Addr().String()
	proxy := socksServer(t, sockstest.Config{Users: map[string]string{"u": "p@ss"}})
	code, r, stderr := runCheck(t, "-S", "socks5h://u:p%40ss@"+proxy, "--target", echo,
		"--dns-upstream", resolver, "--check-name", "db.internal")
	if code != exitOK || !r.OK || len(r.Upstreams) != 1 || !r.Upstreams[0].OK {
		t.Fatalf("exit %d, report %+v, stderr %s", code, r, stderr)
	}
	u := r.Upstreams[0]
	if u.Upstream != "socks5h://u:xxxxx@"+proxy || u.Proxy != proxy {
		t.Errorf("upstream %q proxy %q", u.Upstream, u.Proxy)
	}
	if fmt.Sprint(u.MethodsOffered) != "[0 2]" || u.MethodChosen == nil || *u.MethodChosen != 2 {
		t.Errorf("methods offered %v, chosen %v", u.MethodsOffered, u.MethodChosen)
	}
	var steps []string
	for _, s := range u.Steps {
		steps = append(steps, s.Step+"="+s.Status)
	}
	if got, want := strings.Join(steps, " "), "reachable=ok handshake=ok auth=ok connect=ok bind=ok udp=ok dns-udp=ok dns-tcp=ok"; got != want {
		t.Fatalf("steps %s, want %s", got, want)
	}
	for _, name := range []string{"bind", "udp"} {
		if s := stepOf(t, r, 0, name); !strings.HasPrefix(s.Address, "127.0.0.1:") || strings.HasSuffix(s.Address, ":0") {
			t.Errorf("%s reports address %q, want the proxy's 127.0.0.1:port", name, s.Address)
		}
	}
	for _, name := range []string{"dns-udp", "dns-tcp"} {
		s := stepOf(t, r, 0, name)
		if s.Target != resolver || s.Rcode != "NOERROR" || s.Answers == nil || *s.Answers != 1 || s.DurationMS == nil {
			t.Errorf("%s: %+v", name, s)
		}
	}
	if strings.Contains(stderr+fmt.Sprint(r), "p@ss") {
		t.Errorf("the password shows")
	}
}

// TestCheckFailures: each way a proxy can say no, and what the report
// and exit status make of it.
func TestCheckFailures(t *testing.T) {
	verifyNoLeaks(t)
	echo := testnet.Echo(t).Addr().String()
	tests := []struct {
		name  string
		cfg   sockstest.Config
		args  []string
		want  map[string]string // step → status
		rep   map[string]int    // step → REP
		match map[string]string // step → regexp of its detail
	}{
		{
			name: "not allowed",
			cfg:  sockstest.Config{Reply: socksclient.RepNotAllowed},
			want: map[string]string{"handshake": "ok", "connect": "failed", "bind": "failed", "udp": "failed"},
			rep:  map[string]int{"connect": 2, "bind": 2, "udp": 2},
		},
		{
			name:  "command not supported",
			cfg:   sockstest.Config{Reply: socksclient.RepCommandNotSupported},
			want:  map[string]string{"connect": "unsupported", "bind": "unsupported", "udp": "unsupported", "dns-udp": "skipped"},
			rep:   map[string]int{"bind": 7},
			match: map[string]string{"bind": `command not supported \(REP 0x07\)`},
		},
		{
			// OpenSSH's way of not supporting BIND and UDP ASSOCIATE.
			name:  "closes after the request",
			cfg:   sockstest.Config{Fault: sockstest.FaultCloseAfterRequest},
			want:  map[string]string{"connect": "failed", "bind": "unsupported", "udp": "unsupported"},
			match: map[string]string{"bind": `does not support bind`},
		},
		{
			name:  "wrong password",
			cfg:   sockstest.Config{Users: map[string]string{"u": "right"}},
			args:  []string{"--server-user", "u"},
			want:  map[string]string{"handshake": "ok", "auth": "failed", "connect": "skipped", "bind": "skipped"},
			match: map[string]string{"auth": `rejected the username and password`},
		},
		{
			name:  "credentials wanted",
			cfg:   sockstest.Config{Users: map[string]string{"u": "right"}},
			want:  map[string]string{"handshake": "failed", "auth": "failed", "connect": "skipped"},
			match: map[string]string{"handshake": `chose no acceptable methods`, "auth": `username and password`},
		},
		{
			name:  "hangs after the greeting",
			cfg:   sockstest.Config{Fault: sockstest.FaultHangAfterGreeting},
			args:  []string{"--handshake-timeout", "200ms"},
			want:  map[string]string{"reachable": "ok", "handshake": "failed", "auth": "skipped", "bind": "skipped"},
			match: map[string]string{"handshake": `timed out after 200ms`},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"-S", socksServer(t, tc.cfg), "--target", echo}, tc.args...)
			if slices.Contains(tc.args, "--server-user") {
				pw := filepath.Join(t.TempDir(), "pw")
				if err := os.WriteFile(pw, []byte("wrong\n"), 0o600); err != nil {
					t.Fatal(err)
				}
				args = append(args, "--server-password-file", pw)
			}
			code, r, stderr := runCheck(t, args...)
			if code != exitRuntime || r.OK || r.Upstreams[0].OK {
				t.Fatalf("exit %d, ok %v; want 1 and not ok (stderr %s)", code, r.OK, stderr)
			}
			for step, status := range tc.want {
				if s := stepOf(t, r, 0, step); s.Status != status {
					t.Errorf("%s: %s (%s), want %s", step, s.Status, s.Detail, status)
				}
			}
			for step, code := range tc.rep {
				if s := stepOf(t, r, 0, step); s.REP == nil || *s.REP != code || s.REPMeaning != socksclient.ReplyCode(code).String() {
					t.Errorf("%s: REP %v %q, want %d", step, s.REP, s.REPMeaning, code)
				}
			}
			for step, re := range tc.match {
				if s := stepOf(t, r, 0, step); !regexp.MustCompile(re).MatchString(s.Detail) {
					t.Errorf("%s: detail %q, want it to match %s", step, s.Detail, re)
				}
			}
			if strings.Contains(fmt.Sprint(r)+stderr, "wrong") {
				t.Errorf("the password shows")
			}
		})
	}
}

// TestCheckSilentResolver: a resolver that never answers fails the DNS
// checks within the handshake timeout; the proxy's own checks still pass.
func TestCheckSilentResolver(t *testing.T) {
	verifyNoLeaks(t)
	sink := testnet.NewUDPSink(t) // reads, never answers; nothing on TCP
	code, r, _ := runCheck(t, "-S", socksServer(t, sockstest.Config{}), "--dns-upstream", sink.Addr().String(), "--handshake-timeout", "300ms")
	if code != exitRuntime || r.OK {
		t.Fatalf("exit %d, ok %v; want 1", code, r.OK)
	}
	if s := stepOf(t, r, 0, "udp"); s.Status != statusOK {
		t.Errorf("udp: %+v", s)
	}
	if s := stepOf(t, r, 0, "dns-udp"); s.Status != statusFailed || !strings.Contains(s.Detail, "no answer through the relay") {
		t.Errorf("dns-udp: %+v", s)
	}
	if n := sink.Count(); n != udpSends {
		t.Errorf("the resolver got %d queries, want %d", n, udpSends)
	}
	if s := stepOf(t, r, 0, "dns-tcp"); s.Status != statusFailed || s.REP == nil || *s.REP != int(socksclient.RepConnectionRefused) {
		t.Errorf("dns-tcp: %+v", s)
	}
	if s := stepOf(t, r, 0, "connect"); s.Status != statusSkipped {
		t.Errorf("connect without --target: %+v", s)
	}
}

// TestCheckResolverRefuses: a resolver that refuses the proxy fails both
// DNS checks at once, the detail naming its access control: unbound's
// refusal, REFUSED with no question (QDCOUNT 0), and dnsmasq's, with the
// question. Before, the first failed dns-tcp with "the answer (id N) does
// not match the query (id N)" and dns-udp after the whole timeout with "no
// answer through the relay"; the second passed both as ok.
func TestCheckResolverRefuses(t *testing.T) {
	verifyNoLeaks(t)
	for _, tc := range []struct {
		name     string
		question bool
	}{{"bare", false}, {"with the question", true}} {
		t.Run(tc.name, func(t *testing.T) {
			resolver := dnsTestServerWith(t, dns.HandlerFunc(func(w dns.ResponseWriter, q *dns.Msg) {
				m := new(dns.Msg)
				m.SetRcode(q, dns.RcodeRefused)
				if !tc.question {
					m.Question = nil
				}
				w.WriteMsg(m)
			}))
			code, r, stderr := runCheck(t, "-S", socksServer(t, sockstest.Config{}), "--dns-upstream", resolver,
				"--skip", "bind", "--handshake-timeout", "10s")
			if code != exitRuntime || r.OK {
				t.Fatalf("exit %d, ok %v; want 1 and not ok (stderr %s)", code, r.OK, stderr)
			}
			for _, step := range []string{"dns-udp", "dns-tcp"} {
				s := stepOf(t, r, 0, step)
				if s.Status != statusFailed || s.Rcode != "REFUSED" || !strings.Contains(s.Detail, "check its access control for the proxy's address") {
					t.Errorf("%s: %+v, want failed, REFUSED, naming the access control", step, s)
				}
				// Answered, not timed out: well within the 10 s allowed.
				if s.DurationMS == nil || *s.DurationMS > 5000 {
					t.Errorf("%s took too long (%+v)", step, s)
				}
			}
		})
	}
}

// TestCheckSkip: --skip leaves a check out without failing the run.
func TestCheckSkip(t *testing.T) {
	verifyNoLeaks(t)
	echo := testnet.Echo(t).Addr().String()
	proxy := socksServer(t, sockstest.Config{Fault: sockstest.FaultCloseAfterRequest})
	code, r, _ := runCheck(t, "-S", proxy, "--skip", "bind", "--skip", "udp", "--skip", "connect", "--target", echo)
	if code != exitOK || !r.OK {
		t.Fatalf("exit %d, report %+v", code, r)
	}
	for _, step := range []string{"connect", "bind", "udp"} {
		if s := stepOf(t, r, 0, step); s.Status != statusSkipped || s.Detail != "--skip "+step {
			t.Errorf("%s: %+v", step, s)
		}
	}
}

// checkjson [UPSTREAM [STEP]] FIELD=VALUE|FIELD~REGEXP...: the JSON report
// on stdout has these fields: top-level ones without UPSTREAM; upstream
// number UPSTREAM's with STEP "-"; else that upstream's step STEP. Values
// compare as JSON text (strings unquoted).
func cmdCheckJSON(ts *testscript.TestScript, neg bool, args []string) {
	if neg {
		ts.Fatalf("checkjson does not take !")
	}
	var report map[string]any
	if err := json.Unmarshal([]byte(ts.ReadFile("stdout")), &report); err != nil {
		ts.Fatalf("stdout is not JSON: %v", err)
	}
	obj := report
	if len(args) > 0 && !strings.ContainsAny(args[0], "=~") {
		i, err := strconv.Atoi(args[0])
		ts.Check(err)
		ups, _ := report["upstreams"].([]any)
		if i >= len(ups) {
			ts.Fatalf("no upstream %d in %d", i, len(ups))
		}
		obj = ups[i].(map[string]any)
		if args[1] != "-" {
			steps, _ := obj["steps"].([]any)
			obj = nil
			for _, s := range steps {
				if m := s.(map[string]any); m["step"] == args[1] {
					obj = m
				}
			}
			if obj == nil {
				ts.Fatalf("upstream %d has no step %s", i, args[1])
			}
		}
		args = args[2:]
	}
	for _, a := range args {
		i := strings.IndexAny(a, "=~")
		if i < 0 {
			ts.Fatalf("want FIELD=VALUE or FIELD~REGEXP, have %q", a)
		}
		field, op, want := a[:i], a[i], a[i+1:]
		v, ok := obj[field]
		if !ok {
			ts.Fatalf("no field %q in %v", field, obj)
		}
		got := fmt.Sprint(v)
		if b, err := json.Marshal(v); err == nil && !isString(v) {
			got = string(b)
		}
		if op == '=' && got != want || op == '~' && !regexp.MustCompile(want).MatchString(got) {
			ts.Fatalf("%s is %s, want %c%s", field, got, op, want)
		}
	}
}

func isString(v any) bool { _, ok := v.(string); return ok }

// TestCheckInterop runs check against real servers, with the verdicts
// each deserves: Dante does everything; microsocks and ssh -D only
// CONNECT (microsocks answers REP 7 to BIND and UDP ASSOCIATE, ssh -D
// closes the connection), which --skip can leave out.
func TestCheckInterop(t *testing.T) {
	verifyNoLeaks(t)
	if testing.Short() {
		t.Skip("starts real servers")
	}
	resolver := peertest.Dnsmasq(t, map[string]string{"example.internal": "192.0.2.10"}, nil).Addr
	echo := testnet.Echo(t).Addr().String()
	common := []string{"--target", echo, "--dns-upstream", resolver, "--check-name", "example.internal"}
	statuses := func(r checkReport) string {
		var s []string
		for _, st := range r.Upstreams[0].Steps {
			s = append(s, st.Step+"="+st.Status)
		}
		return strings.Join(s, " ")
	}
	expect := func(t *testing.T, code int, r checkReport, wantCode int, want string) {
		t.Helper()
		if got := statuses(r); code != wantCode || got != want {
			t.Fatalf("exit %d, steps %s\nwant exit %d, steps %s\n%+v", code, got, wantCode, want, r.Upstreams[0].Steps)
		}
	}

	t.Run("dante", func(t *testing.T) {
		dante := peertest.Dante(t, peertest.DanteOptions{})
		code, r, _ := runCheck(t, append([]string{"-S", dante.Addr}, common...)...)
		expect(t, code, r, exitOK, "reachable=ok handshake=ok auth=skipped connect=ok bind=ok udp=ok dns-udp=ok dns-tcp=ok")
		// Dante reports the addresses it uses, never 0.0.0.0.
		for _, step := range []string{"connect", "bind", "udp"} {
			if s := stepOf(t, r, 0, step); !strings.HasPrefix(s.Address, "127.0.0.1:") || strings.HasSuffix(s.Address, ":0") {
				t.Errorf("%s: address %q", step, s.Address)
			}
		}
		for _, step := range []string{"dns-udp", "dns-tcp"} {
			if s := stepOf(t, r, 0, step); s.Rcode != "NOERROR" || s.Answers == nil || *s.Answers != 1 {
				t.Errorf("%s: %+v", step, s)
			}
		}
	})

	t.Run("dante username", func(t *testing.T) {
		dante := peertest.Dante(t, peertest.DanteOptions{Username: true})
		for _, tc := range []struct {
			password string
			code     int
			want     string
		}{
			{peertest.TestPassword, exitOK, "reachable=ok handshake=ok auth=ok connect=ok bind=ok udp=ok dns-udp=ok dns-tcp=ok"},
			{"wrong", exitRuntime, "reachable=ok handshake=ok auth=failed connect=skipped bind=skipped udp=skipped dns-udp=skipped dns-tcp=skipped"},
		} {
			pw := filepath.Join(t.TempDir(), "pw")
			if err := os.WriteFile(pw, []byte(tc.password+"\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			code, r, _ := runCheck(t, append([]string{"-S", dante.Addr, "--server-user", peertest.TestUser, "--server-password-file", pw}, common...)...)
			expect(t, code, r, tc.code, tc.want)
			if u := r.Upstreams[0]; u.MethodChosen == nil || *u.MethodChosen != int(socksclient.MethodUserPass) {
				t.Errorf("method chosen %v, want username/password", u.MethodChosen)
			}
		}
	})

	t.Run("microsocks", func(t *testing.T) {
		micro := peertest.Microsocks(t, peertest.MicrosocksOptions{})
		code, r, _ := runCheck(t, append([]string{"-S", micro.Addr}, common...)...)
		expect(t, code, r, exitRuntime, "reachable=ok handshake=ok auth=skipped connect=ok bind=unsupported udp=unsupported dns-udp=skipped dns-tcp=ok")
		for _, step := range []string{"bind", "udp"} {
			if s := stepOf(t, r, 0, step); s.REP == nil || *s.REP != int(socksclient.RepCommandNotSupported) {
				t.Errorf("%s: %+v, want REP 7", step, s)
			}
		}
		code, r, _ = runCheck(t, append([]string{"-S", micro.Addr, "--skip", "bind", "--skip", "udp"}, common...)...)
		expect(t, code, r, exitOK, "reachable=ok handshake=ok auth=skipped connect=ok bind=skipped udp=skipped dns-udp=skipped dns-tcp=ok")
	})

	t.Run("ssh -D", func(t *testing.T) {
		ssh := peertest.SSHDynamic(t, nil)
		// With credentials: ssh -D takes none, and chooses no authentication.
		code, r, _ := runCheck(t, append([]string{"-S", "socks5h://someone:pw@" + ssh.Addr}, common...)...)
		expect(t, code, r, exitRuntime, "reachable=ok handshake=ok auth=ok connect=ok bind=unsupported udp=unsupported dns-udp=skipped dns-tcp=ok")
		for _, step := range []string{"bind", "udp"} {
			if s := stepOf(t, r, 0, step); s.REP != nil || !strings.Contains(s.Detail, "closed the connection without replying") {
				t.Errorf("%s: %+v, want a closed connection", step, s)
			}
		}
		code, r, _ = runCheck(t, append([]string{"-S", ssh.Addr, "--skip", "bind", "--skip", "udp"}, common...)...)
		expect(t, code, r, exitOK, "reachable=ok handshake=ok auth=skipped connect=ok bind=skipped udp=skipped dns-udp=skipped dns-tcp=ok")
	})

	t.Run("dead", func(t *testing.T) {
		dead := testnet.ClosedPort(t)
		code, r, stderr := runCheck(t, append([]string{"-S", dead}, common...)...)
		expect(t, code, r, exitRuntime, "reachable=failed handshake=skipped auth=skipped connect=skipped bind=skipped udp=skipped dns-udp=skipped dns-tcp=skipped")
		if s := stepOf(t, r, 0, "reachable"); !strings.Contains(s.Detail, "connection refused") {
			t.Errorf("reachable: %+v", s)
		}
		if !strings.Contains(stderr, "check: 1 of 1 upstreams failed") {
			t.Errorf("stderr %q", stderr)
		}
	})
}
