package main

import "testing"

// TestMarkText: --mark takes any 32-bit mark, decimal or hex, the top bit
// included, and nothing wider or negative; it prints back as hex.
func TestMarkText(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Mark
		ok   bool
	}{
		{"0x438", 0x438, true},
		{"1080", 1080, true},
		{"0x80000000", 0x80000000, true},
		{"4294967295", 0xffffffff, true},
		{"0xffffffff", 0xffffffff, true},
		{"4294967296", 0, false},
		{"-1", 0, false},
		{"lots", 0, false},
	} {
		var m Mark
		err := m.UnmarshalText([]byte(tc.in))
		if (err == nil) != tc.ok || m != tc.want {
			t.Errorf("%q: %#x (%v), want %#x ok=%v", tc.in, uint32(m), err, uint32(tc.want), tc.ok)
			continue
		}
		if !tc.ok {
			continue
		}
		b, _ := m.MarshalText()
		var back Mark
		if err := back.UnmarshalText(b); err != nil || back != m {
			t.Errorf("%q: printed %s, read back %#x (%v)", tc.in, b, uint32(back), err)
		}
	}
}
