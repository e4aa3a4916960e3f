//go:build linux

package tunnel

import (
	"io"
	"net"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

const (
	// pipeSize is what each pipe is grown to: more bytes per splice call,
	// as Go's own splice does. Pages are allocated only for bytes in
	// flight; a refusal (an unprivileged user over its pipe quota) leaves
	// the default size, which works too.
	pipeSize = 1 << 20
	// maxFreePipes bounds the drained pipes kept for the next readable
	// socket; more are closed when given back.
	maxFreePipes = 16
	// maxPipes bounds the pipes in use and free together (two descriptors
	// each). A direction that finds none moves that read through a pooled
	// buffer instead.
	maxPipes = 1024
	// pipeIdleClose: a free pipe unused this long is closed, so a burst's
	// pipes do not stay open after it.
	pipeIdleClose = 10 * time.Second
)

// pipes is the process's pool: every relay direction takes from it.
var pipes = newPipePool(maxFreePipes, maxPipes, pipeIdleClose)

// pipe is a non-blocking pipe that bytes pass through on their way from
// one socket to another.
type pipe struct {
	r, w     int
	buffered int       // bytes in the pipe: a pipe with any is never shared
	freed    time.Time // when it went back to the pool
}

func newPipe() (*pipe, error) {
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		return nil, err
	}
	unix.FcntlInt(uintptr(fds[1]), unix.F_SETPIPE_SZ, pipeSize)
	return &pipe{r: fds[0], w: fds[1]}, nil
}

func (p *pipe) close() {
	unix.Close(p.r)
	unix.Close(p.w)
}

// pipePool lends empty pipes. A direction takes one when its socket is
// readable and gives it back once drained; one with bytes still in it
// (the destination would block) stays with its session until drained.
type pipePool struct {
	maxFree, max int
	idleClose    time.Duration

	mu    sync.Mutex
	free  []*pipe // a stack: the bottom was used least recently
	total int     // pipes open: lent and free
	reap  *time.Timer
	armed bool // reap is pending
	// onPut, set by tests before any use, runs after a pipe comes back;
	// onHold when a direction keeps its pipe, bytes in it, because the
	// destination would block.
	onPut, onHold func()
}

func newPipePool(maxFree, max int, idleClose time.Duration) *pipePool {
	return &pipePool{maxFree: maxFree, max: max, idleClose: idleClose}
}

// get lends an empty pipe, or nil when the pool is at its bound or no pipe
// can be made (out of descriptors).
func (pp *pipePool) get() *pipe {
	pp.mu.Lock()
	if n := len(pp.free); n > 0 {
		p := pp.free[n-1]
		pp.free[n-1] = nil
		pp.free = pp.free[:n-1]
		pp.mu.Unlock()
		return p
	}
	if pp.total >= pp.max {
		pp.mu.Unlock()
		return nil
	}
	pp.total++
	pp.mu.Unlock()
	p, err := newPipe()
	if err != nil {
		pp.mu.Lock()
		pp.total--
		pp.mu.Unlock()
		return nil
	}
	return p
}

// put takes a pipe back. One that still holds bytes is closed: the bytes
// belong to a session that ended, and must reach no other.
func (pp *pipePool) put(p *pipe) {
	defer func() {
		if pp.onPut != nil {
			pp.onPut()
		}
	}()
	now := time.Now()
	pp.mu.Lock()
	if p.buffered != 0 || len(pp.free) >= pp.maxFree {
		pp.total--
		pp.mu.Unlock()
		p.close()
		return
	}
	p.freed = now
	pp.free = append(pp.free, p)
	if !pp.armed {
		pp.armed = true
		if pp.reap == nil {
			pp.reap = time.AfterFunc(pp.idleClose, pp.closeIdle)
		} else {
			pp.reap.Reset(pp.idleClose)
		}
	}
	pp.mu.Unlock()
}

// closeIdle closes the free pipes unused for idleClose, and waits for the
// next to age while any are left.
func (pp *pipePool) closeIdle() {
	now := time.Now()
	pp.mu.Lock()
	old := 0
	for old < len(pp.free) && now.Sub(pp.free[old].freed) >= pp.idleClose {
		old++
	}
	stale := append([]*pipe(nil), pp.free[:old]...)
	n := copy(pp.free, pp.free[old:])
	clear(pp.free[n:])
	pp.free = pp.free[:n]
	pp.total -= old
	if n > 0 {
		pp.reap.Reset(pp.idleClose - now.Sub(pp.free[0].freed))
	} else {
		pp.armed = false
	}
	pp.mu.Unlock()
	for _, p := range stale {
		p.close()
	}
}

// stats reports the pipes open and, of them, the free ones.
func (pp *pipePool) stats() (open, free int) {
	pp.mu.Lock()
	defer pp.mu.Unlock()
	return pp.total, len(pp.free)
}

