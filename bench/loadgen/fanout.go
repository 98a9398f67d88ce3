package main

import (
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"strconv"
	"sync/atomic"
	"time"
)

// phase is one stretch of publishing: the fixed-rate phase, one saturation step, or the
// closed-loop phase. Its messages are the sequence numbers [first, last].
type phase struct {
	name        string
	target      float64 // messages/s; 0 for the closed loop
	first, last atomic.Int64
	subscribers int64
	published   int64
	startNs     int64
	pubDoneNs   int64

	lat        hist
	sendLag    hist         // scheduled publish time → POST sent
	pubRTT     hist         // POST sent → 204 received
	unique     atomic.Int64 // first receipts of a (stream, seq)
	dup        atomic.Int64
	lastRecvNs atomic.Int64
	eventsLost atomic.Int64

	// Snapshot when the drain period ended.
	uniqueAtDrain int64
	lastRecvDrain int64
	serverCPU     float64
	serverCPUEach []float64 // per -pid, when there are several
	brokerCPU     float64
	loadgenCPU    float64
	otherCPU      float64
	coresBusy     []float64
	serverWrites  int64 // write syscalls the server made during the phase
	pubErrors     int64
	delivered     bool // every delivery arrived in time, nothing dropped, publishing kept pace
	keptUp        bool // delivered, and p99 within the limit
	whyNot        string
	nominal       float64 // seconds the phase publishes for
	discarded     bool    // disturbed by other processes, and run again
	repeats       int     // earlier attempts discarded
}

// phaseSet holds the phases started so far; streams look up a message's phase in it while
// the main goroutine appends (list has its final capacity; n publishes each new entry).
type phaseSet struct {
	list []*phase
	n    atomic.Int32
}

func (ps *phaseSet) start(p *phase) {
	p.first.Store(math.MaxInt64) // until runPhase numbers its first message
	ps.list[ps.n.Load()] = p
	ps.n.Add(1)
}

// current is the phase being run, or nil before the first.
func (ps *phaseSet) current() *phase {
	if n := ps.n.Load(); n > 0 {
		return ps.list[n-1]
	}
	return nil
}

// of finds the phase a sequence number was published in.
func (ps *phaseSet) of(seq int64) *phase {
	for i := int(ps.n.Load()) - 1; i >= 0; i-- {
		if p := ps.list[i]; seq >= p.first.Load() {
			return p
		}
	}
	return nil
}

func (ps *phaseSet) delivered(st *stream, seq, latency, now int64) {
	p := ps.of(seq)
	if p == nil {
		return
	}
	if !st.markSeen(seq) {
		p.dup.Add(1)
		return
	}
	p.unique.Add(1)
	p.lat.record(latency)
	for {
		m := p.lastRecvNs.Load()
		if now <= m || p.lastRecvNs.CompareAndSwap(m, now) {
			break
		}
	}
}

// publisher POSTs {"seq":n,"t":ns} bodies (or {"own":i,"t":ns} to own topics) from a pool of
// keep-alive connections, in the request form the server under test takes (peers.go).
type publisher struct {
	cfg      *config
	client   *http.Client
	jobs     chan pubJob
	phases   *phaseSet // nil for the own-topic publisher
	pending  atomic.Int64
	errors   atomic.Int64
	firstErr atomic.Value
}

type pubJob struct {
	seq, t int64
	own    int // -1: the shared topic; else the stream whose own topic gets {"own":seq,...}
}

func newPublisher(c *config, ps *phaseSet) *publisher {
	p := &publisher{
		cfg:    c,
		phases: ps,
		client: &http.Client{
			Timeout: 30 * time.Second,
			Transport: &http.Transport{
				MaxConnsPerHost:     c.publishers,
				MaxIdleConnsPerHost: c.publishers,
				// Below node's 5 s keep-alive timeout, so that we never reuse a connection the
				// server is closing (a POST is not retried, and would fail with a reset).
				IdleConnTimeout:    2 * time.Second,
				DisableCompression: true,
			},
		},
		jobs: make(chan pubJob, c.publishers),
	}
	for range c.publishers {
		go p.work()
	}
	return p
}

