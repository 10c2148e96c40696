package main

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"time"
)

// probeCmd is `attrd probe URL`: exit 0 when the URL answers 200 within 3s. Container
// images without a shell or curl use it for health checks (GET /readyz).
func probeCmd(ctx context.Context, args []string, stdout *os.File) error {
	if len(args) != 1 {
		return errors.New("usage: attrd probe URL")
	}
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, args[0], nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", args[0], resp.Status)
	}
	fmt.Fprintln(stdout, "ok")
	return nil
}
