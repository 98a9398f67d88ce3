package main

// Publishing straight into a NATS server (-nats-pub), as a backend beside the relays would:
// a core NATS PUB on the topic's subject (livepipe maps topics to subjects 1:1), so that no
// relay is in the publish path and a relay's CPU is only what it spends on what it receives.

import (
	"bufio"
	"fmt"
	"net"
	"net/url"
	"strings"
	"sync"
	"time"
)

type natsConn struct {
	conn net.Conn
	mu   sync.Mutex // writes: publishes, and PONGs from the reader
	buf  []byte
	err  chan error // the server's first -ERR
}

// dialNATS connects without TLS or credentials, the way a loopback benchmark broker runs.
func dialNATS(raw string) (*natsConn, error) {
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" {
		return nil, fmt.Errorf("bad NATS URL %q", raw)
	}
	conn, err := net.DialTimeout("tcp", u.Host, 5*time.Second)
	if err != nil {
		return nil, err
	}
	r := bufio.NewReader(conn)
	info, err := r.ReadString('\n')
	if err != nil || !strings.HasPrefix(info, "INFO ") {
		conn.Close()
		return nil, fmt.Errorf("%s did not greet with INFO (%q, %v)", u.Host, info, err)
	}
	// Not verbose (no +OK per PUB), and no echo: this connection subscribes to nothing anyway.
	if _, err := conn.Write([]byte("CONNECT {\"verbose\":false,\"pedantic\":false,\"echo\":false,\"name\":\"loadgen\",\"lang\":\"go\",\"version\":\"0\",\"protocol\":1}\r\n")); err != nil {
		conn.Close()
		return nil, err
	}
	nc := &natsConn{conn: conn, err: make(chan error, 1)}
	go nc.read(r)
	return nc, nil
}

// read answers the server's keep-alive PINGs and keeps its first error.
func (nc *natsConn) read(r *bufio.Reader) {
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		switch {
		case strings.HasPrefix(line, "PING"):
			nc.mu.Lock()
			_, _ = nc.conn.Write([]byte("PONG\r\n"))
			nc.mu.Unlock()
		case strings.HasPrefix(line, "-ERR"):
			select {
			case nc.err <- fmt.Errorf("NATS: %s", strings.TrimSpace(line)):
			default:
			}
		}
	}
}

// publish writes one PUB. Core NATS does not acknowledge it: a written message counts as sent.
func (nc *natsConn) publish(subject string, body []byte) error {
	select {
	case err := <-nc.err:
		return err
	default:
	}
	nc.mu.Lock()
	defer nc.mu.Unlock()
	nc.buf = fmt.Appendf(nc.buf[:0], "PUB %s %d\r\n", subject, len(body))
	nc.buf = append(append(nc.buf, body...), '\r', '\n')
	_, err := nc.conn.Write(nc.buf)
	return err
}
