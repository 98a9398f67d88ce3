package main

// Load that runs beside the fan-out phases: messages to every stream's own topic (W3, many
// topics) and streams that connect and disconnect in a loop (W4, churn).

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

type ownStats struct {
	received atomic.Int64
	lat      hist
}

func (o *ownStats) receivedAt(latency int64) {
	o.received.Add(1)
	o.lat.record(latency)
}

type sideLoad struct {
	c        *config
	s        *swarm
	done     chan struct{}
	wg       sync.WaitGroup
	start    time.Time
	stopped  time.Time
	own      *publisher
	ownSent  int64
	cycles   atomic.Int64
	errors   atomic.Int64
	firstErr atomic.Value
	ready    hist
}

func startSideLoad(c *config, s *swarm) *sideLoad {
	l := &sideLoad{c: c, s: s, done: make(chan struct{}), start: time.Now()}
	if s.own != nil && c.ownRate > 0 {
		l.own = newPublisher(c, nil)
		l.wg.Add(1)
		go l.publishOwn()
	}
	for w := range c.churn {
		l.wg.Add(1)
		go l.churnLoop(w)
	}
	return l
}

// publishOwn sends {"own":k,"t":ns} to stream k%n's own topic at -own-rate, open loop.
func (l *sideLoad) publishOwn() {
	defer l.wg.Done()
	interval := time.Duration(float64(time.Second) / l.c.ownRate)
	for k := int64(0); ; k++ {
		due := l.start.Add(time.Duration(k) * interval)
		if d := time.Until(due); d > 0 {
			select {
			case <-l.done:
				return
			case <-time.After(d):
			}
		}
		select {
		case <-l.done:
			return
		default:
		}
		l.own.pending.Add(1)
		l.own.jobs <- pubJob{seq: k, t: due.UnixNano(), own: int(k % int64(l.c.n))}
		l.ownSent = k + 1
	}
}

// churnLoop opens a stream, waits until it is ready (as the fan-out streams are), closes it,
// and again. Each loop has its own source address, so that closed connections waiting in
// TIME_WAIT do not exhaust one address's ports.
func (l *sideLoad) churnLoop(w int) {
	defer l.wg.Done()
	d := net.Dialer{Timeout: 10 * time.Second, LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 1, byte(1+w%250))}}
	for {
		select {
		case <-l.done:
			return
		default:
		}
		t0 := time.Now()
		if err := l.churnOnce(&d); err != nil {
			l.errors.Add(1)
			l.firstErr.CompareAndSwap(nil, err.Error())
			time.Sleep(10 * time.Millisecond)
			continue
		}
		l.ready.record(int64(time.Since(t0)))
		l.cycles.Add(1)
	}
}

func (l *sideLoad) churnOnce(d *net.Dialer) error {
	conn, err := d.Dial("tcp", l.c.base.Host)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	path := l.c.subPath(-1)
	req := "GET " + path + " HTTP/1.1\r\nHost: " + l.c.base.Host + "\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
	if _, err := io.WriteString(conn, req); err != nil {
		return err
	}
	resp, err := http.ReadResponse(bufio.NewReaderSize(conn, 4<<10), nil)
	if err != nil {
		return err
	}
	if resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
		return fmt.Errorf("GET %s answered %s", path, resp.Status)
	}
	if l.c.readyOnHeaders() {
		return nil
	}
	r := newSSEReader(resp.Body, 4<<10)
	var ev event
	for {
		if err := r.next(&ev); err != nil {
			return err
		}
		if k, _, _, _, _ := classify(ev.data, nil); k == kindConfig {
			return nil
		}
	}
}

func (l *sideLoad) stop(res *fanoutResult) {
	close(l.done)
	l.wg.Wait()
	l.stopped = time.Now()
	if l.own != nil {
		l.own.wait()
	}
	if l.c.churn > 0 {
		res.ChurnCycles = l.cycles.Load()
		res.ChurnPerS = round(float64(res.ChurnCycles)/l.stopped.Sub(l.start).Seconds(), 0)
		res.ChurnErrors = l.errors.Load()
		res.ChurnReadyP50, res.ChurnReadyP99 = ms(l.ready.quantile(0.5)), ms(l.ready.quantile(0.99))
		if f, ok := l.firstErr.Load().(string); ok {
			res.ChurnFirstErr = f
		}
	}
}

// ownResult is read after the drain period, so that late own-topic deliveries count.
func (l *sideLoad) ownResult(res *fanoutResult) {
	if l.own == nil {
		return
	}
	o := l.s.own
	res.OwnPublished = l.ownSent
	res.OwnErrors = l.own.errors.Load()
	res.OwnReceived = o.received.Load()
	res.OwnLost = max(0, res.OwnPublished-res.OwnErrors-res.OwnReceived)
	res.OwnRate = round(float64(res.OwnPublished)/l.stopped.Sub(l.start).Seconds(), 1)
	res.OwnP50, res.OwnP99 = ms(o.lat.quantile(0.5)), ms(o.lat.quantile(0.99))
}
