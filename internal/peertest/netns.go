package peertest

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

var netnsCount atomic.Int64

// NewNetns creates an empty network namespace for one test, deleted in
// cleanup, and returns its name (with label in it, for `ip netns list`).
// Its loopback is up, and duplicate address detection is off: until DAD
// ends, a new IPv6 address cannot be used, which would hold the first
// connections of a test.
func NewNetns(t TB, label string) string {
	t.Helper()
	RequireRoot(t)
	Require(t, "ip")
	name := fmt.Sprintf("socksfwd-%d-%d-%s", os.Getpid(), netnsCount.Add(1), label)
	if err := runCmd("ip", "netns", "add", name); err != nil {
		t.Fatalf("%v", err)
	}
	t.Cleanup(func() {
		// Processes still running inside keep the namespace alive until
		// they end; their own cleanup stops them.
		if err := runCmd("ip", "netns", "del", name); err != nil {
			t.Logf("%v", err)
		}
	})
	if err := runCmd("ip", "-n", name, "link", "set", "lo", "up"); err != nil {
		t.Fatalf("%v", err)
	}
	if err := Sysctl(name, map[string]string{
		"net.ipv6.conf.all.accept_dad":     "0",
		"net.ipv6.conf.default.accept_dad": "0",
	}); err != nil {
		t.Fatalf("%v", err)
	}
	return name
}

// inNetnsArgv runs argv inside network namespace ns (none: as it is).
func inNetnsArgv(ns string, argv []string) []string {
	if ns == "" {
		return argv
	}
	return append([]string{"ip", "netns", "exec", ns}, argv...)
}

// waitTCPNetns is waitTCP with the probe connections made inside ns.
func waitTCPNetns(p *Proc, ns, addr string) error {
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	for {
		err := InNetns(ns, func() error {
			var d net.Dialer
			c, err := d.DialContext(ctx, "tcp", addr)
			if err == nil {
				c.Close()
			}
			return err
		})
		if err == nil {
			return nil
		}
		if p.Exited() {
			return fmt.Errorf("%s exited before listening on %s in %s: %v\n%s", p.Name, addr, ns, p.err, p.Output())
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s not listening on %s in %s after %s\n%s", p.Name, addr, ns, startTimeout, p.Output())
		case <-time.After(20 * time.Millisecond): // a readiness probe, bounded by startTimeout
		}
	}
}

// danteNetns starts danted inside opt.Netns; see DanteOptions.
func danteNetns(t TB, bin string, opt DanteOptions) Peer {
	t.Helper()
	method := "none"
	if opt.Username {
		EnsureTestUser(t)
		method = "username"
	}
	if opt.Listen == "" {
		t.Fatalf("dante in namespace %s: DanteOptions.Listen is required", opt.Netns)
	}
	port := opt.Port
	if port == 0 {
		port = 1080 // the namespace is the test's own: the port is free
	}
	external := opt.External
	if len(external) == 0 {
		external = []string{opt.Listen}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "logoutput: stderr\ninternal: %s port = %d\n", opt.Listen, port)
	for _, e := range external {
		fmt.Fprintf(&b, "external: %s\n", e)
	}
	// The namespace is the test's own: any client may use this Dante. Rules
	// match one address family each; one keyword per line in rule blocks;
	// bindreply and udpreply need rules of their own (NOTES.md). Connects
	// are logged, so a test's log shows what reached the proxy.
	fmt.Fprintf(&b, `clientmethod: none
socksmethod: %s
user.privileged: root
user.unprivileged: nobody
%s
client pass {
	from: 0.0.0.0/0 to: 0.0.0.0/0
	log: error
}
socks pass {
	from: 0.0.0.0/0 to: 0.0.0.0/0
	command: bind connect udpassociate
	log: connect error
}
socks pass {
	from: 0.0.0.0/0 to: ::/0
	command: bind connect udpassociate
	log: connect error
}
socks pass {
	from: 0.0.0.0/0 to: 0.0.0.0/0
	command: bindreply udpreply
	log: error
}
socks pass {
	from: ::/0 to: 0.0.0.0/0
	command: bindreply udpreply
	log: error
}
`, method, opt.Extra)
	dir := t.TempDir()
	path := writeFile(t, dir, "danted.conf", b.String())
	argv := []string{bin, "-f", path, "-p", filepath.Join(dir, "danted.pid")}
	if opt.OnlyHosts {
		argv = WithOnlyHosts(t, opt.Hosts, argv...)
	} else {
		argv = WithHosts(t, opt.Hosts, argv...)
	}
	p := Start(t, "danted in "+opt.Netns, inNetnsArgv(opt.Netns, argv)...)
	addr := net.JoinHostPort(opt.Listen, strconv.Itoa(port))
	if err := waitTCPNetns(p, opt.Netns, addr); err != nil {
		t.Fatalf("%v", err)
	}
	return Peer{Addr: addr, Proc: p}
}

// DnsmasqNetns starts dnsmasq inside network namespace ns on addr (an
// ip:port, UDP and TCP), answering the given A records (name → IPv4),
// with no upstream resolver.
func DnsmasqNetns(t TB, ns, addr string, a map[string]string) Peer {
	t.Helper()
	bin := Require(t, "dnsmasq")
	ip, port, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("dnsmasq in %s: %v", ns, err)
	}
	// Not --no-daemon: in that mode dnsmasq serves one TCP connection at a
	// time, and a pooled idle connection would block every other.
	argv := []string{bin, "--keep-in-foreground", "--no-resolv", "--no-hosts",
		"--bind-interfaces", "--listen-address=" + ip, "--port=" + port,
		"--user=root", "--pid-file=", "--log-facility=-", "--log-queries"}
	for name, addr := range a {
		argv = append(argv, "--host-record="+name+","+addr)
	}
	p := Start(t, "dnsmasq in "+ns, inNetnsArgv(ns, argv)...)
	if err := waitTCPNetns(p, ns, addr); err != nil {
		t.Fatalf("%v", err)
	}
	return Peer{Addr: addr, Proc: p}
}
