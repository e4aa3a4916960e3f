// Command socksfwd lets software that does not speak SOCKS use a SOCKS5
// proxy: local listeners turn plain TCP, UDP and DNS into SOCKS5 sessions.
package main

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/signal"
	"reflect"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"github.com/urfave/cli/v2"
)

// version is stamped at build time: -ldflags "-X main.version=…".
var version = "dev"

// Exit codes: 0 a clean stop, 1 a runtime failure (a listener that cannot
// bind), 2 a usage or configuration error.
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

func init() {
	cli.VersionFlag = &cli.BoolFlag{Name: "version", Aliases: []string{"V"}, Usage: "print the version and exit"}
}

// newApp is the command line: one flag per Config option, plus the flags
// that act at once. Its Action only hands back the merged configuration
// (through loaded); serving is the supervisor's.
func newApp(stdout, stderr io.Writer, getenv func(string) string, loaded *mergedConfig) *cli.App {
	flags := append(optionFlags(),
		&cli.BoolFlag{Name: "print-config", Usage: "print the merged configuration as TOML (secrets redacted) and exit"},
	)
	// The completion script and man page are made from a new app: a
	// running one has urfave's additions in it.
	fresh := func() *cli.App { return newApp(io.Discard, io.Discard, getenv, new(mergedConfig)) }
	return &cli.App{
		Name:    "socksfwd",
		Usage:   "forward local TCP and UDP ports, and DNS, through a SOCKS5 proxy",
		Version: version,
		UsageText: "socksfwd -L [bind:]port:host:hostport -S [socks5h://][user:pass@]proxy[:port] [flags]\n" +
			"socksfwd -c config.toml",
		Writer:                    stdout,
		ErrWriter:                 stderr,
		DisableSliceFlagSeparator: true,
		HideHelpCommand:           true,
		Flags:                     flags,
		Commands: []*cli.Command{
			rulesCommand(stdout, getenv),
			checkCommand(stdout, stderr, getenv),
			completionCommand(stdout, fresh),
			manCommand(stdout, fresh),
		},
		OnUsageError: func(c *cli.Context, err error, _ bool) error {
			return usageError{err}
		},
		Action: func(c *cli.Context) error {
			cfg, err := planFrom(c, getenv)
			if err != nil {
				return err
			}
			if c.Bool("print-config") {
				out, err := cfg.printable()
				if err != nil {
					return err
				}
				fmt.Fprint(stdout, out)
				// What a run would log at its start, where the user
				// checking a merge looks for it.
				for _, w := range cfg.warnings {
					fmt.Fprintln(stderr, "socksfwd: warning: "+w)
				}
				return nil
			}
			*loaded = cfg
			return nil
		},
	}
}

// optionFlags is one flag per Config option, and -c.
func optionFlags() []cli.Flag { return optionFlagsIn("") }

// sharedOptions is the help's heading, in rules and check, for the
// daemon's options they read: listed after their own.
const sharedOptions = "socksfwd's options (read as the daemon reads them)"

// optionFlagsIn is optionFlags under a help category ("" for none).
func optionFlagsIn(category string) []cli.Flag {
	flags := make([]cli.Flag, 0, len(options)+1)
	for _, o := range options {
		usage := o.usage + " (env " + envName(o.name)
		if o.repeatable {
			usage += ", comma-separated"
		}
		usage += ")"
		var aliases []string
		if o.short != "" {
			aliases = []string{o.short}
		}
		// Every value arrives as text and is parsed by mergeConfig, so
		// that an error names the option and says what it wants.
		switch {
		case o.isBool:
			flags = append(flags, &cli.BoolFlag{Name: o.name, Aliases: aliases, Usage: usage, Hidden: o.hidden, Category: category})
		case o.repeatable:
			flags = append(flags, &cli.StringSliceFlag{Name: o.name, Aliases: aliases, Usage: usage, Hidden: o.hidden, TakesFile: o.takesFile(), Category: category})
		default:
			flags = append(flags, &cli.StringFlag{Name: o.name, Aliases: aliases, Usage: usage, Hidden: o.hidden, Value: o.def, TakesFile: o.takesFile(), Category: category})
		}
	}
	return append(flags, &cli.StringFlag{Name: "config", Aliases: []string{"c"}, Usage: "TOML file (see config.example.toml); re-read on SIGHUP", TakesFile: true, Category: category})
}

// run is main without os.Exit, for tests.
func run(args []string, stdout, stderr io.Writer, getenv func(string) string) int {
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sigs)
	return runWith(args, stdout, stderr, getenv, sigs)
}

