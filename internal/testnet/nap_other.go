//go:build !linux

package testnet

import "time"

// Nap pauses the calling goroutine for d (at least about a millisecond
// here, where Go's timer does it).
func Nap(d time.Duration) { time.Sleep(d) }
