package socksclient_test

import (
	"context"
	"errors"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/socksfwd/socksfwd/internal/testnet"
	"github.com/socksfwd/socksfwd/socksclient"
	"github.com/socksfwd/socksfwd/socksclient/sockstest"
)

// TestNegotiateTranscript: the exact greeting and RFC 1929 bytes, and
// nothing after them (no request).
func TestNegotiateTranscript(t *testing.T) {
	addr, errc := transcriptServer(t, []step{
		{expect: "05 02 00 02", send: "05 02"},
		{expect: "01 01 'u' 02 'pw'", send: "01 00"},
	})
	d := socksclient.Dialer{ProxyAddr: addr, Username: "u", Password: "pw", HandshakeTimeout: 5 * time.Second}
	n, err := d.Negotiate(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if !n.Reached || !n.Answered || n.Method != socksclient.MethodUserPass ||
		!slices.Equal(n.Offered, []socksclient.AuthMethod{socksclient.MethodNoAuth, socksclient.MethodUserPass}) {
		t.Fatalf("negotiation %+v", n)
	}
}

func TestNegotiate(t *testing.T) {
	users := map[string]string{"u": "right"}
	tests := []struct {
		name     string
		cfg      sockstest.Config
		dialer   socksclient.Dialer
		answered bool
		method   socksclient.AuthMethod
		is       error // nil: success
		want     string
	}{
		{name: "no auth", answered: true, method: socksclient.MethodNoAuth},
		{name: "username", cfg: sockstest.Config{Users: users}, dialer: socksclient.Dialer{Username: "u", Password: "right"}, answered: true, method: socksclient.MethodUserPass},
		{name: "wrong password", cfg: sockstest.Config{Users: users}, dialer: socksclient.Dialer{Username: "u", Password: "wrong"}, answered: true, method: socksclient.MethodUserPass, is: socksclient.ErrAuthFailed, want: "authentication failed"},
		{name: "no credentials", cfg: sockstest.Config{Users: users}, answered: true, method: socksclient.MethodNoAcceptable, is: socksclient.ErrNoAcceptableMethods, want: "none of the offered"},
		{name: "hang", cfg: sockstest.Config{Fault: sockstest.FaultHangAfterGreeting}, dialer: socksclient.Dialer{HandshakeTimeout: 100 * time.Millisecond}, is: context.DeadlineExceeded, want: "handshake timed out after 100ms"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			srv, err := sockstest.NewServer(tc.cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer srv.Close()
			d := tc.dialer
			d.ProxyAddr = srv.Addr()
			if d.HandshakeTimeout == 0 {
				d.HandshakeTimeout = 5 * time.Second
			}
			n, err := d.Negotiate(context.Background())
			if tc.is == nil && err != nil || tc.is != nil && !errors.Is(err, tc.is) {
				t.Fatalf("err = %v, want %v", err, tc.is)
			}
			if err != nil {
				var op *net.OpError
				if !errors.As(err, &op) || op.Op != "socks handshake" || !strings.Contains(err.Error(), srv.Addr()) || !strings.Contains(err.Error(), tc.want) {
					t.Errorf("err = %q, want a *net.OpError naming the proxy and %q", err, tc.want)
				}
				if strings.Contains(err.Error(), "wrong") {
					t.Errorf("err = %q shows the password", err)
				}
			}
			if !n.Reached || n.Answered != tc.answered || tc.answered && n.Method != tc.method {
				t.Errorf("negotiation %+v, want answered %v with %s", n, tc.answered, tc.method)
			}
			if srv.Requests() != 0 {
				t.Errorf("the proxy got %d requests, want none", srv.Requests())
			}
		})
	}
}

func TestNegotiateDeadProxy(t *testing.T) {
	dead := testnet.ClosedPort(t)
	d := socksclient.Dialer{ProxyAddr: dead}
	n, err := d.Negotiate(context.Background())
	if err == nil || n.Reached || !strings.Contains(err.Error(), dead) || !strings.Contains(err.Error(), "refused") {
		t.Fatalf("negotiation %+v, err = %v; want unreached, an error naming %s", n, err, dead)
	}
}
