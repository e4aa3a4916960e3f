package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rogpeppe/go-internal/testscript"

	"github.com/socksfwd/socksfwd/internal/peertest"
	"github.com/socksfwd/socksfwd/internal/testnet"
)

// TestInterop runs testdata/interop/*.txtar: the built binary between real
// clients (psql) and real SOCKS5 servers (Dante, microsocks, ssh -D).
func TestInterop(t *testing.T) {
	verifyNoLeaks(t)
	if testing.Short() {
		t.Skip("interop tests start real servers")
	}
	// Every peer here runs as root (Dante's privileged user, sshd, unshare);
	// programs are checked per script by "needs", so one missing program
	// skips only the scripts that use it.
	peertest.RequireRoot(t)
	testscript.Run(t, testscript.Params{
		Dir: "testdata/interop",
		Setup: func(env *testscript.Env) error {
			env.Values[scriptT{}] = env.T()
			clearProxyEnv(env)
			env.Setenv("TESTUSER", peertest.TestUser)
			env.Setenv("TESTPASS", peertest.TestPassword)
			env.Setenv("TESTPASS_URL", urlEscape(peertest.TestPassword))
			// dnsmasq takes one TXT string per comma-separated value.
			env.Setenv("BIGTXT", strings.TrimSuffix(strings.Repeat(strings.Repeat("x", 200)+",", 9), ","))
			return listenReadiness(env)
		},
		Cmds: scriptCmds(map[string]scriptCmd{
			"dante":        cmdDante,
			"microsocks":   cmdMicrosocks,
			"sshdynamic":   cmdSSHDynamic,
			"postgres":     cmdPostgres,
			"resolvable":   cmdResolvable,
			"shadowsocks":  cmdShadowsocks,
			"dnsmasq":      cmdDnsmasq,
			"cutter":       cmdCutter,
			"cut":          cmdCut,
			"udpcutstream": cmdUDPCutStream,
			"needs":        cmdNeeds,
			"blackhole":    cmdBlackhole,
			"echoserver6":  cmdEchoServer6,
			"udpecho6":     cmdUDPEcho6,
			"portof":       cmdPortOf,
			"downonce":     cmdDownOnce,
			"netns":        cmdNetns,
			"nssysctl":     cmdNsSysctl,
			"innetns":      cmdInNetns,
			"dantein":      cmdDanteIn,
			"dnsmasqin":    cmdDnsmasqIn,
			"servehttp":    cmdServeHTTP,
			"serveecho":    cmdServeEcho,
			"serveudpecho": cmdServeUDPEcho,
			"udpask":       cmdUDPAsk,
			"servegit":     cmdServeGit,
			"remoteaddr":   cmdRemoteAddr,
			"callback":     cmdCallback,
			"xproxyget":    cmdXProxyGet,
			"metric":       cmdMetric,
			"waitmetric":   cmdWaitMetric,
		}),
	})
}

// urlEscape percent-encodes every byte outside unreserved characters, as
// a user would write a password into socks5h://user:pass@host.
func urlEscape(s string) string {
	var b strings.Builder
	for _, c := range []byte(s) {
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("-._~", c) >= 0 {
			b.WriteByte(c)
		} else {
			fmt.Fprintf(&b, "%%%02X", c)
		}
	}
	return b.String()
}

// scriptT keys the script's testscript.T in Env.Values: a command skips
// its script through it, as the builtin skip does.
type scriptT struct{}

// peerTB adapts a TestScript to peertest.TB.
type peerTB struct{ ts *testscript.TestScript }

func (p peerTB) Helper()                           {}
func (p peerTB) Fatalf(format string, args ...any) { p.ts.Fatalf(format, args...) }
func (p peerTB) Logf(format string, args ...any)   { p.ts.Logf(format, args...) }

// Skipf skips the script; testscript stops its background commands on
// the way out.
func (p peerTB) Skipf(format string, args ...any) {
	t, ok := p.ts.Value(scriptT{}).(testscript.T)
	if !ok {
		p.ts.Fatalf("cannot skip: "+format, args...)
	}
	t.Skip(fmt.Sprintf(format, args...))
}
func (p peerTB) Cleanup(f func()) { p.ts.Defer(f) }
func (p peerTB) TempDir() string {
	dir, err := os.MkdirTemp(p.ts.Getenv("WORK"), "peer")
	p.ts.Check(err)
	return dir
}

