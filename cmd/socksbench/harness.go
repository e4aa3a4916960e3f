//go:build linux

package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/socksfwd/socksfwd/internal/peertest"
)

// harness gives peertest and testnet what a testing.T would: cleanups,
// temporary directories, and a fatal error that unwinds to run.
type harness struct {
	dir         string
	cleanups    []func()
	connrateBin string // built by connrate
}

type fatal string

func newHarness() *harness {
	dir, err := os.MkdirTemp("", "socksbench-")
	if err != nil {
		panic(err)
	}
	return &harness{dir: dir}
}

// run calls f, then every cleanup in reverse order, and returns the exit code.
func (h *harness) run(f func()) (code int) {
	defer func() {
		if r := recover(); r != nil {
			msg, ok := r.(fatal)
			if !ok {
				panic(r)
			}
			fmt.Fprintln(os.Stderr, "socksbench:", string(msg))
			code = 1
		}
		for i := len(h.cleanups) - 1; i >= 0; i-- {
			h.cleanups[i]()
		}
		os.RemoveAll(h.dir)
	}()
	f()
	return 0
}

func (h *harness) Helper()                           {}
func (h *harness) Fatalf(format string, args ...any) { panic(fatal(fmt.Sprintf(format, args...))) }
func (h *harness) Fatal(args ...any)                 { panic(fatal(fmt.Sprint(args...))) }
func (h *harness) Skipf(format string, args ...any)  { h.Fatalf("missing: "+format, args...) }
func (h *harness) Logf(format string, args ...any)   { fmt.Fprintf(os.Stderr, format+"\n", args...) }
func (h *harness) Cleanup(f func())                  { h.cleanups = append(h.cleanups, f) }
func (h *harness) TempDir() string {
	d, err := os.MkdirTemp(h.dir, "t")
	if err != nil {
		h.Fatalf("%v", err)
	}
	return d
}

// freeAddr is a free loopback address.
func freeAddr(h *harness) string { return "127.0.0.1:" + strconv.Itoa(peertest.FreePort(h)) }

// socksfwd starts the binary forwarding a free local port to target via
// proxy, and returns the local address and the process.
func (h *harness) socksfwd(bin, target, proxy string, extra ...string) (string, *peertest.Proc) {
	local := freeAddr(h)
	return local, h.startSocksfwd(bin, proxy, []string{local + ":" + target}, extra...)
}

// socksfwdUDP starts the binary forwarding a free local port to target
// over UDP (and TCP too, with tcp) via proxy, and returns the local address.
func (h *harness) socksfwdUDP(bin, target, proxy string, tcp bool) string {
	local := freeAddr(h)
	specs := []string{local + ":" + target + "/udp"}
	if tcp {
		specs = append([]string{local + ":" + target}, specs...)
	}
	h.startSocksfwd(bin, proxy, specs)
	return local
}

// startSocksfwd runs the binary with one -L per spec and waits until it has
// logged the last listener. Not a probe connection: it would reach the
// target (iperf3 counts it as a test).
func (h *harness) startSocksfwd(bin, proxy string, specs []string, extra ...string) *peertest.Proc {
	args := []string{bin}
	for _, spec := range specs {
		args = append(args, "-L", spec)
	}
	args = append(append(args, "-S", proxy, "--log-format", "json"), extra...)
	p := peertest.Start(h, "socksfwd", args...)
	last := `"message":"forwarding `
	if strings.HasSuffix(specs[len(specs)-1], "/udp") {
		last = `/udp →` // listeners log in -L order
	}
	peertest.WaitOutput(h, p, last)
	return p
}

// rssKB reads a process's resident set size from /proc.
func rssKB(h *harness, pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		h.Fatalf("%v", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			n, _ := strconv.Atoi(strings.Fields(v)[0])
			return n
		}
	}
	h.Fatalf("no VmRSS for pid %d", pid)
	return 0
}

// openFDs counts a process's open descriptors in /proc.
func openFDs(h *harness, pid int) int {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		h.Fatalf("%v", err)
	}
	return len(ents)
}

// cpuMillis reads a process's user plus system CPU time from /proc.
func cpuMillis(h *harness, pid int) int {
	t, ok := readProcStat(pid)
	if !ok {
		h.Fatalf("no /proc/%d/stat", pid)
	}
	return t.ticks * 10 // clock ticks are 10 ms (USER_HZ 100)
}

// readProcStat reads a process's command name and user plus system CPU
// time in clock ticks from /proc/PID/stat.
func readProcStat(pid int) (procTicks, bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return procTicks{}, false
	}
	s := string(b)
	open, closeIdx := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
	if open < 0 || closeIdx < open || closeIdx+2 > len(s) {
		return procTicks{}, false
	}
	// Fields after the parenthesised name; utime and stime are the 14th
	// and 15th fields of the whole line.
	f := strings.Fields(s[closeIdx+2:])
	if len(f) < 13 {
		return procTicks{}, false
	}
	ut, _ := strconv.Atoi(f[11])
	st, _ := strconv.Atoi(f[12])
	return procTicks{comm: s[open+1 : closeIdx], ticks: ut + st}, true
}

// settle gives a process a moment to finish handling what was just sent,
// before its memory is read. A measurement pause, not synchronisation.
func settle() { time.Sleep(300 * time.Millisecond) }
