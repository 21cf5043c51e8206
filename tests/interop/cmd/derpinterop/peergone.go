package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/disco"
	"tailscale.com/types/key"
)

// discoShaped returns a packet the relay must classify as disco (spec 5.3):
// the 6-byte magic, a 32-byte sender disco key, a 24-byte nonce and a body.
func discoShaped() []byte {
	tail := make([]byte, 32+24+18)
	rand.Read(tail)
	b := append([]byte(disco.Magic), tail...)
	if !disco.LooksLikeDiscoWrapper(b) {
		panic("discoShaped: not disco-shaped")
	}
	return b
}

func runPeerGone(ctx context.Context, args []string) (result, error) {
	var c commonFlags
	fs := newFlagSet("peergone", &c)
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

	a, err := dialURL(ctx, &c, tc)
	if err != nil {
		return res, fmt.Errorf("connect A: %w", err)
	}
	defer a.Close()
	b, err := dialURL(ctx, &c, tc)
	if err != nil {
		return res, fmt.Errorf("connect B: %w", err)
	}
	defer b.Close()
	defer closeOnDone(ctx, a, b)()
	for name, dc := range map[string]*derphttp.Client{"A": a, "B": b} {
		if err := expectServerInfo(dc); err != nil {
			return res, fmt.Errorf("%s: %w", name, err)
		}
	}
	aKey := a.SelfPublicKey()

	// 1. B receives from A, so B is told when A leaves (spec 5.4, 5.5).
	hello := []byte("peergone: hello from A")
	if err := a.Send(b.SelfPublicKey(), hello); err != nil {
		return res, fmt.Errorf("A send: %w", err)
	}
	m, err := recvSkippingKeepAlives(b)
	if err != nil {
		return res, fmt.Errorf("B receive: %w", err)
	}
	rp, ok := m.(derp.ReceivedPacket)
	if !ok || rp.Source != aKey || !bytes.Equal(rp.Data, hello) {
		return res, fmt.Errorf("B got %s, want A's packet", describe(m))
	}

	// 2. A leaves: B must get PeerGone(A, Disconnected).
	a.Close()
	m, err = recvSkippingKeepAlives(b)
	if err != nil {
		return res, fmt.Errorf("B waiting for PeerGone(A): %w", err)
	}
	pg, ok := m.(derp.PeerGoneMessage)
	if !ok || pg.Peer != aKey {
		return res, fmt.Errorf("after A closed, B got %s, want PeerGone(A)", describe(m))
	}
	res["disconnected_reason"] = int(pg.Reason)
	if pg.Reason != derp.PeerGoneReasonDisconnected {
		return res, fmt.Errorf("PeerGone(A) reason %#x, want Disconnected (0x00)", pg.Reason)
	}

	// 3. A plain packet to an unknown key gets no answer; a disco-shaped one
	// gets PeerGone(dst, NotHere). Sending the plain one first means a wrong
	// NotHere for it would arrive before the right one.
	plainDst, discoDst := key.NewNode().Public(), key.NewNode().Public()
	if err := b.Send(plainDst, []byte("not disco, to nobody")); err != nil {
		return res, fmt.Errorf("B send to unknown key: %w", err)
	}
	if err := b.Send(discoDst, discoShaped()); err != nil {
		return res, fmt.Errorf("B send disco to unknown key: %w", err)
	}
	m, err = recvSkippingKeepAlives(b)
	if err != nil {
		return res, fmt.Errorf("B waiting for PeerGone NotHere: %w", err)
	}
	pg, ok = m.(derp.PeerGoneMessage)
	switch {
	case ok && pg.Peer == plainDst:
		return res, fmt.Errorf("relay sent PeerGone (reason %#x) for a non-disco packet to an unknown key; only disco packets get NotHere", pg.Reason)
	case !ok || pg.Peer != discoDst:
		return res, fmt.Errorf("after a disco packet to an unknown key, B got %s, want PeerGone(dst, NotHere)", describe(m))
	}
	res["not_here_reason"] = int(pg.Reason)
	if pg.Reason != derp.PeerGoneReasonNotHere {
		return res, fmt.Errorf("PeerGone(unknown) reason %#x, want NotHere (0x01)", pg.Reason)
	}
	return res, nil
}

// describe names a received message for error text.
func describe(m derp.ReceivedMessage) string {
	switch m := m.(type) {
	case derp.ReceivedPacket:
		return fmt.Sprintf("a %d-byte packet from %s", len(m.Data), m.Source.ShortString())
	case derp.PeerGoneMessage:
		return fmt.Sprintf("PeerGone(%s, reason %#x)", m.Peer.ShortString(), m.Reason)
	default:
		return fmt.Sprintf("%T", m)
	}
}
