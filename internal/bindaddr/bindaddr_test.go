package bindaddr

import "testing"

func TestNetwork(t *testing.T) {
	for addr, want := range map[string]string{
		"0.0.0.0:53": "udp4", "127.0.0.1:53": "udp4", "[::]:53": "udp", "[::1]:53": "udp", ":53": "udp", "[::ffff:1.2.3.4]:53": "udp4", "[::ffff:0.0.0.0]:53": "udp4",
	} {
		if got := Network("udp", addr); got != want {
			t.Errorf("Network(udp, %s) = %s, want %s", addr, got, want)
		}
	}
}
