package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/disco"
	"tailscale.com/types/key"
)

// reachRetry is how long one reachability attempt waits for the packet before
// sending another one when no PeerGone(NotHere) came back. The relays answer a
// disco packet to an unknown key with NotHere, but at most 3 at once and then
// one a second (derpserver peerGoneLim), so a missing answer is not an error.
const reachRetry = 1500 * time.Millisecond

// meshEnd is one client of a meshpair; a reader goroutine turns its Recv calls
// into a channel so the scenario can wait on several clients at once.
type meshEnd struct {
	name     string // "A" (on --url-a) or "B" (on --url-b)
	pair     int
	dir      int // direction of the packets this end sends: 0 for A, 1 for B
	dc       *derphttp.Client
	key      key.NodePublic
	in       chan derp.ReceivedMessage
	errc     chan error
	peer     *meshEnd
	credits  chan struct{}
	received int
	late     int // disco probes or NotHere answers left over from the reachability phase
}

func (e *meshEnd) String() string { return fmt.Sprintf("pair %d %s", e.pair, e.name) }

func (e *meshEnd) readLoop(ctx context.Context) {
	for {
		m, err := e.dc.Recv()
		if err != nil {
			select {
			case e.errc <- err:
			case <-ctx.Done():
			}
			return
		}
		switch mm := m.(type) {
		case derp.KeepAliveMessage:
			continue
		case derp.ReceivedPacket:
			// Data aliases the client's read buffer, which the next Recv reuses.
			mm.Data = bytes.Clone(mm.Data)
			m = mm
		}
		select {
		case e.in <- m:
		case <-ctx.Done():
			return
		}
	}
}

// next returns e's next message, or an error if its connection or ctx ends.
func (e *meshEnd) next(ctx context.Context) (derp.ReceivedMessage, error) {
	select {
	case m := <-e.in:
		return m, nil
	case err := <-e.errc:
		return nil, fmt.Errorf("%s: receive: %w", e, err)
	case <-ctx.Done():
		return nil, fmt.Errorf("%s: %w", e, ctx.Err())
	}
}

func isNotHere(m derp.ReceivedMessage, peer key.NodePublic) bool {
	pg, ok := m.(derp.PeerGoneMessage)
	return ok && pg.Peer == peer && pg.Reason == derp.PeerGoneReasonNotHere
}

func isProbeFrom(m derp.ReceivedMessage, src key.NodePublic) bool {
	rp, ok := m.(derp.ReceivedPacket)
	return ok && rp.Source == src && disco.LooksLikeDiscoWrapper(rp.Data)
}

// reach sends disco-shaped packets from src to dst until dst gets one. Each
// PeerGone(dst, NotHere) that src gets means "the relay does not know dst
// yet" (the mesh has not told it) and triggers the next attempt at once.
func reach(ctx context.Context, src, dst *meshEnd) (attempts, notHere int, err error) {
	for {
		attempts++
		if err := src.dc.Send(dst.key, discoShaped()); err != nil {
			return attempts, notHere, fmt.Errorf("%s: send probe: %w", src, err)
		}
		timer := time.NewTimer(reachRetry)
	wait:
		for {
			select {
			case m := <-dst.in:
				if isProbeFrom(m, src.key) {
					timer.Stop()
					return attempts, notHere, nil
				}
				if isNotHere(m, src.key) { // a late answer from dst's own reachability phase
					dst.late++
					continue
				}
				timer.Stop()
				return attempts, notHere, fmt.Errorf("%s waiting for %s's probe got %s", dst, src, describe(m))
			case m := <-src.in:
				if isNotHere(m, dst.key) {
					notHere++
					timer.Stop()
					break wait
				}
				if isProbeFrom(m, dst.key) { // dst's own probe, from the other direction's phase
					src.late++
					continue
				}
				timer.Stop()
				return attempts, notHere, fmt.Errorf("%s waiting for PeerGone(NotHere) or nothing got %s", src, describe(m))
			case <-timer.C:
				break wait
			case err := <-src.errc:
				return attempts, notHere, fmt.Errorf("%s: receive: %w", src, err)
			case err := <-dst.errc:
				return attempts, notHere, fmt.Errorf("%s: receive: %w", dst, err)
			case <-ctx.Done():
				return attempts, notHere, fmt.Errorf("%s never reached %s in %d attempts (%d NotHere answers): %w",
					src, dst, attempts, notHere, ctx.Err())
			}
		}
	}
}

