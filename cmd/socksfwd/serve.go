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

	"github.com/socksfwd/socksfwd/dnsforward"
	"github.com/socksfwd/socksfwd/internal/sockbuf"
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
	Addr() net.Addr
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
		svcs, err := startForward(lf, cfg, mode, upstreams, log)
		if err != nil {
			closeAll()
			return err
		}
		services = append(services, svcs...)
		proto := "tcp"
		if lf.UDP {
			proto = "udp"
		}
		for _, s := range svcs {
			name := s.Addr().String()
			log.Info().Str("listener", name).Str("proto", proto).Str("target", lf.Target.String()).Strs("upstream", via).
				Msgf("forwarding %s → %s via %s", name+protoSuffix(lf.UDP), lf.Target, strings.Join(via, ", "))
		}
	}

	if cfg.DNS != "" {
		svc, err := startDNS(cfg, upstreams, log)
		if err != nil {
			closeAll()
			return err
		}
		services = append(services, svc)
		log.Info().Str("listener", svc.Addr().String()).Str("proto", "dns").Strs("resolvers", cfg.DNSUpstream).Strs("upstream", via).
			Msgf("DNS on %s (udp+tcp) → %s over %s via %s", svc.Addr(), strings.Join(cfg.DNSUpstream, ", "), cfg.DNSTransport, strings.Join(via, ", "))
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

// startDNS binds the DNS listener on UDP and TCP at one address.
func startDNS(cfg Config, ups *socksclient.Upstreams, log zerolog.Logger) (service, error) {
	addr, _ := dnsListenAddr(cfg.DNS) // validated already
	var resolvers []socksclient.Addr
	for _, u := range cfg.DNSUpstream {
		a, _ := dnsUpstreamAddr(u)
		resolvers = append(resolvers, a)
	}
	pc, ln, err := dnsforward.Listen(addr)
	if err != nil {
		return nil, fmt.Errorf("--dns %s: cannot listen: %w", cfg.DNS, err)
	}
	fwd, err := dnsforward.New(dnsforward.Config{
		Resolvers: resolvers,
		Upstreams: ups,
		Timeout:   time.Duration(cfg.DNSTimeout),
		CacheSize: cfg.DNSCacheSize,
		Transport: cfg.DNSTransport,
		Logger:    log,
	})
	if err != nil {
		pc.Close()
		ln.Close()
		return nil, err
	}
	return dnsforward.NewServer(fwd, pc, ln), nil
}

func protoSuffix(udp bool) string {
	if udp {
		return "/udp"
	}
	return ""
}

// startForward binds every address of a forward and makes its services.
// A bind failure closes what was bound and is fatal, except for optional
// binds (::1 of "localhost").
func startForward(lf localForward, cfg Config, mode tunnel.CopyMode, ups *socksclient.Upstreams, log zerolog.Logger) ([]service, error) {
	var svcs []service
	for _, addr := range lf.Binds {
		svc, err := listenForward(lf, addr, cfg, mode, ups, log)
		if err != nil {
			if lf.optionalBinds[addr] {
				log.Warn().Err(err).Str("listener", addr).Msg("skipping optional bind")
				continue
			}
			for _, s := range svcs {
				s.Close()
			}
			return nil, fmt.Errorf("-L %s: cannot listen: %w", lf.Spec, err)
		}
		svcs = append(svcs, svc)
	}
	return svcs, nil
}

// listenForward binds one address of a forward, TCP or UDP.
func listenForward(lf localForward, addr string, cfg Config, mode tunnel.CopyMode, ups *socksclient.Upstreams, log zerolog.Logger) (service, error) {
	// No keep-alive probes on accepted connections, as ssh -L does; a
	// loopback listener's connections get small buffers (sockbuf).
	lc := net.ListenConfig{KeepAlive: -1, Control: sockbuf.CapLoopbackTCP}
	if lf.UDP {
		pc, err := lc.ListenPacket(context.Background(), "udp", addr)
		if err != nil {
			return nil, err
		}
		return tunnel.NewUDPForward(tunnel.UDPForwardConfig{
			Name:        pc.LocalAddr().String(),
			Target:      lf.Target,
			Upstreams:   ups,
			IdleTimeout: time.Duration(cfg.UDPIdleTimeout),
			MaxSessions: cfg.UDPMaxSessions,
			Logger:      log,
		}, pc.(*net.UDPConn)), nil
	}
	ln, err := lc.Listen(context.Background(), "tcp", addr)
	if err != nil {
		return nil, err
	}
	return tunnel.NewTCPForward(tunnel.TCPForwardConfig{
		Name:        ln.Addr().String(),
		Target:      lf.Target,
		Upstreams:   ups,
		IdleTimeout: time.Duration(cfg.IdleTimeout),
		CopyMode:    mode,
		Logger:      log,
	}, ln), nil
}
