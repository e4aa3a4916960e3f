//go:build !linux

package peertest

import "errors"

var errNoNetns = errors.New("network namespaces need Linux")

// InNetns needs Linux.
func InNetns(name string, f func() error) error { return errNoNetns }

// Sysctl needs Linux.
func Sysctl(ns string, settings map[string]string) error { return errNoNetns }
