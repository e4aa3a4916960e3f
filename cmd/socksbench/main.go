// Command socksbench is the driver behind `make demo` and `make bench`.
//
//	socksbench demo    forward a real request through socksfwd and microsocks
//	socksbench bench   measure socksfwd beside direct and proxychains4, same run
//
// It starts its peers with internal/peertest and stops them on the way out.
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
)

func main() {
	fs := flag.NewFlagSet("socksbench", flag.ExitOnError)
	bin := fs.String("socksfwd", "bin/socksfwd", "the socksfwd binary to drive")
	secs := fs.Int("seconds", 5, "duration of each timed run")
	conns := fs.Int("idle-conns", 1000, "idle connections held for the memory measurement")
	fs.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: socksbench [flags] demo|bench")
		fs.PrintDefaults()
	}
	fs.Parse(os.Args[1:])
	if fs.NArg() != 1 {
		fs.Usage()
		os.Exit(2)
	}
	abs, err := filepath.Abs(*bin)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	h := newHarness()
	code := h.run(func() {
		switch fs.Arg(0) {
		case "demo":
			demo(h, abs)
		case "bench":
			bench(h, benchConfig{socksfwd: abs, seconds: *secs, idleConns: *conns})
		default:
			fs.Usage()
			h.Fatalf("unknown command %q", fs.Arg(0))
		}
	})
	os.Exit(code)
}
