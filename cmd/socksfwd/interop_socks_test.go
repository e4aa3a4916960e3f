package main

import (
	"context"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/rogpeppe/go-internal/testscript"
	"golang.org/x/net/proxy"
)

// xproxyget SOCKS USER:PASS URL: fetch URL with a Go client dialing
// through the SOCKS5 server at SOCKS by golang.org/x/net/proxy (RFC 1929
// with USER:PASS, - for none), and print the body. x/net/proxy sends the
// URL's host name as a name, so it is the server's to resolve.
func cmdXProxyGet(ts *testscript.TestScript, neg bool, args []string) {
	if len(args) != 3 {
		ts.Fatalf("usage: xproxyget SOCKS USER:PASS|- URL")
	}
	var auth *proxy.Auth
	if args[1] != "-" {
		user, pass, _ := strings.Cut(args[1], ":")
		auth = &proxy.Auth{User: user, Password: pass}
	}
	d, err := proxy.SOCKS5("tcp", args[0], auth, &net.Dialer{Timeout: 10 * time.Second})
	ts.Check(err)
	client := &http.Client{
		Timeout: 20 * time.Second,
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				return d.(proxy.ContextDialer).DialContext(ctx, network, addr)
			},
		},
	}
	defer client.CloseIdleConnections()
	res, err := client.Get(args[2])
	if neg {
		if err == nil {
			res.Body.Close()
			ts.Fatalf("GET %s through %s: %s, want an error", args[2], args[0], res.Status)
		}
		ts.Logf("GET %s: %v", args[2], err)
		return
	}
	ts.Check(err)
	defer res.Body.Close()
	body, err := io.ReadAll(res.Body)
	ts.Check(err)
	ts.Stdout().Write(body)
}
