package main

import (
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
)

// Packet layout: "LG" | seq uint64 | sent_ns int64 (since the run's start) | filler.
const (
	headerLen  = 18
	maxPacket  = 64 << 10
	maxSamples = 1 << 20 // latency samples kept per receiver
)

var magic = [2]byte{'L', 'G'}

type pair struct {
	sender, receiver *derphttp.Client
	sent             atomic.Int64 // packets the sender handed to Send
	sendErrors       atomic.Int64
	received         atomic.Int64 // packets of this run the receiver read
	samples          []float64
}

// phase: 0 warm-up, 1 measuring, 2 draining.
var phase atomic.Int32

func runThroughput(ctx context.Context, args []string) (result, error) {
	var c common
	fs := flag.NewFlagSet("throughput", flag.ContinueOnError)
	c.register(fs)
	pairs := fs.Int("pairs", 1, "sender->receiver pairs")
	size := fs.Int("size", 1200, "packet size in bytes (18..65536)")
	duration := fs.Duration("duration", 5*time.Second, "measurement window")
	warmup := fs.Duration("warmup", time.Second, "traffic before the window (not counted)")
	drain := fs.Duration("drain", 2*time.Second, "longest wait for packets still in flight after the senders stop")
	rate := fs.Float64("rate", 0, "offered packets/s over all pairs; 0 = unpaced (as fast as the relay takes them)")
	if err := parse(fs, args); err != nil {
		return nil, err
	}
	if err := c.check(); err != nil {
		return nil, usageError{err}
	}
	if *pairs < 1 || *pairs > 5000 || *size < headerLen || *size > maxPacket || *duration <= 0 || *rate < 0 {
		return nil, usageError{fmt.Errorf("need 1 <= --pairs <= 5000, %d <= --size <= %d, --duration > 0, --rate >= 0", headerLen, maxPacket)}
	}
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	res := result{"pairs": *pairs, "size": *size, "duration_s": duration.Seconds(), "offered_rate": *rate}

	ps := make([]*pair, *pairs)
	clients, err := dialMany(ctx, &c, 2**pairs, 32)
	defer func() {
		for _, dc := range clients {
			if dc != nil {
				dc.Close()
			}
		}
	}()
	if err != nil {
		return res, err
	}
	for i := range ps {
		ps[i] = &pair{sender: clients[2*i], receiver: clients[2*i+1]}
	}
	start := time.Now()
	var recvWG, sendWG sync.WaitGroup
	for _, p := range ps {
		recvWG.Add(1)
		go func() { defer recvWG.Done(); p.receive(start) }()
	}
	stopSend := make(chan struct{})
	perPair := *rate / float64(*pairs)
	for i, p := range ps {
		sendWG.Add(1)
		go func() { defer sendWG.Done(); p.send(start, *size, perPair, i, stopSend) }()
	}
	wait := func(d time.Duration) error {
		select {
		case <-time.After(d):
			return nil
		case <-ctx.Done():
			return errors.New("--timeout reached")
		}
	}
	if err := wait(*warmup); err != nil {
		close(stopSend)
		return res, err
	}
	sent0, recv0 := totals(ps)
	phase.Store(1)
	t0 := time.Now()
	err = wait(*duration)
	phase.Store(2)
	elapsed := time.Since(t0).Seconds()
	sent1, recv1 := totals(ps)
	close(stopSend)
	sendWG.Wait()
	sentAll, _ := totals(ps)
	// Drain: until every packet arrived, nothing arrived for 300 ms, or --drain passed.
	deadline := time.Now().Add(*drain)
	last, lastChange := int64(-1), time.Now()
	for time.Now().Before(deadline) {
		_, r := totals(ps)
		if r >= sentAll {
			break
		}
		if r != last {
			last, lastChange = r, time.Now()
		} else if time.Since(lastChange) > 300*time.Millisecond {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	_, recvAll := totals(ps)
	for _, dc := range clients {
		dc.Close()
	}
	recvWG.Wait()

	var sendErrs int64
	var samples []float64
	for _, p := range ps {
		sendErrs += p.sendErrors.Load()
		samples = append(samples, p.samples...)
	}
	res["elapsed_s"] = elapsed
	res["sent"] = sentAll
	res["received"] = recvAll
	res["window_sent"] = sent1 - sent0
	res["window_received"] = recv1 - recv0
	res["send_errors"] = sendErrs
	res["sent_pps"] = float64(sent1-sent0) / elapsed
	res["delivered_pps"] = float64(recv1-recv0) / elapsed
	res["delivered_mbps"] = float64(recv1-recv0) * float64(*size) / elapsed / 1e6
	loss := 0.0
	if sentAll > 0 {
		loss = 1 - float64(recvAll)/float64(sentAll)
	}
	res["loss"] = loss
	latencySummary(res, samples)
	return res, err
}

func totals(ps []*pair) (sent, received int64) {
	for _, p := range ps {
		sent += p.sent.Load()
		received += p.received.Load()
	}
	return
}

func (p *pair) send(start time.Time, size int, rate float64, idx int, stop <-chan struct{}) {
	pkt := make([]byte, size)
	copy(pkt, magic[:])
	for i := headerLen; i < size; i++ {
		pkt[i] = byte(i + idx)
	}
	dst := p.receiver.SelfPublicKey()
	var interval time.Duration
	if rate > 0 {
		interval = time.Duration(float64(time.Second) / rate)
	}
	next := time.Now()
	for seq := uint64(0); ; seq++ {
		select {
		case <-stop:
			return
		default:
		}
		if interval > 0 {
			// Send in bursts to catch up with the schedule; sleep when ahead of it.
			if d := time.Until(next); d > 0 {
				time.Sleep(d)
			}
			next = next.Add(interval)
		}
		binary.BigEndian.PutUint64(pkt[2:], seq)
		binary.BigEndian.PutUint64(pkt[10:], uint64(time.Since(start)))
		if err := p.sender.Send(dst, pkt); err != nil {
			p.sendErrors.Add(1)
			select {
			case <-stop:
				return
			case <-time.After(10 * time.Millisecond):
			}
			continue
		}
		p.sent.Add(1)
	}
}

func (p *pair) receive(start time.Time) {
	src := p.sender.SelfPublicKey()
	for {
		m, err := p.receiver.Recv()
		if err != nil {
			if errors.Is(err, derphttp.ErrClientClosed) {
				return
			}
			if phase.Load() == 2 {
				return
			}
			time.Sleep(10 * time.Millisecond) // derphttp reconnects on the next Recv
			continue
		}
		rp, ok := m.(derp.ReceivedPacket)
		if !ok || rp.Source != src || len(rp.Data) < headerLen || rp.Data[0] != magic[0] || rp.Data[1] != magic[1] {
			continue
		}
		p.received.Add(1)
		if phase.Load() == 1 {
			if len(p.samples) < maxSamples {
				sentAt := time.Duration(binary.BigEndian.Uint64(rp.Data[10:]))
				p.samples = append(p.samples, float64(time.Since(start)-sentAt)/1e6)
			}
		}
	}
}

// dialMany connects n clients, at most par at a time.
func dialMany(ctx context.Context, c *common, n, par int) ([]*derphttp.Client, error) {
	out := make([]*derphttp.Client, n)
	errs := make([]error, n)
	sem := make(chan struct{}, par)
	var wg sync.WaitGroup
	for i := range out {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			out[i], errs[i] = c.dial(ctx)
		}()
	}
	wg.Wait()
	return out, errors.Join(errs...)
}
