//go:build !linux

package peertest

import (
	"os"
	"syscall"
)

// The peers are Debian packages run on Linux; elsewhere this package only
// has to build (cmd/socksbench imports it), so a peer is stopped alone.

func groupAttr() *syscall.SysProcAttr { return nil }

func terminateGroup(p *os.Process) { p.Kill() }

func killGroup(p *os.Process) { p.Kill() }

// groupListens cannot tell here: the connection is trusted.
func groupListens(pgid, port int) bool { return true }
