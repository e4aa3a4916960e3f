package tunnel

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"go.uber.org/goleak"

	"github.com/socksfwd/socksfwd/internal/allowlist"
	"github.com/socksfwd/socksfwd/internal/testnet"
	"github.com/socksfwd/socksfwd/socksclient"
	"github.com/socksfwd/socksfwd/socksclient/sockstest"
)

// The -D door, driven by our own SOCKS5 client (socksclient.Dialer) in
// front and sockstest upstreams behind; curl, proxychains and x/net
// against the real binary are cmd/socksfwd's interop tests.

// noLeaks fails the test if a goroutine it started outlives its cleanup.
// Call it first, so that its check runs after every other cleanup.
func noLeaks(t *testing.T) {
	ignore := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, ignore) })
}

// startDoor serves a door on ln (a fresh 127.0.0.1 listener when nil) in
// front of the upstream proxies, until cleanup.
func startDoor(t *testing.T, cfg SOCKSDoorConfig, ln net.Listener, proxies ...string) (*SOCKSDoor, *logBuf) {
	t.Helper()
	var dialers []*socksclient.Dialer
	for _, p := range proxies {
		dialers = append(dialers, &socksclient.Dialer{ProxyAddr: p, HandshakeTimeout: 5 * time.Second})
	}
	return startDoorDialers(t, cfg, ln, dialers...)
}

// startDoorDialers is startDoor with upstream dialers of the test's own.
func startDoorDialers(t *testing.T, cfg SOCKSDoorConfig, ln net.Listener, dialers ...*socksclient.Dialer) (*SOCKSDoor, *logBuf) {
	t.Helper()
	if ln == nil {
		var err error
		if ln, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
	}
	logs := &logBuf{}
	cfg.Forward = TCPForwardConfig{
		Name: ln.Addr().String(), Upstreams: socksclient.NewUpstreams(dialers...),
		Logger: zerolog.New(logs).Level(zerolog.DebugLevel),
	}
	d := NewSOCKSDoor(cfg, ln)
	serveForTest(t, d)
	return d, logs
}

// client is a SOCKS5 client of the door.
func client(d *SOCKSDoor) *socksclient.Dialer {
	return &socksclient.Dialer{ProxyAddr: d.Addr().String(), HandshakeTimeout: 5 * time.Second}
}

// echoTCP sends msg on c and reads it back.
func echoTCP(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := io.WriteString(c, msg); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil || string(got) != msg {
		t.Fatalf("echo: %q, %v; want %q", got, err, msg)
	}
}

// echoUDP sends msg to to through the association and reads the answer,
// which must come from from.
func echoUDP(t *testing.T, u *socksclient.UDPConn, to, from socksclient.Addr, msg string) {
	t.Helper()
	if _, err := u.WriteTo([]byte(msg), to); err != nil {
		t.Fatal(err)
	}
	u.SetReadDeadline(time.Now().Add(10 * time.Second))
	defer u.SetReadDeadline(time.Time{})
	buf := make([]byte, socksclient.MaxUDPHeaderLen+len(msg)+1)
	n, src, err := u.ReadFrom(buf)
	if err != nil || string(buf[:n]) != msg {
		t.Fatalf("udp echo: %q, %v; want %q", buf[:n], err, msg)
	}
	if src != from {
		t.Fatalf("udp answer from %v, want %v", src, from)
	}
}

func udpEchoAddr(t *testing.T) socksclient.Addr {
	return socksclient.AddrFromAddrPort(testnet.UDPEcho(t).LocalAddr().(*net.UDPAddr).AddrPort())
}

// rawRequest greets the door at addr without authentication and sends
// req, written by hand so that it can be what socksclient never sends,
// and returns the conn and the door's reply.
func rawRequest(t *testing.T, addr string, req []byte) (net.Conn, socksclient.Reply) {
	t.Helper()
	c := dialFor(t, addr)
	c.Write([]byte{socksclient.Version, 1, byte(socksclient.MethodNoAuth)})
	if sel, err := socksclient.ReadMethodSelection(c); err != nil || sel.Method != socksclient.MethodNoAuth {
		t.Fatalf("method selection %v, %v", sel, err)
	}
	c.Write(req)
	rep, err := socksclient.ReadReply(c)
	if err != nil {
		t.Fatalf("reply: %v", err)
	}
	return c, rep
}