// runWith loads the configuration, builds the plan and hands it to the
// supervisor, which runs until a signal on sigs stops it.
func runWith(args []string, stdout, stderr io.Writer, getenv func(string) string, sigs <-chan os.Signal) int {
	err := func() error {
		cfg, err := loadConfig(args, stdout, stderr, getenv)
		if err != nil || cfg.plan == nil {
			return err // answered already: --help, --version, --print-config
		}
		p := cfg.plan
		if err := checkRemoteAddrFile(p); err != nil {
			return err
		}
		log := newLogger(p, stderr)
		for _, w := range cfg.warnings {
			log.Warn().Msg(w)
		}
		reload := func() (*plan, error) {
			cfg, err := loadConfig(args, io.Discard, io.Discard, getenv)
			if err != nil {
				return nil, err
			}
			if cfg.plan == nil {
				return nil, usagef("the command line no longer starts socksfwd")
			}
			if err := checkRemoteAddrFile(cfg.plan); err != nil {
				return nil, err
			}
			for _, w := range cfg.warnings {
				log.Warn().Msg(w)
			}
			return cfg.plan, nil
		}
		sd, err := newSystemd(getenv, log, p.listens)
		if err != nil {
			return err
		}
		defer sd.close()
		s := newSupervisor(log, reload)
		s.sd = sd
		return s.run(p, sigs)
	}()
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

// loadConfig parses the command line and merges every source. A config
// without a plan was answered already (help, version, print-config).
func loadConfig(args []string, stdout, stderr io.Writer, getenv func(string) string) (mergedConfig, error) {
	var cfg mergedConfig
	if err := repeatedListener(args); err != nil {
		return cfg, err
	}
	err := newApp(stdout, stderr, getenv, &cfg).Run(args)
	return cfg, err
}

// singleListeners are the listener options that take one address: given
// twice, the flag package would keep the last in silence, where an ssh
// user means two listeners (ssh -D 1080 -D 1081).
var singleListeners = map[string]string{"D": "-D", "dynamic": "-D", "http": "--http", "dns": "--dns", "admin": "--admin"}

// repeatedListener refuses a listener option given twice on the command
// line.
func repeatedListener(args []string) error {
	seen := map[string]bool{}
	for _, a := range args[min(1, len(args)):] {
		if a == "--" {
			break
		}
		name, ok := strings.CutPrefix(a, "--")
		if !ok {
			if name, ok = strings.CutPrefix(a, "-"); !ok {
				continue
			}
		}
		name, _, _ = strings.Cut(name, "=")
		opt, ok := singleListeners[name]
		if !ok {
			continue
		}
		if seen[opt] {
			return usagef("%s given twice: it takes one [bind:]port (several listeners of one kind are not supported; -L forwards are repeatable)", opt)
		}
		seen[opt] = true
	}
	return nil
}

// isFlagError recognises the flag package's parse errors, which urfave
// returns unwrapped for unknown flags.
func isFlagError(err error) bool {
	s := err.Error()
	return strings.Contains(s, "flag provided but not defined") || strings.Contains(s, "invalid value") ||
		strings.Contains(s, "flag needs an argument")
}

// mergedConfig is the configuration with what merging had to say, and
// the plan built from it.
type mergedConfig struct {
	Config
	warnings []string
	plan     *plan // nil when the command line was answered without serving
}

// planFrom merges the sources of a command's flags and builds the plan.
func planFrom(c *cli.Context, getenv func(string) string) (mergedConfig, error) {
	return planFromAdjusted(c, getenv, nil)
}

// planFromAdjusted is planFrom with adjust, when set, applied to the
// merged configuration before the plan is built.
func planFromAdjusted(c *cli.Context, getenv func(string) string, adjust func(*Config)) (mergedConfig, error) {
	if c.NArg() > 0 {
		return mergedConfig{}, usagef("unexpected argument %s", quote(c.Args().First()))
	}
	cfg, err := mergeConfig(c, getenv)
	if err != nil {
		return cfg, err
	}
	if adjust != nil {
		adjust(&cfg.Config)
	}
	cfg.plan, err = buildPlan(cfg.Config)
	if err != nil && len(cfg.warnings) > 0 {
		// Logged only once a plan is built: an ignored ALL_PROXY is
		// most often why there is no server.
		err = fmt.Errorf("%w (%s)", err, strings.Join(cfg.warnings, "; "))
	}
	return cfg, err
}

// mergeConfig layers the sources, lowest first: defaults, ALL_PROXY (only
// for the server), the TOML file, environment, flags. On the command line
// each repetition of a repeatable option is one value; in the environment
// it is a comma-separated list.
func mergeConfig(c *cli.Context, getenv func(string) string) (mergedConfig, error) {
	m := mergedConfig{Config: defaultConfig()}
	cfg := &m.Config
	fileGiven := false
	if fc := setIn(c, "config"); fc != nil && fc.String("config") != "" {
		path := fc.String("config")
		if err := loadFile(path, cfg); err != nil {
			return m, err
		}
		fileGiven = true
	}
	for _, o := range options {
		var vals []string
		source := "--" + o.name
		fc := setIn(c, o.name)
		switch {
		case fc != nil && o.isBool:
			vals = []string{strconv.FormatBool(fc.Bool(o.name))}
		case fc != nil && o.repeatable:
			vals = fc.StringSlice(o.name)
		case fc != nil:
			vals = []string{fc.String(o.name)}
		case getenv(envName(o.name)) != "":
			env := getenv(envName(o.name))
			source = envName(o.name)
			if !o.repeatable {
				vals = []string{env}
				break
			}
			for _, v := range strings.Split(env, ",") {
				if v = strings.TrimSpace(v); v != "" {
					vals = append(vals, v)
				}
			}
		default:
			continue
		}
		if o.repeatable {
			// The command line or environment replaces the file's list,
			// which a reload then does not read either: said, as an ssh
			// user expects -L and LocalForward lines to add up.
			field := reflect.ValueOf(cfg).Elem().Field(o.index)
			if n := field.Len(); fileGiven && n > 0 {
				given := source
				if o.short != "" && given == "--"+o.name {
					given = "-" + o.short + " (" + given + ")"
				}
				m.warnings = append(m.warnings, fmt.Sprintf("%s replaces the %d %q value(s) of the config file (and a reload keeps it so): give them all in one place", given, n, o.name))
			}
			field.SetZero()
		}
		for _, v := range vals {
			if err := o.set(cfg, v); err != nil {
				return m, usagef("%s %s: %v", source, quote(v), err)
			}
		}
	}
	if len(cfg.Server) == 0 {
		// The lowercase one first, as curl reads them; a scheme in any case.
		for _, name := range []string{"all_proxy", "ALL_PROXY"} {
			v := getenv(name)
			if v == "" {
				continue
			}
			if l := strings.ToLower(v); strings.HasPrefix(l, "socks5://") || strings.HasPrefix(l, "socks5h://") {
				cfg.Server = []string{v}
				break
			}
			m.warnings = append(m.warnings, fmt.Sprintf("ignoring %s=%s: only socks5:// and socks5h:// proxies are used", name, redactURL(v)))
		}
	}
	for _, s := range cfg.Server {
		if w := portInBareIPv6(s); w != "" {
			m.warnings = append(m.warnings, w)
		}
	}
	return m, nil
}

// portInBareIPv6 warns of a -S value that is an IPv6 address without
// brackets whose last group reads as a port (2001:db8::1:1080): it is
// taken whole, as the address, with the default port.
func portInBareIPv6(server string) string {
	ip, err := netip.ParseAddr(server)
	if err != nil || !ip.Is6() {
		return ""
	}
	i := strings.LastIndex(server, ":")
	last := server[i+1:]
	rest, err := netip.ParseAddr(server[:i]) // what remains must be an address too
	if len(last) < 2 || strings.Trim(last, "0123456789") != "" || err != nil || !rest.Is6() {
		return ""
	}
	return fmt.Sprintf("-S %s is taken as the IPv6 address %s, port %s; if %s is the port, write [%s]:%s", server, ip, defaultProxyPort, last, rest, last)
}

// setIn returns the context that sets option name on the command line:
// the subcommand's, or the program's for an option given before `check`
// or `rules` (socksfwd -c prod.toml check), which the subcommand's own
// context does not see, as it defines every option again. Nil when none
// does; the subcommand's wins.
func setIn(c *cli.Context, name string) *cli.Context {
	for _, ctx := range c.Lineage() {
		if slices.Contains(ctx.LocalFlagNames(), name) {
			return ctx
		}
	}
	return nil
}

// newLogger builds the process's logger. Its level is zerolog's global
// level, so that a reload can change it for every service at once.
func newLogger(p *plan, stderr io.Writer) zerolog.Logger {
	zerolog.SetGlobalLevel(p.logLevel)
	zerolog.DurationFieldUnit = time.Millisecond // the fields say so: dur_ms
	var w io.Writer = stderr
	terminal := false
	if f, ok := stderr.(*os.File); ok {
		st, err := f.Stat()
		terminal = err == nil && st.Mode()&os.ModeCharDevice != 0
	}
	format := p.cfg.LogFormat
	if format == "auto" {
		format = "json"
		if terminal {
			format = "console"
		}
	}
	if format == "console" {
		// Colours only for a terminal: in a file or the journal their
		// escape codes are noise.
		w = zerolog.ConsoleWriter{Out: stderr, TimeFormat: time.DateTime, NoColor: !terminal}
	}
	return zerolog.New(w).Level(zerolog.TraceLevel).With().Timestamp().Logger()
}
