package main

import (
	"fmt"
	"io"
	"strings"

	"github.com/cpuguy83/go-md2man/v2/md2man"
	"github.com/urfave/cli/v2"
)

// manCommand is the hidden `socksfwd man`: it prints the man page, made
// from the same flag definitions as --help (`make man` writes it to
// docs/socksfwd.1).
func manCommand(stdout io.Writer, fresh func() *cli.App) *cli.Command {
	return &cli.Command{
		Name:   "man",
		Usage:  "print the man page (roff)",
		Hidden: true,
		Action: func(c *cli.Context) error {
			page, err := manPage(fresh())
			if err != nil {
				return err
			}
			_, err = io.WriteString(stdout, page)
			return err
		},
	}
}

// manDescription opens the page; the options and commands follow from
// the flag definitions.
const manDescription = `socksfwd lets programs that do not speak SOCKS use a SOCKS5 proxy. Local
listeners turn plain TCP (**-L**), UDP (**-L** ...**/udp**), DNS (**--dns**), traffic that
netfilter redirects (**--transparent**), HTTP proxy requests (**--http**) and SOCKS5 clients
(**-D**) into SOCKS5 (RFC 1928) sessions toward the upstream servers named with **-S**, tried in
order for failover; **-R** asks the proxy to listen (BIND) and carries its callers to a local
target.

Target names go to the proxy (**socks5h://** or a bare host:port), so nothing leaks to the local
resolver; **socks5://** resolves them locally.`

// manSections follow the options.
const manSections = `
# ENVIRONMENT

Every option but **-c** and **--print-config** (and those of **rules** and **check**) can be set in
the environment as ` + "`SOCKSFWD_`" + ` and its long name in upper case,
dashes as underscores (**--dns-upstream** is ` + "`SOCKSFWD_DNS_UPSTREAM`" + `); a repeatable option takes a
comma-separated list there. ` + "`ALL_PROXY`" + ` (or ` + "`all_proxy`" + `) names the server when no other source
does, if it is a socks5:// or socks5h:// URL. Precedence: flag, environment, the **-c** file,
` + "`ALL_PROXY`" + `, default.

# FILES

The TOML file given with **-c** takes the long option names as keys (` + "`server = [\"proxy:1080\"]`" + `,
` + "`dns-upstream = [\"10.0.0.53\"]`" + `); an unknown key is an error naming file and line. It is read
again on SIGHUP.

# SIGNALS

**SIGINT**, **SIGTERM**: stop accepting on every listener and let live sessions finish for
**--shutdown-timeout**, then cut what is left; a second signal cuts at once, and socksfwd exits 1.

**SIGHUP**: read flags, environment and file again; when the whole new configuration is valid,
keep unchanged listeners and their sessions, drain removed ones and start new ones; otherwise log
the error and keep running as before.

# EXIT STATUS

**0** a clean stop, **1** a runtime failure (a listener cannot bind), **2** a usage or
configuration error.

# EXAMPLES

Reach a database by a name only the proxy resolves:

    socksfwd -L 5432:db.internal:5432 -S socks5h://proxy:1080

DNS through the proxy, and every TCP connection of this host captured by netfilter:

    socksfwd --transparent 12345 --dns 5353 --dns-upstream 10.0.0.53 --mark 0x438 -S proxy:1080
    socksfwd rules --transparent 12345 --dns 5353 --dns-upstream 10.0.0.53 --mark 0x438 -S proxy:1080 | nft -f -

# SEE ALSO

**ssh**(1), **nft**(8), **iptables**(8), **dig**(1)
`

// manPage renders the app's help as a man page in section 1: urfave's
// markdown of the flags and commands, with the sections a man page has,
// in roff. Characters beyond ASCII are written as roff escapes, which
// every formatter reads whatever its input encoding.
func manPage(app *cli.App) (string, error) {
	app.Description = manDescription
	md, err := app.ToMarkdown()
	if err != nil {
		return "", err
	}
	md = manFlagLines(md)
	// urfave/cli leaves its own two flags out of the page.
	md = strings.Replace(md, "\n# COMMANDS", "\n**--help, -h**: show the usage\n\n**--version, -V**: print the version\n\n# COMMANDS", 1)
	roff := string(md2man.Render([]byte(fmt.Sprintf("%% %s 1\n\n%s\n%s", app.Name, md, manSections))))
	// No hyphenation: it would split flag and variable names. md2man's .nh
	// is undone by .TH and every paragraph; the man macros read HY instead.
	roff = strings.Replace(roff, "\n.TH ", "\n.nr HY 0\n.TH ", 1)
	var b strings.Builder
	for _, r := range roff {
		if r < 0x80 {
			b.WriteRune(r)
		} else {
			fmt.Fprintf(&b, `\[u%04X]`, r)
		}
	}
	return b.String(), nil
}

// manFlagLines mends urfave's markdown lines for flags, "**--dns**="": DNS
// listener [bind:]port": "=\"\"" becomes a placeholder, and brackets in the
// usage are escaped, which markdown would otherwise take for a link
// ("host[:port] (port 53)").
func manFlagLines(md string) string {
	lines := strings.Split(md, "\n")
	for i, l := range lines {
		if !strings.HasPrefix(l, "**-") {
			continue
		}
		l = strings.Replace(l, `**="": `, `** *value*: `, 1)
		if name, usage, ok := strings.Cut(l, ": "); ok {
			l = name + ": " + strings.NewReplacer("[", `\[`, "]", `\]`).Replace(usage)
		}
		lines[i] = l
	}
	return strings.Join(lines, "\n")
}
