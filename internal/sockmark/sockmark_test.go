package sockmark

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"syscall"
	"testing"

	"go.uber.org/goleak"
)

// childEnv makes the test binary, instead of running tests, report what
// Check says in the environment it was started in (one without the
// capability, see TestCheckWithoutCapability).
const childEnv = "SOCKMARK_CHECK_CHILD"

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) == "1" {
		err := Check(0x438)
		fmt.Printf("permission=%v\n%v\n", errors.Is(err, fs.ErrPermission), err)
		os.Exit(0)
	}
	goleak.VerifyTestMain(m)
}

func TestChainRunsEveryControlInOrder(t *testing.T) {
	var calls []string
	record := func(name string) ControlFunc {
		return func(network, address string, c syscall.RawConn) error {
			calls = append(calls, name+" "+network+" "+address)
			return nil
		}
	}
	f := Chain(record("a"), nil, record("b"), record("c"))
	if err := f("udp4", "192.0.2.1:53", nil); err != nil {
		t.Fatal(err)
	}
	want := "a udp4 192.0.2.1:53|b udp4 192.0.2.1:53|c udp4 192.0.2.1:53"
	if got := strings.Join(calls, "|"); got != want {
		t.Fatalf("calls %q, want %q", got, want)
	}
}

func TestChainStopsAtFirstError(t *testing.T) {
	boom := errors.New("boom")
	var ran []string
	f := Chain(
		func(string, string, syscall.RawConn) error { ran = append(ran, "first"); return boom },
		func(string, string, syscall.RawConn) error { ran = append(ran, "second"); return nil },
	)
	if err := f("tcp", "192.0.2.1:1080", nil); err != boom {
		t.Fatalf("error %v, want %v", err, boom)
	}
	if len(ran) != 1 {
		t.Fatalf("ran %v, want only the first", ran)
	}
}

func TestChainOfNothingIsNoControl(t *testing.T) {
	if Chain() != nil || Chain(nil, nil) != nil {
		t.Fatal("a chain of nil controls must be nil, so net.Dialer skips the hook")
	}
}
