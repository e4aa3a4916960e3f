package peertest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// Peer is a started server: its address and the process behind it.
type Peer struct {
	Addr string // host:port
	Proc *Proc
}

// DanteOptions configures a Dante instance.
type DanteOptions struct {
	// Username requires RFC 1929 with the system account TestUser.
	Username bool
	// Hosts are /etc/hosts entries only danted sees.
	Hosts map[string]string
	// OnlyHosts gives danted Hosts in place of the system's /etc/hosts, so
	// a name this host resolves (localhost) can mean another address to
	// Dante: a test can then tell whether a name or an address reached it.
	OnlyHosts bool
	// IPv6 lets Dante reach IPv6 targets too (external ::1), for CONNECT
	// and UDP ASSOCIATE; it still listens on 127.0.0.1.
	IPv6 bool
	// Port to listen on (default: a free one).
	Port int
	// Extra is appended to the global section of danted.conf, e.g. socket
	// options for benchmarks.
	Extra string
	// Without lists commands the pass rules leave out ("bind",
	// "bindreply"), to see how Dante refuses them.
	Without []string

	// Netns runs danted inside this network namespace (NewNetns), on
	// Listen (required there) and port 1080 unless Port says otherwise,
	// serving any client; IPv6 does not apply there: External says which
	// addresses it connects from.
	Netns string
	// Listen is the address danted listens on, in Netns.
	Listen string
	// External are the addresses danted connects from, in Netns, one per
	// address family it reaches (default: Listen).
	External []string
}

// Dante starts danted (CONNECT, BIND, UDP ASSOCIATE) on loopback.
func Dante(t TB, opt DanteOptions) Peer {
	t.Helper()
	bin := Require(t, "danted")
	RequireRoot(t) // user.privileged root, and the username method reads /etc/shadow
	if opt.Netns != "" {
		return danteNetns(t, bin, opt)
	}
	method := "none"
	if opt.Username {
		EnsureTestUser(t)
		method = "username"
	}
	port := opt.Port
	if port == 0 {
		port = FreePort(t)
	}
	dir := t.TempDir()
	// Rules match one address family: 0.0.0.0/0 is IPv4 only.
	external, ipv6Rules := "", ""
	if opt.IPv6 {
		external = "external: ::1"
		ipv6Rules = `socks pass {
	from: 127.0.0.0/8 to: ::/0
	command: bind connect udpassociate
	log: error
}
socks pass {
	from: ::/0 to: 0.0.0.0/0
	command: bindreply udpreply
	log: error
}
`
	}
	// One keyword per line in rule blocks; bindreply and udpreply need rules
	// of their own (NOTES.md).
	conf := fmt.Sprintf(`logoutput: stderr
internal: 127.0.0.1 port = %d
external: 127.0.0.1
%s
clientmethod: none
socksmethod: %s
user.privileged: root
user.unprivileged: nobody
%s
client pass {
	from: 127.0.0.0/8 to: 0.0.0.0/0
	log: error
}
socks pass {
	from: 127.0.0.0/8 to: 0.0.0.0/0
	command: bind connect udpassociate
	log: error
}
socks pass {
	from: 0.0.0.0/0 to: 0.0.0.0/0
	command: bindreply udpreply
	log: error
}
%s`, port, external, method, opt.Extra, ipv6Rules)
	for _, cmd := range opt.Without {
		conf = strings.ReplaceAll(conf, " "+cmd+" ", " ")
		conf = strings.ReplaceAll(conf, " "+cmd+"\n", "\n")
	}
	path := writeFile(t, dir, "danted.conf", conf)
	argv := []string{bin, "-f", path, "-p", filepath.Join(dir, "danted.pid")}
	if opt.OnlyHosts {
		argv = WithOnlyHosts(t, opt.Hosts, argv...)
	} else {
		argv = WithHosts(t, opt.Hosts, argv...)
	}
	p := Start(t, "danted", argv...)
	addr := hostPort(port)
	WaitTCP(t, p, addr)
	return Peer{Addr: addr, Proc: p}
}

// MicrosocksOptions configures microsocks.
type MicrosocksOptions struct {
	User, Password string // RFC 1929 when User is set
	Hosts          map[string]string
}

// Microsocks starts microsocks (CONNECT only) on loopback.
func Microsocks(t TB, opt MicrosocksOptions) Peer {
	t.Helper()
	bin := Require(t, "microsocks")
	port := FreePort(t)
	argv := []string{bin, "-i", "127.0.0.1", "-p", strconv.Itoa(port)}
	if opt.User != "" {
		argv = append(argv, "-u", opt.User, "-P", opt.Password)
	}
	p := Start(t, "microsocks", WithHosts(t, opt.Hosts, argv...)...)
	addr := hostPort(port)
	WaitTCP(t, p, addr)
	return Peer{Addr: addr, Proc: p}
}

