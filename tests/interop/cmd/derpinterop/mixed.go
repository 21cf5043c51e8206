package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"

	"tailscale.com/derp"
	"tailscale.com/types/key"
)

// runMixed talks to a Python client (ours) through the relay. For each seq the
// Go client sends makePacket(0, 0, seq) to --py-key and waits for the Python
// client's answer, which must be the same bytes with the first two bytes
// replaced by "PY". The Python side checks what it got from Go the same way.
func runMixed(ctx context.Context, args []string) (result, error) {
	var c commonFlags
	fs := newFlagSet("mixed", &c)
	pyKeyText := fs.String("py-key", "", "the Python client's public key, nodekey:<hex>")
	packets := fs.Int("packets", 50, "packets in each direction")
	websocket := fs.Bool("websocket", false, "speak DERP over WebSocket (needs -tags ts_debug_websockets)")
	if err := parseFlags(fs, args, &c, true); err != nil {
		return nil, err
	}
	var pyKey key.NodePublic
	if err := pyKey.UnmarshalText([]byte(*pyKeyText)); err != nil {
		return nil, usageError{fmt.Errorf("--py-key: %w", err)}
	}
	if *packets < 1 {
		return nil, usageError{errors.New("--packets must be at least 1")}
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

	dc, err := dialURL(ctx, &c, tc)
	if err != nil {
		return result{"url": c.url}, fmt.Errorf("connect: %w", err)
	}
	defer dc.Close()
	defer closeOnDone(ctx, dc)()
	res := result{"url": c.url, "go_key": dc.SelfPublicKey().String(), "packets": *packets}
	if err := expectServerInfo(dc); err != nil {
		return res, err
	}
	received := 0
	for seq := range *packets {
		out := makePacket(0, 0, seq)
		if err := dc.Send(pyKey, out); err != nil {
			return res, fmt.Errorf("send packet %d: %w", seq, err)
		}
		m, err := recvSkippingKeepAlives(dc)
		if err != nil {
			res["received"] = received
			return res, fmt.Errorf("waiting for the Python answer to packet %d: %w", seq, err)
		}
		rp, ok := m.(derp.ReceivedPacket)
		if !ok || rp.Source != pyKey {
			res["received"] = received
			return res, fmt.Errorf("waiting for the Python answer to packet %d, got %s", seq, describe(m))
		}
		want := append([]byte("PY"), out[2:]...)
		if !bytes.Equal(rp.Data, want) {
			res["received"] = received
			return res, fmt.Errorf("Python answer to packet %d differs (%d bytes, want %d)", seq, len(rp.Data), len(want))
		}
		received++
	}
	res["received"] = received
	return res, nil
}
