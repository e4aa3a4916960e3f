package main

import (
	"fmt"
	"io"
	"regexp"
	"slices"
	"strings"

	"github.com/urfave/cli/v2"
)

// completionShells are the shells `socksfwd completion` writes for.
var completionShells = []string{"bash", "zsh", "fish"}

// completionCommand is `socksfwd completion bash|zsh|fish`. The script
// is made from the command line's own definitions (newApp's flags and
// commands), so it cannot fall behind them. A fresh app is walked because
// a running one has had help and version flags added to it by urfave.
func completionCommand(stdout io.Writer, fresh func() *cli.App) *cli.Command {
	return &cli.Command{
		Name:      "completion",
		Usage:     "print a completion script for bash, zsh or fish",
		ArgsUsage: strings.Join(completionShells, "|"),
		UsageText: "source <(socksfwd completion bash)\n" +
			"   socksfwd completion zsh > \"${fpath[1]}/_socksfwd\"\n" +
			"   socksfwd completion fish > ~/.config/fish/completions/socksfwd.fish",
		OnUsageError: func(c *cli.Context, err error, _ bool) error {
			return usageError{err}
		},
		Action: func(c *cli.Context) error {
			if c.NArg() != 1 {
				return usagef("completion: name one shell: %s", strings.Join(completionShells, ", "))
			}
			script, err := completionScript(fresh(), c.Args().First())
			if err != nil {
				return err
			}
			_, err = io.WriteString(stdout, script)
			return err
		},
	}
}

// completionScript is the completion script for shell.
func completionScript(app *cli.App, shell string) (string, error) {
	m := completionModelOf(app)
	switch shell {
	case "bash":
		return m.bash(), nil
	case "zsh":
		return m.zsh(), nil
	case "fish":
		return m.fish(app)
	}
	return "", usagef("completion %s: want one of %s", quote(shell), strings.Join(completionShells, ", "))
}

// completionModel is what a shell can complete: the command's flags and
// its subcommands, each with its own flags.
type completionModel struct {
	name string
	top  completedCommand
	subs []completedCommand
}

type completedCommand struct {
	name, usage string
	flags       []completedFlag
	args        []string // the words it takes as arguments, when they are a fixed few
}

type completedFlag struct {
	names      []string // as typed: "--server", "-S"
	usage      string
	takesValue bool
	takesFile  bool
	repeatable bool
	choices    []string // the values it takes, when they are a fixed few
}

func completionModelOf(app *cli.App) completionModel {
	top := completedCommand{name: app.Name, flags: completedFlags(app.VisibleFlags())}
	// urfave adds these at run time; a fresh app does not have them yet.
	top.flags = append(top.flags, completedFlags([]cli.Flag{cli.HelpFlag, cli.VersionFlag})...)
	m := completionModel{name: app.Name, top: top}
	for _, c := range app.VisibleCommands() {
		flags := c.VisibleFlags()
		if !c.HideHelp {
			flags = append(flags, cli.HelpFlag)
		}
		m.subs = append(m.subs, completedCommand{
			name: c.Name, usage: c.Usage, flags: completedFlags(flags), args: choicesOf(c.ArgsUsage),
		})
	}
	return m
}

func completedFlags(flags []cli.Flag) []completedFlag {
	var out []completedFlag
	for _, f := range flags {
		df, ok := f.(cli.DocGenerationFlag)
		if !ok {
			continue
		}
		cf := completedFlag{usage: df.GetUsage(), takesValue: df.TakesValue()}
		for _, n := range f.Names() {
			if len(n) == 1 {
				cf.names = append(cf.names, "-"+n)
			} else {
				cf.names = append(cf.names, "--"+n)
			}
		}
		switch f := f.(type) {
		case *cli.StringFlag:
			cf.takesFile = f.TakesFile
		case *cli.StringSliceFlag:
			cf.takesFile, cf.repeatable = f.TakesFile, true
		}
		if cf.takesValue {
			cf.choices = choicesOf(cf.usage)
		}
		out = append(out, cf)
	}
	return out
}

// choiceRe is one alternative of a usage that lists them, "tcp (DNS over
// TCP …)": a plain word, then perhaps a parenthesised remark.
var choiceRe = regexp.MustCompile(`^([a-z0-9-]+)(?: \(.*\))?$`)

// choicesOf reads the values a flag takes from a usage written as
// "debug | info | warn | error" or "tcp (…) | udp (…)". A usage that
// only mentions alternatives in passing ("upstream server: host:port |
// socks5h://…") has none.
func choicesOf(usage string) []string {
	parts := strings.Split(usage, "|")
	if len(parts) < 2 {
		return nil
	}
	var out []string
	for _, p := range parts {
		m := choiceRe.FindStringSubmatch(strings.TrimSpace(p))
		if m == nil {
			return nil
		}
		out = append(out, m[1])
	}
	return out
}

func (c completedCommand) valueFlags() []string {
	var out []string
	for _, f := range c.flags {
		if f.takesValue {
			out = append(out, f.names...)
		}
	}
	return out
}

