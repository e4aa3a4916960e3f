package main

import (
	"bytes"
	"encoding"
	"errors"
	"fmt"
	"io"
	"os"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2"

	"github.com/socksfwd/socksfwd/internal/sockmark"
)

// Config is the merged configuration. Each field is one option, declared
// here and nowhere else: the toml tag is the long flag name, the TOML key
// and (as SOCKSFWD_NAME) the environment variable; short is the one-letter
// alias, usage the help text, def the default, written as on the command
// line. A field of type []string is repeatable. Adding an option is adding
// a field; validation of what it means lives in buildPlan.
type Config struct {
	Server             []string `toml:"server" short:"S" usage:"upstream SOCKS5 server, repeat for failover: host:port | socks5h://[user[:pass]@]host[:port] | socks5://… (resolves names locally)"`
	ServerUser         string   `toml:"server-user,omitempty" usage:"username for servers whose URL has none"`
	ServerPasswordFile string   `toml:"server-password-file,omitempty" usage:"file holding the password for them (one line; its newline stripped)"`
	Local              []string `toml:"local" short:"L" usage:"forward [bind:]port:host:hostport[/udp], repeatable; bind defaults to 127.0.0.1"`
	Remote             []string `toml:"remote,omitempty" short:"R" usage:"reverse forward through BIND, [bind_address:]port:host:hostport, repeatable: the proxy listens on port (0: it picks one) for a caller from bind_address (default any) and relays it to host:hostport here; one caller at a time"`
	RemoteAddrFile     string   `toml:"remote-addr-file,omitempty" usage:"write where the proxy listens for each -R to this file, one line per -R (- while it listens nowhere), for scripts"`
	Transparent        []string `toml:"transparent,omitempty" usage:"transparent listener [bind:]port[/udp] for what netfilter sends here (TCP: REDIRECT or TPROXY; /udp: TPROXY; Linux), repeatable; bind defaults to 127.0.0.1"`
	Mark               Mark     `toml:"mark,omitempty" usage:"SO_MARK on every socket toward an upstream, e.g. 0x438, so netfilter rules can leave socksfwd's own traffic alone (Linux, needs CAP_NET_ADMIN)"`
	HTTP               string   `toml:"http,omitempty" usage:"HTTP proxy [bind:]port for programs that take HTTP_PROXY/HTTPS_PROXY: CONNECT and absolute-form requests, each through the upstreams (bind defaults to 127.0.0.1)"`
	HTTPAuth           string   `toml:"http-auth,omitempty" usage:"user:password that --http clients must send (Proxy-Authorization: Basic); without it none is asked"`
	HTTPAuthFile       string   `toml:"http-auth-file,omitempty" usage:"file holding user:password for --http (one line; its newline stripped), which keeps it out of ps"`
	NoProxy            string   `toml:"no-proxy,omitempty" usage:"targets --http reaches directly, not through the upstreams, in NO_PROXY syntax: example.com,.internal,10.0.0.0/8,[::1]:8080 (a name matches itself and names below it; * matches all)"`
	Dynamic            string   `toml:"dynamic,omitempty" short:"D" usage:"SOCKS5 server [bind:]port for local programs (CONNECT, BIND, UDP ASSOCIATE), each request chained to the upstreams, names resolved as the upstream says (socks5h: by the proxy) (bind defaults to 127.0.0.1)"`
	SOCKSAuth          string   `toml:"socks-auth,omitempty" usage:"user:password that -D clients must send (RFC 1929); without it none is asked"`
	SOCKSAuthFile      string   `toml:"socks-auth-file,omitempty" usage:"file holding user:password for -D (one line; its newline stripped), which keeps it out of ps"`
	DNS                string   `toml:"dns,omitempty" usage:"DNS listener [bind:]port, UDP and TCP (bind defaults to 127.0.0.1)"`
	DNSUpstream        []string `toml:"dns-upstream,omitempty" usage:"resolver behind the proxy, host[:port] (port 53), repeatable; required with --dns"`
	DNSTransport       string   `toml:"dns-transport" def:"tcp" usage:"tcp (DNS over TCP through CONNECT, works everywhere) | udp (one UDP ASSOCIATE)"`
	DNSTimeout         Duration `toml:"dns-timeout" def:"5s" usage:"whole-query deadline across all attempts and resolvers"`
	DNSCacheSize       int      `toml:"dns-cache-size" def:"10000" usage:"cached DNS answers, at most 2 KiB each on average (0 disables the cache)"`
	DNSMaxInFlight     int      `toml:"dns-max-inflight" def:"2000" usage:"DNS queries forwarded at once; beyond it queries get REFUSED"`
	HandshakeTimeout   Duration `toml:"handshake-timeout" def:"10s" usage:"connect + SOCKS handshake to the upstream"`
	HedgeDelay         Duration `toml:"hedge-delay" def:"300ms" usage:"when an upstream has not finished its handshake this long, try the next one in parallel (0 = only after it fails)"`
	IdleTimeout        Duration `toml:"idle-timeout" def:"0s" usage:"close a TCP session idle this long (0 = never, like ssh -L)"`
	UDPIdleTimeout     Duration `toml:"udp-idle-timeout" def:"60s" usage:"end a UDP session idle this long"`
	UDPMaxSessions     int      `toml:"udp-max-sessions" def:"1024" usage:"UDP sessions (client addresses) per listener; when full, the one idle longest makes room"`
	MaxSessions        int      `toml:"max-sessions" def:"0" usage:"TCP sessions per listener; connections beyond it are closed at once and counted (0 = no limit)"`
	Allow              []string `toml:"allow,omitempty" usage:"client sources (CIDR) allowed on listeners bound beyond loopback and on transparent ones, repeatable; others are refused (TCP reset, UDP dropped, DNS REFUSED, admin 403) and counted"`
	LogLevel           string   `toml:"log-level" def:"info" usage:"debug | info | warn | error"`
	LogFormat          string   `toml:"log-format" def:"auto" usage:"auto | json | console (auto: console on a terminal)"`
	ShutdownTimeout    Duration `toml:"shutdown-timeout" def:"30s" usage:"drain time on SIGINT/SIGTERM, and of listeners a reload removes"`
	Admin              string   `toml:"admin,omitempty" usage:"serve /metrics, /healthz and /readyz on [bind:]port (bind defaults to 127.0.0.1; off by default)"`
	AdminPprof         bool     `toml:"admin-pprof,omitempty" usage:"also serve /debug/pprof/ on --admin"`
	// For make bench: compare the relay's copy paths.
	RelayCopy string `toml:"relay-copy,omitempty" hidden:"true" usage:"splice | pooled | iocopy"`
}