// TestDoorConnect: CONNECT through the door relays both ways with
// half-close, and the target reaches the upstream as the client sent it:
// an IPv4 address, a name (ATYP 3, for the upstream to resolve), an IPv6
// address.
func TestDoorConnect(t *testing.T) {
	noLeaks(t)
	echo4 := testnet.Echo(t).Addr().(*net.TCPAddr)
	requested := make(chan socksclient.Request, 8)
	up := newSocks(t, sockstest.Config{Requested: requested})
	door, _ := startDoor(t, SOCKSDoorConfig{}, nil, up.Addr())
	targets := []socksclient.Addr{
		socksclient.AddrFromAddrPort(echo4.AddrPort()),
		{Name: "localhost", Port: uint16(echo4.Port)},
	}
	if ln6, err := testnet.ServeOn(t, "[::1]:0", testnet.EchoConn); err == nil {
		targets = append(targets, socksclient.AddrFromAddrPort(ln6.Addr().(*net.TCPAddr).AddrPort()))
	} else if os.Getenv("CI") == "true" {
		t.Fatalf("CI=true requires the IPv6 loopback for the IPv6 target: %v", err)
	} else {
		t.Logf("no IPv6 loopback, IPv6 target left out: %v", err)
	}
	for i, target := range targets {
		c, err := client(door).DialAddr(context.Background(), target)
		if err != nil {
			t.Fatalf("%v: %v", target, err)
		}
		select {
		case got := <-requested:
			if want := (socksclient.Request{Cmd: socksclient.CmdConnect, Addr: target}); got != want {
				t.Fatalf("the upstream was asked %v, want %v", got, want)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("the upstream saw no request")
		}
		if bnd := c.BoundAddr(); !bnd.IP.IsLoopback() || bnd.Port == 0 {
			t.Errorf("bound address %v, want the upstream's loopback one", bnd)
		}
		echoTCP(t, c, "ping")
		// Half-close: the client's FIN reaches the target, which answers
		// and then closes its side, which reaches the client.
		io.WriteString(c, "last words")
		c.CloseWrite()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if rest, err := io.ReadAll(c); err != nil || string(rest) != "last words" {
			t.Fatalf("after half-close: %q, %v", rest, err)
		}
		c.Close()
		if n := door.DoorStats().Requests[socksclient.CmdConnect].Load(); n != int64(i+1) {
			t.Fatalf("CONNECT requests = %d, want %d", n, i+1)
		}
	}
}

// TestDoorAuth: with Credentials the door runs RFC 1929: the right pair
// is served, a wrong one gets status 1 (ErrAuthFailed to the client), a
// client without credentials gets method 0xFF; each refusal is counted.
func TestDoorAuth(t *testing.T) {
	noLeaks(t)
	echo := testnet.Echo(t).Addr().String()
	up := newSocks(t, sockstest.Config{})
	creds, err := ParseProxyCredentials("alice:s3cr:t")
	if err != nil {
		t.Fatal(err)
	}
	door, logs := startDoor(t, SOCKSDoorConfig{Credentials: creds}, nil, up.Addr())
	right := client(door)
	right.Username, right.Password = "alice", "s3cr:t"
	c, err := right.DialContext(context.Background(), "tcp", echo)
	if err != nil {
		t.Fatal(err)
	}
	echoTCP(t, c, "in")
	c.Close()

	// The fields swapped: the password went into the user field, and the
	// refusal's log line must not show it.
	wrong := client(door)
	wrong.Username, wrong.Password = "s3cr:t", "alice"
	if _, err := wrong.DialContext(context.Background(), "tcp", echo); !errors.Is(err, socksclient.ErrAuthFailed) {
		t.Fatalf("wrong credentials: %v, want ErrAuthFailed", err)
	}
	logs.waitFor(t, `"cause":"wrong credentials"`) // written once counted
	if strings.Contains(logs.String(), wrong.Username) {
		t.Fatalf("the log shows the username sent:\n%s", logs)
	}
	if n := door.DoorStats().WrongCredentials.Load(); n != 1 {
		t.Fatalf("WrongCredentials = %d, want 1", n)
	}

	if _, err := client(door).DialContext(context.Background(), "tcp", echo); !errors.Is(err, socksclient.ErrNoAcceptableMethods) {
		t.Fatalf("no credentials: %v, want ErrNoAcceptableMethods", err)
	}
	logs.waitFor(t, `"cause":"no common authentication method"`)
	if n := door.DoorStats().NoCommonMethod.Load(); n != 1 {
		t.Fatalf("NoCommonMethod = %d, want 1", n)
	}
	if n := up.Requests(); n != 1 {
		t.Fatalf("the upstream saw %d requests, want only the authenticated one", n)
	}

	// Credentials changed, say by a reload, apply to the next client.
	door.SetCredentials(nil)
	c, err = client(door).DialContext(context.Background(), "tcp", echo)
	if err != nil {
		t.Fatalf("without credentials after SetCredentials(nil): %v", err)
	}
	echoTCP(t, c, "open")
	c.Close()
}

// TestDoorAuthEmptyField: a client that sends an empty password or
// username (PLEN or ULEN 0: curl -U alice:, x/net with no password) is
// answered RFC 1929 status 1 and counted as wrong credentials, like any
// other pair that does not match, not cut as malformed.
func TestDoorAuthEmptyField(t *testing.T) {
	noLeaks(t)
	up := newSocks(t, sockstest.Config{})
	creds, err := ParseProxyCredentials("alice:pw")
	if err != nil {
		t.Fatal(err)
	}
	door, _ := startDoor(t, SOCKSDoorConfig{Credentials: creds}, nil, up.Addr())
	st := door.DoorStats()
	for i, userpass := range [][]byte{
		{1, 5, 'a', 'l', 'i', 'c', 'e', 0},
		{1, 0, 2, 'p', 'w'},
	} {
		c := dialFor(t, door.Addr().String())
		c.SetDeadline(time.Now().Add(10 * time.Second))
		c.Write([]byte{socksclient.Version, 1, byte(socksclient.MethodUserPass)})
		if sel, err := socksclient.ReadMethodSelection(c); err != nil || sel.Method != socksclient.MethodUserPass {
			t.Fatalf("method selection %v, %v", sel, err)
		}
		c.Write(userpass)
		if status, err := socksclient.ReadUserPassStatus(c); err != nil || status.Success() {
			t.Fatalf("% x: status %v, %v; want status 1", userpass, status, err)
		}
		// The door counts the failure before it hangs up.
		expectClosed(t, c)
		if n := st.WrongCredentials.Load(); n != int64(i+1) {
			t.Fatalf("WrongCredentials = %d, want %d", n, i+1)
		}
	}
	if n := st.Malformed.Load(); n != 0 {
		t.Fatalf("Malformed = %d, want 0", n)
	}
}

// TestDoorPipelinedPayload: a client that sends its greeting, request and
// first bytes at once, without waiting for the answers, has those bytes
// relayed after the reply, none lost or taken for the handshake.
func TestDoorPipelinedPayload(t *testing.T) {
	noLeaks(t)
	echo := testnet.Echo(t).Addr().(*net.TCPAddr)
	up := newSocks(t, sockstest.Config{})
	door, _ := startDoor(t, SOCKSDoorConfig{}, nil, up.Addr())
	c := dialFor(t, door.Addr().String())
	script := []byte{socksclient.Version, 1, byte(socksclient.MethodNoAuth)}
	script, _ = socksclient.Request{Cmd: socksclient.CmdConnect, Addr: socksclient.AddrFromAddrPort(echo.AddrPort())}.AppendTo(script)
	script = append(script, "early bytes"...)
	c.Write(script)
	c.(*net.TCPConn).CloseWrite()
	if sel, err := socksclient.ReadMethodSelection(c); err != nil || sel.Method != socksclient.MethodNoAuth {
		t.Fatalf("method selection %v, %v", sel, err)
	}
	if rep, err := socksclient.ReadReply(c); err != nil || rep.Code != socksclient.RepSucceeded {
		t.Fatalf("reply %v, %v", rep, err)
	}
	if got, err := io.ReadAll(c); err != nil || string(got) != "early bytes" {
		t.Fatalf("after the reply: %q, %v; want the pipelined bytes echoed", got, err)
	}
}

// TestDoorUpstreamRefusals: what the upstreams could not do reaches the
// client as a REP: the upstream's own code as it is, "general failure"
// when no upstream answers, "command not supported" from an upstream that
// hangs up on the command (as ssh -D does on UDP ASSOCIATE); each one
// counted and logged as a failed session.
func TestDoorUpstreamRefusals(t *testing.T) {
	noLeaks(t)
	refusing := newSocks(t, sockstest.Config{Reply: socksclient.RepConnectionRefused})
	hangsUp := newSocks(t, sockstest.Config{Fault: sockstest.FaultCloseAfterRequest})
	refusingPeer := newSocks(t, sockstest.Config{BindSecondReply: socksclient.RepNotAllowed})
	tests := []struct {
		name     string
		upstream string
		do       func(d *socksclient.Dialer) error
		want     socksclient.ReplyCode
	}{
		{"connect refused", refusing.Addr(), func(d *socksclient.Dialer) error {
			_, err := d.DialContext(context.Background(), "tcp", "192.0.2.1:80")
			return err
		}, socksclient.RepConnectionRefused},
		{"no upstream", testnet.ClosedPort(t), func(d *socksclient.Dialer) error {
			_, err := d.DialContext(context.Background(), "tcp", "192.0.2.1:80")
			return err
		}, socksclient.RepGeneralFailure},
		{"udp associate unsupported", hangsUp.Addr(), func(d *socksclient.Dialer) error {
			_, err := d.Associate(context.Background())
			return err
		}, socksclient.RepCommandNotSupported},
		{"bind peer refused", refusingPeer.Addr(), func(d *socksclient.Dialer) error {
			b, err := d.Bind(context.Background(), socksclient.Addr{})
			if err != nil {
				return err
			}
			defer b.Close()
			peer, err := net.Dial("tcp", b.Addr().String())
			if err != nil {
				return err
			}
			defer peer.Close()
			_, err = b.Accept(context.Background())
			return err
		}, socksclient.RepNotAllowed},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			door, logs := startDoor(t, SOCKSDoorConfig{}, nil, tc.upstream)
			err := tc.do(client(door))
			var re *socksclient.ReplyError
			if !errors.As(err, &re) || re.Code != tc.want {
				t.Fatalf("err = %v, want REP %d (%v) from the door", err, tc.want, tc.want)
			}
			logs.waitFor(t, `"message":"session failed"`) // written once counted
			if n := door.Stats().Failed.Load(); n != 1 {
				t.Fatalf("Failed = %d, want 1", n)
			}
		})
	}
}

