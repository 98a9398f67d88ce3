package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"strconv"
)

// event is one dispatched Server-Sent Event (HTML spec, "event stream interpretation").
type event struct {
	typ   []byte // "message" unless an event: field said otherwise
	data  []byte // data lines joined by \n
	id    []byte // the last event ID at dispatch time
	hasID bool   // this event block carried an id: field itself
}

// sseReader parses an event stream: lines end in \n or \r\n, fields are data/id/event/retry,
// lines starting with ':' are comments, a blank line dispatches the event. (A lone \r as a
// line end is also legal SSE; the relay never sends it, and it is not handled here.)
type sseReader struct {
	r        *bufio.Reader
	long     []byte // a line that did not fit in the bufio buffer
	data     []byte
	typ      []byte
	lastID   []byte
	blockID  bool
	retry    int
	comments int
}

func newSSEReader(r io.Reader, size int) *sseReader {
	return &sseReader{r: bufio.NewReaderSize(r, size), retry: -1}
}

// readLine returns the next line without its terminator; the slice is valid until the next call.
func (s *sseReader) readLine() ([]byte, error) {
	line, err := s.r.ReadSlice('\n')
	if errors.Is(err, bufio.ErrBufferFull) {
		s.long = append(s.long[:0], line...)
		for errors.Is(err, bufio.ErrBufferFull) {
			line, err = s.r.ReadSlice('\n')
			s.long = append(s.long, line...)
		}
		line = s.long
	}
	if err != nil {
		return nil, err
	}
	line = line[:len(line)-1]
	if n := len(line); n > 0 && line[n-1] == '\r' {
		line = line[:n-1]
	}
	return line, nil
}

// next returns the next dispatched event; its slices are valid until the next call.
func (s *sseReader) next(ev *event) error {
	s.data = s.data[:0]
	s.typ = s.typ[:0]
	s.blockID = false
	hasData := false
	for {
		line, err := s.readLine()
		if err != nil {
			return err
		}
		if len(line) == 0 {
			if !hasData { // spec: an empty data buffer dispatches nothing
				s.typ = s.typ[:0]
				s.blockID = false
				continue
			}
			ev.data = s.data[:len(s.data)-1] // drop the final \n
			ev.typ = s.typ
			if len(ev.typ) == 0 {
				ev.typ = append(ev.typ, "message"...)
			}
			ev.id = s.lastID
			ev.hasID = s.blockID
			return nil
		}
		if line[0] == ':' {
			s.comments++
			continue
		}
		field, value := line, []byte(nil)
		if i := bytes.IndexByte(line, ':'); i >= 0 {
			field, value = line[:i], line[i+1:]
			if len(value) > 0 && value[0] == ' ' {
				value = value[1:]
			}
		}
		switch string(field) {
		case "data":
			s.data = append(s.data, value...)
			s.data = append(s.data, '\n')
			hasData = true
		case "id":
			if bytes.IndexByte(value, 0) < 0 {
				s.lastID = append(s.lastID[:0], value...)
				s.blockID = true
			}
		case "event":
			s.typ = append(s.typ[:0], value...)
		case "retry":
			if n, err := strconv.Atoi(string(value)); err == nil && n >= 0 {
				s.retry = n
			}
		}
	}
}

// kind of a relay event, by its JSON envelope (PROTOCOL.md 2.1).
type kind int

const (
	kindMessage kind = iota // a message whose payload is {"seq":n,"t":ns}
	kindOther               // a message we did not publish, or one we cannot read
	kindConfig
	kindError
	kindOwn // a message on a stream's own topic: {"own":i,"t":ns}
)

type envelope struct {
	Topic   string          `json:"topic"`
	Payload json.RawMessage `json:"payload"`
	Error   *struct {
		Code  string `json:"code"`
		Count int64  `json:"count"`
	} `json:"error"`
}

var (
	configPrefix  = []byte(`{"topic":"/httpsub/config",`)
	payloadMarker = []byte(`,"payload":"`)
)

// classify reads an event's data. Messages take a fast path that finds the payload string
// in the envelope without a full JSON decode (the loadgen must out-read the server on one
// core); anything unusual goes through encoding/json.
func classify(data []byte, scratch []byte) (k kind, seq, t int64, lostCount int64, errCode string) {
	// The other servers deliver the published body itself as the data.
	if k, seq, t, ok := parsePayload(data); ok {
		return k, seq, t, 0, ""
	}
	if !bytes.HasPrefix(data, configPrefix) && bytes.HasPrefix(data, []byte(`{"topic":"`)) {
		if i := bytes.Index(data, payloadMarker); i >= 0 {
			if payload, ok := unquoteSimple(data[i+len(payloadMarker):], scratch); ok {
				if k, seq, t, ok := parsePayload(payload); ok {
					return k, seq, t, 0, ""
				}
			}
		}
	}
	var env envelope
	if err := json.Unmarshal(data, &env); err != nil {
		return kindOther, 0, 0, 0, ""
	}
	if env.Error != nil {
		return kindError, 0, 0, env.Error.Count, env.Error.Code
	}
	if env.Topic == "/httpsub/config" {
		return kindConfig, 0, 0, 0, ""
	}
	var s string
	if json.Unmarshal(env.Payload, &s) == nil {
		if k, seq, t, ok := parsePayload([]byte(s)); ok {
			return k, seq, t, 0, ""
		}
	}
	return kindOther, 0, 0, 0, ""
}

// unquoteSimple decodes a JSON string body (after its opening quote) up to the closing
// quote, handling only \" and \\; ok is false for anything else (the caller falls back).
func unquoteSimple(b []byte, scratch []byte) ([]byte, bool) {
	out := scratch[:0]
	for i := 0; i < len(b); i++ {
		c := b[i]
		switch c {
		case '"':
			if i+2 != len(b) || b[i+1] != '}' { // the payload must end the envelope
				return nil, false
			}
			return out, true
		case '\\':
			if i+1 >= len(b) || (b[i+1] != '"' && b[i+1] != '\\') {
				return nil, false
			}
			i++
			out = append(out, b[i])
		default:
			out = append(out, c)
		}
	}
	return nil, false
}

// parsePayload reads a body the loadgen published: a shared-topic message or an own-topic one.
func parsePayload(p []byte) (k kind, seq, t int64, ok bool) {
	if seq, t, ok = parseKeyT(p, `{"seq":`); ok {
		return kindMessage, seq, t, true
	}
	if seq, t, ok = parseKeyT(p, `{"own":`); ok {
		return kindOwn, seq, t, true
	}
	return kindOther, 0, 0, false
}

// parseKeyT reads {"<key>":<int>,"t":<int>} exactly as the loadgen's publisher writes it.
func parseKeyT(p []byte, a string) (seq, t int64, ok bool) {
	const b = `,"t":`
	if !bytes.HasPrefix(p, []byte(a)) {
		return 0, 0, false
	}
	p = p[len(a):]
	seq, p, ok = parseInt(p)
	if !ok || !bytes.HasPrefix(p, []byte(b)) {
		return 0, 0, false
	}
	t, p, ok = parseInt(p[len(b):])
	if !ok || len(p) != 1 || p[0] != '}' {
		return 0, 0, false
	}
	return seq, t, true
}

func parseInt(p []byte) (int64, []byte, bool) {
	var n int64
	i := 0
	for ; i < len(p) && p[i] >= '0' && p[i] <= '9'; i++ {
		n = n*10 + int64(p[i]-'0')
	}
	return n, p[i:], i > 0 && i <= 19
}
