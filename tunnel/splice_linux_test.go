//go:build linux

package tunnel

import (
	"bytes"
	"io"
	"os"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"golang.org/x/sys/unix"

	"github.com/socksfwd/socksfwd/internal/peertest"
)

// openPipes counts this process's pipe descriptors: what a spliced
// session would hold beyond its sockets. Sockets are not counted, since
// those of earlier tests may still be closing while this one counts.
func openPipes(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		peertest.Missing(t, "no /proc/self/fd: %v", err) // fails under CI=true
	}
	n := 0
	for _, e := range ents {
		if target, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && strings.HasPrefix(target, "pipe:") {
			n++
		}
	}
	return n
}

// waitPipesLent waits until no pipe of the pool is lent, that is every
// relay direction has given its pipe back (or holds none).
func waitPipesLent(t *testing.T, pp *pipePool, returned <-chan struct{}) {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		open, free := pp.stats()
		if open == free {
			return
		}
		select {
		case <-returned:
		case <-timeout:
			t.Fatalf("pipes still lent: %d open, %d free", open, free)
		}
	}
}

// usePool swaps the package's pool for pp during the test, and returns a
// channel that gets a token whenever a pipe comes back.
func usePool(t *testing.T, pp *pipePool) <-chan struct{} {
	returned := make(chan struct{}, 1)
	pp.onPut = func() {
		select {
		case returned <- struct{}{}:
		default:
		}
	}
	old := pipes
	pipes = pp
	t.Cleanup(func() { pipes = old })
	// The package pool's free pipes, left by earlier tests, would be
	// closed by its idle timer in the middle of a count of descriptors.
	old.mu.Lock()
	stale := old.free
	old.free, old.total = nil, old.total-len(stale)
	old.mu.Unlock()
	for _, p := range stale {
		p.close()
	}
	return returned
}

// TestRelaySpliceIdleHoldsSocketsOnly: a spliced session that has moved
// bytes both ways and gone quiet holds its two sockets and no pipe (Go's
// io.Copy splice held two pipes, four more descriptors, for its life).
func TestRelaySpliceIdleHoldsSocketsOnly(t *testing.T) {
	pp := newPipePool(maxFreePipes, maxPipes, time.Hour)
	returned := usePool(t, pp)
	_, freeBefore := pp.stats()
	before := openPipes(t)
	const sessions = 20
	for range sessions {
		app, target, _ := relayed(t, 0, CopySplice)
		for _, dir := range [][2]io.ReadWriter{{app, target}, {target, app}} {
			msg := bytes.Repeat([]byte("x"), 3000)
			if _, err := dir[0].Write(msg); err != nil {
				t.Fatal(err)
			}
			if _, err := io.ReadFull(dir[1], msg); err != nil {
				t.Fatal(err)
			}
		}
	}
	waitPipesLent(t, pp, returned)
	_, freeAfter := pp.stats()
	// Free pipes in the pool are shared, not a session's; beyond them an
	// idle session holds no pipe (its two sockets are all it keeps). The
	// count may come out below zero, never above, when a pipe left by an
	// earlier test is closed meanwhile (Go's own splice pipes are closed by
	// finalizers, whenever the collector runs).
	if got := openPipes(t) - before - 2*(freeAfter-freeBefore); got > 0 {
		t.Fatalf("%d idle sessions hold %d pipe descriptors", sessions, got)
	}
	if freeAfter > maxFreePipes {
		t.Fatalf("%d free pipes, bound %d", freeAfter, maxFreePipes)
	}
}

// TestRelaySpliceStalledReaderKeepsPipe: bytes that the destination cannot
// take yet stay in the session's pipe, which goes back only once drained.
func TestRelaySpliceStalledReaderKeepsPipe(t *testing.T) {
	pp := newPipePool(maxFreePipes, maxPipes, time.Hour)
	held := make(chan struct{}, 1)
	pp.onHold = func() {
		select {
		case held <- struct{}{}:
		default:
		}
	}
	returned := usePool(t, pp)
	app, target, done := relayed(t, 0, CopySplice)
	// A fixed receive buffer (no autotuning) at the target: the payload is
	// far more than it, the relay's send buffer and a pipe hold, so the
	// relay must stop with bytes in its pipe while the target does not read.
	if err := target.SetReadBuffer(64 << 10); err != nil {
		t.Fatal(err)
	}
	payload := bytes.Repeat([]byte("0123456789abcdef"), 1<<20)
	wrote := make(chan error, 1)
	go func() {
		_, err := app.Write(payload)
		app.CloseWrite()
		wrote <- err
	}()
	// Read a little so the stream is known to flow, then stall until the
	// relay holds bytes it cannot write.
	if _, err := io.ReadFull(target, make([]byte, 1000)); err != nil {
		t.Fatal(err)
	}
	select {
	case <-held:
	case <-time.After(10 * time.Second):
		t.Fatal("the relay never had to hold bytes in its pipe")
	}
	if open, free := pp.stats(); open == free {
		t.Fatalf("the stalled session holds no pipe: %d open, %d free", open, free)
	}
	got, err := io.ReadAll(target)
	if err != nil || len(got)+1000 != len(payload) {
		t.Fatalf("read %d of %d bytes: %v", len(got)+1000, len(payload), err)
	}
	if err := <-wrote; err != nil {
		t.Fatal(err)
	}
	target.CloseWrite()
	if res := <-done; res.Err != nil || res.Up != int64(len(payload)) {
		t.Fatalf("result %+v", res)
	}
	waitPipesLent(t, pp, returned)
}

