package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"tailscale.com/derp/derphttp"
)

// runIdle logs K clients in, prints `READY {...}` once they are connected, and
// keeps them connected (each reads its keepalives) until stdin closes or --hold
// passes; the orchestrator measures the server's memory in between.
func runIdle(ctx context.Context, args []string) (result, error) {
	var c common
	fs := flag.NewFlagSet("idle", flag.ContinueOnError)
	c.register(fs)
	k := fs.Int("clients", 1000, "clients to log in")
	par := fs.Int("parallel", 64, "logins in flight at once")
	hold := fs.Duration("hold", 30*time.Second, "longest time to stay connected after READY (stdin EOF ends it sooner)")
	if err := parse(fs, args); err != nil {
		return nil, err
	}
	if err := c.check(); err != nil {
		return nil, usageError{err}
	}
	if *k < 1 || *k > 50000 || *par < 1 {
		return nil, usageError{fmt.Errorf("need 1 <= --clients <= 50000 and --parallel >= 1")}
	}
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	res := result{"clients": *k}
	t0 := time.Now()
	clients := make([]*derphttp.Client, *k)
	var failed atomic.Int64
	var firstErr atomic.Value
	sem := make(chan struct{}, *par)
	var wg sync.WaitGroup
	for i := range clients {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			dc, err := c.dial(ctx)
			if err != nil {
				failed.Add(1)
				firstErr.CompareAndSwap(nil, err.Error())
				return
			}
			clients[i] = dc
		}()
	}
	wg.Wait()
	elapsed := time.Since(t0).Seconds()
	defer func() {
		for _, dc := range clients {
			if dc != nil {
				dc.Close()
			}
		}
	}()
	connected := int64(*k) - failed.Load()
	res["connected"] = connected
	res["failed"] = failed.Load()
	res["connect_s"] = elapsed
	res["logins_per_s"] = float64(connected) / elapsed
	if e := firstErr.Load(); e != nil {
		res["first_error"] = e
	}
	// Every client reads (KeepAlives, ServerInfo); a read error means it was dropped.
	var dropped atomic.Int64
	done := make(chan struct{})
	for _, dc := range clients {
		if dc == nil {
			continue
		}
		go func() {
			for {
				if _, err := dc.Recv(); err != nil {
					select {
					case <-done:
					default:
						dropped.Add(1)
					}
					return
				}
			}
		}()
	}
	ready, _ := json.Marshal(res)
	fmt.Printf("READY %s\n", ready)
	os.Stdout.Sync()
	eof := make(chan struct{})
	go func() { io.Copy(io.Discard, os.Stdin); close(eof) }()
	select {
	case <-eof:
	case <-time.After(*hold):
	case <-ctx.Done():
	}
	close(done)
	res["held_s"] = time.Since(t0).Seconds() - elapsed
	res["dropped_while_idle"] = dropped.Load()
	return res, nil
}
