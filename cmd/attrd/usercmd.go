package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"

	"github.com/attrd/attrd/api"
	"github.com/attrd/attrd/events"
)

// userCmd is `attrd user create`: it appends user.created as attrd itself, through the
// running server's NATS, and waits for the projector's decision; and `attrd user
// export`.
func userCmd(ctx context.Context, args []string, stdin io.Reader, stdout, stderr *os.File) error {
	if len(args) > 0 && args[0] == "export" {
		return userExportCmd(ctx, args[1:], stdout, stderr)
	}
	if len(args) == 0 || args[0] != "create" {
		return errors.New("usage: attrd user create --username U [--super-user] [--nats-url URL]\n       attrd user export --user ID|USERNAME [--encryption-key-file F] [--nats-url URL]")
	}
	fs := flag.NewFlagSet("user create", flag.ContinueOnError)
	username := fs.String("username", "", "the new user's username")
	super := fs.Bool("super-user", false, "make the user a super-user")
	tool := addToolFlags(fs, false)
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	if *username == "" {
		return errors.New("--username is required")
	}
	line, err := bufio.NewReader(stdin).ReadString('\n')
	if err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("read password: %w", err)
	}
	password := strings.TrimRight(line, "\r\n")
	if password == "" {
		return errors.New("no password on stdin")
	}
	nc, _, err := tool.connect("attrd-cli")
	if err != nil {
		return err
	}
	defer nc.Close()
	svc, err := api.New(ctx, nc, api.Config{Logger: slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))})
	if err != nil {
		return err
	}
	defer svc.Close()
	uid, err := svc.CreateUser(ctx, *username, password, *super)
	if err != nil {
		if errors.Is(err, events.ErrUsernameExists) {
			return fmt.Errorf("username %q is taken", *username)
		}
		return err
	}
	fmt.Fprintln(stdout, uid)
	return nil
}

// userExportCmd is `attrd user export`: everything attrd holds of a user as one JSON
// document (their record, live sessions, attributes and whole history), read from the
// log as an operator, for a request under the right of access. Values open with the
// key file.
func userExportCmd(ctx context.Context, args []string, stdout, stderr *os.File) error {
	fs := flag.NewFlagSet("user export", flag.ContinueOnError)
	user := fs.String("user", "", "the user: id or username")
	tool := addToolFlags(fs, true)
	if err := fs.Parse(args); err != nil {
		return err
	}
	nc, uid, log, keys, err := tool.openUserLog(ctx, "attrd-export", *user, stderr)
	if err != nil {
		return err
	}
	defer nc.Close()
	doc, err := api.Export(func(fn func(events.Entry, events.View) bool) (events.View, error) {
		return log.FoldUser(ctx, uid, 0, false, fn)
	}, uid, keys, keys != nil, 0)
	if err != nil {
		return err
	}
	enc := json.NewEncoder(stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(doc)
}
