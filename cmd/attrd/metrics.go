package main

import (
	"context"
	"net/http"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/attrd/attrd/events"
)

// newRegistry returns this instance's Prometheus registry: the Go runtime's and the
// process's metrics, and the streams' sizes (the API's and the projectors' register
// themselves). Each instance has its own, so that several in one process (tests) do
// not collide.
func newRegistry(js jetstream.JetStream, bucket string) *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		&streamCollector{js: js, streams: []string{events.StreamName, events.KVStream(bucket), events.KVStream(events.ThrottleBucket)}})
	return reg
}

// metricsHandler serves reg in the Prometheus exposition formats.
func metricsHandler(reg *prometheus.Registry) http.Handler {
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg, Timeout: 5 * time.Second})
}

// streamCollector reads the event stream's and the buckets' sizes from their info at
// each scrape (one JetStream API request each, bounded by a second).
type streamCollector struct {
	js      jetstream.JetStream
	streams []string
}

var (
	streamMessages = prometheus.NewDesc("attrd_stream_messages", "Messages in a stream (the event log, the projection and throttle buckets).", []string{"stream"}, nil)
	streamBytes    = prometheus.NewDesc("attrd_stream_bytes", "Bytes a stream stores.", []string{"stream"}, nil)
	streamDedup    = prometheus.NewDesc("attrd_stream_duplicate_window_seconds", "A stream's de-duplication window (request ids within it are appended once).", []string{"stream"}, nil)
	streamUp       = prometheus.NewDesc("attrd_stream_info_ok", "1 when the stream's info could be read at this scrape.", []string{"stream"}, nil)
)

// Describe sends the collector's descriptions.
func (c *streamCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{streamMessages, streamBytes, streamDedup, streamUp} {
		ch <- d
	}
}

// Collect reads each stream's info.
func (c *streamCollector) Collect(ch chan<- prometheus.Metric) {
	for _, name := range c.streams {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		st, err := c.js.Stream(ctx, name)
		var info *jetstream.StreamInfo
		if err == nil {
			info, err = st.Info(ctx)
		}
		cancel()
		if err != nil {
			ch <- prometheus.MustNewConstMetric(streamUp, prometheus.GaugeValue, 0, name)
			continue
		}
		ch <- prometheus.MustNewConstMetric(streamUp, prometheus.GaugeValue, 1, name)
		ch <- prometheus.MustNewConstMetric(streamMessages, prometheus.GaugeValue, float64(info.State.Msgs), name)
		ch <- prometheus.MustNewConstMetric(streamBytes, prometheus.GaugeValue, float64(info.State.Bytes), name)
		ch <- prometheus.MustNewConstMetric(streamDedup, prometheus.GaugeValue, info.Config.Duplicates.Seconds(), name)
	}
}
