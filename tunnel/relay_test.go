package tunnel

import (
	"bytes"
	"errors"
	"io"
	"net"
	"strings"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"go.uber.org/goleak"

	"github.com/socksfwd/socksfwd/internal/testnet"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// exchangeIdle is the idle timeout of a session that must first complete
// an exchange through the proxy, then time out: far longer than such an
// exchange takes on a loaded machine under -race, so the exchange never
// races the timeout, and short enough for a test to wait for. A timeout
// that only has to fire, with nothing before it, can be shorter.
const exchangeIdle = time.Second

// relayed sets up app ⇄ [relay] ⇄ target and returns the app's end, the
// target's end and the relay's result channel.
func relayed(t testing.TB, idle time.Duration, mode CopyMode) (app, target *net.TCPConn, done <-chan RelayResult) {
	app, relayClient := testnet.TCPPair(t)
	relayUp, target := testnet.TCPPair(t)
	ch := make(chan RelayResult, 1)
	ended := make(chan struct{})
	go func() {
		ch <- Relay(relayClient, relayUp, idle, mode)
		close(ended)
	}()
	// The relay has ended before the test's other cleanups run (those that
	// swap the pipe pool among them).
	t.Cleanup(func() {
		app.Close()
		target.Close()
		<-ended
	})
	return app, target, ch
}

// allModes are the copy modes every relay behaviour must hold in.
var allModes = []CopyMode{CopySplice, CopyPooled, CopyIOCopy}

func TestRelayHalfClose(t *testing.T) {
	for _, mode := range allModes {
		for _, idle := range []time.Duration{0, time.Minute} {
			app, target, done := relayed(t, idle, mode)
			request := bytes.Repeat([]byte("q"), 100_000)
			go func() {
				app.Write(request)
				app.CloseWrite() // shutdown(SHUT_WR)
			}()
			got, err := io.ReadAll(target) // ends only if the FIN crossed the relay
			if err != nil || !bytes.Equal(got, request) {
				t.Fatalf("%v idle %v: target read %d bytes, %v", mode, idle, len(got), err)
			}
			// The response still flows after the client's half-close.
			response := bytes.Repeat([]byte("r"), 70_000)
			target.Write(response)
			target.CloseWrite()
			got, err = io.ReadAll(app)
			if err != nil || !bytes.Equal(got, response) {
				t.Fatalf("%v idle %v: app read %d bytes, %v", mode, idle, len(got), err)
			}
			res := <-done
			if res.Err != nil || res.Up != int64(len(request)) || res.Down != int64(len(response)) {
				t.Fatalf("%v idle %v: result %+v", mode, idle, res)
			}
		}
	}
}

// TestRelayIdleTimeout: a quiet session ends, in every copy mode. Nothing
// has to happen before the timeout, so a short one races nothing.
func TestRelayIdleTimeout(t *testing.T) {
	for _, mode := range allModes {
		app, _, done := relayed(t, 50*time.Millisecond, mode)
		res := <-done
		if !errors.Is(res.Err, ErrIdleTimeout) {
			t.Fatalf("%v: err = %v, want idle timeout", mode, res.Err)
		}
		// A session that went quiet ends with a clean close, not a reset.
		if _, err := app.Read(make([]byte, 1)); err != io.EOF {
			t.Fatalf("%v: app read after idle timeout: %v, want EOF", mode, err)
		}
	}
}

// On a synctest bubble's clock, over net.Pipe (the relay's path for conns
// that are not TCP): a session ends one idle timeout after its last byte,
// whichever way it went, and not a moment before.
func TestRelayIdleTimeoutOnTheClock(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const idle = time.Minute
		app, relayClient := net.Pipe()
		relayUp, target := net.Pipe()
		done := make(chan RelayResult, 1)
		go func() { done <- Relay(relayClient, relayUp, idle, CopyPooled) }()
		defer app.Close()
		defer target.Close()
		alive := func(when string) {
			t.Helper()
			synctest.Wait()
			select {
			case res := <-done:
				t.Fatalf("%s: the relay ended (%v)", when, res.Err)
			default:
			}
		}
		buf := make([]byte, 1)
		// move sends a byte from one end to the other through the relay.
		move := func(from, to net.Conn) {
			t.Helper()
			go from.Write([]byte{1}) // a pipe's write waits for the read
			if _, err := io.ReadFull(to, buf); err != nil {
				t.Fatal(err)
			}
		}
		time.Sleep(idle - time.Millisecond)
		alive("just before the idle timeout of a session that never moved a byte")
		move(target, app)
		time.Sleep(idle - time.Millisecond)
		alive("just before the idle timeout after a byte down")
		move(app, target)
		time.Sleep(idle - time.Millisecond)
		alive("just before the idle timeout after a byte up")
		time.Sleep(time.Millisecond)
		synctest.Wait()
		select {
		case res := <-done:
			if !errors.Is(res.Err, ErrIdleTimeout) || res.Up != 1 || res.Down != 1 {
				t.Fatalf("result %+v, want the idle timeout after a byte each way", res)
			}
		default:
			t.Fatal("the relay outlived its idle timeout")
		}
		if _, err := app.Read(buf); err != io.EOF {
			t.Fatalf("app read after the idle timeout: %v, want EOF", err)
		}
	})
}

