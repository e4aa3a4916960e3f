package sockbuf

import (
	"context"
	"net"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

func TestIsLoopback(t *testing.T) {
	for _, tc := range []struct {
		address string
		want    bool
	}{
		{"127.0.0.1:1080", true},
		{"127.3.4.5:1", true},
		{"[::1]:1080", true},
		{"[::ffff:127.0.0.1]:1080", true},
		{"0.0.0.0:1080", false}, // peers from anywhere
		{"[::]:1080", false},
		{"192.0.2.1:1080", false},
		{"[2001:db8::1]:1080", false},
		{"localhost:1080", false}, // Control sees addresses, never names
		{"garbage", false},
	} {
		if got := isLoopback(tc.address); got != tc.want {
			t.Errorf("isLoopback(%q) = %v, want %v", tc.address, got, tc.want)
		}
	}
}

// buffers returns a socket's SO_RCVBUF and SO_SNDBUF as the kernel
// reports them (twice what was asked for).
func buffers(t *testing.T, c syscall.Conn) (rcv, snd int) {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	rc.Control(func(fd uintptr) {
		rcv, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF)
		snd, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUF)
	})
	return rcv, snd
}

// Both ends of a loopback connection are capped: the dialed one by the
// hook, the accepted one by inheriting the listener's sizes.
func TestCapLoopbackTCP(t *testing.T) {
	lc := net.ListenConfig{Control: CapLoopbackTCP}
	ln, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	d := net.Dialer{Control: CapLoopbackTCP}
	dialed, err := d.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer dialed.Close()
	accepted, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer accepted.Close()
	for name, c := range map[string]net.Conn{"dialed": dialed, "accepted": accepted} {
		if rcv, snd := buffers(t, c.(syscall.Conn)); rcv != 2*LoopbackTCPSize || snd != 2*LoopbackTCPSize {
			t.Errorf("%s conn: SO_RCVBUF %d, SO_SNDBUF %d; want %d each", name, rcv, snd, 2*LoopbackTCPSize)
		}
	}

	// Without the hook, the listener's conns keep the kernel's defaults.
	plain, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	c, err := net.Dial("tcp", plain.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if rcv, _ := buffers(t, c.(syscall.Conn)); rcv == 2*LoopbackTCPSize {
		t.Errorf("a conn dialed without the hook has SO_RCVBUF %d too", rcv)
	}
}

// UDP sockets are not TCP's business: the hook leaves them alone.
func TestCapLoopbackTCPIgnoresUDP(t *testing.T) {
	lc := net.ListenConfig{Control: CapLoopbackTCP}
	pc, err := lc.ListenPacket(context.Background(), "udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	if rcv, _ := buffers(t, pc.(syscall.Conn)); rcv == 2*LoopbackTCPSize {
		t.Errorf("UDP socket got SO_RCVBUF %d", rcv)
	}
}
