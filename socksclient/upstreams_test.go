package socksclient

import (
	"context"
	"errors"
	"io"
	"net"
	"testing"
	"time"
)

// TestUpstreamsBackoff: a failed upstream is tried last for 1 s, doubling
// to 30 s; success resets it; a REP about the target is no failover.
func TestUpstreamsBackoff(t *testing.T) {
	var tried []string
	fail := errors.New("unreachable")
	dialer := func(name string, err *error) *Dialer {
		return &Dialer{ProxyAddr: name, ProxyDial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			tried = append(tried, name)
			if *err != nil {
				return nil, *err
			}
			// A working server: answer the greeting and the CONNECT for "db:1".
			c, srv := net.Pipe()
			go func() {
				defer srv.Close()
				io.ReadFull(srv, make([]byte, 3))
				srv.Write([]byte{5, 0})
				io.ReadFull(srv, make([]byte, 9))
				srv.Write([]byte{5, 0, 0, 1, 0, 0, 0, 0, 0, 0})
			}()
			return c, nil
		}}
	}
	primaryErr, secondaryErr := fail, fail
	u := NewUpstreams(dialer("primary", &primaryErr), dialer("secondary", &secondaryErr))
	now := time.Unix(1000, 0)
	u.now = func() time.Time { return now }
	target := Addr{Name: "db", Port: 1}

	_, _, err := u.DialAddr(context.Background(), target)
	if err == nil || len(tried) != 2 {
		t.Fatalf("err = %v, tried %v", err, tried)
	}
	// Both in backoff: still tried, in order, so a returning server is found.
	tried = nil
	u.DialAddr(context.Background(), target)
	if len(tried) != 2 || tried[0] != "primary" {
		t.Fatalf("tried %v", tried)
	}
	// Backoff doubled for both (1 s, then 2 s). After 1.5 s both are still down.
	now = now.Add(1500 * time.Millisecond)
	if got := u.order(); u.dialers[got[0]].ProxyAddr != "primary" || !now.Before(u.state[0].downUntil) {
		t.Fatalf("primary should still be in backoff: %+v", u.state[0])
	}
	if u.state[0].backoff != 2*time.Second {
		t.Fatalf("backoff = %v, want 2s", u.state[0].backoff)
	}
	// The secondary comes back and wins once its backoff ends; it resets.
	secondaryErr = nil
	now = now.Add(time.Second)
	u.state[0].downUntil = now.Add(time.Hour) // primary still down
	tried = nil
	conn, _, err := u.DialAddr(context.Background(), target)
	if err != nil {
		t.Fatal(err)
	}
	conn.Close()
	if tried[0] != "secondary" || u.state[1].backoff != 0 {
		t.Fatalf("tried %v, secondary state %+v", tried, u.state[1])
	}
	for range 10 {
		u.markDown(0)
	}
	if u.state[0].backoff != maxBackoff {
		t.Fatalf("backoff = %v, want capped at %v", u.state[0].backoff, maxBackoff)
	}
	if !IsUpstreamFailure(fail) || IsUpstreamFailure(&ReplyError{Cmd: CmdConnect, Code: RepConnectionRefused}) ||
		!IsUpstreamFailure(&ReplyError{Cmd: CmdUDPAssociate, Code: RepCommandNotSupported}) {
		t.Fatal("IsUpstreamFailure misclassifies")
	}
}