func TestRelayIdleNotWhileOneWayTraffic(t *testing.T) {
	for _, mode := range allModes {
		t.Run(mode.String(), func(t *testing.T) {
			t.Parallel()
			testIdleNotWhileOneWayTraffic(t, mode)
		})
	}
}

// testIdleNotWhileOneWayTraffic: a download with a silent client is not
// idle. The client's direction moves no byte for 2.5 idle timeouts, so its
// wait times out again and again, while the download moves a tick every
// twentieth of the timeout: the traffic pattern under test, with room for
// a loaded machine's stalls between ticks.
func testIdleNotWhileOneWayTraffic(t *testing.T, mode CopyMode) {
	const (
		idle  = 500 * time.Millisecond
		every = idle / 20
		ticks = 50
	)
	app, target, done := relayed(t, idle, mode)
	go func() {
		pace := time.NewTicker(every)
		defer pace.Stop()
		for range ticks {
			if _, err := target.Write([]byte("tick")); err != nil {
				return // the relay ended: the test fails on what the app got
			}
			<-pace.C
		}
		target.CloseWrite()
	}()
	got, _ := io.ReadAll(app)
	if want := strings.Repeat("tick", ticks); string(got) != want {
		t.Fatalf("the download got %d bytes, want %d: the relay ended it as idle", len(got), len(want))
	}
	app.CloseWrite()
	if res := <-done; res.Err != nil {
		t.Fatalf("err = %v", res.Err)
	}
}

func TestRelayResetEndsBoth(t *testing.T) {
	for _, mode := range allModes {
		app, target, done := relayed(t, 0, mode)
		target.SetLinger(0)
		target.Close() // RST toward the relay
		res := <-done
		if res.Err == nil {
			t.Fatalf("%v: want an error after RST", mode)
		}
		// The reset is passed on: a clean EOF would tell the app its
		// stream was complete.
		if _, err := app.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("%v: app read %v, want ECONNRESET", mode, err)
		}
	}
}

// TestRelayErrorNamesSide: the error of a reset says which end reset, for
// either end (io.Copy cannot tell, so CopyIOCopy is not held to it).
func TestRelayErrorNamesSide(t *testing.T) {
	for _, mode := range []CopyMode{CopySplice, CopyPooled} {
		for _, side := range []Side{SideClient, SideUpstream} {
			app, target, done := relayed(t, 0, mode)
			resetter, other := target, app
			if side == SideClient {
				resetter, other = app, target
			}
			resetter.SetLinger(0)
			resetter.Close()
			res := <-done
			var re *RelayError
			if !errors.As(res.Err, &re) || re.Side != side || !re.Reset() || re.Cause() != side.String()+" reset" {
				t.Fatalf("%v, %v resets: err = %#v (%v), want a reset by the %v", mode, side, res.Err, res.Err, side)
			}
			if _, err := other.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("%v, %v resets: the other end read %v, want ECONNRESET", mode, side, err)
			}
		}
	}
}

