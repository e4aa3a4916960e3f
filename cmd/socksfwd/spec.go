package main

import (
	"net"
	"net/netip"
	"net/url"
	"strconv"
	"strings"

	"github.com/socksfwd/socksfwd/internal/sockbuf"
	"github.com/socksfwd/socksfwd/internal/sockmark"
	"github.com/socksfwd/socksfwd/socksclient"
)

const defaultProxyPort = "1080"

// localForward is one parsed -L spec.
type localForward struct {
	Spec   string
	Binds  []string // listen addresses, host:port
	Target socksclient.Addr
	UDP    bool
	// optionalBinds may fail to bind without failing the forward: ::1 for
	// "localhost" on a host without IPv6, as ssh tolerates.
	optionalBinds map[string]bool
}

// parseLocal parses ssh's -L grammar, [bind:]port:host:hostport[/udp],
// with IPv6 addresses in brackets. The bind address defaults to 127.0.0.1;
// "localhost" binds 127.0.0.1 and ::1; "*" or an empty bind means all
// interfaces.
func parseLocal(spec string) (localForward, error) {
	lf := localForward{Spec: spec}
	s := spec
	if rest, ok := strings.CutSuffix(s, "/udp"); ok {
		lf.UDP = true
		s = rest
	} else if rest, ok := strings.CutSuffix(s, "/tcp"); ok {
		s = rest
	}
	f, err := splitForward("-L", spec, s, "[bind:]port:host:hostport[/udp]", "local port")
	if err != nil {
		return lf, err
	}
	bind, port := f.bind, f.port
	if !f.hasBind {
		bind = "127.0.0.1"
	}
	lf.Target = f.target
	switch bind {
	case "localhost":
		lf.Binds = []string{net.JoinHostPort("127.0.0.1", port), net.JoinHostPort("::1", port)}
		lf.optionalBinds = map[string]bool{lf.Binds[1]: true}
	case "*", "":
		lf.Binds = []string{net.JoinHostPort("", port)}
	default:
		lf.Binds = []string{net.JoinHostPort(bind, port)}
	}
	return lf, nil
}

// forwardFields are the parts of an ssh-style forward spec,
// [bind:]port:host:hostport.
type forwardFields struct {
	bind    string // unbracketed; "" when not given
	hasBind bool
	port    string // 0..65535
	target  socksclient.Addr
}

// splitForward parses s, the spec of option (spec as given, for
// messages), as [bind:]port:host:hostport; want is the grammar to show
// when it is not that, portName what to call the port in an error.
func splitForward(option, spec, s, want, portName string) (forwardFields, error) {
	var f forwardFields
	fields, err := splitColons(s)
	if err != nil {
		return f, usagef("%s %s: %v", option, quote(spec), err)
	}
	var host, hostport string
	switch len(fields) {
	case 3:
		f.port, host, hostport = fields[0], fields[1], fields[2]
	case 4:
		f.bind, f.hasBind, f.port, host, hostport = unbracket(fields[0]), true, fields[1], fields[2], fields[3]
	default:
		return f, usagef("%s %s: want %s", option, quote(spec), want)
	}
	n, err := strconv.ParseUint(f.port, 10, 16)
	if err != nil {
		return f, usagef("%s %s: invalid %s %s", option, quote(spec), portName, quote(f.port))
	}
	f.port = strconv.FormatUint(n, 10) // 05432 is 5432: duplicates are found by the number
	if n, err := strconv.ParseUint(hostport, 10, 16); err != nil || n == 0 {
		return f, usagef("%s %s: invalid target port %s", option, quote(spec), quote(hostport))
	}
	if f.target, err = socksclient.ParseAddr(net.JoinHostPort(unbracket(host), hostport)); err != nil {
		return f, usagef("%s %s: %v", option, quote(spec), err)
	}
	return f, nil
}

// remoteForward is one parsed -R spec.
type remoteForward struct {
	// Remote is what BIND asks for: DST.ADDR, the peer the proxy should
	// expect (bind_address; 0.0.0.0 for any), and DST.PORT, the port to
	// listen on (0: the proxy picks one).
	Remote socksclient.Addr
	// Target is the local host:port callers are relayed to.
	Target socksclient.Addr
}

// parseRemote parses ssh's -R grammar, [bind_address:]port:host:hostport,
// with IPv6 addresses in brackets. bind_address "", "*" or "0.0.0.0"
// means any peer.
func parseRemote(spec string) (remoteForward, error) {
	var rf remoteForward
	if strings.HasSuffix(spec, "/udp") {
		return rf, usagef("-R %s: -R forwards TCP only (SOCKS5 BIND carries TCP); for UDP use -L with /udp", quote(spec))
	}
	f, err := splitForward("-R", spec, spec, "[bind_address:]port:host:hostport", "port")
	if err != nil {
		return rf, err
	}
	rf.Target = f.target
	bind := f.bind
	if bind == "" || bind == "*" {
		bind = "0.0.0.0"
	}
	if rf.Remote, err = socksclient.ParseAddr(net.JoinHostPort(bind, f.port)); err != nil {
		return rf, usagef("-R %s: bind_address %s: %v", quote(spec), quote(f.bind), err)
	}
	return rf, nil
}