// SSHDynamic starts a throwaway sshd and `ssh -N -D` against it: OpenSSH's
// SOCKS server (CONNECT only, no SOCKS authentication). Hosts are entries
// only sshd (which makes the onward connections) sees.
func SSHDynamic(t TB, hosts map[string]string) Peer {
	t.Helper()
	sshd := Require(t, "sshd")
	ssh := Require(t, "ssh")
	keygen := Require(t, "ssh-keygen")
	EnsureTestUser(t)
	dir := t.TempDir()
	if err := os.MkdirAll("/run/sshd", 0o755); err != nil { // privilege separation dir
		t.Fatalf("mkdir /run/sshd: %v", err)
	}
	hostKey := filepath.Join(dir, "host_ed25519")
	userKey := filepath.Join(dir, "id_ed25519")
	for _, k := range []string{hostKey, userKey} {
		if err := runCmd(keygen, "-q", "-t", "ed25519", "-N", "", "-f", k); err != nil {
			t.Fatalf("ssh-keygen: %v", err)
		}
	}
	pub, err := os.ReadFile(userKey + ".pub")
	if err != nil {
		t.Fatalf("%v", err)
	}
	// sshd reads authorized_keys as the user, who cannot enter t.TempDir (0700).
	keysDir, err := os.MkdirTemp("", "socksfwd-ssh-")
	if err != nil {
		t.Fatalf("%v", err)
	}
	t.Cleanup(func() { os.RemoveAll(keysDir) })
	os.Chmod(keysDir, 0o755)
	authKeys := writeFile(t, keysDir, "authorized_keys", string(pub))
	sshPort := FreePort(t)
	conf := writeFile(t, dir, "sshd_config", fmt.Sprintf(`Port %d
ListenAddress 127.0.0.1
HostKey %s
AuthorizedKeysFile %s
AllowUsers %s
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding yes
PidFile %s
LogLevel ERROR
`, sshPort, hostKey, authKeys, TestUser, filepath.Join(dir, "sshd.pid")))
	ps := Start(t, "sshd", WithHosts(t, hosts, sshd, "-D", "-e", "-f", conf)...)
	WaitTCP(t, ps, hostPort(sshPort))

	socksPort := FreePort(t)
	pc := Start(t, "ssh -D", ssh, "-N", "-D", hostPort(socksPort),
		"-i", userKey, "-p", strconv.Itoa(sshPort),
		"-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
		"-o", "ExitOnForwardFailure=yes", "-o", "LogLevel=ERROR",
		TestUser+"@127.0.0.1")
	addr := hostPort(socksPort)
	WaitTCP(t, pc, addr)
	return Peer{Addr: addr, Proc: pc}
}

// pgBin is where Debian 12 installs PostgreSQL 15's server programs.
const pgBin = "/usr/lib/postgresql/15/bin"

