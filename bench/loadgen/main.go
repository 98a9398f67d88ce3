// Command loadgen drives a livepipe relay over loopback: it opens N Server-Sent Events
// streams on one topic and either publishes through POST /publish while measuring
// publish-to-receive latency, loss and duplication (mode fanout), or only holds the
// streams open to measure the server's memory per connection (mode idle). It prints one
// JSON line of results on stdout; progress goes to stderr.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/url"
	"os"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

type config struct {
	mode        string
	base        *url.URL   // the first of bases
	bases       []*url.URL // -url lists several nodes: stream i goes to bases[i % len], publishes round-robin
	pubNext     atomic.Uint64
	topic       string
	n           int
	sources     int
	sourceFirst int // the first source address is 127.0.0.<sourceFirst>
	connectPar  int
	connectWait time.Duration
	pids        []int // the server's processes (pushpin is several); RSS, CPU and writes are summed
	brokerPids  []int // a broker the servers use: its CPU is reported apart, not as "other"

	peer      string // livepipe, nchan, pushpin, better-sse, raw-node (peers.go)
	pubURL    string // pushpin: its HTTP publish endpoint
	natsPub   string // publish straight into this NATS server instead (natspub.go)
	ownTopics bool   // each stream also subscribes to a topic of its own (o<i>)
	ownRate   float64
	churn     int

	rate, stepDur, duration, drain, maxDur time.Duration
	fixedRate                              float64
	steps                                  []float64
	p99Limit                               time.Duration
	maxWindow                              int
	publishers                             int
	otherLimit                             float64
	repeats                                int
	repeatBudget                           time.Duration
	warmup                                 time.Duration

	settle, hold time.Duration
}