func (c completedCommand) flagWords() []string {
	var out []string
	for _, f := range c.flags {
		out = append(out, f.names...)
	}
	return out
}

func (m completionModel) subNames() []string {
	var out []string
	for _, s := range m.subs {
		out = append(out, s.name)
	}
	return out
}

// bash: the subcommand is the first word that is neither a flag nor a
// flag's value; a flag's value is completed from its choices or, for a
// file, from the file system; anything else from the flags (after -) or
// the subcommands and arguments.
func (m completionModel) bash() string {
	var b strings.Builder
	fn := "_" + m.name
	m.header(&b, "bash", "source <(%[1]s completion bash), or for good:\n#   %[1]s completion bash > /usr/share/bash-completion/completions/%[1]s")
	fmt.Fprintf(&b, "%s() {\n", fn)
	b.WriteString("\tlocal cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]}\n")
	b.WriteString("\t# COMP_WORDBREAKS splits --flag=value at the '='.\n")
	b.WriteString("\tif [[ $cur == = ]]; then\n\t\tcur=\n\telif [[ $prev == = ]]; then\n\t\tprev=${COMP_WORDS[COMP_CWORD-2]}\n\tfi\n")
	b.WriteString("\tlocal cmd= i\n")
	b.WriteString("\tfor ((i = 1; i < COMP_CWORD; i++)); do\n\t\tcase ${COMP_WORDS[i]} in\n")
	if vf := m.top.valueFlags(); len(vf) > 0 {
		fmt.Fprintf(&b, "\t\t%s)\n\t\t\t[[ ${COMP_WORDS[i+1]} == = ]] && ((i++))\n\t\t\t((i++)) ;;\n", strings.Join(vf, "|"))
	}
	if subs := m.subNames(); len(subs) > 0 {
		fmt.Fprintf(&b, "\t\t%s)\n\t\t\tcmd=${COMP_WORDS[i]}\n\t\t\tbreak ;;\n", strings.Join(subs, "|"))
	}
	b.WriteString("\t\tesac\n\tdone\n")
	b.WriteString("\tlocal words\n\tcase $cmd in\n")
	cmds := append([]completedCommand{m.top}, m.subs...)
	for i, c := range cmds {
		label, args := c.name, c.args
		if i == 0 {
			label, args = `""`, m.subNames()
		}
		fmt.Fprintf(&b, "\t%s)\n", label)
		var files, plain []string
		var arms strings.Builder
		for _, f := range c.flags {
			switch {
			case !f.takesValue:
			case f.takesFile:
				files = append(files, f.names...)
			case len(f.choices) > 0:
				fmt.Fprintf(&arms, "\t\t%s)\n\t\t\tCOMPREPLY=($(compgen -W '%s' -- \"$cur\"))\n\t\t\treturn ;;\n", strings.Join(f.names, "|"), strings.Join(f.choices, " "))
			default:
				plain = append(plain, f.names...)
			}
		}
		if len(files) > 0 {
			fmt.Fprintf(&arms, "\t\t%s)\n\t\t\tcompopt -o filenames 2>/dev/null\n\t\t\tlocal IFS=$'\\n'\n\t\t\tCOMPREPLY=($(compgen -f -- \"$cur\"))\n\t\t\treturn ;;\n", strings.Join(files, "|"))
		}
		if len(plain) > 0 {
			fmt.Fprintf(&arms, "\t\t%s)\n\t\t\treturn ;; # values only the user knows\n", strings.Join(plain, "|"))
		}
		if arms.Len() > 0 {
			fmt.Fprintf(&b, "\t\tcase $prev in\n%s\t\tesac\n", arms.String())
		}
		fmt.Fprintf(&b, "\t\tif [[ $cur == -* ]]; then\n\t\t\twords='%s'\n\t\telse\n\t\t\twords='%s'\n\t\tfi ;;\n",
			strings.Join(c.flagWords(), " "), strings.Join(args, " "))
	}
	b.WriteString("\tesac\n")
	b.WriteString("\tCOMPREPLY=($(compgen -W \"$words\" -- \"$cur\"))\n")
	b.WriteString("}\n\n")
	fmt.Fprintf(&b, "complete -F %s %s\n", fn, m.name)
	return b.String()
}