func (p *publisher) work() {
	send := p.post
	if p.cfg.natsPub != "" {
		nc, err := dialNATS(p.cfg.natsPub)
		if err != nil {
			fatalf("-nats-pub: %v", err)
		}
		send = nc.publish
	}
	var body []byte
	for job := range p.jobs {
		topic := p.cfg.topic
		if job.own >= 0 {
			topic = ownTopic(job.own)
			body = fmt.Appendf(body[:0], `{"own":%d,"t":%d}`, job.seq, job.t)
		} else {
			body = fmt.Appendf(body[:0], `{"seq":%d,"t":%d}`, job.seq, job.t)
		}
		var ph *phase
		if p.phases != nil {
			ph = p.phases.current()
		}
		sent := time.Now().UnixNano()
		if ph != nil {
			ph.sendLag.record(sent - job.t)
		}
		err := send(topic, body)
		if ph != nil {
			ph.pubRTT.record(time.Now().UnixNano() - sent)
		}
		if err != nil {
			p.errors.Add(1)
			p.firstErr.CompareAndSwap(nil, err.Error())
		}
		p.pending.Add(-1)
	}
}

// post publishes through the server under test, in the request form it takes (peers.go).
func (p *publisher) post(topic string, body []byte) error {
	req, err := p.cfg.publishRequest(topic, body)
	if err != nil {
		return err
	}
	resp, err := p.client.Do(req)
	if err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode/100 != 2 { // livepipe 204, nchan 201/202, pushpin 200
		return fmt.Errorf("publish answered %s", resp.Status)
	}
	return nil
}

func (p *publisher) send(seq, t int64) {
	p.pending.Add(1)
	p.jobs <- pubJob{seq: seq, t: t, own: -1}
}

func (p *publisher) wait() {
	for p.pending.Load() > 0 {
		time.Sleep(200 * time.Microsecond)
	}
}

type phaseResult struct {
	Name           string    `json:"name"`
	TargetRate     float64   `json:"target_rate"`
	Subscribers    int64     `json:"subscribers"`
	Published      int64     `json:"published"`
	PublishRate    float64   `json:"publish_rate"`
	Expected       int64     `json:"expected_deliveries"`
	Received       int64     `json:"received"`
	Lost           int64     `json:"lost"`
	Late           int64     `json:"late"`
	Duplicated     int64     `json:"duplicated"`
	DeliveriesPerS float64   `json:"deliveries_per_s"`
	P50            float64   `json:"p50_ms"`
	P90            float64   `json:"p90_ms"`
	P99            float64   `json:"p99_ms"`
	Max            float64   `json:"max_ms"`
	SendLagP99     float64   `json:"publish_send_lag_p99_ms"`
	PublishRTTP99  float64   `json:"publish_rtt_p99_ms"`
	EventsLost     int64     `json:"events_lost_reported"`
	PublishErrors  int64     `json:"publish_errors"`
	ServerCPU      float64   `json:"server_cpu"`
	ServerCPUEach  []float64 `json:"server_cpu_each,omitempty"`
	BrokerCPU      float64   `json:"broker_cpu,omitempty"`
	LoadgenCPU     float64   `json:"loadgen_cpu"`
	OtherCPU       float64   `json:"other_cpu"`
	CoresBusy      []float64 `json:"cores_busy"`
	WritesPerDeliv float64   `json:"server_writes_per_delivery"`
	Delivered      bool      `json:"delivered"`
	KeptUp         bool      `json:"kept_up"`
	Repeats        int       `json:"repeats"`
	WhyNot         string    `json:"why_not,omitempty"`
}

