package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rogpeppe/go-internal/testscript"

	"github.com/socksfwd/socksfwd/internal/peertest"
	"github.com/socksfwd/socksfwd/internal/testnet"
	"github.com/socksfwd/socksfwd/socksclient/sockstest"
)

// remoteLinesOf reads --remote-addr-file.
func remoteLinesOf(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("--remote-addr-file: %v", err)
	}
	return strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
}

// portValue is a port as /metrics gives it.
func portValue(port string) float64 {
	n, _ := strconv.Atoi(port)
	return float64(n)
}

// reverseConfig is a config file for -R through the test server, toward
// one of two echo targets, with a --remote-addr-file and --admin.
type reverseConfig struct {
	socks                          *sockstest.Server
	echo, echo2, file, conf, admin string
}

func newReverseConfig(t *testing.T) *reverseConfig {
	dir := t.TempDir()
	return &reverseConfig{
		socks: newSocks(t),
		echo:  testnet.Echo(t).Addr().String(), echo2: testnet.Echo(t).Addr().String(),
		file: filepath.Join(dir, "remote"), conf: filepath.Join(dir, "socksfwd.toml"),
		admin: "127.0.0.1:" + freePort(t),
	}
}

// text is the file's content with the given -R specs, then extra.
func (rc *reverseConfig) text(extra string, remotes ...string) string {
	q := make([]string, len(remotes))
	for i, r := range remotes {
		q[i] = fmt.Sprintf("%q", r)
	}
	return fmt.Sprintf("server = [%q]\nremote = [%s]\nremote-addr-file = %q\nadmin = %q\n", rc.socks.Addr(), strings.Join(q, ", "), rc.file, rc.admin) + extra
}

