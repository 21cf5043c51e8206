package main

import (
	"context"
	"fmt"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/types/key"
)

// runHealth logs one node key in twice (a cloned key) and has the older
// connection send after the newer one: the relay must tell both connections
// with a Health frame that derp.Client parses as a HealthMessage (what
// tailscaled shows as "Relay server error"), and send the survivor an empty
// one (healthy again) once the other connection has left.
func runHealth(ctx context.Context, args []string) (result, error) {
	var c commonFlags
	fs := newFlagSet("health", &c)
	if err := parseFlags(fs, args, &c, true); err != nil {
		return nil, err
	}
	tc, err := c.tlsConfig()
	if err != nil {
		return nil, usageError{err}
	}
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	res := result{"url": c.url}

	cloned := key.NewNode()
	older, err := dialURLWithKey(ctx, &c, tc, cloned)
	if err != nil {
		return res, fmt.Errorf("connect the older connection: %w", err)
	}
	defer older.Close()
	if err := expectServerInfo(older); err != nil {
		return res, fmt.Errorf("older: %w", err)
	}
	newer, err := dialURLWithKey(ctx, &c, tc, cloned)
	if err != nil {
		return res, fmt.Errorf("connect the newer connection: %w", err)
	}
	defer newer.Close()
	if err := expectServerInfo(newer); err != nil {
		return res, fmt.Errorf("newer: %w", err)
	}
	peer, err := dialURL(ctx, &c, tc)
	if err != nil {
		return res, fmt.Errorf("connect the peer: %w", err)
	}
	defer peer.Close()
	defer closeOnDone(ctx, older, newer, peer)()

	if err := newer.Send(peer.SelfPublicKey(), []byte("health: from the newer connection")); err != nil {
		return res, fmt.Errorf("newer send: %w", err)
	}
	if err := older.Send(peer.SelfPublicKey(), []byte("health: from the older connection")); err != nil {
		return res, fmt.Errorf("older send: %w", err)
	}
	skipped := map[string]int{}
	for _, side := range []struct {
		name string
		dc   *derphttp.Client
	}{{"older", older}, {"newer", newer}} {
		hm, err := recvHealth(side.dc, skipped)
		if err != nil {
			return res, fmt.Errorf("%s waiting for Health: %w", side.name, err)
		}
		if hm.Problem == "" {
			return res, fmt.Errorf("%s: first Health frame was empty, want the cloned-key problem", side.name)
		}
		res[side.name+"_problem"] = hm.Problem
	}

	newer.Close()
	hm, err := recvHealth(older, skipped)
	if err != nil {
		return res, fmt.Errorf("older waiting for the empty Health frame: %w", err)
	}
	res["cleared"] = hm.Problem == ""
	res["skipped_frames"] = skipped
	if hm.Problem != "" {
		return res, fmt.Errorf("after the newer connection left, older got Health %q, want empty", hm.Problem)
	}
	return res, nil
}

// recvHealth returns the next HealthMessage, counting the other frames it skips.
func recvHealth(dc *derphttp.Client, skipped map[string]int) (derp.HealthMessage, error) {
	for {
		m, err := dc.Recv()
		if err != nil {
			return derp.HealthMessage{}, err
		}
		if hm, ok := m.(derp.HealthMessage); ok {
			return hm, nil
		}
		skipped[fmt.Sprintf("%T", m)]++
	}
}