// Postgres initialises a throwaway cluster and starts PostgreSQL 15 on
// loopback, with trust authentication for user postgres. initdb and
// postgres refuse root, so both run as the postgres user in a directory it
// owns.
func Postgres(t TB) Peer {
	t.Helper()
	RequireRoot(t)
	Require(t, "runuser")
	if _, err := os.Stat(filepath.Join(pgBin, "postgres")); err != nil {
		Missing(t, "PostgreSQL 15 is not installed (make deps installs it): %v", err)
	}
	dir, err := os.MkdirTemp("", "socksfwd-pg-")
	if err != nil {
		t.Fatalf("%v", err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := runCmd("chown", "postgres:postgres", dir); err != nil {
		t.Fatalf("%v", err)
	}
	data := filepath.Join(dir, "data")
	if err := runCmd("runuser", "-u", "postgres", "--", filepath.Join(pgBin, "initdb"),
		"-D", data, "-A", "trust", "-U", "postgres", "--no-sync", "--no-instructions"); err != nil {
		t.Fatalf("initdb: %v", err)
	}
	port := FreePort(t)
	p := Start(t, "postgres", "runuser", "-u", "postgres", "--", filepath.Join(pgBin, "postgres"),
		"-D", data, "-k", dir, "-p", strconv.Itoa(port),
		"-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "logging_collector=off")
	addr := hostPort(port)
	WaitTCP(t, p, addr)
	return Peer{Addr: addr, Proc: p}
}

// Versions lists the installed peers' versions, one line each, for the
// test log.
func Versions() []string {
	run := func(argv ...string) string {
		out, _ := exec.Command(argv[0], argv[1:]...).CombinedOutput()
		line, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
		return line
	}
	return []string{
		run("danted", "-v"),
		"microsocks " + run("dpkg-query", "-W", "-f=${Version}", "microsocks"),
		run("ssh", "-V"),
		run(filepath.Join(pgBin, "postgres"), "--version"),
		run("dnsmasq", "--version"),
	}
}

// Shadowsocks starts ss-server and, in front of it, ss-local, whose SOCKS5
// side relays UDP (both run with -u, and --mtu 65535 so that datagrams
// above about 2.7 KB are not truncated). The returned address is
// ss-local's SOCKS5 port; it has no username method and no BIND.
func Shadowsocks(t TB) Peer {
	t.Helper()
	server := Require(t, "ss-server")
	local := Require(t, "ss-local")
	const method, key = "chacha20-ietf-poly1305", "socksfwd-test-key"
	sport, lport := FreePort(t), FreePort(t)
	ps := Start(t, "ss-server", server, "-s", "127.0.0.1", "-p", strconv.Itoa(sport), "-k", key, "-m", method, "-u", "--mtu", "65535")
	WaitTCP(t, ps, hostPort(sport))
	pl := Start(t, "ss-local", local, "-s", "127.0.0.1", "-p", strconv.Itoa(sport), "-b", "127.0.0.1", "-l", strconv.Itoa(lport),
		"-k", key, "-m", method, "-u", "--mtu", "65535")
	addr := hostPort(lport)
	WaitTCP(t, pl, addr)
	return Peer{Addr: addr, Proc: pl}
}

// Dnsmasq starts an authoritative-only dnsmasq on loopback (UDP and TCP)
// answering the given A records (name → IPv4) and TXT records (name →
// text), with no upstream resolver.
func Dnsmasq(t TB, a map[string]string, txt map[string]string) Peer {
	t.Helper()
	bin := Require(t, "dnsmasq")
	// Not --no-daemon: in that mode dnsmasq serves one TCP connection at a
	// time, and a pooled idle connection would block every other.
	argv := []string{bin, "--keep-in-foreground", "--no-resolv", "--no-hosts",
		"--bind-interfaces", "--listen-address=127.0.0.1",
		"--user=root", "--pid-file=", "--log-facility=-", "--edns-packet-max=4096"}
	zones := map[string]bool{}
	for name, ip := range a {
		argv = append(argv, "--host-record="+name+","+ip)
		if _, domain, ok := strings.Cut(name, "."); ok {
			zones[domain] = true
		}
	}
	// Authoritative for the names' domains: unknown names get NXDOMAIN with
	// the zone's SOA (TTL and MINIMUM 60 s), which makes them cacheable
	// (RFC 2308).
	if len(zones) > 0 {
		argv = append(argv, "--auth-server=ns.socksfwd.test,127.0.0.1", "--auth-ttl=60")
		for z := range zones {
			argv = append(argv, "--auth-zone="+z)
		}
	}
	for name, text := range txt {
		argv = append(argv, "--txt-record="+name+","+text)
	}
	p, addr := StartListening(t, "dnsmasq", func(port int) []string {
		return append(slices.Clip(argv), "--port="+strconv.Itoa(port))
	})
	return Peer{Addr: addr, Proc: p}
}

// UnboundWildcard starts unbound, one thread, answering every name under
// domain with ip from its local data (TTL 300), with no upstream and no
// logging: a resolver whose every answer costs what one from its cache
// does, and which serves many TCP connections without forking.
func UnboundWildcard(t TB, domain, ip string) Peer {
	t.Helper()
	bin := Require(t, "unbound")
	dir := t.TempDir()
	p, addr := StartListening(t, "unbound", func(port int) []string {
		text := fmt.Sprintf(`server:
	interface: 127.0.0.1
	port: %d
	num-threads: 1
	do-daemonize: no
	use-syslog: no
	logfile: ""
	verbosity: 0
	chroot: ""
	username: ""
	pidfile: ""
	directory: %q
	do-ip6: no
	access-control: 127.0.0.0/8 allow
	incoming-num-tcp: 64
	so-reuseport: no
	local-zone: "%s." redirect
	local-data: "%s. 300 IN A %s"
`, port, dir, domain, domain, ip)
		return []string{bin, "-d", "-c", writeFile(t, dir, "unbound-"+strconv.Itoa(port)+".conf", text)}
	})
	return Peer{Addr: addr, Proc: p}
}

// DnsmasqWildcard starts dnsmasq answering every name under domain with ip
// (for load tests with unique names), with no upstream and no logging.
func DnsmasqWildcard(t TB, domain, ip string) Peer {
	t.Helper()
	bin := Require(t, "dnsmasq")
	p, addr := StartListening(t, "dnsmasq", func(port int) []string {
		return []string{bin, "--keep-in-foreground", "--no-resolv", "--no-hosts",
			"--bind-interfaces", "--listen-address=127.0.0.1", "--port=" + strconv.Itoa(port),
			"--user=root", "--pid-file=", "--cache-size=0", "--dns-forward-max=1000",
			"--local-ttl=300", // answers to cache (the default TTL 0 may not be cached)
			"--address=/" + domain + "/" + ip}
	})
	return Peer{Addr: addr, Proc: p}
}
