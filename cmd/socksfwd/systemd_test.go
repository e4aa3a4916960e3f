package main

import (
	"net/netip"
	"strings"
	"testing"
	"time"
)

// TestMatchPassed: each socket systemd passed goes to one listener of its
// kind, by FileDescriptorName first (at the socket's address when a name
// fits two listeners), then by address; one that fits nothing, or whose
// listener another socket took, is an error naming it.
func TestMatchPassed(t *testing.T) {
	cfg := defaultConfig()
	cfg.Server = []string{"127.0.0.1:1080"}
	cfg.Local = []string{"5432:db:5432", "localhost:6000:db:6000", "5353:db:53/udp", "*:7000:db:7000"}
	cfg.DNS = "127.0.0.1:5300"
	cfg.DNSUpstream = []string{"10.0.0.53"}
	cfg.Transparent = []string{"12345", "12345/udp"}
	cfg.HTTP = "3128"
	p, err := buildPlan(cfg)
	if err != nil {
		t.Fatal(err)
	}
	type sock struct {
		name   string
		stream bool
		addr   string
	}
	for _, tc := range []struct {
		what   string
		passed []sock
		want   []string // keys, in the order of passed
		err    string
	}{
		{"tcp by address", []sock{{"", true, "127.0.0.1:5432"}}, []string{"tcp 127.0.0.1:5432"}, ""},
		{"tcp by name elsewhere", []sock{{"local-5432", true, "127.0.0.2:5432"}}, []string{"tcp 127.0.0.1:5432"}, ""},
		{"a name for two listeners: the one at its address first",
			[]sock{{"local-6000", true, "127.0.0.2:6000"}, {"local-6000", true, "[::1]:6000"}},
			[]string{"tcp 127.0.0.1:6000", "tcp [::1]:6000"}, ""},
		{"dns pair by address", []sock{{"", false, "127.0.0.1:5300"}, {"", true, "127.0.0.1:5300"}}, []string{"dns 127.0.0.1:5300", "dns 127.0.0.1:5300"}, ""},
		{"dns by name", []sock{{"dns-5300", false, "[::]:5300"}}, []string{"dns 127.0.0.1:5300"}, ""},
		{"udp by address", []sock{{"", false, "127.0.0.1:5353"}}, []string{"udp 127.0.0.1:5353"}, ""},
		{"all interfaces, dual-stack", []sock{{"", true, "[::]:7000"}}, []string{"tcp :7000"}, ""},
		{"all interfaces, IPv4", []sock{{"", true, "0.0.0.0:7000"}}, []string{"tcp :7000"}, ""},
		{"transparent tcp and udp", []sock{{"", true, "127.0.0.1:12345"}, {"transparent-12345", false, "0.0.0.0:12345"}},
			[]string{"transparent 127.0.0.1:12345", "transparent-udp 127.0.0.1:12345"}, ""},
		{"http by address", []sock{{"", true, "127.0.0.1:3128"}}, []string{"http 127.0.0.1:3128"}, ""},
		{"http by name elsewhere", []sock{{"http-3128", true, "[::]:3128"}}, []string{"http 127.0.0.1:3128"}, ""},
		{"a datagram socket for http", []sock{{"http-3128", false, "127.0.0.1:3128"}}, nil, "socket http-3128 (udp 127.0.0.1:3128)"},
		{"a stream socket where only udp listens", []sock{{"", true, "127.0.0.1:5353"}}, nil, "socket LISTEN_FD_3 (tcp 127.0.0.1:5353) passed by systemd matches no listener"},
		{"an unknown name elsewhere", []sock{{"web", true, "127.0.0.1:8080"}}, nil, "socket web (tcp 127.0.0.1:8080)"},
		{"two sockets for one listener", []sock{{"", true, "127.0.0.1:5432"}, {"second", true, "127.0.0.1:5432"}}, nil, "socket second (tcp 127.0.0.1:5432)"},
	} {
		var passed []*passedSocket
		for i, s := range tc.passed {
			name := s.name
			if name == "" {
				name = "LISTEN_FD_" + string(rune('3'+i))
			}
			passed = append(passed, &passedSocket{name: name, stream: s.stream, addr: netip.MustParseAddrPort(s.addr)})
		}
		err := matchPassed(passed, p.listens)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%s: %v, want an error with %q", tc.what, err, tc.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", tc.what, err)
			continue
		}
		for i, p := range passed {
			if p.key != tc.want[i] {
				t.Errorf("%s: socket %s went to %q, want %q", tc.what, p.name, p.key, tc.want[i])
			}
		}
	}
}

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
