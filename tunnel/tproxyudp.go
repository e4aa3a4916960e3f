package tunnel

import (
	"errors"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/rs/zerolog"

	"github.com/socksfwd/socksfwd/socksclient"
)

// ErrTransparentUDPNeedsNetAdmin: TPROXY hands UDP datagrams only to a
// socket with IP_TRANSPARENT, which needs CAP_NET_ADMIN; unlike TCP there
// is no REDIRECT to fall back to (NAT cannot tell a UDP socket where a
// datagram was going).
var ErrTransparentUDPNeedsNetAdmin = errors.New("transparent UDP (TPROXY) needs CAP_NET_ADMIN for IP_TRANSPARENT")

// Transparent UDP defaults.
const (
	// DefaultTProxyReplySockets bounds the sockets bound to remote
	// addresses that carry replies back to clients.
	DefaultTProxyReplySockets = 1024
)

// TransparentUDPConfig describes one --transparent …/udp listener.
type TransparentUDPConfig struct {
	Name      string
	Upstreams *socksclient.Upstreams
	// IdleTimeout ends a client's session (and its association) with no
	// datagram either way for this long (default DefaultUDPIdleTimeout).
	// It also closes a reply socket unused for this long.
	IdleTimeout time.Duration
	// MaxSessions bounds the sessions, one per client address (default
	// DefaultUDPMaxSessions); a new client that finds the table full
	// evicts the session idle the longest.
	MaxSessions int
	// QueueBytes bounds the buffers of datagrams queued for sessions
	// (default DefaultUDPQueueBytes).
	QueueBytes int
	// MaxReplySockets bounds the reply sockets, one per remote address
	// (default DefaultTProxyReplySockets); the least recently used goes.
	MaxReplySockets int
	// Control, if not nil, runs on every socket that sends replies to
	// clients (a socket mark, so that capture rules skip them).
	Control func(network, address string, c syscall.RawConn) error
	Logger  zerolog.Logger
}

// TransparentUDPStats counts a transparent UDP listener's sessions and
// datagrams. The UDPStats part means what it means for a UDP forward;
// every datagram read is either sent or counted under one Dropped reason
// (here or there).
type TransparentUDPStats struct {
	// UDPStats.DroppedReply counts, here, replies whose source is a name,
	// of the other family than the client's, or no remote's (a wildcard,
	// port 0, multicast or broadcast address), and those that both ways
	// of sending failed.
	UDPStats
	// DroppedNoDest: the datagram came without its original destination
	// (no TPROXY rule sent it, or the control message was cut).
	DroppedNoDest atomic.Int64
	// DroppedNotRedirected: its original destination is the listener
	// itself; relaying it would loop.
	DroppedNotRedirected atomic.Int64
	// DroppedOwnRelay: its original destination is the UDP relay of one
	// of the listener's own associations, so it is socksfwd's own
	// datagram, captured again by rules that do not leave it out.
	DroppedOwnRelay atomic.Int64
	// ReplySockets is the number of open reply sockets.
	ReplySockets atomic.Int64
	// ReplyBindFailures counts remotes whose reply socket could not bind
	// (a local service holds that address and port, or descriptors ran
	// out), once per remote until a retry binds it or it idles out.
	ReplyBindFailures atomic.Int64
	// RawReplies counts replies sent through a raw IP socket instead.
	RawReplies atomic.Int64
}