// runMeshPair checks that two meshed relays of one region act as one: for
// each pair, client A connects to --url-a and client B to --url-b, and they
// exchange packets both ways, each arriving intact, in order and with the
// sender's key as source (so the relays carried them as ForwardPacket with
// the right src). Then one end of every pair leaves and the other end, on the
// other relay, must get PeerGone(Disconnected) for it through the mesh.
func runMeshPair(ctx context.Context, args []string) (result, error) {
	var c commonFlags
	fs := newFlagSet("meshpair", &c)
	urlA := fs.String("url-a", "", "DERP URL of the first relay")
	urlB := fs.String("url-b", "", "DERP URL of the second relay, meshed with the first")
	pairs := fs.Int("pairs", 2, "client pairs (A on url-a, B on url-b); pair p's A leaves at the end if p is even, its B if odd")
	packets := fs.Int("packets", 100, "packets each way per pair (every 50th is 64 KiB)")
	window := fs.Int("window", 8, "packets in flight per direction")
	if err := parseFlags(fs, args, &c, false); err != nil {
		return nil, err
	}
	var err error
	if *urlA, err = normalizeURL(*urlA); err != nil {
		return nil, usageError{fmt.Errorf("--url-a: %w", err)}
	}
	if *urlB, err = normalizeURL(*urlB); err != nil {
		return nil, usageError{fmt.Errorf("--url-b: %w", err)}
	}
	if *pairs < 1 || *packets < 1 || *window < 1 {
		return nil, usageError{errors.New("--pairs, --packets and --window must be at least 1")}
	}
	if err := configureTransport(false); err != nil {
		return nil, usageError{err}
	}
	tc, err := c.tlsConfig()
	if err != nil {
		return nil, usageError{err}
	}
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	res := result{"url_a": *urlA, "url_b": *urlB, "pairs": *pairs, "packets": *packets}

	// Connect everyone; each client must see ServerInfo first.
	ends := make([]*meshEnd, 0, 2**pairs)
	defer func() {
		for _, e := range ends {
			e.dc.Close()
		}
	}()
	for p := range *pairs {
		var pe [2]*meshEnd
		for dir, u := range []string{*urlA, *urlB} {
			cf := c
			cf.url = u
			dc, err := dialURL(ctx, &cf, tc)
			if err != nil {
				return res, fmt.Errorf("pair %d: connect to %s: %w", p, u, err)
			}
			e := &meshEnd{name: string(rune('A' + dir)), pair: p, dir: dir, dc: dc, key: dc.SelfPublicKey(),
				in: make(chan derp.ReceivedMessage, 16), errc: make(chan error, 1), credits: make(chan struct{}, *window)}
			ends = append(ends, e)
			pe[dir] = e
			if err := expectServerInfo(dc); err != nil {
				return res, fmt.Errorf("%s: %w", e, err)
			}
		}
		pe[0].peer, pe[1].peer = pe[1], pe[0]
	}
	ctx, cancelReaders := context.WithCancel(ctx)
	defer cancelReaders()
	defer closeOnDone(ctx, func() []*derphttp.Client {
		out := make([]*derphttp.Client, len(ends))
		for i, e := range ends {
			out[i] = e.dc
		}
		return out
	}()...)()
	for _, e := range ends {
		go e.readLoop(ctx)
	}

	// 1. Reachability: the relays learn about each other's clients through
	// WatchConns; wait until each direction delivers (NotHere answers retry).
	t0 := time.Now()
	var attempts, notHere int
	for _, e := range ends {
		a, n, err := reach(ctx, e, e.peer)
		attempts += a
		notHere += n
		if err != nil {
			res["reach_attempts"], res["reach_not_here"] = attempts, notHere
			return res, err
		}
	}
	res["reach_attempts"], res["reach_not_here"] = attempts, notHere
	res["reach_ms"] = ms(time.Since(t0))

	// 2. Bulk: every end sends `packets` to its peer, at most `window` in flight.
	ctx2, cancel2 := context.WithCancel(ctx)
	defer cancel2()
	fe := &firstError{cancel: cancel2}
	var wg sync.WaitGroup
	t1 := time.Now()
	for _, e := range ends {
		for range *window {
			e.credits <- struct{}{}
		}
	}
	for _, e := range ends {
		wg.Add(2)
		go func() { // e receives what e.peer sends
			defer wg.Done()
			for e.received < *packets {
				m, err := e.next(ctx2)
				if err != nil {
					fe.set(fmt.Errorf("after %d packets: %w", e.received, err))
					return
				}
				if isProbeFrom(m, e.peer.key) || isNotHere(m, e.peer.key) {
					e.late++
					continue
				}
				rp, ok := m.(derp.ReceivedPacket)
				if !ok {
					fe.set(fmt.Errorf("%s: got %s during the bulk phase", e, describe(m)))
					return
				}
				if rp.Source != e.peer.key {
					fe.set(fmt.Errorf("%s: packet %d has source %s, want %s (%s)", e, e.received,
						rp.Source.ShortString(), e.peer.key.ShortString(), e.peer))
					return
				}
				if err := checkPacket(rp.Data, e.pair, e.peer.dir, e.received); err != nil {
					fe.set(fmt.Errorf("%s: %w", e, err))
					return
				}
				e.received++
				select {
				case e.peer.credits <- struct{}{}:
				default:
					fe.set(fmt.Errorf("%s: more packets than were sent", e))
					return
				}
			}
		}()
		go func() { // e sends to e.peer
			defer wg.Done()
			for seq := range *packets {
				select {
				case <-e.credits:
				case <-ctx2.Done():
					return
				}
				if err := e.dc.Send(e.peer.key, makePacket(e.pair, e.dir, seq)); err != nil {
					fe.set(fmt.Errorf("%s: send packet %d: %w", e, seq, err))
					return
				}
			}
		}()
	}
	wg.Wait()
	received, late := 0, 0
	for _, e := range ends {
		received += e.received
		late += e.late
	}
	res["received"], res["late_reach_frames"] = received, late
	if fe.err != nil {
		return res, fe.err
	}
	res["bulk_ms"] = ms(time.Since(t1))

	// 3. One end of each pair leaves; the other, on the other relay, must get
	// PeerGone(leaver, Disconnected), which only the mesh can tell its relay.
	gone := map[string]int{}
	for _, e := range ends {
		if e.dir != e.pair%2 {
			continue
		}
		leaver, stayer := e, e.peer
		leaver.dc.Close()
		for {
			m, err := stayer.next(ctx)
			if err != nil {
				return res, fmt.Errorf("waiting for PeerGone(%s) after it left: %w", leaver, err)
			}
			if pg, ok := m.(derp.PeerGoneMessage); ok && pg.Peer == leaver.key && pg.Reason == derp.PeerGoneReasonDisconnected {
				gone[leaver.name+"_left"]++
				break
			}
			if isProbeFrom(m, leaver.key) || isNotHere(m, leaver.key) {
				continue
			}
			return res, fmt.Errorf("%s waiting for PeerGone(%s, Disconnected) got %s", stayer, leaver, describe(m))
		}
	}
	res["peer_gone_disconnected"] = gone
	return res, nil
}
