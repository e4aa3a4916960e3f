// Command socksfwd lets software that does not speak SOCKS use a SOCKS5
// proxy: local listeners turn plain TCP into SOCKS5 CONNECT sessions.
package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"strings"
	"time"

	"github.com/rs/zerolog"
	"github.com/urfave/cli/v2"

	"github.com/socksfwd/socksfwd/tunnel"
)

// version is stamped at build time: -ldflags "-X main.version=…".
var version = "dev"

// Exit codes (DESIGN §5).
const (
	exitOK      = 0
	exitRuntime = 1
	exitUsage   = 2
)

// defaultGCPercent: socksfwd's live heap is small (a few MB) while every
// DNS query and session leaves short-lived garbage, so Go's default GOGC=100
// collects very often. make bench measured 400 at about +12 % DNS queries
// per second for about +1 KB RSS per idle forwarded connection (still
// under 20 KB). GOGC in the environment overrides it.
const defaultGCPercent = 400

func main() {
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(defaultGCPercent)
	}
	os.Exit(run(os.Args, os.Stdout, os.Stderr, os.Getenv))
}

// envPrefix prefixes every flag's environment variable: --dns-upstream →
// SOCKSFWD_DNS_UPSTREAM.
const envPrefix = "SOCKSFWD_"

func envName(flag string) string {
	return envPrefix + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
}

// repeatable flags take a comma-separated list in the environment; on the
// command line each repetition is one value.
var repeatable = []string{"server", "local", "dns-upstream"}

func newApp(stdout, stderr io.Writer, getenv func(string) string) *cli.App {
	cli.VersionFlag = &cli.BoolFlag{Name: "version", Aliases: []string{"V"}, Usage: "print the version and exit"}
	str := func(name, alias, usage string) *cli.StringFlag {
		f := &cli.StringFlag{Name: name, Usage: usage, EnvVars: []string{envName(name)}}
		if alias != "" {
			f.Aliases = []string{alias}
		}
		return f
	}
	slice := func(name, alias, usage string) *cli.StringSliceFlag {
		f := &cli.StringSliceFlag{Name: name, Usage: usage + " (env " + envName(name) + ", comma-separated)"}
		if alias != "" {
			f.Aliases = []string{alias}
		}
		return f
	}
	def := defaultConfig()
	dur := func(name, usage string, value Duration) *cli.DurationFlag {
		return &cli.DurationFlag{Name: name, Usage: usage, EnvVars: []string{envName(name)}, Value: time.Duration(value)}
	}
	app := &cli.App{
		Name:    "socksfwd",
		Usage:   "forward local TCP and UDP ports, and DNS, through a SOCKS5 proxy",
		Version: version,
		UsageText: "socksfwd -L [bind:]port:host:hostport -S [socks5h://][user:pass@]proxy[:port] [flags]\n" +
			"   socksfwd -c config.toml",
		Writer:                    stdout,
		ErrWriter:                 stderr,
		DisableSliceFlagSeparator: true,
		HideHelpCommand:           true,
		Flags: []cli.Flag{
			slice("server", "S", "upstream SOCKS5 server, repeat for failover: host:port | socks5h://[user[:pass]@]host[:port] | socks5://… (resolves names locally)"),
			str("server-user", "", "username for servers whose URL has none"),
			str("server-password-file", "", "file holding the password for them (one trailing newline stripped)"),
			slice("local", "L", "forward [bind:]port:host:hostport[/udp], repeatable; bind defaults to 127.0.0.1"),
			str("dns", "", "DNS listener [bind:]port, UDP and TCP (bind defaults to 127.0.0.1)"),
			slice("dns-upstream", "", "resolver behind the proxy, host[:port] (port 53), repeatable; required with --dns"),
			str("dns-transport", "", "tcp (DNS over TCP through CONNECT, works everywhere; the default) | udp (one UDP ASSOCIATE)"),
			dur("dns-timeout", "whole-query deadline across all attempts and resolvers", def.DNSTimeout),
			&cli.IntFlag{Name: "dns-cache-size", Usage: "cached DNS answers (0 disables the cache)", Value: def.DNSCacheSize, EnvVars: []string{envName("dns-cache-size")}},
			dur("handshake-timeout", "connect + SOCKS handshake to the upstream", def.HandshakeTimeout),
			dur("idle-timeout", "close a TCP session idle this long (0 = never, like ssh -L)", def.IdleTimeout),
			dur("udp-idle-timeout", "end a UDP session idle this long", def.UDPIdleTimeout),
			&cli.IntFlag{Name: "udp-max-sessions", Usage: "UDP sessions (client addresses) per listener", Value: def.UDPMaxSessions, EnvVars: []string{envName("udp-max-sessions")}},
			str("config", "c", "TOML file (see config.example.toml)"),
			str("log-level", "", "debug | info | warn | error (default info)"),
			str("log-format", "", "auto | json | console (default auto: console on a terminal)"),
			dur("shutdown-timeout", "drain time on SIGINT/SIGTERM", def.ShutdownTimeout),
			// For make bench: compare the relay's two copy paths.
			&cli.StringFlag{Name: "relay-copy", Value: "splice", Hidden: true},
			&cli.BoolFlag{Name: "print-config", Usage: "print the merged configuration as TOML (secrets redacted) and exit"},
		},
		OnUsageError: func(c *cli.Context, err error, _ bool) error {
			return usageError{err}
		},
		Action: func(c *cli.Context) error {
			if c.NArg() > 0 {
				return usagef("unexpected argument %q", c.Args().First())
			}
			cfg, err := mergeConfig(c, getenv)
			if err != nil {
				return err
			}
			if c.Bool("print-config") {
				out, err := cfg.printable()
				if err != nil {
					return err
				}
				fmt.Fprint(stdout, out)
				return nil
			}
			log, err := newLogger(cfg, stderr)
			if err != nil {
				return err
			}
			for _, w := range cfg.warnings {
				log.Warn().Msg(w)
			}
			mode := tunnel.CopySplice
			switch c.String("relay-copy") {
			case "splice":
			case "pooled":
				mode = tunnel.CopyPooled
			default:
				return usagef("--relay-copy: want pooled or splice")
			}
			return serve(cfg.Config, mode, log)
		},
	}
	return app
}

