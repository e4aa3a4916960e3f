//go:build unix

package tunnel

import (
	"errors"
	"io"
	"net"
	"testing"
	"time"
)

// TestWritePooledCountsPartialWrite: the pooled path counts what a failed
// write moved, with and without an idle timeout.
func TestWritePooledCountsPartialWrite(t *testing.T) {
	for _, idle := range []time.Duration{0, time.Minute} {
		app, dst := net.Pipe()
		received := make(chan int, 1)
		go func() {
			n, _ := io.Copy(io.Discard, app)
			received <- int(n)
		}()
		r := newRelay(dst, dst, idle, CopyPooled, func(RelayResult) {})
		p := &pooledRead{pool: &smallPool, buf: smallPool.Get().(*[]byte), n: 1000}
		_, err := r.down.writePooled(p, shortWriter{dst})
		dst.Close()
		if !errors.Is(err, errShortWrite) {
			t.Fatalf("idle %v: err = %v, want the write's", idle, err)
		}
		if n := <-received; r.down.n != int64(n) || n == 0 {
			t.Fatalf("idle %v: %d bytes counted, %d received", idle, r.down.n, n)
		}
	}
}
