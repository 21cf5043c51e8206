package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"time"

	"tailscale.com/net/stun"
)

// addrList is a repeatable --addr flag; commas also separate entries.
type addrList []string

func (a *addrList) String() string { return strings.Join(*a, ",") }
func (a *addrList) Set(s string) error {
	for _, part := range strings.Split(s, ",") {
		if part = strings.TrimSpace(part); part != "" {
			*a = append(*a, part)
		}
	}
	return nil
}

// runSTUN sends Tailscale's STUN binding request to each --addr from a fresh
// UDP socket and checks that the answer parses with tailscale.com/net/stun,
// echoes the transaction ID and reports the socket's own address (the test
// runs on loopback, so there is no NAT in between).
func runSTUN(ctx context.Context, args []string) (result, error) {
	var c commonFlags
	fs := newFlagSet("stun", &c)
	var addrs addrList
	fs.Var(&addrs, "addr", "STUN server HOST:PORT; repeat for IPv4 and IPv6, e.g. --addr 127.0.0.1:3478 --addr [::1]:3478")
	tries := fs.Int("tries", 3, "requests per address before giving up (UDP may drop)")
	if err := parseFlags(fs, args, &c, false); err != nil {
		return nil, err
	}
	if len(addrs) == 0 {
		return nil, usageError{errors.New("--addr HOST:PORT is required")}
	}
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	var results []result
	res := result{"results": &results}
	for _, a := range addrs {
		r, err := stunOnce(ctx, a, *tries)
		results = append(results, r)
		if err != nil {
			return res, fmt.Errorf("%s: %w", a, err)
		}
	}
	return res, nil
}

func stunOnce(ctx context.Context, server string, tries int) (result, error) {
	r := result{"server": server}
	dst, err := netip.ParseAddrPort(server)
	if err != nil {
		ua, rerr := net.ResolveUDPAddr("udp", server)
		if rerr != nil {
			return r, fmt.Errorf("bad --addr: %w", rerr)
		}
		dst = ua.AddrPort()
	}
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	network, bind := "udp4", "127.0.0.1:0"
	if dst.Addr().Is6() {
		network, bind = "udp6", "[::1]:0"
	}
	if !dst.Addr().IsLoopback() {
		bind = ""
	}
	r["family"] = map[string]int{"udp4": 4, "udp6": 6}[network]
	laddr, _ := net.ResolveUDPAddr(network, bind)
	conn, err := net.ListenUDP(network, laddr)
	if err != nil {
		return r, err
	}
	defer conn.Close()
	local := conn.LocalAddr().(*net.UDPAddr).AddrPort()
	r["local"] = local.String()

	buf := make([]byte, 1500)
	for try := 1; try <= tries; try++ {
		tx := stun.NewTxID()
		req := stun.Request(tx)
		t0 := time.Now()
		if _, err := conn.WriteToUDPAddrPort(req, dst); err != nil {
			return r, err
		}
		deadline := t0.Add(time.Second)
		if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
			deadline = d
		}
		conn.SetReadDeadline(deadline)
		for {
			n, from, err := conn.ReadFromUDPAddrPort(buf)
			if err != nil {
				if ne, ok := err.(net.Error); ok && ne.Timeout() && ctx.Err() == nil {
					break // resend
				}
				return r, fmt.Errorf("no STUN response after %d tries: %w", try, err)
			}
			if netip.AddrPortFrom(from.Addr().Unmap(), from.Port()) != dst {
				continue
			}
			r["rtt_ms"] = ms(time.Since(t0))
			r["response_len"] = n
			if !stun.Is(buf[:n]) {
				return r, fmt.Errorf("response is not STUN (%d bytes)", n)
			}
			gotTx, mapped, err := stun.ParseResponse(buf[:n])
			if err != nil {
				return r, fmt.Errorf("stun.ParseResponse: %w", err)
			}
			if gotTx != tx {
				return r, errors.New("response transaction ID differs from the request's")
			}
			r["mapped"] = mapped.String()
			r["tries"] = try
			if mapped != local && dst.Addr().IsLoopback() {
				return r, fmt.Errorf("mapped address %v, want this socket's address %v", mapped, local)
			}
			return r, nil
		}
	}
	return r, fmt.Errorf("no STUN response after %d tries", tries)
}
