package peertest

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"

	"golang.org/x/sys/unix"
)

// InNetns runs f on an OS thread that has joined the network namespace
// name (one that `ip netns add` made, as NewNetns does): the sockets f
// opens live in that namespace, and stay there when other goroutines use
// them later. f must open its sockets on its own goroutine, as a dial or
// listen on a literal address does; a name lookup or a dual-stack dial
// may start goroutines that run in the test's namespace.
//
// A panic in f (a testscript Fatalf) is raised again in the caller; f must
// not call t.Fatal, whose runtime.Goexit would end only f's goroutine (it
// is reported as an error instead). The thread goes back to its own
// namespace afterwards.
func InNetns(name string, f func() error) error {
	type result struct {
		err      error
		panicked any
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		returned := false
		defer func() {
			if r := recover(); r != nil {
				done <- result{panicked: r}
			} else if !returned {
				done <- result{err: errors.New("InNetns: f called runtime.Goexit (t.Fatal?)")}
			}
		}()
		home, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			returned = true
			done <- result{err: fmt.Errorf("InNetns: this thread's network namespace: %w", err)}
			return
		}
		defer unix.Close(home)
		defer func() {
			// Back home, so that the runtime may reuse the thread. Were it
			// to end with this goroutine, every peer started from it (by
			// whichever goroutine ran there before) would get its
			// Pdeathsig. If going back fails, the thread stays locked and
			// ends, rather than run other goroutines in the wrong namespace.
			if unix.Setns(home, unix.CLONE_NEWNET) == nil {
				runtime.UnlockOSThread()
			}
		}()
		if err := joinNetns(name); err != nil {
			returned = true
			done <- result{err: err}
			return
		}
		err = f()
		returned = true
		done <- result{err: err}
	}()
	r := <-done
	if r.panicked != nil {
		panic(r.panicked)
	}
	return r.err
}

// joinNetns moves the calling thread into namespace name.
func joinNetns(name string) error {
	fd, err := unix.Open(filepath.Join("/run/netns", name), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("network namespace %s: %w", name, err)
	}
	defer unix.Close(fd)
	if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
		return fmt.Errorf("join network namespace %s: %w", name, err)
	}
	return nil
}

// Sysctl sets net.* sysctls (dotted names, as sysctl(8) takes them) in
// namespace ns: /proc/sys/net belongs to the namespace of the thread that
// opens it.
func Sysctl(ns string, settings map[string]string) error {
	return InNetns(ns, func() error {
		for key, value := range settings {
			path := filepath.Join(append([]string{"/proc/sys"}, strings.Split(key, ".")...)...)
			if err := os.WriteFile(path, []byte(value), 0o644); err != nil {
				return fmt.Errorf("sysctl %s=%s in %s: %w", key, value, ns, err)
			}
		}
		return nil
	})
}
