package main

import (
	"context"
	"fmt"
	"net"

	"github.com/socksfwd/socksfwd/dnsforward"
	"github.com/socksfwd/socksfwd/internal/sockbuf"
	"github.com/socksfwd/socksfwd/tunnel"
)

// sockets are what one listener serves: a TCP listener, a UDP socket, or
// both at one address (DNS).
type sockets struct {
	ln net.Listener
	pc *net.UDPConn
}

func (ss sockets) close() {
	if ss.ln != nil {
		ss.ln.Close()
	}
	if ss.pc != nil {
		ss.pc.Close()
	}
}

// open binds l's sockets.
func (s *supervisor) open(l listenPlan) (sockets, error) {
	switch l.kind {
	case kindTCP:
		// No keep-alive probes on accepted connections, as ssh -L does; a
		// loopback listener's connections get small buffers (sockbuf).
		lc := net.ListenConfig{KeepAlive: -1, Control: sockbuf.CapLoopbackTCP}
		ln, err := lc.Listen(context.Background(), "tcp", l.addr)
		return sockets{ln: ln}, err
	case kindTransparent:
		ln, err := tunnel.ListenTransparent(context.Background(), "tcp", l.addr, sockbuf.CapLoopbackTCP)
		return sockets{ln: ln}, err
	case kindUDP:
		pc, err := net.ListenPacket("udp", l.addr)
		if err != nil {
			return sockets{}, err
		}
		return sockets{pc: pc.(*net.UDPConn)}, nil
	case kindTransparentUDP:
		pc, err := tunnel.ListenTransparentUDP(l.addr)
		return sockets{pc: pc}, err
	case kindDNS:
		pc, ln, err := dnsforward.Listen(l.addr)
		if err != nil {
			return sockets{}, err
		}
		return sockets{ln: ln, pc: pc.(*net.UDPConn)}, nil
	}
	return sockets{}, fmt.Errorf("listener kind %q", l.kind)
}
