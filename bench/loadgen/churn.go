package main

import (
	"context"
	"flag"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"tailscale.com/derp"
)

// runChurn: W workers each loop connect -> send one packet to a fixed receiver ->
// disconnect, for --duration.  Reports logins/s, errors and how many of the
// packets the receiver got.
func runChurn(ctx context.Context, args []string) (result, error) {
	var c common
	fs := flag.NewFlagSet("churn", flag.ContinueOnError)
	c.register(fs)
	workers := fs.Int("workers", 16, "concurrent connect/send/disconnect loops")
	duration := fs.Duration("duration", 5*time.Second, "how long to churn")
	if err := parse(fs, args); err != nil {
		return nil, err
	}
	if err := c.check(); err != nil {
		return nil, usageError{err}
	}
	if *workers < 1 || *workers > 1000 || *duration <= 0 {
		return nil, usageError{fmt.Errorf("need 1 <= --workers <= 1000 and --duration > 0")}
	}
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	res := result{"workers": *workers, "duration_s": duration.Seconds()}
	rx, err := c.dial(ctx)
	if err != nil {
		return res, fmt.Errorf("receiver: %w", err)
	}
	defer rx.Close()
	var got atomic.Int64
	go func() {
		for {
			m, err := rx.Recv()
			if err != nil {
				return // closed at the end of the run
			}
			if _, ok := m.(derp.ReceivedPacket); ok {
				got.Add(1)
			}
		}
	}()
	dst := rx.SelfPublicKey()
	pkt := make([]byte, 100)
	var logins, errs atomic.Int64
	var firstErr atomic.Value
	stop := time.Now().Add(*duration)
	t0 := time.Now()
	var wg sync.WaitGroup
	for range *workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(stop) && ctx.Err() == nil {
				dc, err := c.dial(ctx)
				if err == nil {
					logins.Add(1)
					err = dc.Send(dst, pkt)
					dc.Close()
				}
				if err != nil {
					errs.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(t0).Seconds()
	// Give the last packets a moment to arrive (bounded).
	for deadline := time.Now().Add(time.Second); got.Load() < logins.Load() && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
	}
	res["elapsed_s"] = elapsed
	res["logins"] = logins.Load()
	res["logins_per_s"] = float64(logins.Load()) / elapsed
	res["errors"] = errs.Load()
	res["delivered"] = got.Load()
	if e := firstErr.Load(); e != nil {
		res["first_error"] = e
	}
	return res, nil
}