func TestParseCopyMode(t *testing.T) {
	for _, m := range allModes {
		if got, err := ParseCopyMode(m.String()); err != nil || got != m {
			t.Errorf("ParseCopyMode(%q) = %v, %v", m.String(), got, err)
		}
	}
	if _, err := ParseCopyMode("sendfile"); err == nil {
		t.Error("ParseCopyMode accepted an unknown mode")
	}
}

func benchmarkRelay(b *testing.B, mode CopyMode) {
	app, target, done := relayed(b, 0, mode)
	chunk := make([]byte, 128<<10)
	b.SetBytes(int64(len(chunk)))
	go func() {
		io.Copy(io.Discard, target)
		target.Close()
	}()
	b.ResetTimer()
	for range b.N {
		if _, err := app.Write(chunk); err != nil {
			b.Fatal(err)
		}
	}
	app.CloseWrite()
	<-done
}

func BenchmarkRelayPooled(b *testing.B) { benchmarkRelay(b, CopyPooled) }
func BenchmarkRelaySplice(b *testing.B) { benchmarkRelay(b, CopySplice) }
func BenchmarkRelayIOCopy(b *testing.B) { benchmarkRelay(b, CopyIOCopy) }

// TestRelayIdleNotWhileSlowReader: a one-way download to an app that
// reads slowly is not idle, although each write to it blocks for longer
// than the idle timeout (a large buffer's or a pipe's worth into small
// socket buffers) and the silent direction's waits time out meanwhile.
func TestRelayIdleNotWhileSlowReader(t *testing.T) {
	for _, mode := range []CopyMode{CopySplice, CopyPooled} {
		t.Run(mode.String(), func(t *testing.T) {
			t.Parallel()
			testIdleNotWhileSlowReader(t, mode)
		})
	}
}

func testIdleNotWhileSlowReader(t *testing.T, mode CopyMode) {
	const (
		idle  = 600 * time.Millisecond
		total = 1 << 20
		chunk = 4 << 10
		// 200 KiB/s: a 256 KiB write takes 1.3 s, twice the idle timeout,
		// and one of the relay's 32 KiB steps 160 ms, a quarter of it.
		pause = 20 * time.Millisecond
	)
	app, relayClient := testnet.TCPPair(t)
	relayUp, target := testnet.TCPPair(t)
	// Small buffers toward the app (the kernel doubles the size), so that
	// the relay's writes wait on the app's pace.
	if err := relayClient.SetWriteBuffer(16 << 10); err != nil {
		t.Fatal(err)
	}
	done := make(chan RelayResult, 1)
	go func() { done <- Relay(relayClient, relayUp, idle, mode) }()
	go func() {
		target.Write(make([]byte, total))
		target.CloseWrite()
	}()
	buf := make([]byte, chunk)
	got := 0
	var err error
	// Bounded: twice the reads the download needs. The last quarter is
	// read at full speed: the relay's last write leaves up to the socket
	// buffers' worth (under a quarter) for the app to read, and at the
	// slow pace that alone could outlast the idle timeout with no byte
	// moving through the relay.
	for i := 0; i < 2*total/chunk && got < total && err == nil; i++ {
		var n int
		n, err = app.Read(buf)
		got += n
		if got < total-total/4 {
			time.Sleep(pause) // the slow reader under test, not a wait for an event
		}
	}
	if got != total {
		t.Fatalf("the app got %d bytes of %d (last read: %v): the relay ended the download", got, total, err)
	}
	app.CloseWrite()
	res := <-done
	if res.Err != nil || res.Down != total {
		t.Fatalf("result %+v, want %d bytes down and no error", res, total)
	}
}

// shortWriter is a conn whose writes move half their bytes, then fail.
type shortWriter struct{ net.Conn }

var errShortWrite = errors.New("test: write failed part way")

func (w shortWriter) Write(b []byte) (int, error) {
	n, _ := w.Conn.Write(b[:len(b)/2])
	return n, errShortWrite
}

