package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"text/tabwriter"
	"unicode/utf8"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/api"
	"github.com/attrd/attrd/events"
)

// historyCmd is `attrd history`: a user's (or a session's, or an attribute's) events
// with their decisions, or (--at) the attributes as they were at a time. It reads the
// log through NATS as attrd itself: an operator's tool.
func historyCmd(ctx context.Context, args []string, stdout, stderr *os.File) error {
	fs := flag.NewFlagSet("history", flag.ContinueOnError)
	user := fs.String("user", "", "user id or username (required)")
	attr := fs.String("attr", "", "only this attribute (of --session's session when given)")
	session := fs.String("session", "", "only this session (its id, as history shows it)")
	since := fs.String("since", "", "only events at or after this RFC 3339 time")
	until := fs.String("until", "", "only events at or before this RFC 3339 time")
	types := fs.String("types", "", "only these event types, comma-separated")
	at := fs.String("at", "", "show the attributes as they were at this RFC 3339 time instead")
	asJSON := fs.Bool("json", false, "one JSON object a line instead of a table")
	decrypt := fs.Bool("decrypt", false, "show encrypted values (needs the key file)")
	tool := addToolFlags(fs, true)
	if err := fs.Parse(args); err != nil {
		return err
	}
	nc, uid, log, keys, err := tool.openUserLog(ctx, "attrd-history", *user, stderr)
	if err != nil {
		return err
	}
	defer nc.Close()
	if *at != "" {
		t, err := api.ParseTime("--at", *at)
		if err != nil {
			return err
		}
		view, err := log.FoldUser(ctx, uid, t, true, nil)
		if err != nil {
			return err
		}
		attrs, err := api.AttrsAt(view, uid, *session, t, keys, *decrypt)
		if err != nil {
			return err
		}
		return printAttrs(stdout, attrs, *asJSON)
	}
	f := api.HistoryFilter{SessionID: *session, Name: *attr}
	if *types != "" {
		f.Types = strings.Split(*types, ",")
	}
	if err := api.CheckEventTypes(f.Types); err != nil {
		return fmt.Errorf("--types: %w", err)
	}
	for _, p := range []struct {
		name, s string
		dst     *int64
		has     *bool
	}{{"--since", *since, &f.Since, &f.HasSince}, {"--until", *until, &f.Until, &f.HasUntil}} {
		if p.s != "" {
			t, err := api.ParseTime(p.name, p.s)
			if err != nil {
				return err
			}
			*p.dst, *p.has = t, true
		}
	}
	var rows []map[string]any
	_, err = log.FoldUser(ctx, uid, 0, false, func(e events.Entry, after events.View) bool {
		if f.Match(e) {
			rows = append(rows, api.HistoryEvent(e, after, keys, *decrypt))
		}
		return true
	})
	if err != nil {
		return err
	}
	return printEvents(stdout, rows, *asJSON)
}

// resolveUser takes a user id or a username.
func resolveUser(ctx context.Context, js jetstream.JetStream, user string) (string, error) {
	// From the bucket's leader: a replica behind would not know a new username.
	m, err := events.LeaderLast(ctx, js.Conn(), events.KVStream(events.DefaultBucket), events.KVSubject(events.DefaultBucket, events.UsernameKey(user)))
	if err == nil && !events.IsMarker(m.Header) {
		var r events.UsernameRecord
		if err := events.Unmarshal(m.Data, &r); err == nil {
			return r.UserID, nil
		}
	}
	return user, nil
}

func printEvents(w io.Writer, rows []map[string]any, asJSON bool) error {
	if asJSON {
		enc := json.NewEncoder(w)
		for _, r := range rows {
			if err := enc.Encode(r); err != nil {
				return err
			}
		}
		return nil
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "SEQ\tTIME\tTYPE\tACTOR\tAPP\tADDRESS\tDECISION\tCHANGE")
	for _, r := range rows {
		decision := r["decision"].(string)
		if c, ok := r["code"]; ok {
			decision += " " + c.(string)
		}
		// Every field is escaped: actors, apps, addresses and values come from clients,
		// and a tab, newline or ANSI escape must not forge a row or colour the terminal.
		fmt.Fprintf(tw, "%v\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r["seq"], esc(str(r["time"])), esc(str(r["type"])), esc(str(r["actor"])),
			esc(str(r["app"])), esc(str(r["remote_addr"])), esc(decision), esc(change(r)))
	}
	return tw.Flush()
}

func str(v any) string {
	if s, ok := v.(string); ok {
		return s
	}
	return "-"
}

// change summarises what an event changes, for the table.
func change(r map[string]any) string {
	var parts []string
	if chs, ok := r["changes"].([]map[string]any); ok {
		for _, c := range chs {
			p := c["name"].(string)
			switch {
			case c["value_encrypted"] == true:
				p += "=<encrypted>"
			case c["value_unavailable"] == true:
				p += "=<sealed>"
			case c["value"] != nil:
				b, _ := json.Marshal(c["value"])
				p += "=" + string(b)
			}
			if e, ok := c["expiration_time"]; ok {
				p += " until " + e.(string)
			}
			parts = append(parts, p)
		}
	}
	if u, ok := r["username"]; ok {
		parts = append(parts, "username "+u.(string))
	}
	if e, ok := r["expiration_time"]; ok {
		parts = append(parts, "until "+e.(string))
	}
	return strings.Join(parts, ", ")
}

func printAttrs(w io.Writer, attrs map[string]any, asJSON bool) error {
	if asJSON {
		return json.NewEncoder(w).Encode(attrs)
	}
	names := make([]string, 0, len(attrs))
	for n := range attrs {
		names = append(names, n)
	}
	sort.Strings(names)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tVALUE\tENCRYPTED\tCREATED\tMODIFIED\tEXPIRES")
	for _, n := range names {
		a := attrs[n].(map[string]any)
		b, _ := json.Marshal(a["value"])
		if a["value_unavailable"] == true {
			b = []byte("<sealed>")
		}
		fmt.Fprintf(tw, "%s\t%s\t%v\t%s\t%s\t%s\n", esc(n), esc(string(b)), a["is_encrypted"], a["creation_time"], a["last_modified"], a["expiration_time"])
	}
	return tw.Flush()
}

// esc makes a field safe for a terminal table: control characters (C0, DEL, C1, so tab,
// newline and ANSI escapes too) and invalid UTF-8 become \xNN escapes.
func esc(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); {
		r, n := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && n == 1, r < 0x20, r >= 0x7f && r < 0xa0:
			for _, c := range []byte(s[i : i+n]) {
				fmt.Fprintf(&b, "\\x%02x", c)
			}
		default:
			b.WriteString(s[i : i+n])
		}
		i += n
	}
	return b.String()
}
