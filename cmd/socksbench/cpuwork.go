//go:build linux

package main

import (
	"fmt"
	"math"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// cpuSpent is what one timed run cost in CPU: milliseconds by command name
// of the processes alive at its end, and of the clients this process
// started and waited for during it. A client has exited by the time it is
// read, so /proc no longer has it; the kernel adds a waited-for child's
// time to its parent's RUSAGE_CHILDREN instead, wrapper and all
// (proxychains4 and setpriv exec the client in their own process).
type cpuSpent struct {
	byComm map[string]float64
	client float64
	secs   float64 // since the snapshot, wall clock
}

// childrenCPU is the user plus system CPU time of every child this process
// has waited for.
func childrenCPU() time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_CHILDREN, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// spent is the CPU used since the snapshot; see cpuSpent. A process born
// since then counts whole (Dante forks children under load); one that
// exited without being this process's child is missed, so a forwarder
// must be read before it is stopped.
func (c *cpuSnapshot) spent() cpuSpent {
	s := cpuSpent{byComm: map[string]float64{}, client: float64(childrenCPU()-c.children) / 1e6, secs: time.Since(c.at).Seconds()}
	for pid, t := range readTicks() {
		s.byComm[t.comm] += float64(t.ticks-c.ticks[pid].ticks) * 10 // USER_HZ 100
	}
	return s
}

// percent is comm's CPU in s, in percent of one core.
func (s cpuSpent) percent(comm string) float64 { return s.byComm[comm] / 10 / s.secs }

// wayCPU is the CPU of the process doing a way's forwarding: the
// forwarder's own process, or, for a way whose hop runs inside the client
// (proxychains4) or that has none (direct), the client's. ok is false for
// ways whose forwarding runs in this process or nowhere measurable, and
// when nothing was measured (a run that did not call meter.timed).
func (s cpuSpent) wayCPU(way string) (ms float64, ok bool) {
	who, client := wayProcess(way)
	switch {
	case s.byComm == nil:
		return 0, false
	case client:
		return s.client, true
	case who != "":
		return s.byComm[who], true
	}
	return 0, false
}

// socksfwdComm is the command name the kernel shows for the socksfwd
// binary the bench drives (-socksfwd): its file name, cut to the 15
// bytes /proc keeps, so that a binary under another name is still found.
var socksfwdComm = "socksfwd"

// commOf is the command name the kernel keeps for a program at path.
func commOf(path string) string {
	name := filepath.Base(path)
	if len(name) > 15 {
		name = name[:15]
	}
	return name
}

// wayProcess is the command name of a way's forwarder, or client when the
// way's cost is the client's own (proxychains4's hop, or no hop).
func wayProcess(way string) (comm string, client bool) {
	switch {
	case way == "direct" || way == "proxychains4":
		return "", true
	case strings.HasPrefix(way, "socksfwd"), way == "transparent", way == "transparent-tproxy",
		way == "tproxy", way == "-L", way == "-R":
		return socksfwdComm, false
	case strings.HasPrefix(way, "gost"):
		return "gost", false
	case way == "redsocks", way == "privoxy":
		return way, false
	}
	return "", false
}

// wayLabel names whose CPU a way's figure is: "proxychains4 client" where
// the client's.
func wayLabel(way string) string {
	if _, client := wayProcess(way); client {
		return way + " client"
	}
	return way
}

// workUnit turns a row's rate over a run into units of work and names the
// CPU figure per unit: per GB in ms, per connection in µs.
type workUnit struct {
	label string                        // "CPU per GB"
	cost  string                        // unit of the figure: "ms", "µs"
	perMs float64                       // figure units per CPU millisecond
	work  func(v, secs float64) float64 // units done at rate v over secs
}

var workUnits = map[string]workUnit{
	"Gbit/s": {"CPU per GB", "ms", 1, func(v, secs float64) float64 { return v * secs / 8 }},
	"conn/s": {"CPU per connection", "µs", 1000, func(v, secs float64) float64 { return v * secs }},
}

// perUnit is CPU per unit of work, in the unit's figure, for one run; NaN
// when the run did no work or its CPU is unknown.
func (u workUnit) perUnit(cpuMs, v, secs float64) float64 {
	w := u.work(v, secs)
	if w <= 0 || math.IsNaN(cpuMs) {
		return math.NaN()
	}
	return cpuMs * u.perMs / w
}

// cpuLine is a row's line of CPU per unit of work, each way's figure the
// median of its rounds' (each round's CPU over that round's work), e.g.
// "CPU per GB: socksfwd 412 ms | proxychains4 client 380 ms"; "" when no
// way has one.
func cpuLine(unit string, rows []result) string {
	u, ok := workUnits[unit]
	if !ok {
		return ""
	}
	var parts []string
	for _, r := range rows {
		var each []float64
		for i, v := range r.rounds {
			if i < len(r.cpu) {
				if c := u.perUnit(r.cpu[i], v, r.secs); !math.IsNaN(c) {
					each = append(each, c)
				}
			}
		}
		if len(each) > 0 {
			parts = append(parts, fmt.Sprintf("%s %.0f %s", wayLabel(r.way), median(each), u.cost))
		}
	}
	if len(parts) == 0 {
		return ""
	}
	return fmt.Sprintf("\n%-26s   %s: %s", "", u.label, strings.Join(parts, " | "))
}

// perItem formats CPU per item of a single run in µs ("socksfwd 3.1 µs
// per datagram"), or "" when the way's CPU is unknown or nothing was done.
func perItem(s cpuSpent, way, item string, items float64) string {
	ms, ok := s.wayCPU(way)
	if !ok || items <= 0 {
		return ""
	}
	return fmt.Sprintf("  %s CPU %.1f µs per %s", wayLabel(way), ms*1000/items, item)
}
