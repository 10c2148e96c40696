package main

// A linearizability checker for attrd's attributes (issue 17): every operation of a
// run is recorded with when it was sent and when it was answered, and each key's
// history is checked with porcupine against a register that knows attrd's semantics:
// create fails if the attribute is live, update fails if it is missing, delete, set
// (create or update), expiry, and E008004 (or no answer): the write may or may not have
// happened.

import (
	"fmt"
	"math"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"
)

// attrOp is what an operation asked: its kind ("set", "create", "update", "delete",
// "get"), the key (user and name), the value written and its expiration (seconds,
// 0: none), and when it was sent and answered (Unix ns; the model needs them for
// expiry).
type attrOp struct {
	Kind  string
	Key   string
	Value int64
	TTL   int64
	Call  int64
	Ret   int64
}

// attrOut is what it got: ok, an error code, or unknown (E008004 to the end, or no
// answer); a get's value.
type attrOut struct {
	OK      bool
	Code    string
	Unknown bool
	Found   bool
	Value   int64
}

// regState is one attribute: whether it is stored, its value, and the bounds of its
// expiry (0: never): a write's expiry is its event's time plus the TTL, and that time
// lies between the write's sending and its answer.
type regState struct {
	Present      bool
	Value        int64
	ExpLo, ExpHi int64
}

// live says whether the attribute can be live, and can be dead, at some moment of
// [call, ret].
func (s regState) live(call, ret int64) (canLive, canDead bool) {
	if !s.Present {
		return false, true
	}
	if s.ExpHi == 0 {
		return true, false
	}
	return s.ExpHi > call, s.ExpLo <= ret
}

// written is the state a write of in leaves on top of s, live (an update) or not (a
// create: no TTL means never).
func written(s regState, in attrOp, onLive bool) regState {
	n := regState{Present: true, Value: in.Value}
	switch {
	case in.TTL > 0:
		n.ExpLo, n.ExpHi = in.Call+in.TTL*int64(time.Second), in.Ret+in.TTL*int64(time.Second)
	case onLive:
		n.ExpLo, n.ExpHi = s.ExpLo, s.ExpHi // an update without expiration keeps it
	}
	return n
}

// attrModel is the register, nondeterministic where expiry or an unknown outcome
// leaves more than one state possible.
var attrModel = porcupine.NondeterministicModel{
	Partition: func(h []porcupine.Operation) [][]porcupine.Operation {
		byKey := map[string][]porcupine.Operation{}
		for _, op := range h {
			k := op.Input.(attrOp).Key
			byKey[k] = append(byKey[k], op)
		}
		out := make([][]porcupine.Operation, 0, len(byKey))
		for _, ops := range byKey {
			out = append(out, ops)
		}
		return out
	},
	Init: func() []interface{} { return []interface{}{regState{}} },
	Step: func(state, input, output interface{}) []interface{} {
		s, in, out := state.(regState), input.(attrOp), output.(attrOut)
		canLive, canDead := s.live(in.Call, in.Ret)
		var next []interface{}
		add := func(n regState) { next = append(next, n) }
		switch in.Kind {
		case "get":
			switch {
			case out.Found && canLive && s.Value == out.Value:
				add(s)
			case !out.Found && canDead:
				add(s)
			}
		case "delete":
			if out.OK || out.Unknown {
				add(regState{})
			} else {
				add(s)
			}
		case "set":
			if out.OK || out.Unknown {
				if canLive {
					add(written(s, in, true))
				}
				if canDead {
					add(written(s, in, false))
				}
			} else {
				add(s)
			}
		case "create":
			if (out.OK || out.Unknown) && canDead {
				add(written(s, in, false))
			}
			if (out.Code == "E009001" || out.Unknown) && canLive {
				add(s)
			}
			if !out.OK && !out.Unknown && out.Code != "E009001" {
				add(s)
			}
		case "update":
			if (out.OK || out.Unknown) && canLive {
				add(written(s, in, true))
			}
			if (out.Code == "E009002" || out.Unknown) && canDead {
				add(s)
			}
			if !out.OK && !out.Unknown && out.Code != "E009002" {
				add(s)
			}
		}
		return next
	},
	DescribeOperation: func(input, output interface{}) string {
		in, out := input.(attrOp), output.(attrOut)
		res := "ok"
		switch {
		case out.Unknown:
			res = "unknown"
		case in.Kind == "get" && out.Found:
			res = fmt.Sprint(out.Value)
		case in.Kind == "get":
			res = "absent"
		case !out.OK:
			res = out.Code
		}
		if in.Kind == "get" || in.Kind == "delete" {
			return fmt.Sprintf("%s(%s) -> %s", in.Kind, in.Key, res)
		}
		return fmt.Sprintf("%s(%s, %d, ttl %d) -> %s", in.Kind, in.Key, in.Value, in.TTL, res)
	},
}

// opLog records the operations of a run, from many goroutines.
type opLog struct {
	mu  sync.Mutex
	ops []porcupine.Operation
}

