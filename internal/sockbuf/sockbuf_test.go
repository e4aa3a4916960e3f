package sockbuf

import (
	"errors"
	"math"
	"testing"
)

func TestIsLoopback(t *testing.T) {
	for _, tc := range []struct {
		address string
		want    bool
	}{
		{"127.0.0.1:1080", true},
		{"127.3.4.5:1", true},
		{"[::1]:1080", true},
		{"[::ffff:127.0.0.1]:1080", true},
		{"0.0.0.0:1080", false}, // peers from anywhere
		{"[::]:1080", false},
		{"192.0.2.1:1080", false},
		{"[2001:db8::1]:1080", false},
		{"localhost:1080", false}, // Control sees addresses, never names
		{"garbage", false},
	} {
		if got := isLoopback(tc.address); got != tc.want {
			t.Errorf("isLoopback(%q) = %v, want %v", tc.address, got, tc.want)
		}
	}
}

// growTo settles on the largest size the system takes, halving from Size,
// and gives up below minGrowSize.
func TestGrowTo(t *testing.T) {
	for _, tc := range []struct {
		name  string
		limit int // the largest size the fake system takes
		want  int
	}{
		{"takes Size", Size, Size},
		{"clamps silently", math.MaxInt, Size}, // as Linux does; 1 << 40 overflows a 32-bit int
		{"refuses above 2 MiB", 2 << 20, 2 << 20},
		{"refuses 2 MiB", 1864135, 1 << 20}, // FreeBSD by default: kern.ipc.maxsockbuf 2 MiB, less its overhead
		{"takes only the smallest", minGrowSize, minGrowSize},
		{"takes nothing", minGrowSize - 1, 0},
	} {
		var asked []int
		got := growTo(func(n int) error {
			asked = append(asked, n)
			if n > tc.limit {
				return errors.New("no buffer space available")
			}
			return nil
		})
		if got != tc.want {
			t.Errorf("%s: growTo = %d after asking %v, want %d", tc.name, got, asked, tc.want)
		}
		if len(asked) > 7 {
			t.Errorf("%s: asked %d times: %v", tc.name, len(asked), asked)
		}
	}
}
