package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"syscall"

	"github.com/socksfwd/socksfwd/dnsforward"
	"github.com/socksfwd/socksfwd/internal/bindaddr"
	"github.com/socksfwd/socksfwd/internal/sockbuf"
	"github.com/socksfwd/socksfwd/tunnel"
)

// sockets are what one listener serves: a TCP listener, a UDP socket, or
// both at one address (DNS).
type sockets struct {
	ln net.Listener
	pc *net.UDPConn
}

// addr is where the sockets are bound.
func (ss sockets) addr() net.Addr {
	if ss.ln != nil {
		return ss.ln.Addr()
	}
	if ss.pc != nil {
		return ss.pc.LocalAddr()
	}
	return nil
}

func (ss sockets) close() {
	if ss.ln != nil {
		ss.ln.Close()
	}
	if ss.pc != nil {
		ss.pc.Close()
	}
}

// socketControl sets socket options: a net.ListenConfig Control hook, and
// applied as well to a socket systemd bound.
type socketControl = func(network, address string, c syscall.RawConn) error

// open binds l's sockets, or takes those systemd passed for it and sets on
// them what a bind here would have set, so that either way the same
// service is built on them.
func (s *supervisor) open(l listenPlan) (sockets, error) {
	var control socketControl
	var bind func() (sockets, error)
	switch l.kind {
	case kindTCP, kindAdmin, kindHTTP, kindSOCKS:
		// No keep-alive probes on accepted connections, as ssh -L does; a
		// loopback listener's connections get small buffers (sockbuf).
		control = sockbuf.CapLoopbackTCP
		bind = func() (sockets, error) {
			lc := net.ListenConfig{KeepAlive: -1, Control: control}
			ln, err := lc.Listen(context.Background(), bindaddr.Network("tcp", l.addr), l.addr)
			return sockets{ln: ln}, err
		}
	case kindTransparent:
		control = func(network, address string, c syscall.RawConn) error {
			if err := tunnel.ControlTransparent(network, address, c); err != nil {
				return err
			}
			return sockbuf.CapLoopbackTCP(network, address, c)
		}
		bind = func() (sockets, error) {
			ln, err := tunnel.ListenTransparent(context.Background(), bindaddr.Network("tcp", l.addr), l.addr, sockbuf.CapLoopbackTCP)
			return sockets{ln: ln}, err
		}
	case kindUDP:
		bind = func() (sockets, error) {
			pc, err := net.ListenPacket(bindaddr.Network("udp", l.addr), l.addr)
			if err != nil {
				return sockets{}, err
			}
			return sockets{pc: pc.(*net.UDPConn)}, nil
		}
	case kindTransparentUDP:
		control = tunnel.ControlTransparentUDP
		bind = func() (sockets, error) {
			pc, err := tunnel.ListenTransparentUDP(l.addr)
			return sockets{pc: pc}, err
		}
	case kindDNS:
		bind = func() (sockets, error) {
			pc, ln, err := dnsforward.Listen(l.addr)
			if err != nil {
				return sockets{}, err
			}
			return sockets{ln: ln, pc: pc.(*net.UDPConn)}, nil
		}
	default:
		return sockets{}, fmt.Errorf("listener kind %q", l.kind)
	}
	if ln, ok := s.handover[l.key()]; ok {
		return shareListener(ln)
	}
	passed := s.sd.passedFor(l.key())
	if len(passed) == 0 {
		return bind()
	}
	socks, err := adopt(passed, control)
	if err == nil && l.kind == kindDNS {
		err = socks.bindTwin()
	}
	if err != nil {
		socks.close()
		return sockets{}, err
	}
	return socks, nil
}

// adopt makes a listener's sockets from those systemd passed: duplicates
// (the originals stay for a later reload), with control applied.
func adopt(passed []*passedSocket, control socketControl) (sockets, error) {
	var socks sockets
	for _, p := range passed {
		if err := p.adoptInto(&socks, control); err != nil {
			socks.close()
			return sockets{}, fmt.Errorf("socket %s passed by systemd: %w", p.name, err)
		}
	}
	return socks, nil
}

func (p *passedSocket) adoptInto(socks *sockets, control socketControl) error {
	var sc syscall.Conn
	network := "udp"
	if p.stream {
		network = "tcp"
		ln, err := net.FileListener(p.file)
		if err != nil {
			return err
		}
		tl := ln.(*net.TCPListener)
		socks.ln, sc = keepAliveOff{tl}, tl
	} else {
		pc, err := net.FilePacketConn(p.file)
		if err != nil {
			return err
		}
		socks.pc = pc.(*net.UDPConn)
		sc = socks.pc
	}
	if control == nil {
		return nil
	}
	// The network as a bind passes it to Control: it says the family.
	if p.addr.Addr().Is4() {
		network += "4"
	} else {
		network += "6"
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return err
	}
	return control(network, p.addr.String(), rc)
}