func (rc *reverseConfig) write(t *testing.T, text string) {
	t.Helper()
	if err := os.WriteFile(rc.conf, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestReverseReload: two -R through the test server. Where the server
// listens reaches the log, --remote-addr-file, /metrics and /readyz; a
// caller through each is relayed. A reload keeps the -R that stays (its
// BIND is not asked again), ends the removed one and starts the new one;
// the file goes at exit.
func TestReverseReload(t *testing.T) {
	verifyNoLeaks(t)
	rc := newReverseConfig(t)
	socks, file, conf, admin := rc.socks, rc.file, rc.conf, rc.admin
	fixed := freePort(t)
	keep, gone, added := fixed+":"+rc.echo, "0:"+rc.echo, "0:"+rc.echo2
	config := func(remotes ...string) string { return rc.text("", remotes...) }
	rc.write(t, config(keep, gone))
	d := startDaemon(t, "-c", conf)
	d.waitFor("reverse "+socks.Addr()+" listens on", 2)
	lines := remoteLinesOf(t, file)
	if len(lines) != 2 || lines[0] != "127.0.0.1:"+fixed || lines[1] == "-" {
		t.Fatalf("--remote-addr-file holds %q; want the fixed port's address, then the other's", lines)
	}
	m := scrape(t, admin)
	keptBinds := `socksfwd_reverse_binds_total{reverse="` + keep + `"}`
	if m[`socksfwd_reverse_remote_info{reverse="`+keep+`",remote="127.0.0.1"}`] != 1 || m[`socksfwd_reverse_remote_port{reverse="`+keep+`"}`] != portValue(fixed) || m[keptBinds] != 1 ||
		m[`socksfwd_reverse_listening{reverse="`+gone+`"}`] != 1 {
		t.Errorf("metrics lack the -R forwards: %v", m)
	}
	if body, code := get(t, admin, "/readyz"); code != http.StatusOK || !strings.Contains(body, "reverse "+keep+" listens on "+lines[0]) {
		t.Errorf("/readyz: %d %q", code, body)
	}
	if err := echoOnce(lines[1], "through the port the server chose"); err != nil {
		t.Fatal(err)
	}
	d.waitFor("reverse "+socks.Addr()+" listens on", 3) // re-armed on a new port

	rel := d.reload(conf, config(keep, added), 1)
	if changes := fmt.Sprint(rel["changes"]); !strings.Contains(changes, "-reverse 0.0.0.0:0 → "+rc.echo) || !strings.Contains(changes, "+reverse 0.0.0.0:0 → "+rc.echo2) {
		t.Fatalf("reload changes %s", changes)
	}
	d.waitFor("reverse "+socks.Addr()+" listens on", 4) // the new one
	d.waitFor("removed listener drained", 1)            // the removed one gave its BIND up
	lines = remoteLinesOf(t, file)
	if len(lines) != 2 || lines[0] != "127.0.0.1:"+fixed || lines[1] == "-" {
		t.Fatalf("after the reload, --remote-addr-file holds %q", lines)
	}
	if m := scrape(t, admin); m[keptBinds] != 1 {
		t.Errorf("the kept -R asked BIND %v times; want its first BIND kept", m[keptBinds])
	}
	for _, addr := range lines {
		if err := echoOnce(addr, "after the reload"); err != nil {
			t.Fatalf("caller to %s: %v", addr, err)
		}
	}
	if code := d.stop(); code != exitOK {
		t.Fatalf("exit %d", code)
	}
	if _, err := os.Stat(file); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("--remote-addr-file left behind at exit: %v", err)
	}
}

// TestReverseReloadMovesUpstream: a reload that changes the upstreams
// gives up a BIND waiting at the old one and binds through the new one
// (before, it stayed at the old one until its next caller), and a
// --remote-addr-file an earlier run left behind is gone at start, not
// presented as this run's.
func TestReverseReloadMovesUpstream(t *testing.T) {
	verifyNoLeaks(t)
	oldUp, newUp := newSocks(t), newSocks(t)
	echo := testnet.Echo(t).Addr().String()
	dir := t.TempDir()
	file := filepath.Join(dir, "remote")
	if err := os.WriteFile(file, []byte("127.0.0.1:4444\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(dir, "socksfwd.toml")
	config := func(up string) string {
		return fmt.Sprintf("server = [%q]\nremote = [%q]\nremote-addr-file = %q\n", up, "0:"+echo, file)
	}
	if err := os.WriteFile(conf, []byte(config(oldUp.Addr())), 0o600); err != nil {
		t.Fatal(err)
	}
	d := startDaemon(t, "-c", conf)
	d.waitFor("removed a --remote-addr-file an earlier run left", 1)
	d.waitFor("reverse "+oldUp.Addr()+" listens on", 1)
	if lines := remoteLinesOf(t, file); len(lines) != 1 || lines[0] == "127.0.0.1:4444" {
		t.Fatalf("--remote-addr-file holds %q; want this run's address", lines)
	}
	d.reload(conf, config(newUp.Addr()), 1)
	d.waitFor("reverse "+newUp.Addr()+" listens on", 1)
	lines := remoteLinesOf(t, file)
	if err := echoOnce(lines[0], "through the new upstream"); err != nil {
		t.Fatal(err)
	}
	if n := oldUp.Requests(); n != 1 {
		t.Errorf("the old upstream got %d requests, want its one BIND only", n)
	}
}

// TestReverseServerWithoutBind: through microsocks (REP 7) and ssh -D
// (which closes the connection), -R is one error line naming the server
// and the fix, /readyz says why it listens nowhere (it was silent), and a
// -L beside it keeps working.
func TestReverseServerWithoutBind(t *testing.T) {
	verifyNoLeaks(t)
	if testing.Short() {
		t.Skip("starts microsocks and sshd")
	}
	echo := testnet.Echo(t).Addr().String()
	for name, start := range map[string]func() string{
		"microsocks": func() string { return peertest.Microsocks(t, peertest.MicrosocksOptions{}).Addr },
		"ssh -D":     func() string { return peertest.SSHDynamic(t, nil).Addr },
	} {
		t.Run(name, func(t *testing.T) {
			proxy := start()
			local := "127.0.0.1:" + freePort(t)
			spec := "0:" + echo
			admin := "127.0.0.1:" + freePort(t)
			d := startDaemon(t, "-S", proxy, "-L", local+":"+echo, "-R", spec, "--admin", admin)
			line := d.waitFor("reverse "+spec+": ", 1)
			msg, _ := line["message"].(string)
			if line["level"] != "error" || !strings.Contains(msg, proxy+" has no BIND") || !strings.Contains(msg, "Dante") {
				t.Errorf("error line %v; want it to name %s and the fix", line, proxy)
			}
			// Readiness is about this host's listeners; the body says why
			// the -R listens nowhere.
			if body, code := get(t, admin, "/readyz"); code != http.StatusOK || !strings.Contains(body, "reverse "+spec+" listens nowhere: unsupported: ") {
				t.Errorf("/readyz: %d %q; want 200 saying the -R listens nowhere for want of BIND", code, body)
			}
			for i := range 3 {
				// No half-close: microsocks closes both ways on the first EOF.
				if err := exchangeOnce(local, "the -L beside it"); err != nil {
					t.Fatalf("-L, exchange %d: %v; log: %s", i, err, d.dump())
				}
			}
			if n := d.count("reverse " + spec + ": "); n != 1 {
				t.Errorf("%d lines about the missing BIND, want 1", n)
			}
			if code := d.stop(); code != exitOK {
				t.Fatalf("exit %d", code)
			}
		})
	}
}

// exchangeOnce connects, sends msg and reads it back, without a
// half-close.
func exchangeOnce(addr, msg string) error {
	c, err := sendTo(addr, msg)
	if err != nil {
		return err
	}
	defer c.Close()
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil || string(got) != msg {
		return fmt.Errorf("echo %q, %v; want %q", got, err, msg)
	}
	return nil
}

// Script commands for -R (testdata/interop/reverse.txtar).

// remoteaddr VAR FILE LINE: wait up to 10 s until line LINE (from 1) of
// --remote-addr-file FILE holds an address other than OLD (when $VAR is
// set, its value), and put it in $VAR.
func cmdRemoteAddr(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 3 {
		ts.Fatalf("usage: remoteaddr VAR FILE LINE")
	}
	n, err := strconv.Atoi(args[2])
	ts.Check(err)
	old := ts.Getenv(args[0])
	deadline := time.Now().Add(10 * time.Second)
	for {
		if b, err := os.ReadFile(ts.MkAbs(args[1])); err == nil {
			lines := strings.Split(string(b), "\n")
			if n <= len(lines) && lines[n-1] != "-" && lines[n-1] != "" && lines[n-1] != old {
				ts.Setenv(args[0], lines[n-1])
				return
			}
		}
		if time.Now().After(deadline) {
			ts.Fatalf("line %d of %s never held a new address", n, args[1])
		}
		time.Sleep(20 * time.Millisecond) // the file is written by another process; bounded readiness probe
	}
}

// callback ADDR MSG: as a caller behind the proxy would, connect to ADDR
// once, send MSG, half-close, and expect MSG back, then EOF: one
// connection, one session (roundtrip opens a probe connection first). It
// does not wait for a listener: the script waits first (for -R,
// remoteaddr for a port the proxy chose, waitmetric on the -R's BIND
// count for a fixed port), so a refused or reset call is a failure.
func cmdCallback(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 2 {
		ts.Fatalf("usage: callback ADDR MSG")
	}
	if got, err := callOnce(args[0], args[1]); err != nil || got != args[1] {
		ts.Fatalf("callback got %q, %v; want %q", got, err, args[1])
	}
}

// callOnce connects to addr, sends msg, half-closes and returns what came
// back.
func callOnce(addr, msg string) (string, error) {
	c, err := sendTo(addr, msg)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.(*net.TCPConn).CloseWrite()
	got, err := io.ReadAll(c)
	return string(got), err
}

// TestReloadReAddedReverseKeepsSeries: a -R removed while a session of it
// is live, then added back (same spec, same series) before that session
// ends: the old one's drain ending leaves the new one's re-arm series
// alone (it was unregistered then, a fix for re-arms during the drain).
func TestReloadReAddedReverseKeepsSeries(t *testing.T) {
	verifyNoLeaks(t)
	rc := newReverseConfig(t)
	socks, file, conf, admin := rc.socks, rc.file, rc.conf, rc.admin
	spec, other := "0:"+rc.echo, "0:"+rc.echo2
	config := func(remotes ...string) string { return rc.text("shutdown-timeout = \"60s\"\n", remotes...) }
	rc.write(t, config(other, spec))
	d := startDaemon(t, "-c", conf)
	d.waitFor("reverse "+socks.Addr()+" listens on", 2)
	lines := remoteLinesOf(t, file)
	// A live session of spec's -R, kept open.
	live, err := net.Dial("tcp", lines[1])
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(live, "x")
	live.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(live, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	d.waitFor("reverse "+socks.Addr()+" listens on", 3) // re-armed
	series := `socksfwd_reverse_rearm_seconds_count{reverse="` + spec + `"}`

	d.reload(conf, config(other), 1)       // removed; drains while live is open
	d.reload(conf, config(other, spec), 2) // back, a new unit of the same name
	d.waitFor("reverse "+socks.Addr()+" listens on", 4)
	lines = remoteLinesOf(t, file)
	if err := echoOnce(lines[1], "new"); err != nil {
		t.Fatal(err)
	}
	d.waitFor("reverse "+socks.Addr()+" listens on", 5) // the new unit re-armed
	before := scrape(t, admin)[series]
	live.Close() // the old unit's drain ends
	d.waitFor("removed listener drained", 1)
	m := scrape(t, admin)
	if v, ok := m[series]; !ok || v != before {
		t.Errorf("after the old unit drained, the new -R's %s = %v (present %v), was %v", series, v, ok, before)
	}
	d.stop()
}
