package main

import (
	"testing"
	"time"
)

// TestWatchdogInterval: the watchdog pings at half of WATCHDOG_USEC, and
// not at all when WATCHDOG_PID names another process.
func TestWatchdogInterval(t *testing.T) {
	for _, tc := range []struct {
		usec, pid string
		want      time.Duration
		err       bool
	}{
		{"", "", 0, false},
		{"30000000", "", 15 * time.Second, false},
		{"30000000", "4242", 15 * time.Second, false},
		{"30000000", "4243", 0, false},
		{"0", "", 0, true},
		{"soon", "", 0, true},
	} {
		env := map[string]string{"WATCHDOG_USEC": tc.usec, "WATCHDOG_PID": tc.pid}
		got, err := watchdogInterval(func(k string) string { return env[k] }, 4242)
		if got != tc.want || (err != nil) != tc.err {
			t.Errorf("WATCHDOG_USEC=%q WATCHDOG_PID=%q: %v, %v; want %v (error: %v)", tc.usec, tc.pid, got, err, tc.want, tc.err)
		}
	}
}