type fanoutResult struct {
	Mode           string        `json:"mode"`
	N              int           `json:"n"`
	Connected      int64         `json:"connected"`
	Failed         int64         `json:"failed"`
	ConnectSeconds float64       `json:"connect_s"`
	Phases         []phaseResult `json:"phases"`
	// The fastest step that kept up, and what the first one that did not still delivered.
	SaturationRate       float64 `json:"saturation_rate"`
	SaturationDeliveries float64 `json:"saturation_deliveries_per_s"`
	// The fastest step whose deliveries all arrived, whatever their latency.
	ThroughputRate       float64 `json:"throughput_rate"`
	ThroughputDeliveries float64 `json:"throughput_deliveries_per_s"`
	OverloadDeliveries   float64 `json:"overload_deliveries_per_s"`
	StreamsDropped       int64   `json:"streams_dropped"`
	ErrorEvents          int64   `json:"error_events"`
	OtherMessages        int64   `json:"other_messages"`
	MissingIDs           int64   `json:"messages_without_id"`
	ServerRSSKB          int64   `json:"server_rss_kb"`
	ServerPeakRSSKB      int64   `json:"server_peak_rss_kb"`
	LoadgenRSSKB         int64   `json:"loadgen_rss_kb"`
	FirstFailure         string  `json:"first_failure,omitempty"`
	FirstPublishError    string  `json:"first_publish_error,omitempty"`
	// Every message published on the topic, warm-up and repeated phases included, less failed POSTs.
	PublishedTotal int64 `json:"published_total"`
	// -own-topics: messages to the streams' own topics, over all timed phases.
	OwnPublished         int64   `json:"own_published,omitempty"`
	OwnErrors            int64   `json:"own_publish_errors,omitempty"`
	OwnReceived          int64   `json:"own_received,omitempty"`
	OwnLost              int64   `json:"own_lost,omitempty"`
	OwnRate              float64 `json:"own_rate,omitempty"`
	OwnP50               float64 `json:"own_p50_ms,omitempty"`
	OwnP99               float64 `json:"own_p99_ms,omitempty"`
	ServerRSSConnectedKB int64   `json:"server_rss_connected_kb,omitempty"`
	ServerRSSBeforeKB    int64   `json:"server_rss_before_kb,omitempty"`
	// -churn: streams opened (until ready) and closed again, per second, during the timed phases.
	ChurnCycles   int64   `json:"churn_cycles,omitempty"`
	ChurnPerS     float64 `json:"churn_per_s,omitempty"`
	ChurnErrors   int64   `json:"churn_errors,omitempty"`
	ChurnReadyP50 float64 `json:"churn_ready_p50_ms,omitempty"`
	ChurnReadyP99 float64 `json:"churn_ready_p99_ms,omitempty"`
	ChurnFirstErr string  `json:"churn_first_error,omitempty"`
}

