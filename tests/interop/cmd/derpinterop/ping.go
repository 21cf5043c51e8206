package main

import (
	"context"
	"errors"
	"fmt"
	"time"
)

func runPing(ctx context.Context, args []string) (result, error) {
	var c commonFlags
	fs := newFlagSet("ping", &c)
	count := fs.Int("count", 5, "number of pings")
	if err := parseFlags(fs, args, &c, true); err != nil {
		return nil, err
	}
	if *count < 1 {
		return nil, usageError{errors.New("--count must be at least 1")}
	}
	tc, err := c.tlsConfig()
	if err != nil {
		return nil, usageError{err}
	}
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	res := result{"url": c.url, "count": *count}

	dc, err := dialURL(ctx, &c, tc)
	if err != nil {
		return res, fmt.Errorf("connect: %w", err)
	}
	defer dc.Close()
	defer closeOnDone(ctx, dc)()
	if err := expectServerInfo(dc); err != nil {
		return res, err
	}
	// Client.Ping needs a concurrent Recv loop: that is where Pongs are matched.
	recvErr := make(chan error, 1)
	go func() {
		for {
			if _, err := dc.Recv(); err != nil {
				recvErr <- err
				return
			}
		}
	}()
	rtts := make([]float64, 0, *count)
	for i := range *count {
		t0 := time.Now()
		if err := dc.Ping(ctx); err != nil {
			select {
			case rerr := <-recvErr:
				err = fmt.Errorf("%w (receive loop: %v)", err, rerr)
			default:
			}
			res["rtt_ms"] = rtts
			return res, fmt.Errorf("ping %d: %w", i, err)
		}
		rtts = append(rtts, ms(time.Since(t0)))
	}
	res["rtt_ms"] = rtts
	return res, nil
}