func main() {
	var c config
	var rawURL, steps string
	flag.StringVar(&c.mode, "mode", "fanout", "fanout or idle")
	flag.StringVar(&rawURL, "url", "http://127.0.0.1:8080", "relay base URL; a comma-separated list spreads the streams over several nodes (stream i on URL i mod count) and publishes round-robin")
	flag.StringVar(&c.topic, "topic", "bench", "topic every stream subscribes to")
	flag.IntVar(&c.n, "n", 1000, "number of SSE connections")
	flag.IntVar(&c.sources, "sources", 0, "loopback source IPs 127.0.0.2.. to spread connections over (0: one per 20000 connections when n > 20000)")
	flag.IntVar(&c.sourceFirst, "source-first", 2, "with -sources: the first source IP is 127.0.0.<this> (several loadgens at once each take their own)")
	flag.IntVar(&c.connectPar, "connect-concurrency", 200, "connections being opened at once")
	flag.DurationVar(&c.connectWait, "connect-timeout", 90*time.Second, "how long to wait for every stream's config event")
	var pids string
	flag.StringVar(&pids, "pid", "", "server pid(s), comma-separated, for RSS, CPU time and writes from /proc (summed; CPU also each)")
	var brokerPids string
	flag.StringVar(&brokerPids, "broker-pid", "", "fanout: pid(s) of a broker the servers use; its CPU is reported as broker_cpu")
	flag.StringVar(&c.peer, "peer", "livepipe", "server kind: livepipe, nchan, pushpin, better-sse, raw-node")
	flag.StringVar(&c.natsPub, "nats-pub", "", "fanout: publish with core NATS PUB to this server (nats://host:port) instead of through the server under test")
	flag.StringVar(&c.pubURL, "pub-url", "http://127.0.0.1:5561/publish/", "pushpin: its HTTP publish API")
	flag.BoolVar(&c.ownTopics, "own-topics", false, "each stream also subscribes to its own topic o<i> (many topics)")
	flag.Float64Var(&c.ownRate, "own-rate", 0, "fanout with -own-topics: messages/s published round-robin to the streams' own topics during the timed phases")
	flag.IntVar(&c.churn, "churn", 0, "fanout: streams that connect, wait until ready and disconnect in a loop during the timed phases")
	flag.Float64Var(&c.fixedRate, "rate", 0, "fanout: messages/s of the fixed-rate phase (0: no such phase)")
	flag.DurationVar(&c.duration, "duration", 10*time.Second, "fanout: length of the fixed-rate phase")
	flag.StringVar(&steps, "steps", "", "fanout: comma-separated publish rates (messages/s) stepped up until delivery falls behind")
	flag.DurationVar(&c.stepDur, "step-duration", 3*time.Second, "fanout: length of each step")
	flag.DurationVar(&c.drain, "drain", 2*time.Second, "fanout: after a phase's last publish, how long deliveries may take to arrive before the phase counts as fallen behind")
	flag.DurationVar(&c.p99Limit, "p99-limit", 100*time.Millisecond, "fanout: a step whose p99 latency exceeds this has not kept up")
	flag.DurationVar(&c.maxDur, "max-duration", 0, "fanout: length of a closed-loop phase that publishes as fast as delivery keeps up (0: none)")
	flag.IntVar(&c.maxWindow, "max-window", 10, "fanout: closed-loop phase: messages published but not yet delivered to every subscriber")
	flag.IntVar(&c.publishers, "publishers", 16, "fanout: concurrent POST /publish connections")
	flag.DurationVar(&c.warmup, "warmup", 0, "fanout: publish this long at the first phase's rate before timing anything (not reported)")
	flag.Float64Var(&c.otherLimit, "other-limit", 0.3, "fanout: CPU (in cores) that other processes may use during a phase before it counts as disturbed (needs -pid)")
	flag.IntVar(&c.repeats, "repeats", 0, "fanout: how many times a disturbed phase may be run again")
	flag.DurationVar(&c.repeatBudget, "repeat-budget", 60*time.Second, "fanout: total time that repeating disturbed phases may take")
	flag.DurationVar(&c.settle, "settle", 3*time.Second, "idle: wait after the last config event before reading RSS")
	flag.DurationVar(&c.hold, "hold", 0, "idle: keep the connections open this long after measuring")
	cpuProfile := flag.String("cpuprofile", "", "write the loadgen's own CPU profile here (go tool pprof)")
	flag.Parse()
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err != nil {
			fatalf("%v", err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			fatalf("%v", err)
		}
		defer pprof.StopCPUProfile()
	}

	c.pids, c.brokerPids = pidList(pids), pidList(brokerPids)
	switch c.peer {
	case "livepipe", "nchan", "pushpin", "better-sse", "raw-node":
	default:
		fatalf("unknown -peer %q", c.peer)
	}
	for _, raw := range strings.Split(rawURL, ",") {
		u, err := url.Parse(strings.TrimSpace(raw))
		if err != nil || u.Host == "" {
			fatalf("bad -url %q", raw)
		}
		c.bases = append(c.bases, u)
	}
	c.base = c.bases[0]
	for _, s := range strings.Split(steps, ",") {
		if s = strings.TrimSpace(s); s == "" {
			continue
		}
		r, err := strconv.ParseFloat(s, 64)
		if err != nil || r <= 0 {
			fatalf("bad rate %q in -steps", s)
		}
		c.steps = append(c.steps, r)
	}
	if c.sources == 0 && c.n > 20000 {
		c.sources = (c.n + 19999) / 20000
	}
	limit := raiseFDLimit()
	if uint64(c.n+c.publishers+64) > limit {
		fatalf("%d connections need more file descriptors than the limit of %d (raise the hard limit: ulimit -Hn)", c.n, limit)
	}

	var out any
	switch c.mode {
	case "fanout":
		out = runFanout(&c)
	case "idle":
		out = runIdle(&c)
	default:
		fatalf("unknown -mode %q", c.mode)
	}
	line, _ := json.Marshal(out)
	fmt.Println(string(line))
}

func pidList(list string) []int {
	var out []int
	for _, f := range strings.Split(list, ",") {
		if n, err := strconv.Atoi(strings.TrimSpace(f)); err == nil && n > 0 {
			out = append(out, n)
		}
	}
	return out
}

// baseOf is the node stream i connects to.
func (c *config) baseOf(i int) *url.URL { return c.bases[i%len(c.bases)] }

func fatalf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "loadgen: "+format+"\n", args...)
	os.Exit(2)
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "loadgen: "+format+"\n", args...)
}

// raiseFDLimit lifts the soft open-file limit to the hard one and returns it.
func raiseFDLimit() uint64 {
	var r syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &r); err != nil {
		return 1024
	}
	r.Cur = r.Max
	_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &r)
	_ = syscall.Getrlimit(syscall.RLIMIT_NOFILE, &r)
	return r.Cur
}