// TestDoorUpstreamTimeout: an upstream that takes the request and never
// answers (waiting on a target that does not answer) gets the client REP
// 6, TTL expired, as Dante answers its own connect timeouts, not a
// general failure; the session failed, counted and logged.
func TestDoorUpstreamTimeout(t *testing.T) {
	noLeaks(t)
	hangs := newSocks(t, sockstest.Config{Fault: sockstest.FaultHangAfterGreeting})
	door, logs := startDoorDialers(t, SOCKSDoorConfig{}, nil, &socksclient.Dialer{ProxyAddr: hangs.Addr(), HandshakeTimeout: 200 * time.Millisecond})
	_, err := client(door).DialContext(context.Background(), "tcp", "192.0.2.1:80")
	var re *socksclient.ReplyError
	if !errors.As(err, &re) || re.Code != socksclient.RepTTLExpired {
		t.Fatalf("err = %v, want REP 6 (TTL expired) from the door", err)
	}
	logs.waitFor(t, `"message":"session failed"`) // written once counted
	if n := door.Stats().Failed.Load(); n != 1 {
		t.Fatalf("Failed = %d, want 1", n)
	}
}

// TestDoorClientGoneBeforeReply: a client that hangs up while its
// upstream is being dialed is counted (client gone) and logged once, and
// nothing counts as a failure: whether the dial then succeeds (its reply
// cannot be written after a reset; the upstream connection is closed) or
// fails (a FIN: the refusal could still be written, but nobody is left to
// read it), also on every one of several upstreams (no dialer to name).
func TestDoorClientGoneBeforeReply(t *testing.T) {
	echo, err := socksclient.ParseAddr(testnet.Echo(t).Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	unreachable := socksclient.Addr{IP: netip.MustParseAddr("192.0.2.1"), Port: 80}
	for _, c := range []struct {
		name      string
		fault     sockstest.Fault
		timeout   time.Duration
		target    socksclient.Addr
		hangUp    string // reset, close or half-close
		upstreams int
		closed    bool // the upstreams' port is closed
	}{
		{"dial succeeds, client reset", sockstest.FaultNone, 5 * time.Second, echo, "reset", 1, false},
		{"dial fails, client closed", sockstest.FaultHangAfterGreeting, 200 * time.Millisecond, unreachable, "close", 1, false},
		// A FIN may be a half-close: the refusal is written all the same.
		{"dial fails, client half-closed", sockstest.FaultHangAfterGreeting, 200 * time.Millisecond, unreachable, "half-close", 1, false},
		{"every upstream fails, client closed", sockstest.FaultNone, 5 * time.Second, unreachable, "close", 2, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			noLeaks(t)
			addr := newSocks(t, sockstest.Config{Fault: c.fault}).Addr()
			if c.closed {
				addr = testnet.ClosedPort(t)
			}
			gone := make(chan struct{})
			var held []*socksclient.Dialer
			for range c.upstreams {
				held = append(held, &socksclient.Dialer{ProxyAddr: addr, HandshakeTimeout: c.timeout,
					ProxyDial: func(ctx context.Context, network, addr string) (net.Conn, error) {
						select { // the dial waits until the client has gone
						case <-gone:
						case <-ctx.Done():
							return nil, ctx.Err()
						}
						return (&net.Dialer{}).DialContext(ctx, network, addr)
					}})
			}
			door, logs := startDoorDialers(t, SOCKSDoorConfig{}, nil, held...)
			conn := dialFor(t, door.Addr().String())
			conn.Write([]byte{socksclient.Version, 1, byte(socksclient.MethodNoAuth)})
			if _, err := socksclient.ReadMethodSelection(conn); err != nil {
				t.Fatal(err)
			}
			req, err := socksclient.Request{Cmd: socksclient.CmdConnect, Addr: c.target}.AppendTo(nil)
			if err != nil {
				t.Fatal(err)
			}
			conn.Write(req)
			switch c.hangUp {
			case "reset":
				conn.(*net.TCPConn).SetLinger(0)
				conn.Close()
			case "close":
				conn.Close()
			case "half-close":
				conn.(*net.TCPConn).CloseWrite()
			}
			close(gone)
			logs.waitFor(t, "the client hung up before its reply")
			if c.hangUp == "half-close" {
				conn.SetReadDeadline(time.Now().Add(10 * time.Second))
				if rep, err := socksclient.ReadReply(conn); err != nil || rep.Code != socksclient.RepTTLExpired {
					t.Errorf("the half-closed client read %v (%v), want the refusal REP 6", rep, err)
				}
			}
			if n := door.DoorStats().ClientGone.Load(); n != 1 {
				t.Errorf("ClientGone = %d, want 1", n)
			}
			if n := door.Stats().Failed.Load(); n != 0 {
				t.Errorf("Failed = %d, want 0", n)
			}
		})
	}
}