func runFanout(c *config) fanoutResult {
	type spec struct {
		name   string
		target float64
	}
	var plan []spec
	if c.warmup > 0 && (c.fixedRate > 0 || len(c.steps) > 0) {
		// Connection setup leaves garbage and cold code behind; the first timed phase would pay for it.
		plan = append(plan, spec{"warmup", max(c.fixedRate, firstOr(c.steps, 0))})
	}
	if c.fixedRate > 0 {
		plan = append(plan, spec{"fixed", c.fixedRate})
	}
	for _, r := range c.steps {
		plan = append(plan, spec{"step", r})
	}
	if c.maxDur > 0 {
		plan = append(plan, spec{"closed-loop", 0})
	}
	if len(plan) == 0 {
		fatalf("fanout needs -rate, -steps or -max-duration")
	}
	ps := &phaseSet{list: make([]*phase, len(plan)*(c.repeats+1))}

	s := &swarm{cfg: c, phases: ps}
	if c.ownTopics {
		s.own = &ownStats{}
	}
	res := fanoutResult{Mode: "fanout", N: c.n}
	res.ServerRSSBeforeKB = pidsKB(c.pids, "VmRSS")
	res.ConnectSeconds = round(s.open().Seconds(), 2)
	res.ServerRSSConnectedKB = pidsKB(c.pids, "VmRSS")
	res.Connected = s.stats.configs.Load()
	if res.Connected == 0 {
		fatalf("no stream connected: %v", s.stats.firstFailure.Load())
	}
	time.Sleep(500 * time.Millisecond) // let the connection burst settle before timing anything
	pub := newPublisher(c, ps)
	seq := int64(1)
	steppingFailed := false
	repeatUntil := time.Now().Add(c.repeatBudget)
	var side *sideLoad // own-topic publishing and churn, during the timed phases
	for _, sp := range plan {
		if sp.name != "warmup" && side == nil {
			side = startSideLoad(c, s)
		}
		if sp.name == "step" && steppingFailed {
			continue
		}
		var p *phase
		for attempt := 0; ; attempt++ {
			p = &phase{name: sp.name, target: sp.target, repeats: attempt}
			ps.start(p)
			seq = runPhase(c, s, pub, p, seq)
			logf("%s %.0f msg/s: %d published, %d/%d delivered by the drain deadline, p99 %.1f ms, server cpu %.2f, loadgen cpu %.2f, other cpu %.2f%s",
				p.name, p.target, p.published, p.uniqueAtDrain, p.published*p.subscribers, ms(p.lat.quantile(0.99)), p.serverCPU, p.loadgenCPU, p.otherCPU, map[bool]string{true: "", false: " — " + p.whyNot}[p.keptUp])
			if !p.delivered || p.otherCPU > c.otherLimit {
				// Let an overloaded relay work off its backlog before the next phase is timed.
				deadline := time.Now().Add(5 * time.Second)
				for p.unique.Load() < (p.published-p.pubErrors)*p.subscribers && time.Now().Before(deadline) {
					time.Sleep(10 * time.Millisecond)
				}
			}
			// On a shared machine, a phase that other processes took CPU from measures them
			// too: run it again once they are quiet, while the time budget lasts.
			if p.name == "warmup" {
				p.discarded = true
				break
			}
			if p.otherCPU <= c.otherLimit || attempt >= c.repeats || time.Now().After(repeatUntil) {
				break
			}
			p.discarded = true
			logf("other processes used %.2f cores: repeating this phase once the machine is quiet", p.otherCPU)
			waitQuiet(c, repeatUntil)
		}
		// Stepping goes on past the latency limit while every delivery still arrives, to find
		// the throughput too.
		if p.name == "step" && !p.delivered {
			steppingFailed = true
		}
	}
	if side != nil {
		side.stop(&res)
	}
	// Stragglers still count as received (late), not lost.
	time.Sleep(c.drain)
	if side != nil {
		side.ownResult(&res)
	}
	if len(c.pids) > 0 {
		res.ServerRSSKB = pidsKB(c.pids, "VmRSS")
		res.ServerPeakRSSKB = pidsKB(c.pids, "VmHWM")
	}
	res.LoadgenRSSKB = procStatusKB(os.Getpid(), "VmRSS")
	s.close()

	for _, p := range ps.list[:ps.n.Load()] {
		if p.discarded {
			continue
		}
		// A message whose POST failed may or may not have been published: it is not expected.
		expected := (p.published - p.pubErrors) * p.subscribers
		received := p.unique.Load()
		// Over the phase's nominal length at least: at 1 msg/s, 3 messages are sent within 2 s.
		dur := max(float64(p.lastRecvDrain-p.startNs)/1e9, p.nominal)
		r := phaseResult{
			Name: p.name, TargetRate: p.target, Subscribers: p.subscribers, Published: p.published,
			PublishRate: round(p.publishRate(), 1),
			Expected:    expected, Received: received, Lost: max(0, expected-received), Late: received - p.uniqueAtDrain,
			Duplicated: p.dup.Load(),
			P50:        ms(p.lat.quantile(0.50)), P90: ms(p.lat.quantile(0.90)), P99: ms(p.lat.quantile(0.99)), Max: ms(p.lat.max.Load()),
			SendLagP99: ms(p.sendLag.quantile(0.99)), PublishRTTP99: ms(p.pubRTT.quantile(0.99)),
			EventsLost: p.eventsLost.Load(), PublishErrors: p.pubErrors,
			ServerCPU: p.serverCPU, ServerCPUEach: p.serverCPUEach, BrokerCPU: p.brokerCPU, LoadgenCPU: p.loadgenCPU, OtherCPU: p.otherCPU, CoresBusy: p.coresBusy, Delivered: p.delivered, KeptUp: p.keptUp, WhyNot: p.whyNot, Repeats: p.repeats,
		}
		if dur > 0 {
			r.DeliveriesPerS = round(float64(p.uniqueAtDrain)/dur, 0)
		}
		if p.uniqueAtDrain > 0 {
			r.WritesPerDeliv = round(float64(p.serverWrites)/float64(p.uniqueAtDrain), 2)
		}
		res.Phases = append(res.Phases, r)
		if p.name == "step" {
			if p.keptUp && res.SaturationRate < p.target {
				res.SaturationRate, res.SaturationDeliveries = p.target, r.DeliveriesPerS
			}
			if p.delivered {
				res.ThroughputRate, res.ThroughputDeliveries = p.target, r.DeliveriesPerS
			} else {
				res.OverloadDeliveries = r.DeliveriesPerS
			}
		}
	}
	res.PublishedTotal = seq - 1 - pub.errors.Load()
	res.Failed = s.stats.failed.Load()
	// Streams close at the end on purpose; a drop is one that ended before that.
	res.StreamsDropped = s.stats.dropped.Load()
	res.ErrorEvents = s.stats.errorEvents.Load()
	res.OtherMessages = s.stats.otherMessages.Load()
	res.MissingIDs = s.stats.missingID.Load()
	if f, ok := s.stats.firstFailure.Load().(string); ok {
		res.FirstFailure = f
	}
	if f, ok := pub.firstErr.Load().(string); ok {
		res.FirstPublishError = f
	}
	return res
}

