//go:build !linux

package sockdiag

import (
	"errors"
	"testing"
)

// Without socket diagnostics Open says so in a way callers can test.
func TestOpenUnsupported(t *testing.T) {
	q, err := Open()
	if q != nil || !errors.Is(err, errors.ErrUnsupported) {
		t.Fatalf("Open = %v, %v; want nil and errors.ErrUnsupported", q, err)
	}
}