// peerArgs splits NAME=IP host entries from other words.
func peerArgs(args []string) (words []string, hosts map[string]string) {
	for _, a := range args {
		if name, ip, ok := strings.Cut(a, "="); ok {
			if hosts == nil {
				hosts = map[string]string{}
			}
			hosts[name] = ip
			continue
		}
		words = append(words, a)
	}
	return words, hosts
}

// dante VAR [username] [ipv6] [onlyhosts] [port=PORTVAR] [NAME=IP...]: start
// danted, address in $VAR; ipv6 lets it reach IPv6 targets, onlyhosts makes
// the NAME=IP entries its whole /etc/hosts.
func cmdDante(ts *testscript.TestScript, neg bool, args []string) {
	words, hosts := peerArgs(args[1:])
	opt := peertest.DanteOptions{Hosts: hosts}
	if p, ok := hosts["port"]; ok {
		delete(hosts, "port")
		opt.Port, _ = strconv.Atoi(ts.Getenv(p))
	}
	for _, w := range words {
		switch w {
		case "username":
			opt.Username = true
		case "ipv6":
			opt.IPv6 = true
		case "onlyhosts":
			opt.OnlyHosts = true
		default:
			ts.Fatalf("dante: unknown option %q", w)
		}
	}
	ts.Setenv(args[0], peertest.Dante(peerTB{ts}, opt).Addr)
}

// microsocks VAR [user pass] [NAME=IP...]
func cmdMicrosocks(ts *testscript.TestScript, neg bool, args []string) {
	words, hosts := peerArgs(args[1:])
	opt := peertest.MicrosocksOptions{Hosts: hosts}
	if len(words) == 2 {
		opt.User, opt.Password = words[0], words[1]
	}
	ts.Setenv(args[0], peertest.Microsocks(peerTB{ts}, opt).Addr)
}

// sshdynamic VAR [NAME=IP...]: sshd plus ssh -D, SOCKS address in $VAR.
func cmdSSHDynamic(ts *testscript.TestScript, neg bool, args []string) {
	_, hosts := peerArgs(args[1:])
	ts.Setenv(args[0], peertest.SSHDynamic(peerTB{ts}, hosts).Addr)
}

// postgres VAR: start PostgreSQL, its port in $VAR.
func cmdPostgres(ts *testscript.TestScript, neg bool, args []string) {
	p := peertest.Postgres(peerTB{ts})
	_, port, _ := net.SplitHostPort(p.Addr)
	ts.Setenv(args[0], port)
}

// resolvable NAME: NAME resolves locally (use ! to insist it does not).
func cmdResolvable(ts *testscript.TestScript, neg bool, args []string) {
	_, err := net.LookupHost(args[0])
	if (err == nil) == neg {
		ts.Fatalf("resolving %s locally: %v", args[0], err)
	}
}

// shadowsocks VAR: ss-local in front of ss-server, SOCKS address in $VAR.
func cmdShadowsocks(ts *testscript.TestScript, neg bool, args []string) {
	ts.Setenv(args[0], peertest.Shadowsocks(peerTB{ts}).Addr)
}

// dnsmasq VAR NAME=IP... [txt:NAME=TEXT...]: a resolver answering those records.
func cmdDnsmasq(ts *testscript.TestScript, neg bool, args []string) {
	a, txt := map[string]string{}, map[string]string{}
	for _, arg := range args[1:] {
		name, val, _ := strings.Cut(arg, "=")
		if n, ok := strings.CutPrefix(name, "txt:"); ok {
			txt[n] = val
		} else {
			a[name] = val
		}
	}
	ts.Setenv(args[0], peertest.Dnsmasq(peerTB{ts}, a, txt).Addr)
}

// cutters are TCP relays a script can cut: "cutter VAR TARGET" puts one in
// front of TARGET (address in $VAR); "cut VAR" closes every connection it
// carries, as a proxy or a network would drop a control connection.
var cutters sync.Map // relay address → *testnet.Cutter

func cmdCutter(ts *testscript.TestScript, neg bool, args []string) {
	c := testnet.NewCutter(tb{ts: ts}, ts.Getenv(args[1]))
	ts.Setenv(args[0], c.Addr())
	cutters.Store(c.Addr(), c)
}

