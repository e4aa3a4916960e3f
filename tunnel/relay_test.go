package tunnel

import (
	"bytes"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// tcpPair returns the two ends of a loopback TCP connection.
func tcpPair(t testing.TB) (*net.TCPConn, *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	acc := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		acc <- c
	}()
	a, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	b := <-acc
	if b == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { a.Close(); b.Close() })
	return a.(*net.TCPConn), b.(*net.TCPConn)
}

// relayed sets up app ⇄ [relay] ⇄ target and returns the app's end, the
// target's end and the relay's result channel.
func relayed(t testing.TB, idle time.Duration, mode CopyMode) (app, target *net.TCPConn, done <-chan RelayResult) {
	app, relayClient := tcpPair(t)
	relayUp, target := tcpPair(t)
	ch := make(chan RelayResult, 1)
	go func() { ch <- Relay(relayClient, relayUp, idle, mode) }()
	return app, target, ch
}

func TestRelayHalfClose(t *testing.T) {
	for _, mode := range []CopyMode{CopyPooled, CopySplice} {
		for _, idle := range []time.Duration{0, time.Minute} {
			app, target, done := relayed(t, idle, mode)
			request := bytes.Repeat([]byte("q"), 100_000)
			go func() {
				app.Write(request)
				app.CloseWrite() // shutdown(SHUT_WR)
			}()
			got, err := io.ReadAll(target) // ends only if the FIN crossed the relay
			if err != nil || !bytes.Equal(got, request) {
				t.Fatalf("mode %d: target read %d bytes, %v", mode, len(got), err)
			}
			// The response still flows after the client's half-close.
			response := bytes.Repeat([]byte("r"), 70_000)
			target.Write(response)
			target.CloseWrite()
			got, err = io.ReadAll(app)
			if err != nil || !bytes.Equal(got, response) {
				t.Fatalf("mode %d: app read %d bytes, %v", mode, len(got), err)
			}
			res := <-done
			if res.Err != nil || res.Up != int64(len(request)) || res.Down != int64(len(response)) {
				t.Fatalf("mode %d: result %+v", mode, res)
			}
		}
	}
}

func TestRelayIdleTimeout(t *testing.T) {
	app, _, done := relayed(t, 50*time.Millisecond, CopyPooled)
	res := <-done
	if !errors.Is(res.Err, ErrIdleTimeout) {
		t.Fatalf("err = %v, want idle timeout", res.Err)
	}
	if _, err := app.Read(make([]byte, 1)); err == nil {
		t.Fatal("app conn still open after idle timeout")
	}
}

func TestRelayIdleNotWhileOneWayTraffic(t *testing.T) {
	// A download with a silent client is not idle.
	app, target, done := relayed(t, 500*time.Millisecond, CopyPooled)
	go func() {
		for range 6 {
			target.Write([]byte("tick"))
			time.Sleep(40 * time.Millisecond) // the traffic pattern under test, not synchronisation
		}
		target.CloseWrite()
	}()
	got, _ := io.ReadAll(app)
	if string(got) != "ticktickticktickticktick" {
		t.Fatalf("got %q", got)
	}
	app.CloseWrite()
	if res := <-done; res.Err != nil {
		t.Fatalf("err = %v", res.Err)
	}
}

func TestRelayResetEndsBoth(t *testing.T) {
	for _, mode := range []CopyMode{CopyPooled, CopySplice} {
		app, target, done := relayed(t, 0, mode)
		target.SetLinger(0)
		target.Close() // RST toward the relay
		res := <-done
		if res.Err == nil {
			t.Fatalf("mode %d: want an error after RST", mode)
		}
		if _, err := app.Read(make([]byte, 1)); err == nil {
			t.Fatalf("mode %d: app conn still open", mode)
		}
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
