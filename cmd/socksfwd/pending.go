package main

// TEMPORARY: the lead switches these to direct calls once the APIs land.

import (
	"time"

	"github.com/socksfwd/socksfwd/dnsforward"
	"github.com/socksfwd/socksfwd/socksclient"
)

type pendingUpstreams interface {
	SetHedgeDelay(time.Duration)
	OnStateChange(func(proxy string, up bool, cause error))
	SetDialers(...*socksclient.Dialer)
}

type nopUps struct{}

func (nopUps) SetHedgeDelay(time.Duration)                            {}
func (nopUps) OnStateChange(func(proxy string, up bool, cause error)) {}
func (nopUps) SetDialers(...*socksclient.Dialer)                      {}

func pendingUps(u any) pendingUpstreams {
	if p, ok := u.(pendingUpstreams); ok {
		return p
	}
	return nopUps{}
}

type pendingService interface {
	SetTarget(socksclient.Addr)
	SetIdleTimeout(time.Duration)
	SetLimits(time.Duration, int)
	SetForwarder(*dnsforward.Forwarder)
}

type nopSvc struct{}

func (nopSvc) SetTarget(socksclient.Addr)         {}
func (nopSvc) SetIdleTimeout(time.Duration)       {}
func (nopSvc) SetLimits(time.Duration, int)       {}
func (nopSvc) SetForwarder(*dnsforward.Forwarder) {}

func pendingSvc(u any) pendingService {
	if p, ok := u.(pendingService); ok {
		return p
	}
	return nopSvc{}
}
