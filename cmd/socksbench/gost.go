//go:build linux

package main

import (
	"fmt"
	"os/exec"
	"strings"

	"github.com/socksfwd/socksfwd/internal/peertest"
)

// gost (github.com/go-gost/gost, v3) is an optional peer in the TCP and
// --http rows: a forwarder and proxy written in Go that users chain to a
// SOCKS5 server as they would socksfwd. No Debian package ships it and the
// Go module proxy does not serve its modules, so the bench takes the
// `gost` on PATH, built from its sources, and leaves its rows out without.
const gostMissing = "gost: not on PATH (build it from github.com/go-gost/gost)"

// wayGostForward is gost's TCP forward (-L tcp://) in the TCP rows, beside
// socksfwd -L.
const wayGostForward = "gost"

// lookGost returns the gost binary on PATH, after printing its version, or
// "" after printing gostMissing: once per bench part, where its rows would
// have been.
func lookGost() string {
	bin, err := exec.LookPath("gost")
	if err != nil {
		fmt.Println(gostMissing)
		return ""
	}
	out, _ := exec.Command(bin, "-V").CombinedOutput()
	version, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	fmt.Printf("gost: %s (%s)\n", version, bin)
	return bin
}

// startGost runs gost with one listener, listen (a gost -L URL on local),
// chained to the SOCKS5 proxy, and waits until it says it listens on
// local: not a probe connection, which a forward would carry on to its
// target (iperf3 takes any connection as a test). gost v3 prints
// "listening on ADDR/tcp", v2 "URL on ADDR".
func (h *harness) startGost(bin, listen, local, proxy string) *peertest.Proc {
	p := peertest.Start(h, "gost", bin, "-L", listen, "-F", "socks5://"+proxy)
	peertest.WaitOutput(h, p, " on "+local)
	return p
}

// gostForward starts gost forwarding a free port to target through proxy
// (-L tcp://), the counterpart of socksfwd -L, and returns the local
// address.
func (h *harness) gostForward(bin, target, proxy string) (string, *peertest.Proc) {
	local := freeAddr(h)
	return local, h.startGost(bin, "tcp://"+local+"/"+target, local, proxy)
}

// gostProxy starts a gost proxy listener of scheme on a free port, chained
// to proxy, and returns its address: "http" is the counterpart of socksfwd
// --http, "socks5" of a local SOCKS5 server door.
func (h *harness) gostProxy(bin, scheme, proxy string) (string, *peertest.Proc) {
	local := freeAddr(h)
	return local, h.startGost(bin, scheme+"://"+local, local, proxy)
}