// option is one field of Config as the command line sees it.
type option struct {
	name, short, usage, def string
	hidden                  bool
	repeatable              bool
	isBool                  bool // a switch: --name alone means true
	index                   int  // field index in Config
}

// options lists Config's fields, in declaration order.
var options = func() []option {
	t := reflect.TypeFor[Config]()
	opts := make([]option, t.NumField())
	for i := range opts {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("toml"), ",")
		opts[i] = option{
			name: name, short: f.Tag.Get("short"), usage: f.Tag.Get("usage"), def: f.Tag.Get("def"),
			hidden: f.Tag.Get("hidden") == "true", repeatable: f.Type.Kind() == reflect.Slice, index: i,
			isBool: f.Type.Kind() == reflect.Bool,
		}
	}
	return opts
}()

// envName is an option's environment variable: --dns-upstream →
// SOCKSFWD_DNS_UPSTREAM.
func envName(flag string) string {
	return "SOCKSFWD_" + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
}

// defaultConfig is Config with every def tag applied.
func defaultConfig() Config {
	var c Config
	for _, o := range options {
		if o.def == "" {
			continue
		}
		if err := o.set(&c, o.def); err != nil {
			panic(fmt.Sprintf("option %s: bad default: %v", o.name, err)) // a programming error
		}
	}
	return c
}

// set parses one value written as on the command line into the option's
// field. Repeatable options take one value per call.
func (o option) set(c *Config, value string) error {
	v := reflect.ValueOf(c).Elem().Field(o.index)
	switch p := v.Addr().Interface().(type) {
	case *string:
		*p = value
	case *[]string:
		*p = append(*p, value)
	case *bool:
		b, err := strconv.ParseBool(value)
		if err != nil {
			return errors.New("want true or false")
		}
		*p = b
	case *int:
		n, err := strconv.Atoi(value)
		if err != nil {
			return fmt.Errorf("want a whole number such as %s", o.exampleOr("10"))
		}
		*p = n
	case encoding.TextUnmarshaler:
		return p.UnmarshalText([]byte(value))
	default:
		panic("option " + o.name + ": unsupported field type " + v.Type().String())
	}
	return nil
}

func (o option) exampleOr(s string) string {
	if o.def != "" {
		return o.def
	}
	return s
}

// Duration is a time.Duration written as "10s" in TOML and on the command
// line.
type Duration time.Duration

func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return errors.New("want a duration such as 30s or 1m30s")
	}
	if v < 0 {
		return fmt.Errorf("negative duration %s", quote(string(b)))
	}
	*d = Duration(v)
	return nil
}

// Mark is a socket mark, written in decimal or as 0x… hex.
type Mark uint32

func (m Mark) MarshalText() ([]byte, error) { return []byte(fmt.Sprintf("%#x", uint32(m))), nil }

// control sets the mark on a socket, or is nil without one.
func (m Mark) control() sockmark.ControlFunc {
	if m == 0 {
		return nil
	}
	return sockmark.Control(uint32(m))
}

func (m *Mark) UnmarshalText(b []byte) error {
	v, err := strconv.ParseUint(string(b), 0, 32)
	if err != nil {
		return errors.New("want a mark such as 0x438 or 1080")
	}
	*m = Mark(v)
	return nil
}

