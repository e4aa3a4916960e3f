package socksclient

import (
	"context"
	"net"
	"slices"
	"time"
)

// Negotiation is what Negotiate saw of a proxy's part of the handshake.
type Negotiation struct {
	// Offered are the methods the greeting offered.
	Offered []AuthMethod
	// Reached: the TCP connection to the proxy was made, in ConnectTime.
	Reached     bool
	ConnectTime time.Duration
	// Answered: the proxy chose a method, Method (MethodNoAcceptable when
	// it accepted none of those offered). HandshakeTime runs from the
	// connection to the end of method selection and, when Method is
	// username/password, of authentication.
	Answered      bool
	Method        AuthMethod
	HandshakeTime time.Duration
}

// Negotiate connects to the proxy, selects a method and authenticates as
// every request does, then closes without sending a request: it tells
// whether the proxy can be reached and accepts these credentials, without
// asking it to reach anything. The whole exchange is bounded by
// HandshakeTimeout. Errors are *net.OpError with Op "socks handshake";
// errors.Is finds ErrAuthFailed, ErrNoAcceptableMethods and
// ErrCredentialsRequired. The Negotiation is filled in as far as it got,
// on failure too.
func (d *Dialer) Negotiate(ctx context.Context) (Negotiation, error) {
	n := Negotiation{Offered: slices.Clone(d.offered())}
	timeout := d.handshakeTimeout()
	hctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	start := time.Now()
	conn, err := d.dialProxy(hctx)
	if err != nil {
		return n, d.negotiateError(timeoutCause(ctx, hctx, timeout, err, stageConnect))
	}
	defer conn.Close()
	n.Reached, n.ConnectTime = true, time.Since(start)

	start = time.Now()
	stop := context.AfterFunc(hctx, func() { conn.SetDeadline(aLongTimeAgo) })
	var buf [8 + 2*256]byte
	defer clear(buf[:]) // it held the password
	n.Method, n.Answered, err = d.greet(conn, buf[:0])
	n.HandshakeTime = time.Since(start)
	if !stop() {
		stage := stageGreeting
		if n.Answered {
			stage = stageAuth
		}
		err = timeoutCause(ctx, hctx, timeout, hctx.Err(), stage)
	}
	if err != nil {
		return n, d.negotiateError(err)
	}
	return n, nil
}

func (d *Dialer) negotiateError(err error) error {
	return &net.OpError{Op: "socks handshake", Net: "tcp", Source: proxyAddr(d.ProxyAddr), Err: err}
}
