package main

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/coreos/go-systemd/v22/activation"
	sdnotify "github.com/coreos/go-systemd/v22/daemon"
	"github.com/rs/zerolog"
)

// systemd is socksfwd's side of a systemd service: state notifications on
// NOTIFY_SOCKET (ready, reloading, stopping, the watchdog) and the
// listening sockets systemd passed (LISTEN_FDS). The zero value is a
// process systemd did not start: it does nothing.
type systemd struct {
	log zerolog.Logger
	// notifySocket is NOTIFY_SOCKET; nil: nobody to notify.
	notifySocket *net.UnixAddr
	warned       atomic.Bool // a failed notification was logged at warn
	// watchdogEvery is half of WATCHDOG_USEC, as sd_watchdog_enabled(3)
	// advises; 0: no watchdog.
	watchdogEvery time.Duration
	watchdogTick  *time.Ticker // from the first ready on

	// passed are the sockets systemd passed, each matched at start to the
	// listener it serves. A listener serves a duplicate and the original
	// stays open until close: a listener that one reload removes and
	// another adds back serves the same socket again (systemd still holds
	// it, so binding the address here would fail).
	passed []*passedSocket
}

// passedSocket is one socket systemd passed.
type passedSocket struct {
	file   *os.File
	name   string         // FileDescriptorName=, or LISTEN_FD_<n>
	stream bool           // a TCP listener; otherwise a UDP socket
	addr   netip.AddrPort // its local address
	key    string         // the listener it serves (listenPlan.key)
}

// newSystemd reads what systemd set in the environment and matches the
// sockets it passed to the plan's listeners: a socket that matches none
// is an error, since systemd would keep it bound for nothing.
func newSystemd(getenv func(string) string, log zerolog.Logger, listens []listenPlan) (*systemd, error) {
	sd := &systemd{log: log}
	if path := getenv("NOTIFY_SOCKET"); path != "" {
		sd.notifySocket = &net.UnixAddr{Name: path, Net: "unixgram"}
		every, err := watchdogInterval(getenv, os.Getpid())
		if err != nil {
			log.Warn().Err(err).Msg("systemd watchdog off")
		}
		sd.watchdogEvery = every
	}
	// activation.Files reads the process environment itself; getenv is
	// that environment outside tests, and keeps tests away from it.
	if getenv("LISTEN_FDS") != "" {
		var err error
		sd.passed, err = passedSockets(activation.Files(true))
		if err == nil {
			err = matchPassed(sd.passed, listens)
		}
		if err != nil {
			sd.close()
			return nil, err
		}
	}
	return sd, nil
}

// watchdogInterval is how often to ping systemd's watchdog: half of
// WATCHDOG_USEC, or 0 when there is no watchdog or it watches another
// process (WATCHDOG_PID).
func watchdogInterval(getenv func(string) string, pid int) (time.Duration, error) {
	usec := getenv("WATCHDOG_USEC")
	if usec == "" {
		return 0, nil
	}
	if wpid := getenv("WATCHDOG_PID"); wpid != "" && wpid != strconv.Itoa(pid) {
		return 0, nil
	}
	n, err := strconv.ParseInt(usec, 10, 64)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("WATCHDOG_USEC=%q: want a positive number of microseconds", usec)
	}
	return time.Duration(n) * time.Microsecond / 2, nil
}

// ready says every listener is bound (status is a one-line summary) and
// starts the watchdog's ticker on the first call.
func (sd *systemd) ready(status string) {
	sd.notify(sdnotify.SdNotifyReady, "STATUS="+status)
	if sd.watchdogEvery > 0 && sd.watchdogTick == nil {
		sd.watchdogTick = time.NewTicker(sd.watchdogEvery)
	}
}

// watchdogDue ticks when the watchdog is to be pinged (never without
// one). The supervisor's own loop pings, so that a supervisor stuck in a
// reload or a drain stops the pings and systemd restarts it, as the
// watchdog is for; a goroutine of its own would ping on regardless.
func (sd *systemd) watchdogDue() <-chan time.Time {
	if sd.watchdogTick == nil {
		return nil
	}
	return sd.watchdogTick.C
}