// add records one operation; an unknown outcome is open to the end of the run.
func (l *opLog) add(client int, in attrOp, out attrOut) {
	ret := in.Ret
	if out.Unknown {
		ret = math.MaxInt64
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.ops = append(l.ops, porcupine.Operation{ClientId: client, Input: in, Call: in.Call, Output: out, Return: ret})
}

// check fails the test unless the run is linearizable, printing the smallest failing
// prefix (by the time operations were sent) of the first key that fails, and writing
// porcupine's visualization of it to a file; it reports whether the run was
// linearizable.
func (l *opLog) check(t *testing.T) bool {
	t.Helper()
	l.mu.Lock()
	ops := slices.Clone(l.ops)
	l.mu.Unlock()
	model := attrModel.ToModel()
	began := time.Now()
	res := porcupine.CheckOperationsTimeout(model, ops, 2*time.Minute)
	switch res {
	case porcupine.Ok:
		t.Logf("linearizable: %d operations on %d keys (checked in %s)", len(ops), len(attrModel.Partition(ops)), time.Since(began).Round(time.Millisecond))
		return true
	case porcupine.Unknown:
		t.Fatalf("the linearizability check of %d operations did not finish in time", len(ops))
	}
	for _, keyOps := range attrModel.Partition(ops) {
		if porcupine.CheckOperations(model, keyOps) {
			continue
		}
		slices.SortFunc(keyOps, func(a, b porcupine.Operation) int { return int(a.Call - b.Call) })
		lo, hi := 1, len(keyOps) // the smallest prefix that is not linearizable
		for lo < hi {
			mid := (lo + hi) / 2
			if porcupine.CheckOperations(model, keyOps[:mid]) {
				lo = mid + 1
			} else {
				hi = mid
			}
		}
		failing := keyOps[:lo]
		var b strings.Builder
		t0 := failing[0].Call
		for _, op := range failing {
			in := op.Input.(attrOp)
			ret := "never"
			if op.Return != math.MaxInt64 {
				ret = time.Duration(op.Return - t0).String()
			}
			fmt.Fprintf(&b, "\n  client %2d  sent %10s  answered %10s  %s", op.ClientId, time.Duration(op.Call-t0), ret, model.DescribeOperation(in, op.Output))
		}
		_, info := porcupine.CheckOperationsVerbose(model, failing, time.Minute)
		if f, err := os.CreateTemp("", "attrd-linearizability-*.html"); err == nil {
			porcupine.Visualize(model, info, f)
			f.Close()
			b.WriteString("\n  visualization: " + f.Name())
		}
		t.Errorf("not linearizable: the smallest failing history of %s (%d of its %d operations):%s",
			failing[0].Input.(attrOp).Key, len(failing), len(keyOps), b.String())
		return false
	}
	t.Error("not linearizable, but no key alone fails")
	return false
}

// TestTheCheckerAcceptsLinearizableHistoriesAndCatchesAStaleRead: the model itself,
// on hand-written histories: overlapping writes and reads that see either order,
// expiry, unknown outcomes, refused creates and updates are accepted; a read of a value
// overwritten before the read was sent, an update of a missing attribute answered ok,
// or a create of a live one answered ok, are not.
func TestTheCheckerAcceptsLinearizableHistoriesAndCatchesAStaleRead(t *testing.T) {
	const s = int64(time.Second)
	op := func(kind string, v, ttl, call, ret int64, out attrOut) porcupine.Operation {
		in := attrOp{Kind: kind, Key: "k", Value: v, TTL: ttl, Call: call, Ret: ret}
		if out.Unknown {
			ret = math.MaxInt64
		}
		return porcupine.Operation{Input: in, Call: call, Output: out, Return: ret}
	}
	ok, got := attrOut{OK: true}, func(v int64) attrOut { return attrOut{OK: true, Found: true, Value: v} }
	absent := attrOut{OK: true}
	model := attrModel.ToModel()
	good := map[string][]porcupine.Operation{
		"writes then reads":                      {op("create", 1, 0, 0, 10, ok), op("get", 0, 0, 20, 30, got(1)), op("set", 2, 0, 40, 50, ok), op("get", 0, 0, 60, 70, got(2))},
		"a read overlapping a write sees either": {op("set", 1, 0, 0, 10, ok), op("set", 2, 0, 20, 60, ok), op("get", 0, 0, 30, 40, got(1)), op("get", 0, 0, 35, 45, got(2))},
		"expiry":                                 {op("set", 1, 1, 0, 10, ok), op("get", 0, 0, 20, 30, got(1)), op("get", 0, 0, 2*s, 2*s+10, absent), op("create", 3, 0, 3*s, 3*s+10, ok)},
		"an unknown write that never happened":   {op("set", 1, 0, 0, 10, ok), op("set", 2, 0, 20, 30, attrOut{Unknown: true}), op("get", 0, 0, 40, 50, got(1))},
		"an unknown write that happened":         {op("set", 1, 0, 0, 10, ok), op("set", 2, 0, 20, 30, attrOut{Unknown: true}), op("get", 0, 0, 40, 50, got(2))},
		"refusals":                               {op("update", 1, 0, 0, 10, attrOut{Code: "E009002"}), op("create", 1, 0, 20, 30, ok), op("create", 2, 0, 40, 50, attrOut{Code: "E009001"}), op("delete", 0, 0, 60, 70, ok), op("get", 0, 0, 80, 90, absent)},
	}
	for name, h := range good {
		if !porcupine.CheckOperations(model, h) {
			t.Errorf("%s: judged not linearizable", name)
		}
	}
	bad := map[string][]porcupine.Operation{
		"a stale read":               {op("set", 1, 0, 0, 10, ok), op("set", 2, 0, 20, 30, ok), op("get", 0, 0, 40, 50, got(1))},
		"an update of a missing one": {op("update", 1, 0, 0, 10, ok)},
		"a create of a live one":     {op("create", 1, 0, 0, 10, ok), op("create", 2, 0, 20, 30, ok)},
		"a value back from expiry":   {op("set", 1, 1, 0, 10, ok), op("get", 0, 0, 3*s, 3*s+10, got(1))},
	}
	for name, h := range bad {
		if porcupine.CheckOperations(model, h) {
			t.Errorf("%s: judged linearizable", name)
		}
	}
}
