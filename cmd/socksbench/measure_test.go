//go:build linux

package main

import (
	"slices"
	"testing"
	"time"
)

// TestRoundOrder: over the bench's rounds every order is a permutation,
// directions alternate, two ways run in both orders, and of two to eight
// ways at least three (or all) run first in some round: a fixed order
// makes a way pay for the one before it in every round.
func TestRoundOrder(t *testing.T) {
	for n := 2; n <= 8; n++ {
		first := map[int]bool{}
		orders := map[string]bool{}
		for round := range rounds {
			o := roundOrder(n, round)
			s := slices.Clone(o)
			slices.Sort(s)
			for i, k := range s {
				if i != k {
					t.Fatalf("n=%d round %d: %v is no permutation", n, round, o)
				}
			}
			first[o[0]] = true
			orders[string(rune('0'+o[0]))+string(rune('0'+o[1]))] = true
		}
		if want := min(n, 3); len(first) < want {
			t.Errorf("n=%d: %d ways ever run first, want at least %d", n, len(first), want)
		}
		if n == 2 && len(orders) != 2 {
			t.Errorf("n=2: orders %v, want both", orders)
		}
	}
}

// TestQuantileNearestRank: the p50 of 1..100 is 50 and its p99 99; the
// p50 of 1..2000 is 1000 (they came out one rank high).
func TestQuantileNearestRank(t *testing.T) {
	seq := func(n int) []time.Duration {
		d := make([]time.Duration, n)
		for i := range d {
			d[i] = time.Duration(n - i) // unsorted on purpose
		}
		return d
	}
	for _, c := range []struct {
		n    int
		q    float64
		want time.Duration
	}{{100, 0.5, 50}, {100, 0.99, 99}, {2000, 0.5, 1000}, {2000, 0.99, 1980}, {1, 0.99, 1}, {3, 0.5, 2}} {
		if got := quantile(seq(c.n), c.q); got != c.want {
			t.Errorf("quantile(1..%d, %v) = %d, want %d", c.n, c.q, got, c.want)
		}
	}
	if p50, p99 := percentiles(seq(100)); p50 != 50 || p99 != 99 {
		t.Errorf("percentiles(1..100) = %d, %d; want 50, 99", p50, p99)
	}
}
