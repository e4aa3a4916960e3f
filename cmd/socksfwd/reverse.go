package main

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"github.com/socksfwd/socksfwd/internal/sockbuf"
	"github.com/socksfwd/socksfwd/internal/sockmark"
	"github.com/socksfwd/socksfwd/socksclient"
	"github.com/socksfwd/socksfwd/tunnel"
)

// reverseName names a -R forward in logs and metric labels: its spec,
// "8080:127.0.0.1:80".
func reverseName(l listenPlan) string { return strings.TrimPrefix(l.spec, "-R ") }

// reverseAsk says in words what BIND asks for, host:port: "on port 8080
// for any caller".
func reverseAsk(addr string) string {
	host, port, _ := net.SplitHostPort(addr)
	where := "on port " + port
	if port == "0" {
		where = "on a port of its choosing"
	}
	if host == "0.0.0.0" || host == "::" {
		return where + " for any caller"
	}
	return where + " for callers from " + host
}

// newReverse makes a -R forward's service. It binds nothing here: its
// first BIND goes out when it starts serving.
func (s *supervisor) newReverse(l listenPlan) (*tunnel.Reverse, error) {
	remote, err := socksclient.ParseAddr(l.addr)
	if err != nil {
		return nil, err
	}
	name, key := reverseName(l), l.key()
	// The re-arm series is made on the first re-arm, under the name then
	// (a reload may rename the forward): a reload that fails leaves none.
	var rev *tunnel.Reverse
	rev = tunnel.NewReverse(tunnel.ReverseConfig{
		Name:        name,
		Remote:      remote,
		Target:      l.target.String(),
		Upstreams:   s.ups,
		IdleTimeout: time.Duration(s.plan.cfg.IdleTimeout),
		CopyMode:    s.plan.copyMode,
		// As a -L listener's connections: small buffers toward this host;
		// and the mark, so that capture rules leave the dial alone.
		TargetControl: sockmark.Chain(sockbuf.CapLoopbackTCP, s.plan.cfg.Mark.control()),
		OnListen:      func(a socksclient.Addr) { s.remotes.set(key, a) },
		OnRearm:       func(re tunnel.Rearm) { s.tel.observeRearm(rev, re.Gap) },
		Logger:        s.log,
	})
	return rev, nil
}

// rearmBuckets are the re-arm histogram's upper bounds, in seconds: a BIND
// round trip to a proxy on this host takes well under a millisecond; a
// server that cannot bind a port in use adds the session's length.
var rearmBuckets = []float64{0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}

// observeRearm records a re-arm gap of rev under its name now.
func (t *telemetry) observeRearm(rev *tunnel.Reverse, gap time.Duration) {
	t.rearmMu.Lock()
	defer t.rearmMu.Unlock()
	t.rearms.GetOrCreatePrometheusHistogramExt(rearmSeries(rev.Name()), rearmBuckets).Update(gap.Seconds())
}

// renameReverse renames rev and takes its series under the old name away,
// with no re-arm observed between the two.
func (t *telemetry) renameReverse(rev *tunnel.Reverse, name string) {
	t.rearmMu.Lock()
	defer t.rearmMu.Unlock()
	oldName := rev.Name()
	rev.Rename(name)
	t.rearms.UnregisterMetric(rearmSeries(oldName))
}

func rearmSeries(name string) string {
	return "socksfwd_reverse_rearm_seconds{reverse=" + labelValue(name) + "}"
}

// remoteLines is what /readyz adds to its "ok": where each -R's proxy
// listens now.
func (s *supervisor) remoteLines() string {
	var b strings.Builder
	for _, u := range s.liveUnits() {
		if r, ok := u.svc.(*tunnel.Reverse); ok {
			if a, listening := r.Remote(); listening {
				fmt.Fprintf(&b, "reverse %s listens on %s\n", u.name, a)
			} else if why := r.Failed(); why != "" {
				fmt.Fprintf(&b, "reverse %s listens nowhere: %s\n", u.name, why)
			}
		}
	}
	return b.String()
}

// remoteAddrs keeps where each -R's proxy listens and writes it to
// --remote-addr-file: one line per -R in the order of the options, the
// address or "-" while it has none. The file appears once one -R has an
// address, is replaced whole (a reader never sees half of it), and is
// removed at exit.
type remoteAddrs struct {
	log zerolog.Logger

	mu     sync.Mutex
	path   string
	order  []string // the -R listeners' keys
	addrs  map[string]socksclient.Addr
	wrote  bool
	failed bool // a write failed: said once
}

// configure takes a plan's file and -R order (at start and on reload).
func (r *remoteAddrs) configure(p *plan) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.path != "" && r.path != p.cfg.RemoteAddrFile && r.wrote {
		os.Remove(r.path)
		r.wrote = false
	}
	if p.cfg.RemoteAddrFile != "" && p.cfg.RemoteAddrFile != r.path {
		// A file already there is an earlier run's, one that could not
		// remove it (killed): its addresses are not this process's, and
		// may now be anyone's.
		if err := os.Remove(p.cfg.RemoteAddrFile); err == nil {
			r.log.Info().Str("file", p.cfg.RemoteAddrFile).Msg("removed a --remote-addr-file an earlier run left")
		}
	}
	r.path, r.order = p.cfg.RemoteAddrFile, nil
	for _, l := range p.listens {
		if l.kind == kindReverse {
			r.order = append(r.order, l.key())
		}
	}
	r.write()
}

// set records where the -R with key listens (the zero Addr: nowhere).
func (r *remoteAddrs) set(key string, a socksclient.Addr) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.addrs == nil {
		r.addrs = make(map[string]socksclient.Addr)
	}
	if a.Port == 0 {
		a = socksclient.Addr{} // nowhere, as an absent key reads
	}
	// A fixed port is armed again for every caller: same address, and the
	// file already says so.
	if !r.failed && r.addrs[key] == a {
		return
	}
	if a.Port == 0 {
		delete(r.addrs, key)
	} else {
		r.addrs[key] = a
	}
	r.write()
}

// write replaces the file; called with mu held.
func (r *remoteAddrs) write() {
	if r.path == "" || (!r.wrote && len(r.addrs) == 0) {
		return
	}
	var b strings.Builder
	for _, k := range r.order {
		if a, ok := r.addrs[k]; ok {
			b.WriteString(a.String() + "\n")
		} else {
			b.WriteString("-\n")
		}
	}
	tmp, err := os.CreateTemp(filepath.Dir(r.path), ".socksfwd-remote-*")
	if err == nil {
		_, err = tmp.WriteString(b.String())
		if cerr := tmp.Close(); err == nil {
			err = cerr
		}
		if err == nil {
			err = os.Chmod(tmp.Name(), 0o644)
		}
		if err == nil {
			err = os.Rename(tmp.Name(), r.path)
		}
		if err != nil {
			os.Remove(tmp.Name())
		}
	}
	if err != nil {
		if !r.failed {
			r.log.Error().Err(err).Str("file", r.path).Msg("cannot write --remote-addr-file")
		}
		r.failed = true
		return
	}
	r.wrote, r.failed = true, false
}

// remove deletes the file at exit: the addresses in it are gone.
func (r *remoteAddrs) remove() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.wrote {
		os.Remove(r.path)
		r.wrote = false
	}
}