// TestDoorCloseDuringDial: Close while a request's upstream dial waits for
// the upstream's reply ends the session as one cut at shutdown (a debug
// line), not as a failed session.
func TestDoorCloseDuringDial(t *testing.T) {
	noLeaks(t)
	greeted := make(chan struct{}, 1)
	hangs := newSocks(t, sockstest.Config{Fault: sockstest.FaultHangAfterGreeting, Greeted: greeted})
	door, logs := startDoor(t, SOCKSDoorConfig{}, nil, hangs.Addr())
	failed := make(chan error, 1)
	go func() {
		_, err := client(door).DialContext(context.Background(), "tcp", "192.0.2.1:80")
		failed <- err
	}()
	<-greeted // the door's dial now waits for the upstream's reply
	door.Close()
	if err := <-failed; err == nil {
		t.Fatal("the client's CONNECT succeeded after Close")
	}
	if n := door.Stats().Failed.Load(); n != 0 || strings.Contains(logs.String(), `"session failed"`) {
		t.Fatalf("Failed = %d after a Close during the dial, want 0; log:\n%s", n, logs)
	}
	if !strings.Contains(logs.String(), `"cause":"cut at shutdown"`) {
		t.Fatalf("no line says the dial was cut at shutdown:\n%s", logs)
	}
}

// TestDoorFailover: a dead first upstream is skipped.
func TestDoorFailover(t *testing.T) {
	noLeaks(t)
	echo := testnet.Echo(t).Addr().String()
	up := newSocks(t, sockstest.Config{})
	door, _ := startDoor(t, SOCKSDoorConfig{}, nil, testnet.ClosedPort(t), up.Addr())
	for range 2 {
		c, err := client(door).DialContext(context.Background(), "tcp", echo)
		if err != nil {
			t.Fatal(err)
		}
		echoTCP(t, c, "around")
		c.Close()
	}
	if n := up.Requests(); n != 2 {
		t.Fatalf("the live upstream saw %d requests, want 2", n)
	}
}