// run is main without os.Exit, for tests.
func run(args []string, stdout, stderr io.Writer, getenv func(string) string) int {
	app := newApp(stdout, stderr, getenv)
	err := app.Run(args)
	if err == nil {
		return exitOK
	}
	fmt.Fprintf(stderr, "socksfwd: %v\n", err)
	var ue usageError
	if errors.As(err, &ue) || isFlagError(err) {
		return exitUsage
	}
	return exitRuntime
}

// isFlagError recognises the flag package's parse errors, which urfave
// returns unwrapped for unknown flags.
func isFlagError(err error) bool {
	s := err.Error()
	return strings.Contains(s, "flag provided but not defined") || strings.Contains(s, "invalid value") ||
		strings.Contains(s, "flag needs an argument")
}

// mergedConfig is the configuration with what merging had to say.
type mergedConfig struct {
	Config
	warnings []string
}

// mergeConfig layers the sources, lowest first: defaults, ALL_PROXY (only
// for the server), the TOML file, environment, flags. urfave reports a
// scalar flag as set when it came from the command line or its variable.
func mergeConfig(c *cli.Context, getenv func(string) string) (mergedConfig, error) {
	m := mergedConfig{Config: defaultConfig()}
	cfg := &m.Config
	path := c.String("config")
	if path != "" {
		if err := loadFile(path, cfg); err != nil {
			return m, err
		}
	}
	for _, name := range repeatable {
		var vals []string
		if c.IsSet(name) {
			vals = c.StringSlice(name)
		} else if env := getenv(envName(name)); env != "" {
			for _, v := range strings.Split(env, ",") {
				if v = strings.TrimSpace(v); v != "" {
					vals = append(vals, v)
				}
			}
		} else {
			continue
		}
		switch name {
		case "server":
			cfg.Server = vals
		case "local":
			cfg.Local = vals
		case "dns-upstream":
			cfg.DNSUpstream = vals
		}
	}
	setStr := func(name string, dst *string) {
		if c.IsSet(name) {
			*dst = c.String(name)
		}
	}
	setDur := func(name string, dst *Duration) {
		if c.IsSet(name) {
			*dst = Duration(c.Duration(name))
		}
	}
	setStr("server-user", &cfg.ServerUser)
	setStr("server-password-file", &cfg.ServerPasswordFile)
	setStr("dns", &cfg.DNS)
	setStr("dns-transport", &cfg.DNSTransport)
	setDur("dns-timeout", &cfg.DNSTimeout)
	setStr("log-level", &cfg.LogLevel)
	setStr("log-format", &cfg.LogFormat)
	setDur("handshake-timeout", &cfg.HandshakeTimeout)
	setDur("idle-timeout", &cfg.IdleTimeout)
	setDur("shutdown-timeout", &cfg.ShutdownTimeout)
	setDur("udp-idle-timeout", &cfg.UDPIdleTimeout)
	if c.IsSet("udp-max-sessions") {
		cfg.UDPMaxSessions = c.Int("udp-max-sessions")
	}
	if c.IsSet("dns-cache-size") {
		cfg.DNSCacheSize = c.Int("dns-cache-size")
	}

	if len(cfg.Server) == 0 {
		for _, name := range []string{"ALL_PROXY", "all_proxy"} {
			v := getenv(name)
			if v == "" {
				continue
			}
			if strings.HasPrefix(v, "socks5://") || strings.HasPrefix(v, "socks5h://") {
				cfg.Server = []string{v}
			} else {
				m.warnings = append(m.warnings, fmt.Sprintf("ignoring %s=%s: only socks5:// and socks5h:// proxies are used", name, redactURL(v)))
			}
			break
		}
	}
	return m, validate(cfg)
}