// TestRelayCountsPartialWrite: the bytes a failed write moved before it
// failed are counted, with and without an idle timeout: a cut session
// reports what its peer may have received.
func TestRelayCountsPartialWrite(t *testing.T) {
	for _, idle := range []time.Duration{0, time.Minute} {
		app, relayClient := net.Pipe()
		relayUp, target := net.Pipe()
		done := make(chan RelayResult, 1)
		go func() { done <- Relay(shortWriter{relayClient}, relayUp, idle, CopyPooled) }()
		received := make(chan int, 1)
		go func() {
			n, _ := io.Copy(io.Discard, app)
			received <- int(n)
		}()
		target.Write(make([]byte, 1000))
		res := <-done
		var re *RelayError
		if !errors.As(res.Err, &re) || re.Side != SideClient || re.Op != "write" {
			t.Fatalf("idle %v: err = %v, want the client's write error", idle, res.Err)
		}
		if n := <-received; res.Down != int64(n) || n == 0 {
			t.Fatalf("idle %v: %d bytes counted down, the app received %d", idle, res.Down, n)
		}
		target.Close()
	}
}

// TestRelayHalfCloseUpstreamFirst: the upstream half-closes first; the
// client's upload still reaches the target, in every mode.
func TestRelayHalfCloseUpstreamFirst(t *testing.T) {
	for _, mode := range allModes {
		for _, idle := range []time.Duration{0, time.Minute} {
			app, target, done := relayed(t, idle, mode)
			resp := bytes.Repeat([]byte("r"), 70_000)
			go func() {
				target.Write(resp)
				target.CloseWrite()
			}()
			got, err := io.ReadAll(app)
			if err != nil || !bytes.Equal(got, resp) {
				t.Fatalf("%v idle %v: app read %d, %v", mode, idle, len(got), err)
			}
			upload := bytes.Repeat([]byte("u"), 3<<20)
			go func() {
				app.Write(upload)
				app.CloseWrite()
			}()
			got, err = io.ReadAll(target)
			if err != nil || !bytes.Equal(got, upload) {
				t.Fatalf("%v idle %v: target read %d of %d, %v", mode, idle, len(got), len(upload), err)
			}
			res := <-done
			if res.Err != nil || res.Up != int64(len(upload)) || res.Down != int64(len(resp)) {
				t.Fatalf("%v idle %v: %+v", mode, idle, res)
			}
		}
	}
}

// TestRelayIdleEndsStuckWriter: after the client's half-close, a client
// that stops reading leaves the download direction blocked in a write and
// no read to notice: the idle timeout still ends the session. The bound
// of 20 idle timeouts only keeps a failure finite.
func TestRelayIdleEndsStuckWriter(t *testing.T) {
	for _, mode := range []CopyMode{CopySplice, CopyPooled} {
		t.Run(mode.String(), func(t *testing.T) {
			const idle = 200 * time.Millisecond
			app, target, done := relayed(t, idle, mode)
			app.SetReadBuffer(4096)
			app.CloseWrite() // request done
			go func() {
				// far more than the socket buffers hold; the app never reads
				big := make([]byte, 64<<20)
				target.Write(big)
			}()
			select {
			case res := <-done:
				if !errors.Is(res.Err, ErrIdleTimeout) {
					t.Fatalf("ended with %v, want idle timeout", res.Err)
				}
			case <-time.After(20 * idle):
				t.Fatalf("relay still running %v after the last byte moved with a %v idle timeout", 20*idle, idle)
			}
		})
	}
}

// TestRelayIdleCutResets: a client that pauses reading for longer than
// the idle timeout while the relay holds download bytes it has not
// delivered: the session ends with a reset, not a clean EOF after a
// truncated stream.
func TestRelayIdleCutResets(t *testing.T) {
	for _, mode := range []CopyMode{CopySplice, CopyPooled} {
		t.Run(mode.String(), func(t *testing.T) {
			const idle = 300 * time.Millisecond
			app, target, done := relayed(t, idle, mode)
			const total = 32 << 20
			go func() {
				target.Write(make([]byte, total))
				target.CloseWrite()
			}()
			var res RelayResult
			select {
			case res = <-done:
			case <-time.After(10 * time.Second):
				t.Fatal("relay did not end")
			}
			app.SetReadDeadline(time.Now().Add(10 * time.Second))
			got, err := io.Copy(io.Discard, app)
			if !errors.Is(res.Err, ErrIdleTimeout) {
				t.Fatalf("ended with %v, want idle timeout", res.Err)
			}
			if got < total && err == nil {
				t.Fatalf("the app got %d of %d bytes and a clean EOF: a truncated download looks complete", got, total)
			}
		})
	}
}
