package peertest

import (
	"os"
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