// TestDoorUDPAssociate: datagrams go through the door and one upstream
// association and back, names staying names for the upstream to resolve;
// fragments the upstream sends are the door's to drop, not its client's.
func TestDoorUDPAssociate(t *testing.T) {
	noLeaks(t)
	echo := udpEchoAddr(t)
	up := newSocks(t, sockstest.Config{UDPFragmentCopies: true})
	door, logs := startDoor(t, SOCKSDoorConfig{}, nil, up.Addr())
	u, err := client(door).Associate(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	if relay := u.Relay(); !relay.Addr().IsLoopback() {
		t.Fatalf("relay %v, want the door's loopback address", relay)
	}
	echoUDP(t, u, echo, echo, "one")
	echoUDP(t, u, socksclient.Addr{Name: "localhost", Port: echo.Port}, echo, "by name")
	big := string(bytes.Repeat([]byte("u"), 60000))
	echoUDP(t, u, echo, echo, big)
	// A datagram can reach its receiver before the door has counted it:
	// once the association has ended (its end line comes after both its
	// relaying goroutines), the counters are final.
	u.Close()
	logs.waitFor(t, `"cmd":"udp associate"`)
	st := door.DoorStats()
	if up, down := st.DatagramsUp.Load(), st.DatagramsDown.Load(); up != 3 || down != 3 {
		t.Fatalf("DatagramsUp = %d, DatagramsDown = %d, want 3, 3", up, down)
	}
	// Each fragment came just before its whole copy, which reached the client.
	if n := st.Upstream.Fragmented.Load(); n != 3 {
		t.Fatalf("upstream fragments dropped = %d, want 3", n)
	}
	if n := u.Stats().Fragmented.Load(); n != 0 {
		t.Fatalf("the client saw %d fragments: the door passed them on", n)
	}
	if n := st.Requests[socksclient.CmdUDPAssociate].Load(); n != 1 {
		t.Fatalf("UDP ASSOCIATE requests = %d, want 1", n)
	}
}

// TestDoorUDPDrops: the door relays only whole datagrams from its client:
// from another socket, with FRAG != 0, or malformed, they are dropped and
// counted, and the association goes on.
func TestDoorUDPDrops(t *testing.T) {
	noLeaks(t)
	echo := udpEchoAddr(t)
	up := newSocks(t, sockstest.Config{})
	door, _ := startDoor(t, SOCKSDoorConfig{}, nil, up.Addr())
	st := door.DoorStats()

	t.Run("source learnt from the first datagram", func(t *testing.T) {
		u, err := client(door).Associate(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		defer u.Close()
		echoUDP(t, u, echo, echo, "first")
		stranger := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
		hdr, _ := socksclient.UDPHeader{Addr: echo}.AppendTo(nil)
		stranger.WriteToUDPAddrPort(append(hdr, "stranger"...), u.Relay())
		echoUDP(t, u, echo, echo, "still mine")
		// The door's one reader of the relay socket took the stranger's
		// datagram, sent first, before relaying this one.
		if n := st.DroppedStranger.Load(); n != 1 {
			t.Fatalf("DroppedStranger = %d, want 1", n)
		}
	})

	t.Run("source named in the request", func(t *testing.T) {
		// The client says where it will send from (RFC 1928 §7), so even
		// the first datagram from elsewhere is a stranger's.
		c := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
		from := socksclient.AddrFromAddrPort(c.LocalAddr().(*net.UDPAddr).AddrPort())
		req, _ := socksclient.Request{Cmd: socksclient.CmdUDPAssociate, Addr: from}.AppendTo(nil)
		_, rep := rawRequest(t, door.Addr().String(), req)
		relay, ok := rep.Addr.AddrPort()
		if rep.Code != socksclient.RepSucceeded || !ok {
			t.Fatalf("reply %v", rep)
		}
		datagram := func(frag byte, payload string) []byte {
			b, _ := socksclient.UDPHeader{Frag: frag, Addr: echo}.AppendTo(nil)
			return append(b, payload...)
		}
		stranger := testnet.ListenUDP(t, "udp4", "127.0.0.1:0")
		stranger.WriteToUDPAddrPort(datagram(0, "stranger"), relay)
		c.WriteToUDPAddrPort(datagram(1, "fragment"), relay)
		c.WriteToUDPAddrPort([]byte{0, 0, 0, 9, 1, 2, 3, 4, 0, 53}, relay)
		// None of them went on: the first answer is the whole one's. The
		// door's one reader of the relay socket took them, sent first,
		// before relaying it, so they are counted once it comes.
		c.WriteToUDPAddrPort(datagram(0, "whole"), relay)
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		buf := make([]byte, 512)
		n, src, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			t.Fatal(err)
		}
		h, hlen, err := socksclient.ParseUDPHeader(buf[:n])
		if err != nil || src != relay || h.Addr != echo || h.Frag != 0 || string(buf[hlen:n]) != "whole" {
			t.Fatalf("answer from %v: %v % x, %v; want the echo of \"whole\" from the relay", src, h, buf[:n], err)
		}
		stranger2, frag, malformed := st.DroppedStranger.Load(), st.DroppedFragment.Load(), st.DroppedMalformed.Load()
		if stranger2 != 2 || frag != 1 || malformed != 1 {
			t.Fatalf("DroppedStranger %d, DroppedFragment %d, DroppedMalformed %d; want 2, 1, 1", stranger2, frag, malformed)
		}
	})
}

// TestDoorUDPAllow: the source a UDP ASSOCIATE names (RFC 1928 §7) is
// the one the relay will serve, so it must pass --allow like the client's
// own connection: one the list refuses gets REP 2, without an upstream
// association, and is counted and logged; one it admits, zeros, or any
// source without a list, are served.
func TestDoorUDPAllow(t *testing.T) {
	noLeaks(t)
	up := newSocks(t, sockstest.Config{})
	door, logs := startDoor(t, SOCKSDoorConfig{}, nil, up.Addr())
	allow, err := allowlist.Parse([]string{"10.0.0.0/8"})
	if err != nil {
		t.Fatal(err)
	}
	associate := func(hint string) socksclient.ReplyCode {
		t.Helper()
		req, _ := socksclient.Request{Cmd: socksclient.CmdUDPAssociate, Addr: socksclient.AddrFromAddrPort(netip.MustParseAddrPort(hint))}.AppendTo(nil)
		c, rep := rawRequest(t, door.Addr().String(), req)
		c.Close()
		return rep.Code
	}
	door.SetAdmission(0, allow) // the client, on loopback, is admitted
	if got := associate("192.0.2.7:5000"); got != socksclient.RepNotAllowed {
		t.Fatalf("a source outside --allow answered %v, want REP 2", got)
	}
	logs.waitFor(t, `"message":"request refused: the UDP source it names is not allowed"`)
	if n := door.DoorStats().SourceNotAllowed.Load(); n != 1 {
		t.Fatalf("SourceNotAllowed = %d, want 1", n)
	}
	if n := up.Requests(); n != 0 {
		t.Fatalf("the upstream saw %d requests for a refused one", n)
	}
	for _, hint := range []string{"10.1.2.3:5000", "0.0.0.0:0", "0.0.0.0:5000", "127.0.0.1:5000"} {
		if got := associate(hint); got != socksclient.RepSucceeded {
			t.Fatalf("source %s answered %v, want success", hint, got)
		}
	}
	door.SetAdmission(0, nil)
	if got := associate("192.0.2.7:5000"); got != socksclient.RepSucceeded {
		t.Fatalf("without --allow: answered %v, want success", got)
	}
	if n := door.DoorStats().SourceNotAllowed.Load(); n != 1 {
		t.Fatalf("SourceNotAllowed = %d, want 1", n)
	}
}

// TestDoorUDPEnds: an association through the door lives as long as both
// control connections: the client's closing it ends the door's session,
// and the upstream's closing its own ends the client's association.
func TestDoorUDPEnds(t *testing.T) {
	noLeaks(t)
	echo := udpEchoAddr(t)
	t.Run("client closes", func(t *testing.T) {
		up := newSocks(t, sockstest.Config{})
		door, logs := startDoor(t, SOCKSDoorConfig{}, nil, up.Addr())
		u, err := client(door).Associate(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		echoUDP(t, u, echo, echo, "bye")
		relay := u.Relay()
		u.Close()
		logs.waitFor(t, `"cmd":"udp associate"`) // the session's end line
		if n := door.Stats().Active.Load(); n != 0 {
			t.Fatalf("%d sessions active after the client left", n)
		}
		// The door's relay socket is gone: a datagram to it is refused.
		probe, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(relay))
		if err != nil {
			t.Fatal(err)
		}
		defer probe.Close()
		probe.Write([]byte{0, 0, 0, 1, 127, 0, 0, 1, 0, 9})
		probe.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := probe.Read(make([]byte, 16)); !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("datagram to the door's old relay: %v, want connection refused", err)
		}
	})
	t.Run("upstream closes", func(t *testing.T) {
		up := newSocks(t, sockstest.Config{UDPCloseControlAfter: 1})
		door, logs := startDoor(t, SOCKSDoorConfig{}, nil, up.Addr())
		u, err := client(door).Associate(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		defer u.Close()
		u.WriteTo([]byte("last"), echo)
		u.SetReadDeadline(time.Now().Add(10 * time.Second))
		buf := make([]byte, 64)
		for range 2 { // the echo may still come back before the end
			if _, _, err = u.ReadFrom(buf); err != nil {
				break
			}
		}
		if !errors.Is(err, socksclient.ErrAssociationClosed) {
			t.Fatalf("read after the upstream ended its association: %v, want ErrAssociationClosed", err)
		}
		logs.waitFor(t, `"cmd":"udp associate"`)
		if n := door.Stats().Active.Load(); n != 0 {
			t.Fatalf("%d sessions active after the upstream left", n)
		}
	})
}

// TestDoorUDPRelayRefused: an ICMP port unreachable from the upstream's
// relay, which the door reads as ECONNREFUSED, is counted and the
// association goes on: the next datagram still goes through.
func TestDoorUDPRelayRefused(t *testing.T) {
	noLeaks(t)
	up, relay := refusingUpstream(t)
	door, logs := startDoor(t, SOCKSDoorConfig{}, nil, up)
	u, err := client(door).Associate(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	// The relay below is an echo: the answer carries the header sent.
	to := socksclient.Addr{IP: netip.MustParseAddr("192.0.2.1"), Port: 53}
	if _, err := u.WriteTo([]byte("refused"), to); err != nil {
		t.Fatal(err)
	}
	logs.waitFor(t, "an ICMP error came back") // logged once counted
	if n := door.DoorStats().RelayRefused.Load(); n != 1 {
		t.Fatalf("RelayRefused = %d, want 1", n)
	}
	relay.answer(t)
	echoUDP(t, u, to, to, "after")
}

// TestDoorBind: BIND through the door listens at the upstream; the first
// reply names where, the second the peer that came, and the session is
// relayed both ways with half-close.
func TestDoorBind(t *testing.T) {
	noLeaks(t)
	up := newSocks(t, sockstest.Config{})
	door, _ := startDoor(t, SOCKSDoorConfig{}, nil, up.Addr())
	b, err := client(door).Bind(context.Background(), socksclient.Addr{})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	peer, err := net.Dial("tcp", b.Addr().String())
	if err != nil {
		t.Fatalf("dialing the first reply's %v: %v", b.Addr(), err)
	}
	defer peer.Close()
	c, err := b.Accept(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if got := c.BoundAddr().String(); got != peer.LocalAddr().String() {
		t.Errorf("second reply names %s, want the peer %s", got, peer.LocalAddr())
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	peer.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(peer, "from peer")
	peer.(*net.TCPConn).CloseWrite()
	if got, err := io.ReadAll(c); err != nil || string(got) != "from peer" {
		t.Fatalf("client read %q, %v", got, err)
	}
	io.WriteString(c, "from client")
	c.CloseWrite()
	if got, err := io.ReadAll(peer); err != nil || string(got) != "from client" {
		t.Fatalf("peer read %q, %v", got, err)
	}
	if n := door.DoorStats().Requests[socksclient.CmdBind].Load(); n != 1 {
		t.Fatalf("BIND requests = %d, want 1", n)
	}
}

// TestDoorRefusesBadRequests: an unknown command gets REP 7 and an unknown
// address type REP 8, without reaching an upstream; a malformed greeting,
// and a client that says nothing until HandshakeTimeout, are cut and
// counted; the door serves on.
func TestDoorRefusesBadRequests(t *testing.T) {
	noLeaks(t)
	echo := testnet.Echo(t).Addr().String()
	up := newSocks(t, sockstest.Config{})
	door, logs := startDoor(t, SOCKSDoorConfig{HandshakeTimeout: 100 * time.Millisecond}, nil, up.Addr())
	st := door.DoorStats()
	works := func() {
		t.Helper()
		c, err := client(door).DialContext(context.Background(), "tcp", echo)
		if err != nil {
			t.Fatalf("the door stopped serving: %v", err)
		}
		echoTCP(t, c, "still")
		c.Close()
	}

	c, rep := rawRequest(t, door.Addr().String(), []byte{5, 9, 0, 1, 127, 0, 0, 1, 0, 80})
	if rep.Code != socksclient.RepCommandNotSupported {
		t.Fatalf("unknown command answered %v, want REP 7", rep)
	}
	expectClosed(t, c)
	if n := st.Requests[0].Load(); n != 1 {
		t.Fatalf("unknown-command requests = %d, want 1", n)
	}

	c, rep = rawRequest(t, door.Addr().String(), []byte{5, 1, 0, 9, 127, 0, 0, 1, 0, 80})
	if rep.Code != socksclient.RepAddrTypeNotSupported {
		t.Fatalf("unknown address type answered %v, want REP 8", rep)
	}
	expectClosed(t, c)
	logs.waitFor(t, `"cause":"malformed handshake"`)
	if n := st.Malformed.Load(); n != 1 {
		t.Fatalf("Malformed = %d, want 1", n)
	}
	works()

	c = dialFor(t, door.Addr().String())
	c.Write([]byte{4, 1, 0, 80, 127, 0, 0, 1, 0}) // SOCKS4
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if got, err := io.ReadAll(c); err != nil || !bytes.Equal(got, []byte{0, 91, 0, 0, 0, 0, 0, 0}) {
		t.Fatalf("a SOCKS4 client got % x (%v), want SOCKS4's \"request rejected\" and a hang-up", got, err)
	}
	logs.waitFor(t, `"cause":"SOCKS4 client"`)
	if n, m := st.SOCKS4.Load(), st.Malformed.Load(); n != 1 || m != 1 {
		t.Fatalf("SOCKS4 = %d, Malformed = %d; want 1, 1 (a SOCKS4 client is told from garbage)", n, m)
	}
	works()

	expectClosed(t, dialFor(t, door.Addr().String())) // says nothing
	logs.waitFor(t, `"cause":"handshake timeout"`)
	if n := st.HandshakeTimeout.Load(); n != 1 {
		t.Fatalf("HandshakeTimeout = %d, want 1", n)
	}
	works()
	if n := up.Requests(); n != 3 {
		t.Fatalf("the upstream saw %d requests, want the 3 good ones", n)
	}
	// A refused session ends just after its client sees the door hang
	// up, with nothing to say so. Shutdown returns once every session has
	// ended on its own (it cuts none before its deadline): then none may
	// still count as active.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := door.Shutdown(ctx); err != nil {
		t.Fatalf("sessions still open 10 s after the last exchange: %v", err)
	}
	if n := door.Stats().Active.Load(); n != 0 {
		t.Fatalf("%d sessions active, want 0", n)
	}
}

// expectClosed reads c until the door ends it, at most 10 s.
func expectClosed(t *testing.T, c net.Conn) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err := io.Copy(io.Discard, c)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatal("the door left the connection open")
	}
}

// live is one session of each kind through a door, each past its first
// exchange.
type live struct {
	connect  net.Conn
	udp      *socksclient.UDPConn
	udpEcho  socksclient.Addr
	bind     net.Conn // the client's end of an accepted BIND
	bindPeer net.Conn
	waiting  *socksclient.Binding // a BIND still waiting for its peer
}

func openLive(t *testing.T, door *SOCKSDoor, echo string) *live {
	t.Helper()
	l := &live{udpEcho: udpEchoAddr(t)}
	var err error
	if l.connect, err = client(door).DialContext(context.Background(), "tcp", echo); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.connect.Close() })
	if l.udp, err = client(door).Associate(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.udp.Close() })
	b, err := client(door).Bind(context.Background(), socksclient.Addr{})
	if err != nil {
		t.Fatal(err)
	}
	if l.bindPeer, err = net.Dial("tcp", b.Addr().String()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.bindPeer.Close() })
	if l.bind, err = b.Accept(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.bind.Close() })
	if l.waiting, err = client(door).Bind(context.Background(), socksclient.Addr{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.waiting.Close() })
	l.exchange(t, "1")
	return l
}

