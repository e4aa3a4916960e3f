package sockbuf

import (
	"context"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

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

// Grow gives a UDP socket Size each way: as root past net.core.rmem_max
// and wmem_max (SO_RCVBUFFORCE), otherwise up to them.
func TestGrow(t *testing.T) {
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	Grow(c)
	wantRcv, wantSnd := 2*Size, 2*Size // the kernel doubles what is asked
	if os.Geteuid() != 0 {
		wantRcv = 2 * min(Size, sysctl(t, "net/core/rmem_max"))
		wantSnd = 2 * min(Size, sysctl(t, "net/core/wmem_max"))
	}
	if rcv, snd := buffers(t, c); rcv != wantRcv || snd != wantSnd {
		t.Fatalf("SO_RCVBUF %d, SO_SNDBUF %d; want %d and %d", rcv, snd, wantRcv, wantSnd)
	}
}

func sysctl(t *testing.T, name string) int {
	t.Helper()
	b, err := os.ReadFile("/proc/sys/" + name)
	if err != nil {
		t.Fatal(err)
	}
	v, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	return v
}