// bindTwin binds the DNS socket systemd did not pass, at the address of
// the one it did: a DNS listener answers over UDP and TCP at one address.
func (ss *sockets) bindTwin() error {
	switch {
	case ss.ln == nil:
		ln, err := net.Listen(bindaddr.Network("tcp", ss.pc.LocalAddr().String()), ss.pc.LocalAddr().String())
		ss.ln = ln
		return err
	case ss.pc == nil:
		pc, err := net.ListenPacket(bindaddr.Network("udp", ss.ln.Addr().String()), ss.ln.Addr().String())
		if err != nil {
			return err
		}
		ss.pc = pc.(*net.UDPConn)
	}
	return nil
}

// plainTCP reports whether a listener kind opens a plain TCP socket, all
// with the same options, so that one may take over another's.
func plainTCP(k listenKind) bool {
	return k == kindTCP || k == kindAdmin || k == kindHTTP || k == kindSOCKS
}

// handOver notes, for each added plain TCP listener, the socket of a
// listener the reload removes that is bound to the same address (-L P
// becoming -D P, say): the new listener shares it instead of binding,
// which the old one, still bound until it drains, would refuse.
func (s *supervisor) handOver(added []listenPlan, want map[string]listenPlan) {
	s.handover, s.removing = nil, nil
	for k, u := range s.units {
		if _, kept := want[k]; !kept {
			s.removing = append(s.removing, u)
		}
	}
	for _, l := range added {
		if !plainTCP(l.kind) || strings.HasSuffix(l.addr, ":0") {
			continue
		}
		for _, u := range s.removing {
			if u.ln != nil && u.lp.addr == l.addr {
				if s.handover == nil {
					s.handover = make(map[string]net.Listener)
				}
				s.handover[l.key()] = u.ln
				break
			}
		}
	}
}

// heldByRemoved adds how to proceed to l's bind refused because a
// listener this reload removes holds the port (a socket is shared only
// with a listener on the very same address).
func (s *supervisor) heldByRemoved(l listenPlan, err error) error {
	if !errors.Is(err, syscall.EADDRINUSE) {
		return err
	}
	host, port, _ := net.SplitHostPort(l.addr)
	want, _ := netip.ParseAddr(host) // "" (every address) stays invalid
	for _, u := range s.removing {
		a := u.boundAddr()
		if a == nil || portOf(a) != port || !sameProtocol(u.lp.kind, l.kind) {
			continue
		}
		// In the way: the same address, or either side every address.
		held, perr := netip.ParseAddrPort(a.String())
		if perr != nil || !want.IsValid() || want.IsUnspecified() || held.Addr().IsUnspecified() || held.Addr().Unmap() == want.Unmap() {
			return fmt.Errorf("%w (the listener on %s, which this reload removes, holds that port until it drains: remove it in one reload and add the new one in the next reload, or restart)", err, a)
		}
	}
	return err
}

// portOf is the port of a listener's address.
func portOf(a net.Addr) string {
	_, port, _ := net.SplitHostPort(a.String())
	return port
}

// sameProtocol reports whether listeners of kinds a and b can hold the
// same port: both TCP or both UDP (DNS binds both).
func sameProtocol(a, b listenKind) bool {
	udp := func(k listenKind) bool { return k == kindUDP || k == kindTransparentUDP }
	return a == kindDNS || b == kindDNS || udp(a) == udp(b)
}

// shareListener opens a second descriptor of ln's socket: both accept
// until the old listener closes its own as it drains.
func shareListener(ln net.Listener) (sockets, error) {
	tl, ok := ln.(*net.TCPListener)
	if k, isKA := ln.(keepAliveOff); isKA {
		tl, ok = k.TCPListener, true
	}
	if !ok {
		return sockets{}, fmt.Errorf("cannot share the listener on %s", ln.Addr())
	}
	f, err := tl.File()
	if err != nil {
		return sockets{}, fmt.Errorf("sharing the listener on %s: %w", ln.Addr(), err)
	}
	defer f.Close()
	shared, err := net.FileListener(f)
	if err != nil {
		return sockets{}, fmt.Errorf("sharing the listener on %s: %w", ln.Addr(), err)
	}
	return sockets{ln: keepAliveOff{shared.(*net.TCPListener)}}, nil
}

// keepAliveOff accepts as a listener bound with KeepAlive: -1 does: Go
// turns keep-alive probes on for the connections of a listener it did not
// bind (a socket systemd passed).
type keepAliveOff struct{ *net.TCPListener }

func (l keepAliveOff) Accept() (net.Conn, error) {
	c, err := l.AcceptTCP()
	if err != nil {
		return nil, err
	}
	c.SetKeepAlive(false)
	return c, nil
}