func cmdCut(ts *testscript.TestScript, neg bool, args []string) {
	c, ok := cutters.Load(ts.Getenv(args[0]))
	if !ok {
		ts.Fatalf("no cutter at $%s", args[0])
	}
	if n := c.(*testnet.Cutter).Cut(); n == 0 {
		ts.Fatalf("cut: no connection to cut")
	}
}

// udpcutstream ADDR CUTVAR: from one client socket (one session), echo
// datagrams through ADDR (each sent once; wait for the listener first), cut the cutter's connections mid-stream (proxy
// side first, then wait for socksfwd to close its side), and expect the
// datagrams after the cut to get through too.
func cmdUDPCutStream(ts *testscript.TestScript, neg bool, args []string) {
	c, err := net.ListenUDP("udp", nil)
	ts.Check(err)
	defer c.Close()
	to, err := net.ResolveUDPAddr("udp", args[0])
	ts.Check(err)
	buf := make([]byte, 2048)
	// Each datagram is sent once: socksfwd queues it while it builds the
	// association (again, after the cut), so one lost fails the script.
	echo := func(i int) {
		msg := []byte(fmt.Sprintf("datagram %d", i))
		if _, err := c.WriteToUDP(msg, to); err != nil {
			ts.Fatalf("send %q: %v", msg, err)
		}
		c.SetReadDeadline(time.Now().Add(udpAnswerTimeout))
		n, _, err := c.ReadFromUDP(buf)
		if err != nil || string(buf[:n]) != string(msg) {
			ts.Fatalf("echo of %q: got %q, %v", msg, buf[:n], err)
		}
	}
	for i := range 3 {
		echo(i)
	}
	// Time passing is what is tested here: an association the proxy ends
	// within a second of its start makes socksfwd pause before the next
	// and drop what comes meanwhile (a proxy that drops every association
	// at once must not cost a handshake per datagram). This one has lived
	// past that, as one a network cuts has, so nothing may be lost.
	time.Sleep(1500 * time.Millisecond)
	// The proxy's end of the control connection goes first; socksfwd
	// closing its end says it has seen the association end, so the next
	// datagram must build a new one.
	cut, ok := cutters.Load(ts.Getenv(args[1]))
	if !ok {
		ts.Fatalf("no cutter at $%s", args[1])
	}
	if n, err := cut.(*testnet.Cutter).CutUpstream(10 * time.Second); n == 0 || err != nil {
		ts.Fatalf("cut %d control connections: %v", n, err)
	}
	for i := 3; i < 6; i++ {
		echo(i)
	}
}

// needs PROGRAM...: the script uses these programs. One that is missing
// skips the script, or fails it under CI=true, where every real-peer test
// must run; other scripts still run.
func cmdNeeds(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) == 0 {
		ts.Fatalf("usage: needs PROGRAM...")
	}
	for _, program := range args {
		peertest.Require(peerTB{ts}, program)
	}
}

// blackhole VAR: a loopback TCP listener that accepts connections and
// never reads or answers, as a hung proxy does; address in $VAR. Its
// connections stay open until the script ends.
func cmdBlackhole(ts *testscript.TestScript, neg bool, args []string) {
	ts.Setenv(args[0], serveLoopback(ts, "127.0.0.1:0", nil).Addr().String())
}

// echoserver6 VAR: an echo server on [::1] (half-close as echoserver),
// address in $VAR.
func cmdEchoServer6(ts *testscript.TestScript, neg bool, args []string) {
	ln := serveLoopback(ts, "[::1]:0", testnet.EchoConn)
	ts.Setenv(args[0], ln.Addr().String())
}

// udpecho6 VAR: a UDP echo server on [::1], address in $VAR.
func cmdUDPEcho6(ts *testscript.TestScript, neg bool, args []string) {
	pc, err := testnet.UDPEchoOn(tb{ts: ts}, &net.UDPAddr{IP: net.IPv6loopback})
	if err != nil {
		peertest.Missing(peerTB{ts}, "no IPv6 loopback: %v", err)
	}
	ts.Setenv(args[0], pc.LocalAddr().String())
}