// waitQuiet waits until processes other than the server and the loadgen have used less
// than the limit for two seconds in a row, or until the deadline.
func waitQuiet(c *config, deadline time.Time) {
	quiet := 0
	for quiet < 2 && time.Now().Before(deadline) {
		srv0, self0, all0 := pidsCPU(c.pids)+pidsCPU(c.brokerPids), selfCPU(), machineCPU()
		time.Sleep(time.Second)
		other := float64(machineCPU()-all0-(pidsCPU(c.pids)+pidsCPU(c.brokerPids)-srv0)-(selfCPU()-self0)) / float64(time.Second)
		if other < c.otherLimit {
			quiet++
		} else {
			quiet = 0
		}
	}
}

func eachCPU(pids []int) []time.Duration {
	out := make([]time.Duration, len(pids))
	for i, p := range pids {
		out[i] = procCPU(p)
	}
	return out
}

func ms(ns int64) float64 { return round(float64(ns)/1e6, 2) }

// runPhase publishes one phase's messages, waits for them to arrive (up to the drain
// period), and decides whether delivery kept up. It returns the next sequence number.
func runPhase(c *config, s *swarm, pub *publisher, p *phase, seq int64) int64 {
	p.subscribers = int64(s.aliveCount())
	p.first.Store(seq)
	errBefore := pub.errors.Load()
	srv0, self0, all0 := pidsCPU(c.pids), selfCPU(), machineCPU()
	each0, broker0 := eachCPU(c.pids), pidsCPU(c.brokerPids)
	coreBusy0, coreTotal0 := coreTicks()
	writes0 := pidsWrites(c.pids)
	start := time.Now()
	p.startNs = start.UnixNano()

	if p.target > 0 {
		// Open loop on a fixed schedule; each message carries its *scheduled* time, so a
		// publisher held up by a slow server shows as latency (no coordinated omission).
		interval := float64(time.Second) / p.target
		count := int64(math.Round(p.target * c.durationOf(p).Seconds()))
		for i := range count {
			due := start.Add(time.Duration(float64(i) * interval))
			if d := time.Until(due); d > 0 {
				time.Sleep(d)
			}
			pub.send(seq, due.UnixNano())
			seq++
		}
		p.published = count
		p.nominal = c.durationOf(p).Seconds()
	} else {
		// Closed loop: publish whenever fewer than maxWindow messages are still on their way
		// to some subscriber, i.e. as fast as delivery keeps up.
		subs := max(p.subscribers, 1)
		lastProgress, lastDone := time.Now(), int64(-1)
		for time.Since(start) < c.maxDur {
			done := p.unique.Load() / subs
			if done != lastDone {
				lastDone, lastProgress = done, time.Now()
			}
			if p.published-done >= int64(c.maxWindow) {
				if time.Since(lastProgress) > c.drain {
					break // stalled: messages were lost
				}
				time.Sleep(50 * time.Microsecond)
				continue
			}
			pub.send(seq, time.Now().UnixNano())
			seq++
			p.published++
		}
	}
	pub.wait()
	p.last.Store(seq - 1)
	p.pubDoneNs = time.Now().UnixNano()
	p.pubErrors = pub.errors.Load() - errBefore

	expected := (p.published - p.pubErrors) * p.subscribers
	deadline := time.Now().Add(c.drain)
	for p.unique.Load() < expected && time.Now().Before(deadline) {
		time.Sleep(2 * time.Millisecond)
	}
	p.uniqueAtDrain = p.unique.Load()
	p.lastRecvDrain = p.lastRecvNs.Load()
	elapsed := time.Since(start)
	p.serverCPU = round(float64(pidsCPU(c.pids)-srv0)/float64(elapsed), 2)
	p.loadgenCPU = round(float64(selfCPU()-self0)/float64(elapsed), 2)
	p.brokerCPU = round(float64(pidsCPU(c.brokerPids)-broker0)/float64(elapsed), 2)
	if len(c.pids) > 1 {
		for i, t := range eachCPU(c.pids) {
			p.serverCPUEach = append(p.serverCPUEach, round(float64(t-each0[i])/float64(elapsed), 2))
		}
	}
	p.coresBusy = coresBusy(coreBusy0, coreTotal0)
	if writes0 >= 0 {
		p.serverWrites = pidsWrites(c.pids) - writes0
	}
	if len(c.pids) > 0 {
		p.otherCPU = round(max(0, float64(machineCPU()-all0)/float64(elapsed)-p.serverCPU-p.brokerCPU-p.loadgenCPU), 2)
	}

	pubRate := p.publishRate()
	switch {
	case p.pubErrors > 0:
		p.whyNot = fmt.Sprintf("%d publish errors", p.pubErrors)
	case p.target > 0 && pubRate < 0.95*p.target:
		p.whyNot = "publishing itself fell behind: " + strconv.FormatFloat(pubRate, 'f', 0, 64) + " msg/s"
	case p.uniqueAtDrain < expected:
		p.whyNot = fmt.Sprintf("%d deliveries still missing %s after the last publish", expected-p.uniqueAtDrain, c.drain)
	case p.eventsLost.Load() > 0:
		p.whyNot = "the server dropped messages (events-lost)"
	default:
		p.delivered = true
		if p.lat.quantile(0.99) > int64(c.p99Limit) {
			p.whyNot = fmt.Sprintf("p99 above %s", c.p99Limit)
		} else {
			p.keptUp = true
		}
	}
	return seq
}

// publishRate is messages per second over the time publishing took, or the phase's nominal
// length if that was shorter (the last message goes out one interval before the end).
func (p *phase) publishRate() float64 {
	return float64(p.published) / max(float64(p.pubDoneNs-p.startNs)/1e9, p.nominal)
}

func (c *config) durationOf(p *phase) time.Duration {
	switch p.name {
	case "fixed":
		return c.duration
	case "warmup":
		return c.warmup
	}
	return c.stepDur
}

func firstOr(v []float64, def float64) float64 {
	if len(v) > 0 {
		return v[0]
	}
	return def
}
