package main

import (
	"math/bits"
	"sync/atomic"
)

// hist is a log-linear latency histogram in nanoseconds (64 sub-buckets per power of two,
// so about 1.6% precision), safe for concurrent record without locks.
type hist struct {
	counts [64 * 64]atomic.Uint64
	max    atomic.Int64
}

const subBits = 6

func bucketOf(v int64) int {
	if v < 0 {
		v = 0
	}
	u := uint64(v)
	if u < 1<<subBits {
		return int(u)
	}
	e := bits.Len64(u) - subBits - 1 // u>>e is in [64, 128)
	return (e+1)<<subBits + int(u>>e) - 1<<subBits
}

// lowOf is the smallest value that lands in bucket i.
func lowOf(i int) int64 {
	if i < 1<<subBits {
		return int64(i)
	}
	e := i>>subBits - 1
	return int64((uint64(i&(1<<subBits-1)) + 1<<subBits) << e)
}

func (h *hist) record(v int64) {
	i := bucketOf(v)
	if i >= len(h.counts) {
		i = len(h.counts) - 1
	}
	h.counts[i].Add(1)
	for {
		m := h.max.Load()
		if v <= m || h.max.CompareAndSwap(m, v) {
			return
		}
	}
}

func (h *hist) total() uint64 {
	var n uint64
	for i := range h.counts {
		n += h.counts[i].Load()
	}
	return n
}

// quantile returns the upper edge of the bucket holding quantile q (0 < q <= 1), in ns.
func (h *hist) quantile(q float64) int64 {
	n := h.total()
	if n == 0 {
		return 0
	}
	rank := uint64(q * float64(n))
	if rank == 0 {
		rank = 1
	}
	var seen uint64
	for i := range h.counts {
		seen += h.counts[i].Load()
		if seen >= rank {
			hi := lowOf(i+1) - 1
			if m := h.max.Load(); hi > m {
				hi = m
			}
			return hi
		}
	}
	return h.max.Load()
}