// quote quotes a user's value for an error message, cut short: a value
// can be megabytes long, and an error is one line.
func quote(s string) string {
	const max = 64
	if len(s) <= max {
		return strconv.Quote(s)
	}
	return strconv.Quote(s[:max]) + fmt.Sprintf("… (%d bytes)", len(s))
}

// usageError is a configuration or usage mistake: exit code 2.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

func usagef(format string, args ...any) error { return usageError{fmt.Errorf(format, args...)} }

// maxConfigSize bounds the TOML file: a configuration is a few kilobytes,
// and -c /dev/zero must not read forever.
const maxConfigSize = 1 << 20

// loadFile reads a TOML file strictly into cfg: an unknown key is an error
// naming file, line and key.
func loadFile(path string, cfg *Config) error {
	data, err := readLimited(path, maxConfigSize)
	if err != nil {
		return usagef("config: %w", err)
	}
	dec := toml.NewDecoder(bytes.NewReader(data)).DisallowUnknownFields()
	if err := dec.Decode(cfg); err != nil {
		var strict *toml.StrictMissingError
		if errors.As(err, &strict) && len(strict.Errors) > 0 {
			keys := make([]string, len(strict.Errors))
			for i, e := range strict.Errors {
				row, _ := e.Position()
				keys[i] = fmt.Sprintf("%s:%d: unknown key %s", path, row, quote(strings.Join(e.Key(), ".")))
			}
			return usageError{errors.New(strings.Join(keys, "; "))}
		}
		var de *toml.DecodeError
		if errors.As(err, &de) {
			row, col := de.Position()
			msg := de.Error()
			if key := keyAt(data, row); key != "" {
				// go-toml names the Go field, or no key at all.
				msg = fmt.Sprintf("%s: %s", key, strings.TrimPrefix(msg, "toml: "))
				if i := slices.IndexFunc(options, func(o option) bool { return o.name == key }); i >= 0 && options[i].repeatable &&
					strings.Contains(msg, "cannot decode TOML string") {
					msg = fmt.Sprintf("%s: want an array, such as %s = [\"…\"]", key, key)
				}
			}
			return usagef("%s:%d:%d: %s", path, row, col, cut(msg))
		}
		return usagef("%s: %s", path, cut(err.Error()))
	}
	return checkDurationsQuoted(path, data)
}

// keyAt is the key a TOML line (1-based row) sets, or "" when it sets
// none: a line inside a multi-line array is an element, which may hold a
// password (one ending in '=', as base64 does), never shown.
func keyAt(data []byte, row int) string {
	lines := strings.Split(string(data), "\n")
	if row < 1 || row > len(lines) {
		return ""
	}
	m := keyLineRe.FindStringSubmatch(lines[row-1])
	if m == nil {
		return ""
	}
	return m[1]
}

// keyLineRe is a line that sets one of socksfwd's keys (bare, lowercase).
var keyLineRe = regexp.MustCompile(`^\s*([a-z][a-z0-9-]*)\s*=`)

// checkDurationsQuoted refuses a duration written as a bare number: go-toml
// stores a TOML integer straight into a Duration (an int64), so
// `shutdown-timeout = 30` would mean 30 ns, where the flag refuses "30".
func checkDurationsQuoted(path string, data []byte) error {
	var raw map[string]any
	if err := toml.Unmarshal(data, &raw); err != nil {
		return nil // Decode above read it; nothing more to say
	}
	t := reflect.TypeFor[Config]()
	for i := range t.NumField() {
		f := t.Field(i)
		if f.Type != reflect.TypeFor[Duration]() {
			continue
		}
		key, _, _ := strings.Cut(f.Tag.Get("toml"), ",")
		if v, ok := raw[key]; ok {
			if _, isString := v.(string); !isString {
				return usagef("%s: %s = %v: want a duration in quotes, such as \"30s\" or \"1m30s\"", path, key, v)
			}
		}
	}
	return nil
}

// readLimited reads a whole file of at most max bytes, and refuses a
// larger one (or an endless one such as /dev/zero) after reading max+1.
func readLimited(path string, max int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if int64(len(data)) > max {
		return nil, fmt.Errorf("%s: larger than %d KiB; is it the right file?", path, max>>10)
	}
	return data, nil
}

// cut shortens a message that may quote a huge value.
func cut(s string) string {
	const max = 200
	s, _, _ = strings.Cut(s, "\n")
	if len(s) <= max {
		return s
	}
	return s[:max] + "…"
}

// printable returns the config as TOML with secrets redacted.
func (c Config) printable() (string, error) {
	red := c
	red.Server = make([]string, len(c.Server))
	for i, s := range c.Server {
		red.Server[i] = redactURL(s)
	}
	for _, secret := range []*string{&red.HTTPAuth, &red.SOCKSAuth} {
		if user, _, ok := strings.Cut(*secret, ":"); ok {
			*secret = user + ":" + redactedMark
		}
	}
	var buf bytes.Buffer
	enc := toml.NewEncoder(&buf)
	if err := enc.Encode(red); err != nil {
		return "", err
	}
	return buf.String(), nil
}
