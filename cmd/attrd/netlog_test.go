package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// netLogs keeps the instances' log records of note in memory (their warnings and
// errors, and the reasons of refused requests), for a failed bound's evidence.
type netLogs struct {
	mu   sync.Mutex
	recs []netLogRec
}

type netLogRec struct {
	at   time.Time
	node int
	line string
}

// handler returns a slog handler recording node i's records.
func (l *netLogs) handler(i int) slog.Handler { return &netLogHandler{logs: l, node: i} }

// dump logs node i's records in [from, to], each distinct line once with its count
// and first time.
func (l *netLogs) dump(t *testing.T, i int, from, to time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	type seen struct {
		first time.Time
		n     int
	}
	lines, order := map[string]*seen{}, []string{}
	for _, r := range l.recs {
		if r.node != i || r.at.Before(from) || r.at.After(to) {
			continue
		}
		if s := lines[r.line]; s != nil {
			s.n++
			continue
		}
		lines[r.line] = &seen{r.at, 1}
		order = append(order, r.line)
	}
	for _, line := range order {
		s := lines[line]
		t.Logf("node %d log from %s, %d×: %s", i, s.first.Format("15:04:05.000"), s.n, line)
	}
}

// dumpAll logs every node's records of note but refused requests, in time order.
func (l *netLogs) dumpAll(t *testing.T) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, r := range l.recs {
		if !strings.HasPrefix(r.line, "request refused") {
			t.Logf("%s node %d: %s", r.at.Format("15:04:05.000"), r.node, r.line)
		}
	}
}

type netLogHandler struct {
	logs  *netLogs
	node  int
	attrs []slog.Attr
}

func (h *netLogHandler) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelDebug }

func (h *netLogHandler) Handle(_ context.Context, r slog.Record) error {
	if r.Level < slog.LevelInfo && r.Message != "request refused" {
		return nil
	}
	var b strings.Builder
	b.WriteString(r.Message)
	r.Attrs(func(a slog.Attr) bool {
		if a.Key != "cid" {
			// Ids and sequences vary: keep the reason, so that repeats count as one.
			fmt.Fprintf(&b, " %s=%s", a.Key, idsOut.ReplaceAllString(a.Value.String(), "#"))
		}
		return true
	})
	h.logs.mu.Lock()
	defer h.logs.mu.Unlock()
	if len(h.logs.recs) < 500_000 {
		h.logs.recs = append(h.logs.recs, netLogRec{r.Time, h.node, b.String()})
	}
	return nil
}

func (h *netLogHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return &netLogHandler{logs: h.logs, node: h.node, attrs: append(slices.Clone(h.attrs), as...)}
}

func (h *netLogHandler) WithGroup(string) slog.Handler { return h }

// idsOut matches ids and numbers in log values.
var idsOut = regexp.MustCompile(`[0-9A-Za-z]{20,}|[0-9]+`)

// serverLog logs node i's nats-server log lines stamped in [from, to], and the other
// nodes' lines about leaders (elections the healed node may have caused).
func (c *netCluster) serverLog(t *testing.T, i int, from, to time.Time) {
	for j := range 3 {
		if j != i {
			c.serverLines(t, j, from, to, "leader")
		}
	}
	c.serverLines(t, i, from, to, "")
}

// serverLines logs node i's nats-server log lines stamped in [from, to] that contain
// match.
func (c *netCluster) serverLines(t *testing.T, i int, from, to time.Time, match string) {
	c.eachServerLine(i, from, to, func(line string) {
		if strings.Contains(line, match) {
			t.Logf("node %d server: %s", i, line)
		}
	})
}

// eachServerLine calls f with each of node i's nats-server log lines stamped in
// [from, to].
func (c *netCluster) eachServerLine(i int, from, to time.Time, f func(string)) {
	data, err := os.ReadFile(filepath.Join(c.dir, fmt.Sprintf("n%d.log", i)))
	if err != nil {
		f(fmt.Sprintf("(no log: %v)", err))
		return
	}
	for _, line := range strings.Split(string(data), "\n") {
		// [pid] 2006/01/02 15:04:05.000000 [INF] ...
		fs := strings.Fields(line)
		if len(fs) < 3 {
			continue
		}
		at, err := time.ParseInLocation("2006/01/02 15:04:05.000000", fs[1]+" "+fs[2], time.Local)
		if err == nil && !at.Before(from) && !at.After(to) {
			f(line)
		}
	}
}

// electedAgain reports whether a node other than healed logged in [from, to] that a
// Raft group's leader (the meta group's or a stream's) stepped down for another with a
// higher term: the healed node, back with the terms it raised while cut off, deposed it.
func (c *netCluster) electedAgain(healed int, from, to time.Time) bool {
	for i := range 3 {
		if i == healed {
			continue
		}
		found := false
		c.eachServerLine(i, from, to, func(line string) {
			found = found || strings.Contains(line, "Detected another leader with higher term")
		})
		if found {
			return true
		}
	}
	return false
}