// ---- streams ----

// stats shared by every stream.
type streamStats struct {
	configs       atomic.Int64 // streams that got their config event
	failed        atomic.Int64 // streams that could not be opened
	dropped       atomic.Int64 // streams that ended while we were still reading
	eventsLost    atomic.Int64 // sum of `count` in events-lost error events
	errorEvents   atomic.Int64
	otherMessages atomic.Int64 // message events we could not read as ours
	missingID     atomic.Int64 // message events without an id: field
	heartbeats    atomic.Int64
	firstFailure  atomic.Value // string
}

type stream struct {
	conn    net.Conn
	seen    []uint64 // bit per sequence number, for loss and duplicate counting
	alive   atomic.Bool
	closing atomic.Bool
}

type swarm struct {
	cfg     *config
	streams []*stream
	stats   streamStats
	wg      sync.WaitGroup
	phases  *phaseSet // fanout only
	own     *ownStats // fanout with -own-topics only
}

func (s *swarm) open() time.Duration {
	s.streams = make([]*stream, s.cfg.n)
	sem := make(chan struct{}, s.cfg.connectPar)
	start := time.Now()
	for i := range s.streams {
		st := &stream{}
		s.streams[i] = st
		var src net.IP
		if s.cfg.sources > 0 {
			src = net.IPv4(127, 0, 0, byte(s.cfg.sourceFirst+i%s.cfg.sources))
		}
		sem <- struct{}{}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.run(st, i, src, func() { <-sem })
		}()
	}
	deadline := time.Now().Add(s.cfg.connectWait)
	for s.stats.configs.Load()+s.stats.failed.Load() < int64(s.cfg.n) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	took := time.Since(start)
	logf("%d of %d streams got their config event in %.1fs (%d failed)", s.stats.configs.Load(), s.cfg.n, took.Seconds(), s.stats.failed.Load())
	return took
}

func (s *swarm) fail(err error) {
	s.stats.firstFailure.CompareAndSwap(nil, err.Error())
}

// run opens one stream and reads it until closed. `connected` is called once the config
// event arrived or opening failed, to let the next connection start.
func (s *swarm) run(st *stream, idx int, src net.IP, connected func()) {
	once := sync.OnceFunc(connected)
	defer once()
	d := net.Dialer{Timeout: 10 * time.Second}
	if src != nil {
		d.LocalAddr = &net.TCPAddr{IP: src}
	}
	host := s.cfg.baseOf(idx).Host
	conn, err := d.Dial("tcp", host)
	if err != nil {
		s.stats.failed.Add(1)
		s.fail(err)
		return
	}
	st.conn = conn
	path := s.cfg.subPath(idx)
	req := "GET " + path + " HTTP/1.1\r\nHost: " + host + "\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
	if _, err := io.WriteString(conn, req); err != nil {
		s.stats.failed.Add(1)
		s.fail(err)
		conn.Close()
		return
	}
	br := bufio.NewReaderSize(conn, 8<<10)
	resp, err := http.ReadResponse(br, nil)
	if err == nil && (resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream")) {
		err = fmt.Errorf("GET %s answered %s (%s)", path, resp.Status, resp.Header.Get("Content-Type"))
	}
	if err != nil {
		s.stats.failed.Add(1)
		s.fail(err)
		conn.Close()
		return
	}
	st.alive.Store(true)
	r := newSSEReader(resp.Body, 8<<10)
	var ev event
	scratch := make([]byte, 0, 256)
	configured := false
	if s.cfg.readyOnHeaders() {
		configured = true
		s.stats.configs.Add(1)
		once()
	}
	for {
		err := r.next(&ev)
		if err != nil {
			break
		}
		now := time.Now().UnixNano()
		k, seq, t, lost, _ := classify(ev.data, scratch)
		switch k {
		case kindConfig:
			if !configured {
				configured = true
				s.stats.configs.Add(1)
				once()
			}
		case kindError:
			s.stats.errorEvents.Add(1)
			s.stats.eventsLost.Add(lost)
			if s.phases != nil {
				if p := s.phases.current(); p != nil {
					p.eventsLost.Add(lost)
				}
			}
		case kindOther:
			s.stats.otherMessages.Add(1)
		case kindOwn:
			if s.own != nil {
				s.own.receivedAt(now - t)
			}
		case kindMessage:
			if !ev.hasID && !s.cfg.readyOnHeaders() { // only livepipe promises an id: on every message
				s.stats.missingID.Add(1)
			}
			if s.phases != nil {
				s.phases.delivered(st, seq, now-t, now)
			}
		}
	}
	s.stats.heartbeats.Add(int64(r.comments))
	st.alive.Store(false)
	if !st.closing.Load() {
		s.stats.dropped.Add(1)
		if !configured {
			s.stats.failed.Add(1)
		}
	}
	conn.Close()
}

