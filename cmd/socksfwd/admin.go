package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/socksfwd/socksfwd/internal/allowlist"
	"github.com/socksfwd/socksfwd/socksclient"
)

// Readiness: a handshake this recent says an upstream works; without one,
// /readyz probes the upstreams itself, and reuses the probe's verdict for
// a while, so a probe every second from an orchestrator costs the proxy
// one handshake every few seconds at most.
const (
	readyWindow  = 30 * time.Second
	probeReuse   = 5 * time.Second
	probeTimeout = 5 * time.Second
)

// adminServer is the --admin listener: /metrics (Prometheus text),
// /healthz (the process answers), /readyz (it can forward), and
// /debug/pprof/ when --admin-pprof says so.
type adminServer struct {
	ln    net.Listener
	srv   *http.Server
	sup   *supervisor
	pprof atomic.Bool
	allow atomic.Pointer[allowlist.List]

	probeMu  sync.Mutex // one probe at a time; later callers reuse its verdict
	probeAt  time.Time
	probeErr error
}

func newAdminServer(ln net.Listener, sup *supervisor, withPprof bool) *adminServer {
	a := &adminServer{ln: ln, sup: sup}
	a.pprof.Store(withPprof)
	mux := http.NewServeMux()
	mux.HandleFunc("GET /metrics", a.metrics)
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("GET /readyz", a.readyz)
	mux.Handle("/debug/pprof/", a.onlyWithPprof(http.HandlerFunc(pprof.Index)))
	mux.Handle("/debug/pprof/cmdline", a.onlyWithPprof(http.HandlerFunc(pprof.Cmdline)))
	mux.Handle("/debug/pprof/profile", a.onlyWithPprof(http.HandlerFunc(pprof.Profile)))
	mux.Handle("/debug/pprof/symbol", a.onlyWithPprof(http.HandlerFunc(pprof.Symbol)))
	mux.Handle("/debug/pprof/trace", a.onlyWithPprof(http.HandlerFunc(pprof.Trace)))
	// No write or read timeout: a CPU profile streams for as long as it
	// was asked, and net/http cancels a request when its read deadline
	// passes. A body, which none of these endpoints takes, is refused
	// unread instead (see onlyAllowed).
	a.srv = &http.Server{Handler: a.onlyAllowed(mux), ReadHeaderTimeout: 5 * time.Second, IdleTimeout: time.Minute, ErrorLog: nil}
	return a
}

func (a *adminServer) onlyWithPprof(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !a.pprof.Load() {
			http.Error(w, "profiling is off: run with --admin-pprof", http.StatusNotFound)
			return
		}
		h.ServeHTTP(w, r)
	})
}

// onlyAllowed answers 403 to clients outside --allow.
func (a *adminServer) onlyAllowed(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.ContentLength != 0 {
			// Answered and closed without reading the body: net/http
			// would otherwise wait for it, before answering and again
			// before closing, as long as a client cares to hold the
			// connection. A past read deadline ends that wait at once.
			http.NewResponseController(w).SetReadDeadline(time.Unix(1, 0))
			w.Header().Set("Connection", "close")
			http.Error(w, "the admin endpoints take no request body", http.StatusBadRequest)
			return
		}
		if ap, err := netip.ParseAddrPort(r.RemoteAddr); err == nil && !a.allow.Load().AllowsAddr(net.TCPAddrFromAddrPort(ap)) {
			http.Error(w, "client source not in --allow", http.StatusForbidden)
			return
		}
		h.ServeHTTP(w, r)
	})
}

// SetAllow sets the client sources served from now on (nil: every source).
func (a *adminServer) SetAllow(l *allowlist.List) { a.allow.Store(l) }

// SetPprof turns /debug/pprof/ on or off (a reload).
func (a *adminServer) SetPprof(on bool) { a.pprof.Store(on) }

func (a *adminServer) Addr() net.Addr { return a.ln.Addr() }

