//go:build !linux

package tunnel

import (
	"context"
	"net"
	"syscall"
	"time"

	"github.com/socksfwd/socksfwd/internal/allowlist"
)

// ListenTransparentUDP needs Linux (TPROXY is netfilter's).
func ListenTransparentUDP(addr string) (*net.UDPConn, error) {
	return nil, ErrTransparentNeedsLinux
}

// ControlTransparentUDP needs Linux.
func ControlTransparentUDP(network, address string, c syscall.RawConn) error {
	return ErrTransparentNeedsLinux
}

// TransparentUDP is a transparent UDP listener; it needs Linux.
type TransparentUDP struct {
	pc    *net.UDPConn
	stats TransparentUDPStats
}

// NewTransparentUDP returns a listener whose Serve fails: transparent
// mode needs Linux.
func NewTransparentUDP(cfg TransparentUDPConfig, pc *net.UDPConn) *TransparentUDP {
	return &TransparentUDP{pc: pc}
}

// Serve fails: transparent mode needs Linux.
func (t *TransparentUDP) Serve(ctx context.Context) error { return ErrTransparentNeedsLinux }

// Shutdown is Close.
func (t *TransparentUDP) Shutdown(ctx context.Context) error { return t.Close() }

// Close closes the socket it was given.
func (t *TransparentUDP) Close() error {
	if t.pc != nil {
		t.pc.Close()
	}
	return nil
}

// Addr is the listening address, nil without a socket.
func (t *TransparentUDP) Addr() net.Addr {
	if t.pc == nil {
		return nil
	}
	return t.pc.LocalAddr()
}

// Stats returns the counters, all zero.
func (t *TransparentUDP) Stats() *TransparentUDPStats { return &t.stats }

// Sessions is zero.
func (t *TransparentUDP) Sessions() int { return 0 }

// SetLimits does nothing: there are no sessions without Linux.
func (t *TransparentUDP) SetLimits(idleTimeout time.Duration, maxSessions int) {}

// SetAllow does nothing: there are no clients without Linux.
func (t *TransparentUDP) SetAllow(l *allowlist.List) {}

// TransparentUDPReplyLimits: nothing to say where transparent UDP cannot run.
func TransparentUDPReplyLimits() []string { return nil }
