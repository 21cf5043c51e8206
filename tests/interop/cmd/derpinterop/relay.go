package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/types/key"
)

// Packet layout used by relay and mixed:
//
//	"DI" | pair uint16 | direction uint8 | 0 | seq uint32 | length uint32 | filler
//
// The filler is a pure function of (pair, direction, seq), so the receiver can
// rebuild the exact bytes it should have got.
const packetHeaderLen = 14

// maxPacket is the largest packet a DERP client may send (spec 2.2).
const maxPacket = 64 << 10

// largestPacket is the size of every 50th packet (--max-packet); the rest are
// spread over typical WireGuard sizes.
var largestPacket = maxPacket

func packetSize(seq int) int {
	if seq%50 == 49 {
		return largestPacket
	}
	return packetHeaderLen + (seq*97)%1400
}

func makePacket(pair, dir, seq int) []byte {
	n := packetSize(seq)
	b := make([]byte, n)
	b[0], b[1] = 'D', 'I'
	binary.BigEndian.PutUint16(b[2:], uint16(pair))
	b[4] = byte(dir)
	binary.BigEndian.PutUint32(b[6:], uint32(seq))
	binary.BigEndian.PutUint32(b[10:], uint32(n))
	for j := packetHeaderLen; j < n; j++ {
		b[j] = byte(seq*131 + j*7 + pair*3 + dir)
	}
	return b
}

// checkPacket says what is wrong with got, if anything, given what was expected next.
func checkPacket(got []byte, pair, dir, seq int) error {
	if len(got) < packetHeaderLen || got[0] != 'D' || got[1] != 'I' {
		return fmt.Errorf("pair %d dir %d: packet %d: not one of ours (%d bytes, starts %x)",
			pair, dir, seq, len(got), got[:min(len(got), 40)])
	}
	gotSeq := int(binary.BigEndian.Uint32(got[6:]))
	if gotSeq != seq {
		return fmt.Errorf("pair %d dir %d: got packet %d, want %d (lost or reordered)", pair, dir, gotSeq, seq)
	}
	if want := makePacket(pair, dir, seq); !bytes.Equal(got, want) {
		return fmt.Errorf("pair %d dir %d: packet %d: content differs (%d bytes, want %d)",
			pair, dir, seq, len(got), len(want))
	}
	return nil
}

// firstError keeps the first error and cancels the scenario.
type firstError struct {
	once   sync.Once
	err    error
	cancel context.CancelFunc
}

func (f *firstError) set(err error) {
	f.once.Do(func() {
		f.err = err
		f.cancel()
	})
}

// configureTransport selects WebSocket or the binary DERP upgrade for every
// derphttp client this process makes (spec 9.5).
func configureTransport(websocket bool) error {
	if !websocket {
		return os.Unsetenv("TS_DEBUG_DERP_WS_CLIENT")
	}
	if !builtWithWebsockets {
		return errors.New("--websocket needs a binary built with `go build -tags ts_debug_websockets`")
	}
	return os.Setenv("TS_DEBUG_DERP_WS_CLIENT", "1")
}

// dialFunc returns a connected client with a fresh key.
type dialFunc func(ctx context.Context) (*derphttp.Client, error)

type relayEnd struct {
	pair, dir int // dir 0: this end is A (sends dir 0), 1: B
	client    *derphttp.Client
	peer      key.NodePublic
	credits   chan struct{} // for packets this end sends; refilled by the peer's receiver
	received  int
	others    map[string]int
}

func runRelay(ctx context.Context, args []string) (result, error) {
	var c commonFlags
	fs := newFlagSet("relay", &c)
	pairs := fs.Int("pairs", 50, "number of client pairs")
	packets := fs.Int("packets", 200, "packets sent in each direction of each pair")
	websocket := fs.Bool("websocket", false, "speak DERP over WebSocket (needs -tags ts_debug_websockets)")
	fs.IntVar(&largestPacket, "max-packet", maxPacket, "size of every 50th packet (the others are under 1414 bytes)")
	window := fs.Int("window", 8, "packets in flight per direction; keep it under the relay's queue depth (32)")
	if err := parseFlags(fs, args, &c, true); err != nil {
		return nil, err
	}
	if largestPacket < packetHeaderLen || largestPacket > maxPacket {
		return nil, usageError{fmt.Errorf("--max-packet must be in [%d, %d]", packetHeaderLen, maxPacket)}
	}
	if *pairs < 1 || *packets < 1 || *window < 1 {
		return nil, usageError{errors.New("--pairs, --packets and --window must be at least 1")}
	}
	if err := configureTransport(*websocket); err != nil {
		return nil, usageError{err}
	}
	tc, err := c.tlsConfig()
	if err != nil {
		return nil, usageError{err}
	}
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	dial := func(ctx context.Context) (*derphttp.Client, error) { return dialURL(ctx, &c, tc) }
	res, err := relayPairs(ctx, dial, nil, *pairs, *packets, *window)
	res["url"] = c.url
	res["max_packet"] = largestPacket
	res["websocket"] = *websocket
	res["websocket_dials"] = sink.websocketDials.Load()
	if err == nil && *websocket && sink.websocketDials.Load() != int64(2**pairs) {
		err = fmt.Errorf("derphttp dialed %d WebSocket connections, want %d", sink.websocketDials.Load(), 2**pairs)
	}
	if err == nil && !*websocket && sink.websocketDials.Load() != 0 {
		err = errors.New("derphttp used WebSocket although --websocket was not given")
	}
	return res, err
}

