package peertest

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
)

// groupAttr starts a peer in its own process group, so that Stop reaches
// what it forks (sshd's children, unshare's sh), and kills it when the
// test process dies without cleaning up.
func groupAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}

func terminateGroup(p *os.Process) { syscall.Kill(-p.Pid, syscall.SIGTERM) }

func killGroup(p *os.Process) { syscall.Kill(-p.Pid, syscall.SIGKILL) }

// groupListens reports whether a process of the group pgid holds the TCP
// socket listening on port (in this network namespace). A port chosen free
// a moment before can be taken meanwhile by another test's socket; a
// connection that succeeds then proves nothing about the peer.
func groupListens(pgid, port int) bool {
	inodes := listenInodes(port)
	if len(inodes) == 0 {
		return false
	}
	procs, err := os.ReadDir("/proc")
	if err != nil {
		return true // cannot tell: trust the connection
	}
	for _, e := range procs {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if pg, err := syscall.Getpgid(pid); err != nil || pg != pgid {
			continue
		}
		fds, err := os.ReadDir("/proc/" + e.Name() + "/fd")
		if err != nil {
			continue
		}
		for _, fd := range fds {
			link, err := os.Readlink("/proc/" + e.Name() + "/fd/" + fd.Name())
			if err == nil && inodes[link] {
				return true
			}
		}
	}
	return false
}

// listenInodes is the set of "socket:[inode]" names of the TCP sockets
// listening on port, IPv4 and IPv6.
func listenInodes(port int) map[string]bool {
	inodes := map[string]bool{}
	want := fmt.Sprintf(":%04X", port)
	for _, table := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		b, err := os.ReadFile(table)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n")[1:] {
			f := strings.Fields(line)
			// sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
			if len(f) > 9 && strings.HasSuffix(f[1], want) && f[3] == "0A" {
				inodes["socket:["+f[9]+"]"] = true
			}
		}
	}
	return inodes
}