// zsh: _arguments with one spec per flag, the subcommands described, and
// each subcommand's own _arguments once it is typed. The script works both
// from $fpath (its first line) and sourced.
func (m completionModel) zsh() string {
	var b strings.Builder
	fn := "_" + m.name
	fmt.Fprintf(&b, "#compdef %s\n", m.name)
	m.header(&b, "zsh", "%[1]s completion zsh > \"${fpath[1]}/_%[1]s\", or source <(%[1]s completion zsh)")
	fmt.Fprintf(&b, "%s() {\n", fn)
	b.WriteString("\tlocal curcontext=$curcontext state line ret=1\n\ttypeset -A opt_args\n")
	b.WriteString("\t_arguments -C \\\n")
	for _, f := range m.top.flags {
		fmt.Fprintf(&b, "\t\t%s \\\n", zshFlagSpec(f))
	}
	b.WriteString("\t\t'1: :->command' \\\n\t\t'*:: :->args' && ret=0\n")
	b.WriteString("\tcase $state in\n\tcommand)\n\t\tlocal -a commands=(\n")
	for _, s := range m.subs {
		fmt.Fprintf(&b, "\t\t\t%s\n", zshQuote(s.name+":"+s.usage))
	}
	b.WriteString("\t\t)\n\t\t_describe -t commands 'command' commands && ret=0 ;;\n")
	b.WriteString("\targs)\n\t\tcurcontext=${curcontext%:*:*}:" + m.name + "-$words[1]:\n")
	b.WriteString("\t\tcase $words[1] in\n")
	for _, s := range m.subs {
		fmt.Fprintf(&b, "\t\t%s)\n\t\t\t_arguments \\\n", s.name)
		for _, f := range s.flags {
			fmt.Fprintf(&b, "\t\t\t\t%s \\\n", zshFlagSpec(f))
		}
		if len(s.args) > 0 {
			fmt.Fprintf(&b, "\t\t\t\t'1:argument:(%s)' \\\n", strings.Join(s.args, " "))
		}
		b.WriteString("\t\t\t\t&& ret=0 ;;\n")
	}
	b.WriteString("\t\tesac ;;\n\tesac\n\treturn ret\n}\n\n")
	// Autoloaded from $fpath, the file is the function's body; sourced,
	// it defines the function and registers it.
	fmt.Fprintf(&b, "if [[ $funcstack[1] == %[1]s ]]; then\n\t%[1]s \"$@\"\nelse\n\tcompdef %[1]s %[2]s\nfi\n", fn, m.name)
	return b.String()
}

// header opens a script: what made it and how to load it (use, with
// %[1]s for the command's name).
func (m completionModel) header(b *strings.Builder, shell, use string) {
	fmt.Fprintf(b, "# %s completion for %s, made by `%s completion %s`.\n", shell, m.name, m.name, shell)
	fmt.Fprintf(b, "# Load it: "+use+"\n\n", m.name)
}

// zshFlagSpec is one _arguments spec: '(-S --server)'{-S,--server=}'[…]:value:'.
func zshFlagSpec(f completedFlag) string {
	names := slices.Clone(f.names)
	if f.takesValue {
		for i, n := range names {
			if strings.HasPrefix(n, "--") {
				names[i] = n + "=" // --flag=value or --flag value
			}
		}
	}
	var b strings.Builder
	switch {
	case f.repeatable:
		b.WriteString("'*'")
	case len(f.names) > 1:
		b.WriteString("'(" + strings.Join(f.names, " ") + ")'")
	}
	desc := strings.NewReplacer(`\`, `\\`, "[", `\[`, "]", `\]`).Replace(f.usage)
	spec := "[" + desc + "]"
	if len(names) > 1 {
		b.WriteString("{" + strings.Join(names, ",") + "}")
	} else {
		spec = names[0] + spec
	}
	if f.takesValue {
		switch {
		case f.takesFile:
			spec += ":file:_files"
		case len(f.choices) > 0:
			spec += ":value:(" + strings.Join(f.choices, " ") + ")"
		default:
			spec += ":value: "
		}
	}
	return b.String() + zshQuote(spec)
}

// zshQuote single-quotes s for zsh (and bash).
func zshQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// fish: urfave's own script, plus what it leaves out: the values of the
// flags and commands that take a fixed few, and no file names offered
// where a subcommand or argument goes.
func (m completionModel) fish(app *cli.App) (string, error) {
	script, err := app.ToFishCompletion()
	if err != nil {
		return "", err
	}
	var b strings.Builder
	b.WriteString(script)
	b.WriteString("\n# Besides: the values of flags and arguments that take a fixed few, and\n# no file names where no flag wants one.\n")
	cond := func(c completedCommand, top bool) string {
		if top {
			return fmt.Sprintf("__fish_%s_no_subcommand", m.name)
		}
		return "__fish_seen_subcommand_from " + c.name
	}
	cmds := append([]completedCommand{m.top}, m.subs...)
	for i, c := range cmds {
		for _, f := range c.flags {
			if len(f.choices) == 0 {
				continue
			}
			fmt.Fprintf(&b, "complete -c %s -n '%s'", m.name, cond(c, i == 0))
			for _, n := range f.names {
				if strings.HasPrefix(n, "--") {
					fmt.Fprintf(&b, " -l %s", n[2:])
				} else {
					fmt.Fprintf(&b, " -s %s", n[1:])
				}
			}
			fmt.Fprintf(&b, " -x -a '%s'\n", strings.Join(f.choices, " "))
		}
		// No file names where an argument goes: none of them takes one.
		fmt.Fprintf(&b, "complete -c %s -n '%s' -f", m.name, cond(c, i == 0))
		if i > 0 && len(c.args) > 0 {
			fmt.Fprintf(&b, " -a '%s'", strings.Join(c.args, " "))
		}
		b.WriteString("\n")
	}
	return b.String(), nil
}

// takesFile says that an option's value is a path, for shells to complete
// from the file system: the options named …-file.
func (o option) takesFile() bool { return strings.HasSuffix(o.name, "-file") }