func (a *adminServer) Serve(context.Context) error {
	if err := a.srv.Serve(a.ln); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

func (a *adminServer) Shutdown(ctx context.Context) error { return a.srv.Shutdown(ctx) }

// Close closes the listener too: http.Server.Close closes only the
// listeners Serve took, and a reload that failed after binding the admin
// socket closes it before Serve ever ran.
func (a *adminServer) Close() error {
	err := a.srv.Close()
	a.ln.Close()
	return err
}

func (a *adminServer) metrics(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	a.sup.writeMetrics(w)
}

func (a *adminServer) readyz(w http.ResponseWriter, r *http.Request) {
	if why, ok := a.ready(r.Context()); !ok {
		http.Error(w, why, http.StatusServiceUnavailable)
		return
	}
	// Where each -R's proxy listens, for whoever waits on readiness; it
	// does not decide readiness, which is about this host's listeners.
	fmt.Fprint(w, "ok\n"+a.sup.remoteLines())
}

// ready says whether socksfwd can forward now, and why not: every listener
// bound, not draining, and an upstream that works (a recent handshake, or
// else a probe).
func (a *adminServer) ready(ctx context.Context) (string, bool) {
	t := a.sup.tel
	switch {
	case t.draining.Load():
		return "draining: stopping on a signal", false
	case !t.bound.Load():
		return "starting: listeners not bound yet", false
	}
	status := a.sup.ups.Status()
	now := time.Now()
	var backoff []string
	for _, st := range status {
		if !st.Up && now.Before(st.DownUntil) {
			backoff = append(backoff, fmt.Sprintf("%s (for %s more)", st.Dialer.ProxyAddr, st.DownUntil.Sub(now).Round(time.Second)))
		}
	}
	if len(backoff) == len(status) {
		return "every upstream is in backoff: " + strings.Join(backoff, ", "), false
	}
	for _, st := range status {
		// A recent handshake counts only for an upstream not since marked
		// down: its backoff may have lapsed with no new try yet.
		if last := t.upstream(st.Dialer.ProxyAddr).lastOK.Load(); st.Up && last != 0 && now.Sub(time.Unix(0, last)) < readyWindow {
			return "", true
		}
	}
	if err := a.probe(ctx, status); err != nil {
		return "no upstream completed a handshake: " + err.Error(), false
	}
	return "", true
}

// probe negotiates with the upstreams not in backoff, all at once and
// each within probeTimeout (no request: nothing is asked of the
// targets), until one works, and remembers the verdict for probeReuse.
// One after another under one budget, a black-holed first upstream spent
// it all and made an idle, working instance unready. Not under the
// caller's context: a client that gives up first (a probe with a 1 s
// timeout) must not keep the verdict from being kept, or each of its
// calls would start a new probe.
func (a *adminServer) probe(ctx context.Context, status []socksclient.UpstreamStatus) error {
	a.probeMu.Lock()
	defer a.probeMu.Unlock()
	if !a.probeAt.IsZero() && time.Since(a.probeAt) < probeReuse {
		return a.probeErr
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), probeTimeout)
	defer cancel()
	type result struct {
		i   int
		err error
	}
	results := make(chan result, len(status))
	now, started := time.Now(), 0
	for i, st := range status {
		if !st.Up && now.Before(st.DownUntil) {
			continue // traffic found it down; ready said so if all are
		}
		started++
		go func() {
			_, err := st.Dialer.Negotiate(ctx)
			results <- result{i, err}
		}()
	}
	errs := make([]error, len(status))
	worked := false
	for range started {
		r := <-results
		errs[r.i] = r.err
		if r.err == nil && !worked {
			worked = true
			cancel() // the others are not needed
		}
	}
	var err error
	if !worked {
		if err = errors.Join(errs...); err != nil {
			err = errors.New(strings.ReplaceAll(err.Error(), "\n", "; "))
		} else {
			err = errors.New("no upstream to probe")
		}
	}
	a.probeAt, a.probeErr = time.Now(), err
	return err
}