// portof VAR ADDR: the port of host:port ADDR, in $VAR.
func cmdPortOf(ts *testscript.TestScript, neg bool, args []string) {
	_, port, err := net.SplitHostPort(args[1])
	ts.Check(err)
	ts.Setenv(args[0], port)
}

// serveLoopback is testnet.ServeOn for a script: an address family the
// machine lacks skips the script (fails it under CI=true).
func serveLoopback(ts *testscript.TestScript, addr string, handle func(net.Conn)) net.Listener {
	ln, err := testnet.ServeOn(tb{ts: ts}, addr, handle)
	if err != nil {
		peertest.Missing(peerTB{ts}, "cannot listen on %s: %v", addr, err)
	}
	return ln
}

// downMessage is a log line's message saying that an upstream is down.
var downMessage = regexp.MustCompile(`"message":"[^"]*[Uu]pstream[^"]*\bdown\b`)

// downonce ADDR: the last stderr (JSON log lines) says exactly once that an
// upstream is down, and that line names ADDR.
func cmdDownOnce(ts *testscript.TestScript, neg bool, args []string) {
	var down []string
	for line := range strings.Lines(ts.ReadFile("stderr")) {
		if downMessage.MatchString(line) {
			down = append(down, line)
		}
	}
	if len(down) != 1 {
		ts.Fatalf("want one line saying an upstream is down, have %d:\n%s", len(down), strings.Join(down, ""))
	}
	if !strings.Contains(down[0], args[0]) {
		ts.Fatalf("the upstream-down line does not name %s: %s", args[0], down[0])
	}
}

// netns VAR...: a network namespace per VAR, its name in $VAR, deleted
// when the script ends (processes still inside keep it alive until they
// end). Loopback is up, IPv6 duplicate address detection off.
func cmdNetns(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) == 0 {
		ts.Fatalf("usage: netns VAR...")
	}
	for _, v := range args {
		ts.Setenv(v, peertest.NewNetns(peerTB{ts}, strings.ToLower(v)))
	}
}

// nssysctl NS KEY=VALUE...: set net.* sysctls in namespace NS.
func cmdNsSysctl(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) < 2 {
		ts.Fatalf("usage: nssysctl NS KEY=VALUE...")
	}
	settings := map[string]string{}
	for _, a := range args[1:] {
		k, v, ok := strings.Cut(a, "=")
		if !ok {
			ts.Fatalf("nssysctl: want KEY=VALUE, have %q", a)
		}
		settings[k] = v
	}
	ts.Check(peertest.Sysctl(args[0], settings))
}

// netnsCmds are the commands innetns runs: each opens its sockets on its
// own goroutine (literal addresses), so they land in the namespace.
var netnsCmds = map[string]scriptCmd{
	"waitport":     cmdWaitPort,
	"waitudp":      cmdWaitUDP,
	"roundtrip":    cmdRoundTrip,
	"servehttp":    cmdServeHTTP,
	"serveecho":    cmdServeEcho,
	"serveudpecho": cmdServeUDPEcho,
	"udpask":       cmdUDPAsk,
}

// innetns NS CMD ARGS...: run the script command CMD (waitport, waitudp,
// roundtrip, servehttp, serveecho, serveudpecho, udpask) inside network
// namespace NS; with !,
// CMD is negated. Servers it starts keep serving there.
func cmdInNetns(ts *testscript.TestScript, neg bool, args []string) {
	if len(args) < 2 {
		ts.Fatalf("usage: innetns NS CMD ARGS...")
	}
	cmd, ok := netnsCmds[args[1]]
	if !ok {
		ts.Fatalf("innetns: %s cannot run in a namespace", args[1])
	}
	ts.Check(peertest.InNetns(args[0], func() error {
		cmd(ts, neg, args[2:])
		return nil
	}))
}

// dantein VAR NS LISTEN [EXTERNAL...]: danted inside namespace NS,
// listening on LISTEN port 1080 and connecting from EXTERNAL (default
// LISTEN); address in $VAR. It logs each connect.
func cmdDanteIn(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) < 3 {
		ts.Fatalf("usage: dantein VAR NS LISTEN [EXTERNAL...]")
	}
	p := peertest.Dante(peerTB{ts}, peertest.DanteOptions{Netns: args[1], Listen: args[2], External: args[3:]})
	ts.Setenv(args[0], p.Addr)
}

