//go:build unix

package main

import (
	"bufio"
	"io"
	"os"
	"strings"
	"syscall"
	"testing"

	"github.com/socksfwd/socksfwd/internal/testnet"
)

// TestSIGHUPDoesNotKill: a real SIGHUP delivered to the process reloads
// (it used to kill socksfwd with exit 129).
func TestSIGHUPDoesNotKill(t *testing.T) {
	verifyNoLeaks(t)
	echo := testnet.Echo(t).Addr().String()
	socks := newSocks(t)
	port := freePort(t)
	pr, pw := io.Pipe()
	exit := make(chan int, 1)
	go func() {
		exit <- run([]string{"socksfwd", "--log-format", "json", "-S", socks.Addr(), "-L", "127.0.0.1:" + port + ":" + echo}, io.Discard, pw, noEnv)
		pw.Close()
	}()
	sc := bufio.NewScanner(pr)
	waitLine := func(want string) {
		t.Helper()
		for sc.Scan() {
			if strings.Contains(sc.Text(), want) {
				return
			}
		}
		t.Fatalf("no log line with %q", want)
	}
	waitLine("forwarding")
	syscall.Kill(os.Getpid(), syscall.SIGHUP)
	waitLine("reloaded")
	if err := echoOnce("127.0.0.1:"+port, "after SIGHUP"); err != nil {
		t.Fatal(err)
	}
	syscall.Kill(os.Getpid(), syscall.SIGTERM)
	waitLine("stopped")
	go io.Copy(io.Discard, pr)
	if code := <-exit; code != exitOK {
		t.Fatalf("exit %d, want 0", code)
	}
}