// TestRelaySpliceWithoutPipes: with the pool at its bound, a direction
// moves its bytes through a pooled buffer instead.
func TestRelaySpliceWithoutPipes(t *testing.T) {
	pp := newPipePool(0, 0, time.Hour)
	usePool(t, pp)
	app, target, done := relayed(t, 0, CopySplice)
	msg := bytes.Repeat([]byte("y"), 200_000)
	go func() {
		app.Write(msg)
		app.CloseWrite()
	}()
	got, err := io.ReadAll(target)
	if err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("read %d bytes: %v", len(got), err)
	}
	target.CloseWrite()
	if res := <-done; res.Err != nil || res.Up != int64(len(msg)) {
		t.Fatalf("result %+v", res)
	}
	if open, _ := pp.stats(); open != 0 {
		t.Fatalf("%d pipes opened beyond a bound of 0", open)
	}
}

// fdOpen reports whether fd is an open descriptor.
func fdOpen(fd int) bool {
	_, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	return err == nil
}

func TestPipePoolNeverSharesBytes(t *testing.T) {
	pp := newPipePool(4, 4, time.Hour)
	p := pp.get()
	if p == nil {
		t.Fatal("no pipe")
	}
	if _, err := unix.Write(p.w, []byte("left over")); err != nil {
		t.Fatal(err)
	}
	p.buffered = 9
	pp.put(p)
	if open, free := pp.stats(); open != 0 || free != 0 {
		t.Fatalf("a pipe with bytes went back to the pool: %d open, %d free", open, free)
	}
	if fdOpen(p.r) || fdOpen(p.w) {
		t.Fatal("a pipe with bytes was not closed")
	}
}

func TestPipePoolBounds(t *testing.T) {
	pp := newPipePool(1, 2, time.Hour)
	a, b := pp.get(), pp.get()
	if a == nil || b == nil {
		t.Fatal("no pipe within the bound")
	}
	if pp.get() != nil {
		t.Fatal("a third pipe beyond a bound of 2")
	}
	pp.put(a)
	pp.put(b) // beyond one free: closed
	if open, free := pp.stats(); open != 1 || free != 1 {
		t.Fatalf("%d open, %d free; want 1 kept free", open, free)
	}
	if fdOpen(b.r) {
		t.Fatal("the pipe beyond the free bound was not closed")
	}
	if c := pp.get(); c != a {
		t.Fatal("the free pipe was not reused")
	}
	pp.put(a)
	pp.closeAll(t)
}

// closeAll closes the pool's free pipes at the end of a test.
func (pp *pipePool) closeAll(t *testing.T) {
	t.Helper()
	pp.mu.Lock()
	free := pp.free
	pp.free = nil
	pp.total -= len(free)
	if pp.reap != nil {
		pp.reap.Stop()
	}
	pp.armed = false
	pp.mu.Unlock()
	for _, p := range free {
		p.close()
	}
}

// TestPipePoolClosesIdle: free pipes are closed once unused for a while,
// the oldest first, so a burst's descriptors do not linger.
func TestPipePoolClosesIdle(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const idle = 10 * time.Second
		pp := newPipePool(8, 8, idle)
		a, b := pp.get(), pp.get()
		pp.put(a)
		time.Sleep(idle / 2)
		pp.put(b)
		time.Sleep(idle/2 + time.Millisecond)
		synctest.Wait()
		if open, free := pp.stats(); open != 1 || free != 1 || fdOpen(a.r) || !fdOpen(b.r) {
			t.Fatalf("after one idle period: %d open, %d free; want only the older closed", open, free)
		}
		time.Sleep(idle / 2)
		synctest.Wait()
		if open, _ := pp.stats(); open != 0 || fdOpen(b.w) {
			t.Fatalf("%d pipes open after both went idle", open)
		}
	})
}
