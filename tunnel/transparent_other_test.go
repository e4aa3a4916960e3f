//go:build !linux

package tunnel

import (
	"context"
	"net"
	"testing"
)

func TestTransparentNeedsLinux(t *testing.T) {
	if _, err := ListenTransparent(context.Background(), "tcp", "127.0.0.1:0", nil); err == nil || err.Error() != "transparent mode needs Linux" {
		t.Errorf("ListenTransparent: err = %v", err)
	}
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	if _, err := OriginalDestination(a); err == nil || err.Error() != "transparent mode needs Linux" {
		t.Errorf("OriginalDestination: err = %v", err)
	}
}
