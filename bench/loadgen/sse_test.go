package main

import (
	"strings"
	"testing"
)

func TestSSEReader(t *testing.T) {
	stream := "retry: 2000\nid: s.0\ndata: {\"topic\":\"/httpsub/config\",\"payload\":{}}\n\n" +
		":\n\n" +
		"id: s.7\r\ndata: {\"topic\":\"a\",\"payload\":\"{\\\"seq\\\":12,\\\"t\\\":1700000000000000000}\"}\r\n\r\n" +
		"data: line1\ndata: line2\n\n" +
		"data: {\"error\":{\"code\":\"events-lost\",\"message\":\"x\",\"count\":3}}\n\n"
	r := newSSEReader(strings.NewReader(stream), 16) // tiny buffer: lines longer than it
	var ev event
	want := []struct {
		k     kind
		id    string
		hasID bool
	}{{kindConfig, "s.0", true}, {kindMessage, "s.7", true}, {kindOther, "s.7", false}, {kindError, "s.7", false}}
	for i, w := range want {
		if err := r.next(&ev); err != nil {
			t.Fatalf("event %d: %v", i, err)
		}
		k, seq, ts, lost, _ := classify(ev.data, nil)
		if k != w.k || string(ev.id) != w.id || ev.hasID != w.hasID {
			t.Fatalf("event %d: kind %v id %q/%v, want %v %q/%v (data %q)", i, k, ev.id, ev.hasID, w.k, w.id, w.hasID, ev.data)
		}
		if k == kindMessage && (seq != 12 || ts != 1700000000000000000) {
			t.Fatalf("seq %d t %d", seq, ts)
		}
		if k == kindError && lost != 3 {
			t.Fatalf("lost %d", lost)
		}
		if i == 2 && string(ev.data) != "line1\nline2" {
			t.Fatalf("multi-line data %q", ev.data)
		}
	}
	if r.retry != 2000 || r.comments != 1 {
		t.Fatalf("retry %d comments %d", r.retry, r.comments)
	}
}

func TestHistogram(t *testing.T) {
	var h hist
	for v := int64(1); v <= 100000; v++ {
		h.record(v * 1000)
	}
	for _, q := range []float64{0.5, 0.99} {
		got, want := float64(h.quantile(q)), q*1e8
		if got < want*0.97 || got > want*1.03 {
			t.Fatalf("q%.2f = %.0f, want about %.0f", q, got, want)
		}
	}
	for i := 0; i < 3700; i++ { // int64 values never reach higher buckets
		if bucketOf(lowOf(i)) != i {
			t.Fatalf("bucket %d round trip", i)
		}
	}
}