// dnsmasqin VAR NS ADDR NAME=IP...: dnsmasq inside namespace NS on
// ip:port ADDR (UDP and TCP), answering those A records; address in $VAR.
func cmdDnsmasqIn(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) < 3 {
		ts.Fatalf("usage: dnsmasqin VAR NS ADDR NAME=IP...")
	}
	a := map[string]string{}
	for _, arg := range args[3:] {
		name, ip, _ := strings.Cut(arg, "=")
		a[name] = ip
	}
	ts.Setenv(args[0], peertest.DnsmasqNetns(peerTB{ts}, args[1], args[2], a).Addr)
}

// servehttp ADDR...: an HTTP server on each ADDR answering every request
// with "hello CLIENT-IP", so a client sees who connected for it (a
// proxy's address, or its own when nothing captured it).
func cmdServeHTTP(ts *testscript.TestScript, neg bool, args []string) {
	for _, addr := range args {
		_, err := testnet.ServeOn(tb{ts: ts}, addr, func(c net.Conn) {
			c.SetDeadline(time.Now().Add(10 * time.Second))
			r := bufio.NewReader(c)
			for { // the request's head; nothing else is read
				line, err := r.ReadString('\n')
				if err != nil {
					return
				}
				if strings.TrimRight(line, "\r\n") == "" {
					break
				}
			}
			host, _, _ := net.SplitHostPort(c.RemoteAddr().String())
			body := "hello " + host + "\n"
			fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", len(body), body)
		})
		ts.Check(err)
	}
}

// serveecho from=IP[,IP...] ADDR...: an echo server on each ADDR (with
// half-close, as echoserver) for connections from those addresses only;
// any other is reset unanswered, so an echo proves who connected (the
// proxy, not the app itself).
func cmdServeEcho(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) < 2 {
		ts.Fatalf("usage: serveecho from=IP[,IP...] ADDR...")
	}
	allowed := sourcesOf(ts, args[0])
	for _, addr := range args[1:] {
		_, err := testnet.ServeOn(tb{ts: ts}, addr, func(c net.Conn) {
			tc := c.(*net.TCPConn)
			if from := tc.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap(); !allowed[from] {
				tc.SetLinger(0) // a reset, not an empty echo
				return
			}
			c.SetDeadline(time.Now().Add(10 * time.Second))
			io.Copy(c, c)
			tc.CloseWrite()
		})
		ts.Check(err)
	}
}

// sourcesOf parses "from=IP[,IP...]": the addresses a server answers.
func sourcesOf(ts *testscript.TestScript, arg string) map[netip.Addr]bool {
	list, ok := strings.CutPrefix(arg, "from=")
	if !ok {
		ts.Fatalf("want from=IP[,IP...], have %q", arg)
	}
	allowed := map[netip.Addr]bool{}
	for _, ip := range strings.Split(list, ",") {
		a, err := netip.ParseAddr(ip)
		ts.Check(err)
		allowed[a] = true
	}
	return allowed
}

// serveudpecho [from=IP[,IP...]] ADDR...: a UDP echo server on each ADDR,
// answering only datagrams from those addresses when from= is given (so
// an echo proves the proxy sent it), until the script ends.
func cmdServeUDPEcho(ts *testscript.TestScript, neg bool, args []string) {
	var allowed map[netip.Addr]bool
	if len(args) > 0 && strings.HasPrefix(args[0], "from=") {
		allowed, args = sourcesOf(ts, args[0]), args[1:]
	}
	if neg || len(args) == 0 {
		ts.Fatalf("usage: serveudpecho [from=IP[,IP...]] ADDR...")
	}
	for _, addr := range args {
		pc, err := net.ListenPacket("udp", addr)
		ts.Check(err)
		c := pc.(*net.UDPConn)
		done := make(chan struct{})
		go func() {
			defer close(done)
			buf := make([]byte, 65536)
			for {
				n, from, err := c.ReadFromUDPAddrPort(buf)
				if err != nil {
					return
				}
				if allowed == nil || allowed[from.Addr().Unmap()] {
					c.WriteToUDPAddrPort(buf[:n], from)
				}
			}
		}()
		ts.Defer(func() { c.Close(); <-done })
	}
}

