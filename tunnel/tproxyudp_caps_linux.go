package tunnel

import (
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// TransparentUDPReplyLimits says what this process lacks to send every
// reply of a transparent UDP listener from its remote's address, one
// sentence each: binding a remote's port below the unprivileged bound
// (DNS 53, HTTPS/QUIC 443, NTP 123) takes CAP_NET_BIND_SERVICE, which
// IP_TRANSPARENT does not waive, and the raw socket that answers when a
// local service holds a remote's port takes CAP_NET_RAW. Such replies are
// dropped and counted; this is for one line at start instead of a
// surprise.
func TransparentUDPReplyLimits() []string {
	var limits []string
	if start := unprivilegedPortStart(); start > 1 && !hasCap(unix.CAP_NET_BIND_SERVICE) {
		limits = append(limits, "without CAP_NET_BIND_SERVICE, replies from remote ports below "+strconv.Itoa(start)+
			" (DNS, HTTPS/QUIC, NTP) cannot be sent from their remote's address and are dropped")
	}
	if !hasCap(unix.CAP_NET_RAW) {
		limits = append(limits, "without CAP_NET_RAW, a reply from a remote whose port a local service holds is dropped")
	}
	return limits
}

// unprivilegedPortStart is the lowest port any process may bind
// (net.ipv4.ip_unprivileged_port_start, which covers IPv6 too).
func unprivilegedPortStart() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_unprivileged_port_start")
	if err != nil {
		return 1024
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 1024
	}
	return n
}

// hasCap reports whether the process has capability c in its effective set.
func hasCap(c int) bool {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return false
	}
	return data[c/32].Effective&(1<<(uint(c)%32)) != 0
}