// relayPairs connects 2*pairs clients, waits until each has read ServerInfo,
// then has both ends of every pair send `packets` packets to each other with
// at most `window` unacknowledged packets per direction.
//
// check, if not nil, is called for every client once it is connected.
func relayPairs(ctx context.Context, dial dialFunc, check func(*derphttp.Client) error, pairs, packets, window int) (result, error) {
	res := result{"pairs": pairs, "packets": packets}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	fe := &firstError{cancel: cancel}

	ends := make([]*relayEnd, 2*pairs)
	t0 := time.Now()
	var wg sync.WaitGroup
	for i := range ends {
		ends[i] = &relayEnd{pair: i / 2, dir: i % 2, credits: make(chan struct{}, window), others: map[string]int{}}
		for range window {
			ends[i].credits <- struct{}{}
		}
		wg.Add(1)
		go func(e *relayEnd) {
			defer wg.Done()
			dc, err := dial(ctx)
			if err != nil {
				fe.set(fmt.Errorf("pair %d: connect: %w", e.pair, err))
				return
			}
			e.client = dc
			if check != nil {
				if err := check(dc); err != nil {
					fe.set(fmt.Errorf("pair %d: %w", e.pair, err))
				}
			}
		}(ends[i])
	}
	wg.Wait()
	defer func() {
		for _, e := range ends {
			if e.client != nil {
				e.client.Close()
			}
		}
	}()
	if fe.err != nil {
		return res, fe.err
	}
	stop := closeOnDone(ctx, clientsOf(ends)...)
	defer stop()
	for i := 0; i < len(ends); i += 2 {
		ends[i].peer = ends[i+1].client.SelfPublicKey()
		ends[i+1].peer = ends[i].client.SelfPublicKey()
	}

	// Every client reads ServerInfo before anyone sends: the relay registers a
	// client before it writes ServerInfo, so then every destination exists.
	for _, e := range ends {
		wg.Add(1)
		go func(e *relayEnd) {
			defer wg.Done()
			if err := expectServerInfo(e.client); err != nil {
				fe.set(fmt.Errorf("pair %d: %w", e.pair, err))
			}
		}(e)
	}
	wg.Wait()
	if fe.err != nil {
		return res, fe.err
	}
	connected := time.Since(t0)

	t1 := time.Now()
	var bytesSent sync.Map
	for i, e := range ends {
		peerEnd := ends[i^1]
		wg.Add(2)
		go func() { // receiver: e receives what peerEnd sends
			defer wg.Done()
			for e.received < packets {
				m, err := e.client.Recv()
				if err != nil {
					fe.set(fmt.Errorf("pair %d dir %d: receive after %d packets: %w", e.pair, peerEnd.dir, e.received, err))
					return
				}
				rp, ok := m.(derp.ReceivedPacket)
				if !ok {
					e.others[fmt.Sprintf("%T", m)]++
					continue
				}
				if rp.Source != e.peer {
					fe.set(fmt.Errorf("pair %d: packet source %v, want %v", e.pair, rp.Source.ShortString(), e.peer.ShortString()))
					return
				}
				if err := checkPacket(rp.Data, e.pair, peerEnd.dir, e.received); err != nil {
					fe.set(err)
					return
				}
				e.received++
				select {
				case peerEnd.credits <- struct{}{}:
				default:
					fe.set(fmt.Errorf("pair %d: more packets than were sent", e.pair))
					return
				}
			}
		}()
		go func() { // sender
			defer wg.Done()
			total := 0
			for seq := range packets {
				select {
				case <-e.credits:
				case <-ctx.Done():
					return
				}
				p := makePacket(e.pair, e.dir, seq)
				if err := e.client.Send(e.peer, p); err != nil {
					fe.set(fmt.Errorf("pair %d dir %d: send packet %d: %w", e.pair, e.dir, seq, err))
					return
				}
				total += len(p)
			}
			bytesSent.Store(i, total)
		}()
	}
	wg.Wait()
	if fe.err != nil {
		return res, fe.err
	}
	elapsed := time.Since(t1)
	var total int
	bytesSent.Range(func(_, v any) bool { total += v.(int); return true })
	received := 0
	others := map[string]int{}
	for _, e := range ends {
		received += e.received
		for k, v := range e.others {
			others[k] += v
		}
	}
	res["sent"] = 2 * pairs * packets
	res["received"] = received
	res["bytes"] = total
	res["connect_ms"] = ms(connected)
	res["relay_ms"] = ms(elapsed)
	res["other_frames"] = others
	return res, nil
}

func clientsOf(ends []*relayEnd) []*derphttp.Client {
	out := make([]*derphttp.Client, 0, len(ends))
	for _, e := range ends {
		out = append(out, e.client)
	}
	return out
}