// validate checks what can be checked without touching the network.
func validate(cfg *Config) error {
	if len(cfg.Server) == 0 {
		return usagef("no upstream server: give -S host:port (or server in the config file, or %s)", envName("server"))
	}
	if len(cfg.Local) == 0 && cfg.DNS == "" {
		return usagef("nothing to forward: give -L [bind:]port:host:hostport or --dns [bind:]port")
	}
	if cfg.DNS != "" {
		if _, err := dnsListenAddr(cfg.DNS); err != nil {
			return err
		}
		if len(cfg.DNSUpstream) == 0 {
			return usagef("--dns needs at least one --dns-upstream (the resolver behind the proxy, e.g. 10.0.0.53)")
		}
		for _, u := range cfg.DNSUpstream {
			if _, err := dnsUpstreamAddr(u); err != nil {
				return err
			}
		}
		if cfg.DNSTransport != "tcp" && cfg.DNSTransport != "udp" {
			return usagef("--dns-transport %q: want tcp or udp", cfg.DNSTransport)
		}
		if cfg.DNSTimeout <= 0 {
			return usagef("--dns-timeout must be positive")
		}
		if cfg.DNSCacheSize < 0 {
			return usagef("--dns-cache-size %d: want 0 (off) or more", cfg.DNSCacheSize)
		}
	}
	if _, err := zerolog.ParseLevel(cfg.LogLevel); err != nil || cfg.LogLevel == "" {
		return usagef("--log-level %q: want debug, info, warn or error", cfg.LogLevel)
	}
	switch cfg.LogFormat {
	case "auto", "json", "console":
	default:
		return usagef("--log-format %q: want auto, json or console", cfg.LogFormat)
	}
	if _, err := buildDialers(cfg); err != nil {
		return err
	}
	for _, spec := range cfg.Local {
		if _, err := parseLocal(spec); err != nil {
			return err
		}
	}
	if cfg.UDPMaxSessions < 1 {
		return usagef("--udp-max-sessions %d: want at least 1", cfg.UDPMaxSessions)
	}
	if cfg.UDPIdleTimeout <= 0 {
		return usagef("--udp-idle-timeout must be positive")
	}
	return nil
}

func newLogger(cfg mergedConfig, stderr io.Writer) (zerolog.Logger, error) {
	level, _ := zerolog.ParseLevel(cfg.LogLevel)
	zerolog.DurationFieldUnit = time.Millisecond
	var w io.Writer = stderr
	format := cfg.LogFormat
	if format == "auto" {
		format = "json"
		if f, ok := stderr.(*os.File); ok {
			if st, err := f.Stat(); err == nil && st.Mode()&os.ModeCharDevice != 0 {
				format = "console"
			}
		}
	}
	if format == "console" {
		w = zerolog.ConsoleWriter{Out: stderr, TimeFormat: time.DateTime}
	}
	return zerolog.New(w).Level(level).With().Timestamp().Logger(), nil
}
