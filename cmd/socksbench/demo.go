//go:build linux

package main

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"syscall"
	"time"

	"github.com/socksfwd/socksfwd/internal/peertest"
)

// demo: a target web server, microsocks with a username in front of it,
// socksfwd forwarding a local port through microsocks, and one real HTTP
// request through the forward.
func demo(h *harness, bin string) {
	fmt.Println("socksfwd demo: local client → socksfwd → microsocks (SOCKS5, username/password) → web server")

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		h.Fatalf("%v", err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from the target; this connection came from %s (the proxy)\n", r.RemoteAddr)
	}), ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln)
	h.Cleanup(func() { srv.Close() })
	target := ln.Addr().String()
	fmt.Printf("  target web server     http://%s/\n", target)

	ms := peertest.Microsocks(h, peertest.MicrosocksOptions{User: "demo", Password: "s3cr@t"})
	fmt.Printf("  microsocks            %s  (user demo)\n", ms.Addr)

	proxy := "socks5h://demo:s3cr%40t@" + ms.Addr
	local, p := h.socksfwd(bin, target, proxy, "--log-level", "debug")
	fmt.Printf("  socksfwd              -L %s:%s -S %s\n\n", local, target, strings.Replace(proxy, "s3cr%40t", "xxxxx", 1))

	client := &http.Client{Timeout: 10 * time.Second}
	resp, err := client.Get("http://" + local + "/")
	if err != nil {
		h.Fatalf("request through socksfwd failed: %v\n%s", err, p.Output())
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	fmt.Printf("GET http://%s/ → %s\n  %s\n", local, resp.Status, strings.TrimSpace(string(body)))

	client.CloseIdleConnections() // else the drain rightly waits for the keep-alive connection
	p.Signal(syscall.SIGTERM)
	if !p.Wait(10 * time.Second) {
		h.Fatalf("socksfwd did not stop on SIGTERM")
	}
	fmt.Println("socksfwd log:")
	for _, line := range strings.Split(strings.TrimSpace(p.Output()), "\n") {
		fmt.Println("  " + line)
	}
	if resp.StatusCode != http.StatusOK {
		h.Fatalf("unexpected status %s", resp.Status)
	}
	fmt.Println("demo OK: the request crossed socksfwd and microsocks; everything is stopped.")
}
