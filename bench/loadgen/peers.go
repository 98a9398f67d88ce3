package main

// How the loadgen talks to each server it can drive: where a stream subscribes, how a
// message is published, and when a new stream counts as ready. Every server delivers the
// publisher's body ({"seq":n,"t":ns} or {"own":i,"t":ns}) as an event's data: livepipe inside
// its JSON envelope, the others as is.

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/url"
	"strconv"
	"strings"
)

// subPath is the request path of stream i: the shared topic, plus the stream's own topic
// when -own-topics is set.
func (c *config) subPath(i int) string {
	topics := []string{c.topic}
	if c.ownTopics && i >= 0 {
		topics = append([]string{ownTopic(i)}, topics...)
	}
	switch c.peer {
	case "nchan":
		// nchan_channel_id $arg_c (location /sub) or $arg_c $arg_d (location /sub2, multiplexed).
		if len(topics) == 2 {
			return "/sub2?c=" + url.QueryEscape(topics[0]) + "&d=" + url.QueryEscape(topics[1])
		}
		return "/sub?c=" + url.QueryEscape(topics[0])
	default: // livepipe, pushpin (its GRIP origin), better-sse, raw-node
		return endpoint(c.base, "events") + "?topics=" + url.QueryEscape(strings.Join(topics, ","))
	}
}

func ownTopic(i int) string { return "o" + strconv.Itoa(i) }

// readyOnHeaders: livepipe's streams are ready at their config event (its subscription is
// in place by then); the others send no such event, so a 200 text/event-stream answer is
// taken as ready, and the warm-up phase covers any subscription still in flight.
func (c *config) readyOnHeaders() bool { return c.peer != "livepipe" }

// publishRequest builds the request that publishes body on topic.
func (c *config) publishRequest(topic string, body []byte) (*http.Request, error) {
	var u string
	switch c.peer {
	case "nchan":
		u = c.base.Scheme + "://" + c.base.Host + "/pub?c=" + url.QueryEscape(topic)
	case "pushpin":
		// Pushpin's HTTP publish API on its control port: one item, an SSE frame as content.
		item := map[string]any{"items": []any{map[string]any{
			"channel": topic,
			"formats": map[string]any{"http-stream": map[string]string{"content": "data: " + string(body) + "\n\n"}},
		}}}
		b, err := json.Marshal(item)
		if err != nil {
			return nil, err
		}
		body = b
		u = c.pubURL
	default:
		b := c.bases[c.pubNext.Add(1)%uint64(len(c.bases))] // spread over the nodes
		u = b.Scheme + "://" + b.Host + endpoint(b, "publish") + "?topic=" + url.QueryEscape(topic)
	}
	req, err := http.NewRequest(http.MethodPost, u, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	return req, nil
}
