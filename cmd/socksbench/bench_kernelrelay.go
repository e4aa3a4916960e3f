//go:build linux

package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/socksfwd/socksfwd/internal/peertest"
	"github.com/socksfwd/socksfwd/internal/testnet"
)

// The kernel relay experiment: the two sockets of a relayed session joined
// in a BPF sockmap, with an sk_skb stream verdict program that sends each
// segment straight out of the other socket, so bytes never reach user
// space and the relay wakes only at the end of a direction. It is measured
// here, against the splice relay socksfwd uses, on the same relay code
// path otherwise (accept, dial, half-close), in this process. It lives in
// the bench, not in socksfwd, because it lost (docs/PERFORMANCE.md).

// Ways of the kernel relay rows.
const (
	waySpliceRelay  = "splice"
	wayKernelRelay  = "sockmap"
	relayPairsLimit = 4096 // sessions the sockmap holds at once
)

func benchKernelRelay(h *harness, cfg benchConfig) {
	iperf := peertest.Require(h, "iperf3")
	connrate := h.connrate()
	km, err := newSockmapRelay()
	if err != nil {
		fmt.Printf("kernel relay: not available here (%v): needs Linux with sockmap and CAP_BPF\n", err)
		return
	}
	defer km.close()
	fmt.Printf("socksbench: kernel relay (sockmap + sk_skb verdict) against splice, median of %d interleaved rounds, %d s per run, relays in this process, no proxy\n", rounds, cfg.seconds)
	ways := []string{waySpliceRelay, wayKernelRelay}
	iperfAddr := h.iperfServer(iperf)
	relays := map[string]string{
		waySpliceRelay: startRelay(h, iperfAddr, spliceJoin),
		wayKernelRelay: startRelay(h, iperfAddr, km.join),
	}
	for _, streams := range []int{1, 4} {
		cost := map[string]float64{} // measure runs one way at a time
		rows := measure(ways, func(way string, m *meter) float64 {
			busy := machineBusy()
			v := m.timed(cfg.seconds, func() float64 { return iperfGbps(h, nil, iperf, relays[way], streams, cfg.seconds) })
			// Machine CPU: the kernel relay's work runs in softirq and
			// kworker context, which no process is charged for.
			gb := v * float64(cfg.seconds) / 8
			cost[way] = (machineBusy() - busy) * 1000 / gb
			return v
		})
		report(fmt.Sprintf("kernel-relay-throughput-%dstream", streams), "Gbit/s", rows, waySpliceRelay, 0)
		for _, w := range ways {
			fmt.Printf("%-26s   %s: machine CPU %.0f ms per GB (last round)\n", "", w, cost[w])
		}
	}
	rows := measure(ways, func(way string, m *meter) float64 {
		echo := testnet.Echo(h).Addr().String()
		join := spliceJoin
		if way == wayKernelRelay {
			join = km.join
		}
		addr := startRelay(h, echo, join)
		return m.timed(cfg.seconds, func() float64 { return connRate(h, nil, connrate, addr, cfg.seconds) })
	})
	report(fmt.Sprintf("kernel-relay-new-conns-%dthreads", connThreads), "conn/s", rows, waySpliceRelay, 0)
	fmt.Printf("%-26s   sockmap: %d bytes were relayed in user space (sent before a session joined the sockmap)\n", "", km.userBytes.Load())
}

// machineBusy is the CPU seconds every CPU of the machine has spent busy.
func machineBusy() float64 {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0
	}
	var user, nice, sys, idle, iowait, irq, softirq, steal float64
	fmt.Sscanf(string(b), "cpu %f %f %f %f %f %f %f %f", &user, &nice, &sys, &idle, &iowait, &irq, &softirq, &steal)
	return (user + nice + sys + irq + softirq) / 100
}

// startRelay relays every connection to a free loopback port on to
// target, the bytes carried by join, and returns the port's address.
func startRelay(h *harness, target string, join func(client, upstream *net.TCPConn)) string {
	return testnet.Serve(h, func(c net.Conn) {
		up, err := net.Dial("tcp", target)
		if err != nil {
			return
		}
		defer up.Close()
		join(c.(*net.TCPConn), up.(*net.TCPConn))
	}).Addr().String()
}

// spliceJoin is socksfwd's relay in short: both ways with io.Copy, which
// splices between TCP sockets, each half-close passed on.
func spliceJoin(client, upstream *net.TCPConn) { testnet.Join(client, upstream) }

// sockmapRelay holds the sockmap, the map from a socket's cookie to its
// peer's slot, and the verdict program attached to the sockmap.
type sockmapRelay struct {
	socks, peers *ebpf.Map
	prog         *ebpf.Program

	mu   sync.Mutex
	free []uint32 // free pairs of slots, by their even slot

	userBytes atomic.Int64 // relayed in user space, not by the program
}

