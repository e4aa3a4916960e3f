package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sync/errgroup"

	"github.com/socksfwd/socksfwd/socksclient"
	"github.com/socksfwd/socksfwd/tunnel"
)

// buildDialers turns the -S list into dialers, in failover order.
func buildDialers(cfg *Config) ([]*socksclient.Dialer, error) {
	password := ""
	if cfg.ServerPasswordFile != "" {
		b, err := os.ReadFile(cfg.ServerPasswordFile)
		if err != nil {
			return nil, usagef("--server-password-file: %w", err)
		}
		password = strings.TrimSuffix(strings.TrimSuffix(string(b), "\n"), "\r")
	}
	if password != "" && cfg.ServerUser == "" {
		return nil, usagef("--server-password-file needs --server-user")
	}
	var dialers []*socksclient.Dialer
	for _, raw := range cfg.Server {
		d, err := parseServer(raw, cfg.ServerUser, password)
		if err != nil {
			return nil, err
		}
		d.HandshakeTimeout = time.Duration(cfg.HandshakeTimeout)
		dialers = append(dialers, d)
	}
	return dialers, nil
}

// service is what every listener kind provides (DESIGN §3).
type service interface {
	Serve(ctx context.Context) error
	Shutdown(ctx context.Context) error
	Close() error
}

// serve binds every listener first (a bind failure exits 1 and nothing
// half-starts), then runs the services until SIGINT/SIGTERM, drains them
// for the shutdown timeout and returns. A second signal exits at once.
func serve(cfg Config, mode tunnel.CopyMode, log zerolog.Logger) error {
	dialers, err := buildDialers(&cfg)
	if err != nil {
		return err
	}
	upstreams := socksclient.NewUpstreams(dialers...)
	via := make([]string, len(dialers))
	for i, d := range dialers {
		via[i] = d.ProxyAddr
	}

	var services []service
	closeAll := func() {
		for _, s := range services {
			s.Close()
		}
	}
	for _, spec := range cfg.Local {
		lf, _ := parseLocal(spec) // validated already
		lns, err := listenAll(lf, log)
		if err != nil {
			closeAll()
			return err
		}
		for _, ln := range lns {
			name := ln.Addr().String()
			services = append(services, tunnel.NewTCPForward(tunnel.TCPForwardConfig{
				Name:        name,
				Target:      lf.Target,
				Upstreams:   upstreams,
				IdleTimeout: time.Duration(cfg.IdleTimeout),
				CopyMode:    mode,
				Logger:      log,
			}, ln))
			log.Info().Str("listener", name).Str("target", lf.Target.String()).Strs("upstream", via).
				Msgf("forwarding %s → %s via %s", name, lf.Target, strings.Join(via, ", "))
		}
	}

	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sigs)

	g, ctx := errgroup.WithContext(context.Background())
	for _, s := range services {
		g.Go(func() error { return s.Serve(ctx) })
	}
	served := make(chan error, 1)
	go func() { served <- g.Wait() }()

	select {
	case err := <-served:
		closeAll()
		return err
	case sig := <-sigs:
		log.Info().Str("signal", sig.String()).Dur("timeout", time.Duration(cfg.ShutdownTimeout)).Msg("draining sessions")
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), time.Duration(cfg.ShutdownTimeout))
	defer cancel()
	drained := make(chan struct{})
	go func() {
		for _, s := range services {
			if err := s.Shutdown(shutdownCtx); errors.Is(err, context.DeadlineExceeded) {
				log.Warn().Msg("shutdown timeout reached; cutting remaining sessions")
			}
		}
		close(drained)
	}()
	select {
	case <-drained:
	case sig := <-sigs:
		log.Warn().Str("signal", sig.String()).Msg("second signal; exiting without drain")
		os.Exit(exitRuntime)
	}
	<-served
	log.Info().Msg("stopped")
	return nil
}

// listenAll binds every address of a forward. A failure closes what was
// bound and is fatal, except for optional binds (::1 of "localhost").
func listenAll(lf localForward, log zerolog.Logger) ([]net.Listener, error) {
	var lns []net.Listener
	// No keep-alive probes on accepted connections, as ssh -L does.
	lc := net.ListenConfig{KeepAlive: -1}
	for _, addr := range lf.Binds {
		ln, err := lc.Listen(context.Background(), "tcp", addr)
		if err != nil {
			if lf.optionalBinds[addr] {
				log.Warn().Err(err).Str("listener", addr).Msg("skipping optional bind")
				continue
			}
			for _, l := range lns {
				l.Close()
			}
			return nil, fmt.Errorf("-L %s: cannot listen: %w", lf.Spec, err)
		}
		lns = append(lns, ln)
	}
	return lns, nil
}