func (s *swarm) aliveCount() int {
	n := 0
	for _, st := range s.streams {
		if st.alive.Load() {
			n++
		}
	}
	return n
}

func (s *swarm) close() {
	for _, st := range s.streams {
		st.closing.Store(true)
		if st.conn != nil {
			// From a source address of our own (-sources): reset rather than close. A FIN would
			// leave each port in TIME_WAIT for a minute, and meanwhile the kernel gives none of
			// them to a connect() that lets it pick the port (curl, the next run, other programs).
			if tc, ok := st.conn.(*net.TCPConn); ok && s.cfg.sources > 0 {
				tc.SetLinger(0)
			}
			st.conn.Close()
		}
	}
	s.wg.Wait()
}

// markSeen records seq for a stream; false when it was already seen (a duplicate).
func (st *stream) markSeen(seq int64) bool {
	w := int(seq >> 6)
	if w >= len(st.seen) {
		grown := make([]uint64, max(w+1, 2*len(st.seen)))
		copy(grown, st.seen)
		st.seen = grown
	}
	bit := uint64(1) << (seq & 63)
	if st.seen[w]&bit != 0 {
		return false
	}
	st.seen[w] |= bit
	return true
}

// ---- server readings from /proc ----

// procStatusKB reads a field such as VmRSS from /proc/<pid>/status, in kB.
func procStatusKB(pid int, field string) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, field+":"); ok {
			n, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			return n
		}
	}
	return -1
}

func pidsKB(pids []int, field string) int64 {
	var sum int64
	for _, p := range pids {
		if v := procStatusKB(p, field); v > 0 {
			sum += v
		}
	}
	return sum
}

func pidsCPU(pids []int) time.Duration {
	var sum time.Duration
	for _, p := range pids {
		sum += procCPU(p)
	}
	return sum
}

func pidsWrites(pids []int) int64 {
	var sum int64 = -1
	for _, p := range pids {
		if v := procWrites(p); v >= 0 {
			sum = max(sum, 0) + v
		}
	}
	return sum
}

// procCPU is a process's user+system CPU time, from /proc/<pid>/stat (clock ticks of 10 ms).
func procCPU(pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// Fields after the command name, which is in parentheses and may hold spaces.
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
	if len(f) < 13 {
		return 0
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+st) * 10 * time.Millisecond
}

// machineCPU is the CPU time all cores spent in processes (user, system) or stolen by the
// hypervisor, from /proc/stat, so that CPU used by processes other than the server and the
// loadgen shows (this machine may be shared).
func machineCPU() time.Duration {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line) // cpu user nice system idle iowait irq softirq steal guest guest_nice
	var busy int64
	for i, v := range f[1:] {
		// Not idle or iowait; not irq or softirq either, where the kernel may account our own
		// loopback traffic; guest time is already in user. Steal stays: on a VM, another
		// guest taking our cores is a disturbance too.
		if i != 0 && i != 1 && i != 2 && i != 7 {
			continue
		}
		n, _ := strconv.ParseInt(v, 10, 64)
		busy += n
	}
	return time.Duration(busy) * 10 * time.Millisecond
}

// procWrites is the number of write syscalls (write, writev, …) a process made so far, from
// /proc/<pid>/io, or -1.
func procWrites(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/io", pid))
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "syscw: "); ok {
			n, _ := strconv.ParseInt(rest, 10, 64)
			return n
		}
	}
	return -1
}

