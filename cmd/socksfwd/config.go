package main

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2"
)

// Config is the merged configuration. TOML keys are the long flag names.
// Defaults are set in defaultConfig.
type Config struct {
	Server             []string `toml:"server"`
	ServerUser         string   `toml:"server-user,omitempty"`
	ServerPasswordFile string   `toml:"server-password-file,omitempty"`
	Local              []string `toml:"local"`
	DNS                string   `toml:"dns,omitempty"`
	DNSUpstream        []string `toml:"dns-upstream,omitempty"`
	DNSTransport       string   `toml:"dns-transport"`
	DNSTimeout         Duration `toml:"dns-timeout"`
	DNSCacheSize       int      `toml:"dns-cache-size"`
	HandshakeTimeout   Duration `toml:"handshake-timeout"`
	IdleTimeout        Duration `toml:"idle-timeout"`
	UDPIdleTimeout     Duration `toml:"udp-idle-timeout"`
	UDPMaxSessions     int      `toml:"udp-max-sessions"`
	LogLevel           string   `toml:"log-level"`
	LogFormat          string   `toml:"log-format"`
	ShutdownTimeout    Duration `toml:"shutdown-timeout"`
}

func defaultConfig() Config {
	return Config{
		HandshakeTimeout: Duration(10 * time.Second), // connect + SOCKS handshake
		IdleTimeout:      0,                          // never, like ssh -L
		UDPIdleTimeout:   Duration(60 * time.Second), // a UDP session with no datagram either way
		UDPMaxSessions:   1024,                       // UDP sessions (client addresses) per listener
		DNSTransport:     "tcp",                      // DNS over TCP through CONNECT: works with every server
		DNSTimeout:       Duration(5 * time.Second),  // a whole query, across attempts and resolvers
		DNSCacheSize:     10000,                      // cached answers; 0 disables the cache
		LogLevel:         "info",
		LogFormat:        "auto", // console on a terminal, JSON otherwise
		ShutdownTimeout:  Duration(30 * time.Second),
	}
}

// Duration is a time.Duration written as "10s" in TOML.
type Duration time.Duration

func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("invalid duration %q (want e.g. 10s, 1m30s)", b)
	}
	if v < 0 {
		return fmt.Errorf("negative duration %q", b)
	}
	*d = Duration(v)
	return nil
}

// usageError is a configuration or usage mistake: exit code 2.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

func usagef(format string, args ...any) error { return usageError{fmt.Errorf(format, args...)} }

// loadFile reads a TOML file strictly into cfg: an unknown key is an error
// naming file, line and key.
func loadFile(path string, cfg *Config) error {
	data, err := os.ReadFile(path)
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
				keys[i] = fmt.Sprintf("%s:%d: unknown key %q", path, row, strings.Join(e.Key(), "."))
			}
			return usageError{errors.New(strings.Join(keys, "; "))}
		}
		var de *toml.DecodeError
		if errors.As(err, &de) {
			row, col := de.Position()
			return usagef("%s:%d:%d: %s", path, row, col, de.Error())
		}
		return usagef("%s: %w", path, err)
	}
	return nil
}

// printable returns the config as TOML with secrets redacted.
func (c Config) printable() (string, error) {
	red := c
	red.Server = make([]string, len(c.Server))
	for i, s := range c.Server {
		red.Server[i] = redactURL(s)
	}
	var buf bytes.Buffer
	enc := toml.NewEncoder(&buf)
	if err := enc.Encode(red); err != nil {
		return "", err
	}
	return buf.String(), nil
}