// pingWatchdog tells systemd the process is alive.
func (sd *systemd) pingWatchdog() { sd.notify(sdnotify.SdNotifyWatchdog) }

// reloading says a reload begins. Type=notify-reload needs the monotonic
// time with it, to tell this reload from an older one.
func (sd *systemd) reloading() {
	sd.notify(sdnotify.SdNotifyReloading, strings.TrimSuffix(sdnotify.SdNotifyMonotonicUsec(), "\n"), "STATUS=reloading the configuration")
}

// reloaded says the reload is over, whatever its result: either way the
// process serves again (the old configuration, when err is not nil).
func (sd *systemd) reloaded(err error, status string) {
	if err != nil {
		status = "reload failed, configuration kept (" + err.Error() + "): " + status
	} else {
		status = "reloaded: " + status
	}
	sd.notify(sdnotify.SdNotifyReady, "STATUS="+status)
}

// stopping says the drain began.
func (sd *systemd) stopping() {
	sd.notify(sdnotify.SdNotifyStopping, "STATUS=stopping: draining sessions")
}

// notify sends one datagram of newline-separated assignments (empty ones
// left out) to NOTIFY_SOCKET, on a socket of its own, as sd_notify(3)
// does: the watchdog and the supervisor send concurrently, and a systemd
// re-executing itself binds the socket anew.
func (sd *systemd) notify(fields ...string) {
	if sd.notifySocket == nil {
		return
	}
	var msg strings.Builder
	for _, f := range fields {
		if f == "" {
			continue
		}
		if msg.Len() > 0 {
			msg.WriteByte('\n')
		}
		// A value is one line: a newline would start an assignment.
		msg.WriteString(strings.ReplaceAll(f, "\n", " "))
	}
	c, err := net.DialUnix("unixgram", nil, sd.notifySocket)
	if err == nil {
		// A reader that stopped reading must not hold up a reload or
		// the exit: the send would block once its queue is full.
		c.SetWriteDeadline(time.Now().Add(notifyTimeout))
		_, err = c.Write([]byte(msg.String()))
		c.Close()
	}
	if err != nil {
		ev := sd.log.Debug()
		if !sd.warned.Swap(true) {
			ev = sd.log.Warn()
		}
		ev.Err(err).Str("notify_socket", sd.notifySocket.Name).Msg("cannot notify systemd")
	}
}

// notifyTimeout bounds one notification's send.
const notifyTimeout = time.Second

// close stops the watchdog's ticker and closes the passed sockets' originals.
func (sd *systemd) close() {
	if sd.watchdogTick != nil {
		sd.watchdogTick.Stop()
		sd.watchdogTick = nil
	}
	for _, p := range sd.passed {
		p.file.Close()
	}
	sd.passed = nil
}

// passedSockets finds out what each file systemd passed is: a listening
// TCP socket or a UDP socket, and its local address.
func passedSockets(files []*os.File) ([]*passedSocket, error) {
	passed := make([]*passedSocket, 0, len(files))
	var errs []error
	for _, f := range files {
		p := &passedSocket{file: f, name: f.Name()}
		passed = append(passed, p)
		c, err := net.FileConn(f)
		if err != nil {
			errs = append(errs, fmt.Errorf("socket %s passed by systemd: %w", p.name, err))
			continue
		}
		switch a := c.LocalAddr().(type) {
		case *net.TCPAddr:
			p.stream, p.addr = true, a.AddrPort()
		case *net.UDPAddr:
			p.addr = a.AddrPort()
		default:
			err = fmt.Errorf("socket %s passed by systemd is a %s socket; socksfwd takes TCP listeners and UDP sockets", p.name, c.LocalAddr().Network())
		}
		if err == nil && c.RemoteAddr() != nil {
			err = fmt.Errorf("socket %s passed by systemd is connected to %s: use Accept=no", p.name, c.RemoteAddr())
		}
		c.Close()
		if err != nil {
			errs = append(errs, err)
		}
	}
	return passed, errors.Join(errs...)
}