// splicer is one direction's splice state, kept out of the copy loop's
// frame so that a waiting goroutine's stack stays small.
type splicer struct {
	p      *pipe // lent while bytes are in flight
	in     int   // what the last splice from the socket moved
	inErr  error
	outErr error
	moved  int64 // bytes spliced out since the copy loop last counted
	// fallback reads through a pooled buffer when no pipe can be had.
	fallback pooledRead
	buffered bool // the last read went to fallback
}

// fill is the source's read callback: take a pipe (the socket may be
// readable) and splice into it; a splice that would block gives the
// pipe back and waits for readability without one.
func (s *splicer) fill(fd uintptr) bool {
	if s.p == nil {
		if s.p = pipes.get(); s.p == nil {
			s.buffered = true
			return s.fallback.read(fd)
		}
	}
	s.buffered = false
	for {
		var n int64
		n, s.inErr = rawSplice(int(fd), s.p.w, pipeSize)
		s.in = int(n)
		if s.inErr != unix.EINTR {
			break
		}
	}
	if s.inErr == unix.EAGAIN {
		// The pipe was empty, so only the socket can have blocked.
		pipes.put(s.p)
		s.p = nil
		return false
	}
	return true
}

// drain is the destination's write callback: splice the pipe out until it
// is empty, or wait for room.
func (s *splicer) drain(fd uintptr) bool {
	for s.p.buffered > 0 {
		n, err := rawSplice(s.p.r, int(fd), s.p.buffered)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			if pipes.onHold != nil {
				pipes.onHold()
			}
			return false
		case err != nil:
			s.outErr = err
			return true
		case n == 0:
			s.outErr = io.ErrNoProgress
			return true
		}
		s.p.buffered -= int(n)
		s.moved += n
	}
	return true
}

// rawSplice moves up to n bytes from rfd to wfd, one of them a pipe, as a
// raw system call: both ends are non-blocking, so it cannot block, and
// the runtime need not hand the P to another thread meanwhile (a splice
// on loopback runs the receiver's TCP too, often longer than the monitor
// thread's 20 µs tick, which then retakes the P: a thread switch each).
func rawSplice(rfd, wfd, n int) (int64, error) {
	r, _, errno := unix.RawSyscall6(unix.SYS_SPLICE, uintptr(rfd), 0, uintptr(wfd), 0, uintptr(n), unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
	if errno != 0 {
		return 0, errno
	}
	return int64(r), nil
}

// copySplice moves bytes socket → pipe → socket without copying them to
// user space, holding a pipe only while bytes are in flight.
func (c *copier) copySplice(src, dst *net.TCPConn) error {
	rc, err := src.SyscallConn()
	if err != nil {
		return c.copyBuffered(src, dst)
	}
	wc, err := dst.SyscallConn()
	if err != nil {
		return c.copyBuffered(src, dst)
	}
	s := &splicer{fallback: pooledRead{pool: &smallPool}}
	defer func() {
		if s.p != nil {
			pipes.put(s.p) // closed if bytes are left in it
		}
	}()
	fill, drain := s.fill, s.drain
	if c.r.idle > 0 {
		// A drain into a slow reader can take far longer than the idle
		// timeout (a pipe holds up to pipeSize): each wake-up that moved
		// bytes is progress, or the silent other direction would end a
		// one-way download as idle.
		drain = func(fd uintptr) bool {
			before := s.moved
			done := s.drain(fd)
			if s.moved != before {
				c.r.touch()
			}
			return done
		}
	}
	for {
		c.armIdle(src)
		if err := rc.Read(fill); err != nil {
			if c.stillActive(err) {
				continue
			}
			return c.waitErr(err)
		}
		if s.buffered {
			if eof, err := c.writePooled(&s.fallback, dst); eof || err != nil {
				return err
			}
			continue
		}
		if s.inErr != nil {
			return c.readErr(s.inErr)
		}
		if s.in == 0 {
			return nil // EOF
		}
		c.r.touch()
		s.p.buffered = s.in
		err := c.drainPipe(wc, dst, drain, s)
		if err != nil {
			return err
		}
		if s.outErr != nil {
			return c.writeErr(s.outErr)
		}
	}
}

// drainPipe splices the pipe's bytes out to dst. With an idle timeout it
// waits for room under a write deadline, renewed while bytes move either
// way: a client that stopped reading after it half-closed leaves no read
// to notice the session went idle.
func (c *copier) drainPipe(wc syscall.RawConn, dst *net.TCPConn, drain func(uintptr) bool, s *splicer) error {
	if c.r.idle <= 0 {
		err := wc.Write(drain)
		c.moved(s.moved)
		s.moved = 0
		if err != nil {
			return c.writeErr(err)
		}
		return nil
	}
	c.holding.Store(true)
	for {
		c.armWriteIdle(dst)
		err := wc.Write(drain)
		c.moved(s.moved)
		s.moved = 0
		if err == nil {
			c.holding.Store(false)
			return nil
		}
		if !c.stillActive(err) {
			return c.writeWaitErr(err)
		}
	}
}