// exchange passes msg through every established session.
func (l *live) exchange(t *testing.T, msg string) {
	t.Helper()
	echoTCP(t, l.connect, msg)
	echoUDP(t, l.udp, l.udpEcho, l.udpEcho, msg)
	l.bindPeer.SetDeadline(time.Now().Add(10 * time.Second))
	defer l.bindPeer.SetDeadline(time.Time{})
	io.WriteString(l.bind, msg)
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(l.bindPeer, got); err != nil || string(got) != msg {
		t.Fatalf("bind session: %q, %v", got, err)
	}
}

// TestDoorShutdownDrains: Shutdown stops accepting, lets CONNECT, UDP and
// BIND sessions go on, and returns when the last has ended.
func TestDoorShutdownDrains(t *testing.T) {
	noLeaks(t)
	echo := testnet.Echo(t).Addr().String()
	up := newSocks(t, sockstest.Config{})
	ln := newCloseNotifyListener(t)
	door, _ := startDoor(t, SOCKSDoorConfig{}, ln, up.Addr())
	l := openLive(t, door, echo)
	shut := make(chan error, 1)
	go func() { shut <- door.Shutdown(context.Background()) }()
	<-ln.closed
	l.exchange(t, "2")
	select {
	case err := <-shut:
		t.Fatalf("Shutdown returned (%v) with sessions live", err)
	default:
	}
	l.connect.(interface{ CloseWrite() error }).CloseWrite()
	io.Copy(io.Discard, l.connect)
	l.udp.Close()
	l.bindPeer.Close()
	l.bind.Close()
	l.waiting.Close()
	select {
	case err := <-shut:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("Shutdown still waiting after every session ended (%d active)", door.Stats().Active.Load())
	}
}

