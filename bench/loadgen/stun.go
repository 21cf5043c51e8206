package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"tailscale.com/net/stun"
)

// runSTUN: W workers, each with its own UDP socket, send Binding requests built
// by Tailscale's net/stun and wait for each answer (closed loop, one in flight
// per worker) for --duration, optionally at an offered rate.
func runSTUN(ctx context.Context, args []string) (result, error) {
	fs := flag.NewFlagSet("stun", flag.ContinueOnError)
	addr := fs.String("addr", "127.0.0.1:3478", "STUN server address (loopback only)")
	workers := fs.Int("workers", 1, "concurrent request loops (one UDP socket each)")
	duration := fs.Duration("duration", 5*time.Second, "how long to send")
	rate := fs.Float64("rate", 0, "offered requests/s over all workers; 0 = closed loop as fast as answers come")
	wait := fs.Duration("wait", 500*time.Millisecond, "how long to wait for an answer before counting it lost")
	timeout := fs.Duration("timeout", 60*time.Second, "hard bound on the scenario")
	if err := parse(fs, args); err != nil {
		return nil, err
	}
	host, _, err := net.SplitHostPort(*addr)
	if err != nil {
		return nil, usageError{fmt.Errorf("--addr: %w", err)}
	}
	if err := requireLoopback(host); err != nil {
		return nil, usageError{err}
	}
	if *workers < 1 || *workers > 256 || *duration <= 0 || *rate < 0 {
		return nil, usageError{errors.New("need 1 <= --workers <= 256, --duration > 0, --rate >= 0")}
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	raddr, err := net.ResolveUDPAddr("udp", *addr)
	if err != nil {
		return nil, err
	}
	res := result{"workers": *workers, "duration_s": duration.Seconds(), "offered_rate": *rate}
	var answered, lost, bad atomic.Int64
	samples := make([][]float64, *workers)
	var interval time.Duration
	if *rate > 0 {
		interval = time.Duration(float64(time.Second) * float64(*workers) / *rate)
	}
	stop := time.Now().Add(*duration)
	t0 := time.Now()
	var wg sync.WaitGroup
	var firstErr atomic.Value
	for w := range *workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			conn, err := net.DialUDP("udp", nil, raddr)
			if err != nil {
				firstErr.CompareAndSwap(nil, err.Error())
				return
			}
			defer conn.Close()
			buf := make([]byte, 1500)
			next := time.Now()
			for time.Now().Before(stop) && ctx.Err() == nil {
				if interval > 0 {
					if d := time.Until(next); d > 0 {
						time.Sleep(d)
					}
					next = next.Add(interval)
				}
				tx := stun.NewTxID()
				sent := time.Now()
				if _, err := conn.Write(stun.Request(tx)); err != nil {
					lost.Add(1)
					continue
				}
				conn.SetReadDeadline(sent.Add(*wait))
				for {
					n, err := conn.Read(buf)
					if err != nil {
						lost.Add(1)
						break
					}
					got, _, err := stun.ParseResponse(buf[:n])
					if err != nil || got != tx {
						bad.Add(1)
						continue // a late answer to an earlier request
					}
					answered.Add(1)
					if len(samples[w]) < maxSamples {
						samples[w] = append(samples[w], float64(time.Since(sent))/1e6)
					}
					break
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(t0).Seconds()
	var all []float64
	for _, s := range samples {
		all = append(all, s...)
	}
	res["elapsed_s"] = elapsed
	res["answered"] = answered.Load()
	res["answered_per_s"] = float64(answered.Load()) / elapsed
	res["lost"] = lost.Load()
	res["unmatched"] = bad.Load()
	latencySummary(res, all)
	if e := firstErr.Load(); e != nil {
		return res, fmt.Errorf("%v", e)
	}
	return res, nil
}