// splitColons splits on colons outside [brackets].
func splitColons(s string) ([]string, error) {
	var (
		fields []string
		depth  int
		start  int
	)
	for i, c := range s {
		switch c {
		case '[':
			depth++
		case ']':
			depth--
			if depth < 0 {
				return nil, errBrackets
			}
		case ':':
			if depth == 0 {
				fields = append(fields, s[start:i])
				start = i + 1
			}
		}
	}
	if depth != 0 {
		return nil, errBrackets
	}
	return append(fields, s[start:]), nil
}

var errBrackets = usagef("unbalanced [brackets]")

func unbracket(s string) string {
	if len(s) >= 2 && s[0] == '[' && s[len(s)-1] == ']' {
		return s[1 : len(s)-1]
	}
	return s
}

// parseServer turns an -S value into a dialer. Accepted: host[:port],
// socks5h://[user[:pass]@]host[:port] (names go to the proxy) and socks5://
// (names resolved here, as curl does). user and password apply when the URL
// carries none.
//
// Every socket toward the proxy gets small buffers when the proxy is on
// this host (sockbuf) and the mark, when one is set; the dialer's own
// default sends no keep-alive probes, as ssh -L does.
func parseServer(raw, user, password string, mark Mark) (*socksclient.Dialer, error) {
	markControl := mark.control()
	d := &socksclient.Dialer{Username: user, Password: password, Control: sockmark.Chain(sockbuf.CapLoopbackTCP, markControl)}
	if markControl != nil {
		d.LookupControl = markControl // else the system's resolver, split DNS and all
	}
	hostport := raw
	if !strings.Contains(raw, "://") && strings.Contains(raw, "@") {
		raw = "socks5h://" + raw // user:pass@proxy, as the usage has it
	}
	if strings.Contains(raw, "://") {
		u, err := url.Parse(raw)
		if err != nil {
			// url's error quotes the input, which may hold a password.
			return nil, usagef("-S %s: not a valid URL", cut(redactURL(raw)))
		}
		switch u.Scheme {
		case "socks5h":
		case "socks5":
			d.ResolveLocally = true
		default:
			return nil, usagef("-S %s: unsupported scheme %s (want socks5h:// or socks5://)", cut(u.Redacted()), quote(u.Scheme))
		}
		if u.Path != "" && u.Path != "/" || u.RawQuery != "" || u.Fragment != "" {
			// Not the path itself: a '/', '?' or '#' in a password that is
			// not percent-encoded ends it, and the rest lands there.
			// Nor the host: what came before such a character was taken
			// for it, and may be the password's first part.
			return nil, usagef("-S %s://…: a proxy URL has no path, query or fragment (percent-encode / ? # in a password)", u.Scheme)
		}
		if u.User != nil {
			d.Username = u.User.Username()
			if p, ok := u.User.Password(); ok {
				d.Password = p
			} else if user != "" && d.Username != user {
				d.Password = "" // --server-user's password is another user's
			}
			// Otherwise a username without a password takes
			// --server-password-file's: the password stays out of ps.
		}
		hostport = u.Host
	}
	if ip, err := netip.ParseAddr(hostport); err == nil {
		hostport = net.JoinHostPort(ip.String(), defaultProxyPort) // bare IPv6
	} else if _, _, err := net.SplitHostPort(hostport); err != nil {
		hostport = net.JoinHostPort(unbracket(hostport), defaultProxyPort)
	}
	host, port, err := net.SplitHostPort(hostport)
	if _, ipErr := netip.ParseAddr(host); err != nil || host == "" || strings.Contains(host, ":") && ipErr != nil {
		return nil, usagef("-S %s: want host[:port] (an IPv6 address in brackets: [2001:db8::1]:1080)", cut(redactURL(raw)))
	}
	if n, err := strconv.ParseUint(port, 10, 16); err != nil || n == 0 {
		// Not quoted: in "socks5h://alice:pa,ss@p" split at the comma of a
		// list, the port is a piece of the password.
		return nil, usagef("-S %s: invalid port after host %s (want 1-65535; in a list, percent-encode , in a password)", cut(redactURL(raw)), quote(host))
	}
	if len(d.Username) > 255 || len(d.Password) > 255 {
		return nil, usagef("-S %s: username and password must be at most 255 bytes", cut(redactURL(raw)))
	}
	if d.Username == "" {
		d.Password = "" // a password file for the others' user
	}
	if d.Username != "" && d.Password == "" {
		// Only the host is shown: in a list split at a comma in a
		// password, the username is a piece of that password.
		return nil, usagef("-S …@%s: the username has no password (use user:pass@, or the user and --server-password-file)", cut(hostport))
	}
	if p, ok := urlPassword(raw); ok && p == redactedMark {
		// Only one in the URL: --print-config writes no password files.
		return nil, usagef("-S …@%s: %s", cut(hostport), redactedMarkHint)
	}
	d.ProxyAddr = hostport
	return d, nil
}