// udpask ADDR MSG: from an unconnected socket, send MSG once to ADDR and
// expect it back from ADDR itself (a transparent proxy answers with the
// remote's address) within 10 s; associations are built while it waits.
// Nothing resends it: wait for the listener first. With !, expect no
// answer within 2 s.
func cmdUDPAsk(ts *testscript.TestScript, neg bool, args []string) {
	if len(args) != 2 {
		ts.Fatalf("usage: udpask ADDR MSG")
	}
	to, err := netip.ParseAddrPort(args[0])
	ts.Check(err)
	c, err := net.ListenUDP("udp", nil)
	ts.Check(err)
	defer c.Close()
	wait := udpAnswerTimeout
	if neg {
		wait = udpSilenceTimeout
	}
	if _, err := c.WriteToUDPAddrPort([]byte(args[1]), to); err != nil {
		ts.Fatalf("send to %s: %v", to, err)
	}
	c.SetReadDeadline(time.Now().Add(wait))
	buf := make([]byte, 65536)
	n, from, err := c.ReadFromUDPAddrPort(buf)
	from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
	switch {
	case neg && err == nil:
		ts.Fatalf("unexpected answer %q from %s", buf[:n], from)
	case neg && !isTimeout(err):
		ts.Fatalf("no answer from %s, but not for want of one: %v", to, err)
	case neg:
	case err != nil:
		ts.Fatalf("no answer from %s within %s: %v", to, wait, err)
	case string(buf[:n]) != args[1]:
		ts.Fatalf("the answer from %s is %q, not %q", from, buf[:n], args[1])
	case from != to:
		ts.Fatalf("the answer to %s came from %s", to, from)
	}
}

// metric ADMIN SERIES VALUE: /metrics at ADMIN (host:port) has SERIES,
// written as it appears there (name{labels}), at VALUE now. With !, any
// other value, or none.
func cmdMetric(ts *testscript.TestScript, neg bool, args []string) {
	if len(args) != 3 {
		ts.Fatalf("usage: metric ADMIN SERIES VALUE")
	}
	want, err := strconv.ParseFloat(args[2], 64)
	ts.Check(err)
	got, ok := scrapeSeries(ts, args[0], args[1])
	switch {
	case neg && ok && got == want:
		ts.Fatalf("%s = %v, want another value", args[1], got)
	case !neg && (!ok || got != want):
		ts.Fatalf("%s = %v (present: %v), want %v", args[1], got, ok, want)
	}
}

// waitmetric ADMIN SERIES VALUE: wait up to 10 s until SERIES at ADMIN's
// /metrics reads VALUE: a readiness signal for what the process does on
// its own (a -R armed again). A counter that passes VALUE fails at once.
func cmdWaitMetric(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 3 {
		ts.Fatalf("usage: waitmetric ADMIN SERIES VALUE")
	}
	want, err := strconv.ParseFloat(args[2], 64)
	ts.Check(err)
	deadline := time.Now().Add(10 * time.Second)
	for {
		got, ok := scrapeSeries(ts, args[0], args[1])
		switch {
		case ok && got == want:
			return
		case ok && got > want && strings.HasSuffix(strings.SplitN(args[1], "{", 2)[0], "_total"):
			ts.Fatalf("counter %s = %v, past the awaited %v", args[1], got, want)
		case time.Now().After(deadline):
			ts.Fatalf("%s = %v (present: %v) after 10 s, want %v", args[1], got, ok, want)
		}
		time.Sleep(10 * time.Millisecond) // another process's state; bounded readiness probe
	}
}

// scrapeSeries reads one series from /metrics at admin.
func scrapeSeries(ts *testscript.TestScript, admin, series string) (float64, bool) {
	c := &http.Client{Timeout: 10 * time.Second}
	resp, err := c.Get("http://" + admin + "/metrics")
	ts.Check(err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	ts.Check(err)
	if resp.StatusCode != http.StatusOK {
		ts.Fatalf("/metrics at %s: %s", admin, resp.Status)
	}
	all, err := lintMetrics(string(body))
	if err != nil {
		ts.Fatalf("/metrics at %s does not lint: %v", admin, err)
	}
	v, ok := all[series]
	return v, ok
}
