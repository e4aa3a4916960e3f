package main

import (
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	sdnotify "github.com/coreos/go-systemd/v22/daemon"
	"github.com/rs/zerolog"
)

// systemd is socksfwd's side of a systemd service: state notifications on
// NOTIFY_SOCKET (ready, reloading, stopping, the watchdog). The zero value
// is a process systemd did not start: it does nothing.
type systemd struct {
	log zerolog.Logger
	// notifySocket is NOTIFY_SOCKET; nil: nobody to notify.
	notifySocket *net.UnixAddr
	warned       atomic.Bool // a failed notification was logged at warn
	// watchdogEvery is half of WATCHDOG_USEC, as sd_watchdog_enabled(3)
	// advises; 0: no watchdog.
	watchdogEvery time.Duration
	watchdogStop  chan struct{}
	watchdog      sync.WaitGroup
}

// newSystemd reads what systemd set in the environment.
func newSystemd(getenv func(string) string, log zerolog.Logger) *systemd {
	sd := &systemd{log: log}
	if path := getenv("NOTIFY_SOCKET"); path != "" {
		sd.notifySocket = &net.UnixAddr{Name: path, Net: "unixgram"}
		every, err := watchdogInterval(getenv, os.Getpid())
		if err != nil {
			log.Warn().Err(err).Msg("systemd watchdog off")
		}
		sd.watchdogEvery = every
	}
	return sd
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
// starts the watchdog on the first call.
func (sd *systemd) ready(status string) {
	sd.notify(sdnotify.SdNotifyReady, "STATUS="+status)
	if sd.watchdogEvery > 0 && sd.watchdogStop == nil {
		sd.watchdogStop = make(chan struct{})
		sd.watchdog.Go(sd.pingWatchdog)
	}
}

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

func (sd *systemd) pingWatchdog() {
	tick := time.NewTicker(sd.watchdogEvery)
	defer tick.Stop()
	for {
		select {
		case <-sd.watchdogStop:
			return
		case <-tick.C:
			sd.notify(sdnotify.SdNotifyWatchdog)
		}
	}
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

// close stops the watchdog.
func (sd *systemd) close() {
	if sd.watchdogStop != nil {
		close(sd.watchdogStop)
		sd.watchdog.Wait()
		sd.watchdogStop = nil
	}
}

// status is the one-line summary systemctl status shows.
func (s *supervisor) status() string {
	noun := "listeners"
	if len(s.units) == 1 {
		noun = "listener"
	}
	return fmt.Sprintf("%d %s via %s", len(s.units), noun, s.via())
}
