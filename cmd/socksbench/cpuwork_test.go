//go:build linux

package main

import (
	"math"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// Each round's figure is that round's CPU over that round's work, and the
// line gives the median of those, not the median CPU over the median rate.
func TestCPULineIsMedianOfRoundFigures(t *testing.T) {
	rows := []result{
		// 8 Gbit/s over 2 s is 2 GB: 800 ms is 400 ms per GB; then 600 and 500.
		{way: "socksfwd", rounds: []float64{8, 4, 8}, cpu: []float64{800, 600, 1000}, secs: 2},
		{way: "proxychains4", rounds: []float64{8, 8, 8}, cpu: []float64{200, 200, 200}, secs: 2},
		{way: "gost", rounds: []float64{8, 0, 8}, cpu: []float64{math.NaN(), 300, math.NaN()}, secs: 2},
	}
	got := cpuLine("Gbit/s", rows)
	want := "CPU per GB: socksfwd 500 ms | proxychains4 client 100 ms"
	if !strings.HasSuffix(got, want) {
		t.Errorf("cpuLine = %q, want it to end %q (gost has no round with both CPU and work)", got, want)
	}
	conns := cpuLine("conn/s", []result{{way: "redsocks", rounds: []float64{1000}, cpu: []float64{300}, secs: 3}})
	if !strings.HasSuffix(conns, "CPU per connection: redsocks 100 µs") {
		t.Errorf("cpuLine for connections = %q", conns)
	}
	if line := cpuLine("Gbit/s", []result{{way: "dante-bind", rounds: []float64{5}, cpu: []float64{math.NaN()}, secs: 3}}); line != "" {
		t.Errorf("cpuLine without a known CPU = %q, want none", line)
	}
}

// A way's CPU is its forwarder's process, or the client's where the hop
// runs inside the client or there is none.
func TestWayCPU(t *testing.T) {
	s := cpuSpent{byComm: map[string]float64{"socksfwd": 10, "gost": 20, "redsocks": 30, "privoxy": 40}, client: 5}
	for way, want := range map[string]float64{
		"socksfwd": 10, "transparent": 10, "socksfwd-http": 10, "-R": 10, "tproxy": 10,
		"gost": 20, "gost-socks5": 20, "redsocks": 30, "privoxy": 40,
		"proxychains4": 5, "direct": 5,
	} {
		if got, ok := s.wayCPU(way); !ok || got != want {
			t.Errorf("wayCPU(%q) = %v, %v; want %v", way, got, ok, want)
		}
	}
	if _, ok := s.wayCPU("dante-connect"); ok {
		t.Error("wayCPU(dante-connect): its client is this process, want no figure")
	}
}