// fdName is the FileDescriptorName= that gives a passed socket to
// listener l whatever the socket's address: the option's long name and
// the port it binds ("local-5432", "dns-53", "transparent-12345"). The
// option's value itself cannot be a name: systemd forbids colons there.
func fdName(l listenPlan) string {
	_, port, _ := net.SplitHostPort(l.addr)
	option := "local"
	switch l.kind {
	case kindDNS:
		option = "dns"
	case kindTransparent, kindTransparentUDP:
		option = "transparent"
	case kindAdmin:
		option = "admin"
	case kindHTTP:
		option = "http"
	case kindSOCKS:
		option = "dynamic"
	}
	return option + "-" + port
}

// at reports whether the socket is bound to addr, a listener's host:port;
// an empty host is every interface, which systemd's ListenStream=53 binds
// as Go's ":53" does.
func (p *passedSocket) at(addr string) bool {
	host, port, err := net.SplitHostPort(addr)
	if err != nil || port != strconv.Itoa(int(p.addr.Port())) {
		return false
	}
	got := p.addr.Addr().Unmap().WithZone("")
	if host == "" {
		return got.IsUnspecified()
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.Unmap() == got
}

// wants reports whether a listener of kind serves a stream socket (TCP)
// or a datagram socket (UDP); DNS serves both at one address.
func wants(kind listenKind, stream bool) bool {
	if kind == kindReverse { // binds nothing here
		return false
	}
	if kind == kindDNS {
		return true
	}
	return stream == (kind == kindTCP || kind == kindTransparent || kind == kindAdmin || kind == kindHTTP || kind == kindSOCKS)
}

// matchPassed gives each passed socket to one listener of the right kind,
// by FileDescriptorName (preferring the listener at the socket's address
// when "localhost" made two of one name), then by address. A socket left
// over is an error naming it.
func matchPassed(passed []*passedSocket, listens []listenPlan) error {
	type slot struct {
		key    string
		stream bool
	}
	taken := make(map[slot]bool)
	rules := []func(p *passedSocket, l listenPlan) bool{
		func(p *passedSocket, l listenPlan) bool { return p.name == fdName(l) && p.at(l.addr) },
		func(p *passedSocket, l listenPlan) bool { return p.name == fdName(l) },
		func(p *passedSocket, l listenPlan) bool { return p.at(l.addr) },
	}
	for _, rule := range rules {
		for _, p := range passed {
			for _, l := range listens {
				s := slot{l.key(), p.stream}
				if p.key == "" && wants(l.kind, p.stream) && !taken[s] && rule(p, l) {
					p.key, taken[s] = s.key, true
				}
			}
		}
	}
	for _, p := range passed {
		if p.key == "" {
			kind := "udp"
			if p.stream {
				kind = "tcp"
			}
			return fmt.Errorf("socket %s (%s %s) passed by systemd matches no listener: give it the address of a -L, -D, --http, --dns, --transparent or --admin listener, or FileDescriptorName=local-PORT, dynamic-PORT, http-PORT, dns-PORT, transparent-PORT or admin-PORT", p.name, kind, p.addr)
		}
	}
	return nil
}

// passedFor returns the sockets systemd passed for the listener with key
// (none when it passed none: the listener is bound as usual).
func (sd *systemd) passedFor(key string) []*passedSocket {
	var ps []*passedSocket
	for _, p := range sd.passed {
		if p.key == key {
			ps = append(ps, p)
		}
	}
	return ps
}

// status is the one-line summary systemctl status shows.
func (s *supervisor) status() string {
	noun := "listeners"
	if len(s.units) == 1 {
		noun = "listener"
	}
	return fmt.Sprintf("%d %s via %s", len(s.units), noun, s.via())
}