func newSockmapRelay() (*sockmapRelay, error) {
	socks, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.SockMap, KeySize: 4, ValueSize: 4, MaxEntries: 2 * relayPairsLimit})
	if err != nil {
		return nil, fmt.Errorf("sockmap: %w", err)
	}
	peers, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Hash, KeySize: 8, ValueSize: 4, MaxEntries: 2 * relayPairsLimit})
	if err != nil {
		socks.Close()
		return nil, fmt.Errorf("peer map: %w", err)
	}
	// For each segment: look the socket's cookie up in peers; send the
	// segment out of the peer's socket (bpf_sk_redirect_map without
	// BPF_F_INGRESS), or pass it to the socket as usual when unknown.
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:    ebpf.SkSKB,
		License: "GPL",
		Instructions: asm.Instructions{
			asm.Mov.Reg(asm.R6, asm.R1),
			asm.FnGetSocketCookie.Call(),
			asm.StoreMem(asm.RFP, -8, asm.R0, asm.DWord),
			asm.Mov.Reg(asm.R2, asm.RFP),
			asm.Add.Imm(asm.R2, -8),
			asm.LoadMapPtr(asm.R1, peers.FD()),
			asm.FnMapLookupElem.Call(),
			asm.JEq.Imm(asm.R0, 0, "pass"),
			asm.LoadMem(asm.R3, asm.R0, 0, asm.Word),
			asm.Mov.Reg(asm.R1, asm.R6),
			asm.LoadMapPtr(asm.R2, socks.FD()),
			asm.Mov.Imm(asm.R4, 0),
			asm.FnSkRedirectMap.Call(),
			asm.Return(),
			asm.Mov.Imm(asm.R0, 1).WithSymbol("pass"), // SK_PASS
			asm.Return(),
		},
	})
	if err == nil {
		err = link.RawAttachProgram(link.RawAttachProgramOptions{Target: socks.FD(), Program: prog, Attach: ebpf.AttachSkSKBStreamVerdict})
	}
	if err != nil {
		socks.Close()
		peers.Close()
		if prog != nil {
			prog.Close()
		}
		return nil, fmt.Errorf("sk_skb verdict program: %w", err)
	}
	r := &sockmapRelay{socks: socks, peers: peers, prog: prog}
	for i := range uint32(relayPairsLimit) {
		r.free = append(r.free, 2*i)
	}
	return r, nil
}

func (r *sockmapRelay) close() {
	r.prog.Close()
	r.socks.Close()
	r.peers.Close()
}

// join puts client and upstream in the sockmap, each the other's peer,
// and returns when both directions have ended. A direction ends when its
// source's FIN arrives (the socket reads EOF: its bytes went to the peer
// in the kernel); its half-close is passed on only once the peer has had
// every byte acknowledged, since bytes still queued for the redirect
// would be lost behind the FIN.
func (r *sockmapRelay) join(client, upstream *net.TCPConn) {
	cfd, ccookie, err := socketOf(client)
	ufd, ucookie, err2 := socketOf(upstream)
	if err != nil || err2 != nil {
		return
	}
	r.mu.Lock()
	if len(r.free) == 0 {
		r.mu.Unlock()
		spliceJoin(client, upstream)
		return
	}
	slot := r.free[len(r.free)-1]
	r.free = r.free[:len(r.free)-1]
	r.mu.Unlock()
	defer func() {
		r.peers.Delete(ccookie)
		r.peers.Delete(ucookie)
		r.socks.Delete(slot)
		r.socks.Delete(slot + 1)
		r.mu.Lock()
		r.free = append(r.free, slot)
		r.mu.Unlock()
	}()
	// Both sockets first, then who is whose peer: a segment whose socket
	// has no peer yet passes to the socket as usual (and is read below),
	// while one redirected to an empty slot would be dropped.
	if r.socks.Put(slot, uint32(cfd)) != nil || r.socks.Put(slot+1, uint32(ufd)) != nil ||
		r.peers.Put(ccookie, slot+1) != nil || r.peers.Put(ucookie, slot) != nil {
		spliceJoin(client, upstream)
		return
	}
	var wg sync.WaitGroup
	wg.Go(func() { r.direction(upstream, ufd, client, cfd) })
	r.direction(client, cfd, upstream, ufd)
	wg.Wait()
}

// direction waits for src's end and passes it on to dst once dst has had
// all of src's bytes acknowledged (bounded: a peer that stops reading is
// not waited for).
func (r *sockmapRelay) direction(src *net.TCPConn, sfd int, dst *net.TCPConn, dfd int) {
	buf := make([]byte, 32<<10)
	for {
		// Bytes that arrived before src joined the sockmap are read here
		// and passed on (counted, to show how much took this way): the
		// verdict program sees only later ones.
		n, err := src.Read(buf)
		if n > 0 {
			r.userBytes.Add(int64(n))
			dst.Write(buf[:n])
		}
		if err != nil {
			break
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		si, err1 := unix.GetsockoptTCPInfo(sfd, unix.IPPROTO_TCP, unix.TCP_INFO)
		di, err2 := unix.GetsockoptTCPInfo(dfd, unix.IPPROTO_TCP, unix.TCP_INFO)
		if err1 != nil || err2 != nil || di.Bytes_acked >= si.Bytes_received {
			break
		}
		time.Sleep(200 * time.Microsecond)
	}
	dst.CloseWrite()
}

// socketOf returns a connection's descriptor and socket cookie.
func socketOf(c *net.TCPConn) (fd int, cookie uint64, err error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return 0, 0, err
	}
	cerr := raw.Control(func(f uintptr) {
		fd = int(f)
		cookie, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE)
	})
	return fd, cookie, errors.Join(cerr, err)
}