// coreTicks reads each core's busy and total ticks from /proc/stat (busy includes irq and
// softirq, where network processing is accounted, so a saturated core shows as 1).
func coreTicks() (busy, total []int64) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return nil, nil
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 9 || !strings.HasPrefix(f[0], "cpu") || f[0] == "cpu" {
			continue
		}
		var bz, tot int64
		for i, v := range f[1:9] { // user nice system idle iowait irq softirq steal
			n, _ := strconv.ParseInt(v, 10, 64)
			tot += n
			if i != 3 && i != 4 {
				bz += n
			}
		}
		busy, total = append(busy, bz), append(total, tot)
	}
	return busy, total
}

func coresBusy(busy0, total0 []int64) []float64 {
	busy1, total1 := coreTicks()
	out := make([]float64, 0, len(busy1))
	for i := range busy1 {
		if i < len(busy0) && total1[i] > total0[i] {
			out = append(out, round(float64(busy1[i]-busy0[i])/float64(total1[i]-total0[i]), 2))
		}
	}
	return out
}

func selfCPU() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// heapUsed reads the V8 heap in use from the relay's /metrics (prom-client default metrics), or -1.
func heapUsed(base *url.URL) int64 {
	resp, err := http.Get(base.Scheme + "://" + base.Host + endpoint(base, "metrics"))
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		name, value, ok := strings.Cut(sc.Text(), " ")
		if ok && strings.HasSuffix(name, "nodejs_heap_size_used_bytes") {
			v, _ := strconv.ParseFloat(value, 64)
			return int64(v)
		}
	}
	return -1
}

// endpoint is the absolute path of a relay endpoint under the base URL's path.
func endpoint(base *url.URL, name string) string {
	return strings.TrimSuffix(base.EscapedPath(), "/") + "/" + name
}

func round(v float64, digits int) float64 {
	p := math.Pow(10, float64(digits))
	return math.Round(v*p) / p
}

// ---- idle ----

type idleResult struct {
	Mode            string  `json:"mode"`
	N               int     `json:"n"`
	Connected       int64   `json:"connected"`
	Failed          int64   `json:"failed"`
	StillOpen       int     `json:"still_open"`
	ConnectSeconds  float64 `json:"connect_s"`
	RSSBeforeKB     int64   `json:"server_rss_before_kb"`
	RSSAfterKB      int64   `json:"server_rss_after_kb"`
	RSSPerConnBytes float64 `json:"server_rss_per_conn_bytes"`
	HeapBefore      int64   `json:"server_heap_used_before_bytes"`
	HeapAfter       int64   `json:"server_heap_used_after_bytes"`
	HeapPerConn     float64 `json:"server_heap_per_conn_bytes"`
	LoadgenRSSKB    int64   `json:"loadgen_rss_kb"`
	FirstFailure    string  `json:"first_failure,omitempty"`
}

func runIdle(c *config) idleResult {
	res := idleResult{Mode: "idle", N: c.n, HeapBefore: heapUsed(c.base)}
	if len(c.pids) > 0 {
		res.RSSBeforeKB = pidsKB(c.pids, "VmRSS")
	}
	s := &swarm{cfg: c}
	res.ConnectSeconds = round(s.open().Seconds(), 2)
	time.Sleep(c.settle)
	res.Connected = s.stats.configs.Load()
	res.Failed = s.stats.failed.Load()
	if len(c.pids) > 0 {
		res.RSSAfterKB = pidsKB(c.pids, "VmRSS")
		if res.Connected > 0 {
			res.RSSPerConnBytes = round(float64(res.RSSAfterKB-res.RSSBeforeKB)*1024/float64(res.Connected), 0)
		}
	}
	res.HeapAfter = heapUsed(c.base)
	if res.HeapBefore > 0 && res.HeapAfter > 0 && res.Connected > 0 {
		res.HeapPerConn = round(float64(res.HeapAfter-res.HeapBefore)/float64(res.Connected), 0)
	}
	time.Sleep(c.hold)
	res.StillOpen = s.aliveCount()
	res.LoadgenRSSKB = procStatusKB(os.Getpid(), "VmRSS")
	if f, ok := s.stats.firstFailure.Load().(string); ok {
		res.FirstFailure = f
	}
	s.close()
	return res
}