// urlPassword is the password a -S value's URL holds, if any.
func urlPassword(raw string) (string, bool) {
	if !strings.Contains(raw, "://") {
		raw = "socks5h://" + raw
	}
	u, err := url.Parse(raw)
	if err != nil || u.User == nil {
		return "", false
	}
	return u.User.Password()
}

// redactedMark is what --print-config shows for a password; taken back
// as one, it would only fail authentication at the first session.
const (
	redactedMark     = "xxxxx"
	redactedMarkHint = "the password is " + redactedMark + ", what --print-config shows in place of one: give the real password (or keep it in a -file option)"
)

// redactURL hides a password in a proxy URL, with or without a scheme,
// and a port that may be a piece of one (see parseServer).
func redactURL(raw string) string {
	prefix, rest := "", raw
	if scheme, r, ok := strings.Cut(raw, "://"); ok {
		if u, err := url.Parse(raw); err == nil {
			return u.Redacted()
		}
		prefix, rest = scheme+"://", r
	} else if strings.Contains(raw, "@") {
		// user:pass@proxy, read as parseServer reads it: the user stays,
		// so that the redacted value, loaded again, says the password is
		// the mark instead of that the user has none. A user without a
		// password does not: in a list split at a comma in a password,
		// it is that password's second piece.
		if u, err := url.Parse("socks5h://" + raw); err == nil && u.User != nil {
			if _, ok := u.User.Password(); ok {
				return strings.TrimPrefix(u.Redacted(), "socks5h://")
			}
		}
	}
	if i := strings.LastIndex(rest, "@"); i >= 0 {
		return prefix + "xxxxx@" + rest[i+1:]
	}
	// "alice:pa" or "socks5h://alice:pa", a list split at a comma in a
	// password: what follows the colon may be a piece of it. Without a
	// scheme, a port or an IPv6 address (bare or in brackets) is shown.
	host, port, ok := strings.Cut(rest, ":")
	if _, err := netip.ParseAddr(rest); err == nil && prefix == "" {
		return raw
	}
	if ok && (prefix != "" || !strings.HasPrefix(rest, "[") && strings.Trim(port, "0123456789") != "") {
		return prefix + host + ":xxxxx"
	}
	return raw
}

// listenAddrs parses a listener's [bind:]port for option: the bind
// defaults to 127.0.0.1; "localhost" binds 127.0.0.1 and ::1 (the second
// optional, for hosts without IPv6), as -L does; "*" or an empty bind means
// every interface.
func listenAddrs(option, spec string) (addrs []string, optional map[string]bool, err error) {
	fields, err := splitColons(spec)
	if err != nil || len(fields) > 2 {
		return nil, nil, usagef("%s %s: want [bind:]port", option, quote(spec))
	}
	bind, port := "127.0.0.1", fields[len(fields)-1]
	if len(fields) == 2 {
		bind = unbracket(fields[0])
	}
	n, err := strconv.ParseUint(port, 10, 16)
	if err != nil || (n == 0 && port != "0") {
		return nil, nil, usagef("%s %s: invalid port %s", option, quote(spec), quote(port))
	}
	port = strconv.FormatUint(n, 10) // 05432 is 5432: duplicates are found by the number
	switch bind {
	case "localhost":
		v6 := net.JoinHostPort("::1", port)
		return []string{net.JoinHostPort("127.0.0.1", port), v6}, map[string]bool{v6: true}, nil
	case "*":
		bind = ""
	}
	return []string{net.JoinHostPort(bind, port)}, nil, nil
}

// dnsUpstreamAddr parses a resolver, host[:port] with port 53 by default;
// names are resolved by the proxy.
func dnsUpstreamAddr(s string) (socksclient.Addr, error) {
	hostport := s
	if ip, err := netip.ParseAddr(unbracket(s)); err == nil {
		hostport = net.JoinHostPort(ip.String(), "53")
	} else if _, _, err := net.SplitHostPort(s); err != nil {
		hostport = net.JoinHostPort(s, "53")
	}
	a, err := socksclient.ParseAddr(hostport)
	if err != nil || a.Port == 0 {
		return socksclient.Addr{}, usagef("--dns-upstream %s: want host[:port]", quote(s))
	}
	return a, nil
}