// TestDoorCloseCuts: Close cuts every live session, a BIND still waiting
// for its peer and a client halfway through its handshake included, and
// returns with nothing of theirs left running; none of them counts or is
// logged as a failed session.
func TestDoorCloseCuts(t *testing.T) {
	noLeaks(t)
	echo := testnet.Echo(t).Addr().String()
	up := newSocks(t, sockstest.Config{})
	door, logs := startDoor(t, SOCKSDoorConfig{}, nil, up.Addr())
	l := openLive(t, door, echo)
	greeted := dialFor(t, door.Addr().String())
	greeted.Write([]byte{socksclient.Version, 1, byte(socksclient.MethodNoAuth)})
	if _, err := socksclient.ReadMethodSelection(greeted); err != nil {
		t.Fatal(err)
	}
	// 5 s: far below the handshake's own bound.
	returnsWithin(t, 5*time.Second, "Close waits for a handshake to time out", func() { door.Close() })
	if n := door.Stats().Active.Load(); n != 0 {
		t.Fatalf("%d sessions active after Close", n)
	}
	// Close returns after every session's end was counted and logged.
	if n := door.Stats().Failed.Load(); n != 0 || strings.Contains(logs.String(), `"session failed"`) {
		t.Fatalf("Failed = %d after Close, want 0; log:\n%s", n, logs)
	}
	expectClosed(t, greeted)
	expectClosed(t, l.connect)
	expectClosed(t, l.bind)
	expectClosed(t, l.bindPeer)
	l.udp.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, _, err := l.udp.ReadFrom(make([]byte, 64)); !errors.Is(err, socksclient.ErrAssociationClosed) {
		t.Fatalf("association after Close: %v, want ErrAssociationClosed", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := l.waiting.Accept(ctx); err == nil || errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("waiting BIND after Close: %v, want the door's hang-up", err)
	}
}

// TestDoorDualStack: a door on [::] serves clients that reach it over
// IPv4 and over IPv6, each with a UDP relay on the address it reached:
// a plain IPv4 address for the first, not an IPv4-mapped one.
func TestDoorDualStack(t *testing.T) {
	noLeaks(t)
	ln, err := net.Listen("tcp", "[::]:0")
	if err != nil {
		t.Skipf("no IPv6 here: %v", err)
	}
	echo := testnet.Echo(t).Addr().String()
	udpEcho := udpEchoAddr(t)
	up := newSocks(t, sockstest.Config{})
	door, _ := startDoor(t, SOCKSDoorConfig{}, ln, up.Addr())
	port := uint16(door.Addr().(*net.TCPAddr).Port)
	for _, ip := range []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.IPv6Loopback()} {
		d := client(door)
		d.ProxyAddr = netip.AddrPortFrom(ip, port).String()
		c, err := d.DialContext(context.Background(), "tcp", echo)
		if err != nil {
			t.Fatalf("through %s: %v", d.ProxyAddr, err)
		}
		echoTCP(t, c, "dual")
		c.Close()
		u, err := d.Associate(context.Background())
		if err != nil {
			t.Fatalf("through %s: %v", d.ProxyAddr, err)
		}
		if u.Relay().Addr() != ip {
			t.Errorf("through %s: relay %v, want on %v", d.ProxyAddr, u.Relay(), ip)
		}
		echoUDP(t, u, udpEcho, udpEcho, "dual")
		u.Close()
	}
}
