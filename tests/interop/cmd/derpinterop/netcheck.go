package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"

	"tailscale.com/net/netcheck"
	"tailscale.com/net/netmon"
	"tailscale.com/tailcfg"
)

// loadDERPMap reads a DERP map from http(s)://, file:// or a plain path.
func loadDERPMap(ctx context.Context, src string) (*tailcfg.DERPMap, error) {
	var body []byte
	var err error
	if strings.HasPrefix(src, "http://") || strings.HasPrefix(src, "https://") {
		body, err = get(ctx, src) // derpmap.go
	} else {
		body, err = os.ReadFile(strings.TrimPrefix(src, "file://"))
	}
	if err != nil {
		return nil, err
	}
	dm := new(tailcfg.DERPMap)
	if err := json.Unmarshal(body, dm); err != nil {
		return nil, fmt.Errorf("DERP map %s: %w", src, err)
	}
	if len(dm.Regions) == 0 {
		return nil, fmt.Errorf("DERP map %s has no regions", src)
	}
	return dm, nil
}

// runNetcheck runs one full netcheck report with sockets this program owns, so
// it knows which address the STUN server should report back.
func runNetcheck(ctx context.Context, args []string) (result, error) {
	var c commonFlags
	fs := newFlagSet("netcheck", &c)
	mapSrc := fs.String("derpmap", "", "DERP map: http(s):// URL (our coordinator), file:// URL or path")
	bind4 := fs.String("bind4", "127.0.0.1:0", "local IPv4 UDP address; empty disables IPv4")
	bind6 := fs.String("bind6", "[::1]:0", "local IPv6 UDP address; empty disables IPv6")
	want6 := fs.Bool("want-ipv6", false, "fail unless an IPv6 STUN round trip completes")
	if err := parseFlags(fs, args, &c, false); err != nil {
		return nil, err
	}
	if *mapSrc == "" {
		return nil, usageError{errors.New("--derpmap is required")}
	}
	if _, err := c.tlsConfig(); err != nil {
		return nil, usageError{err}
	}
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	res := result{"derpmap": *mapSrc}
	dm, err := loadDERPMap(ctx, *mapSrc)
	if err != nil {
		return res, err
	}

	nc := &netcheck.Client{NetMon: netmon.NewStatic(), Logf: logf(), Verbose: verbose}
	socks := map[string]*net.UDPConn{}
	for network, bind := range map[string]string{"udp4": *bind4, "udp6": *bind6} {
		if bind == "" {
			continue
		}
		la, err := net.ResolveUDPAddr(network, bind)
		if err != nil {
			return res, usageError{fmt.Errorf("bind %s: %w", bind, err)}
		}
		pc, err := net.ListenUDP(network, la)
		if err != nil {
			return res, fmt.Errorf("listen %s %s: %w", network, bind, err)
		}
		defer pc.Close()
		socks[network] = pc
		go func() {
			buf := make([]byte, 64<<10)
			for {
				n, from, err := pc.ReadFromUDPAddrPort(buf)
				if err != nil {
					return
				}
				nc.ReceiveSTUNPacket(buf[:n], netip.AddrPortFrom(from.Addr().Unmap(), from.Port()))
			}
		}()
	}
	local := func(network string) netip.AddrPort {
		if pc := socks[network]; pc != nil {
			return pc.LocalAddr().(*net.UDPAddr).AddrPort()
		}
		return netip.AddrPort{}
	}
	nc.SendPacket = func(pkt []byte, dst netip.AddrPort) (int, error) {
		network := "udp4"
		if dst.Addr().Is6() {
			network = "udp6"
		}
		pc := socks[network]
		if pc == nil {
			return 0, fmt.Errorf("no %s socket", network)
		}
		return pc.WriteToUDPAddrPort(pkt, dst)
	}

	report, err := nc.GetReport(ctx, dm, nil)
	if err != nil {
		return res, fmt.Errorf("GetReport: %w", err)
	}
	latency := map[string]float64{}
	for id, d := range report.RegionLatency {
		latency[strconv.Itoa(id)] = ms(d)
	}
	res["udp"] = report.UDP
	res["ipv4"] = report.IPv4
	res["ipv6"] = report.IPv6
	res["global_v4"] = addrString(report.GlobalV4)
	res["global_v6"] = addrString(report.GlobalV6)
	res["local_v4"] = addrString(local("udp4"))
	res["local_v6"] = addrString(local("udp6"))
	res["preferred_derp"] = report.PreferredDERP
	res["region_latency_ms"] = latency
	var fastest time.Duration = -1
	for _, d := range report.RegionLatency {
		if fastest < 0 || d < fastest {
			fastest = d
		}
	}
	preferredLatency, preferredMeasured := report.RegionLatency[report.PreferredDERP]

	var missing []string
	for id, reg := range dm.Regions {
		if reg == nil || reg.NoMeasureNoHome || len(reg.Nodes) == 0 {
			continue
		}
		if _, ok := report.RegionLatency[id]; !ok {
			missing = append(missing, strconv.Itoa(id))
		}
	}
	sort.Strings(missing)
	switch {
	case !report.UDP:
		return res, errors.New("netcheck got no STUN answer over UDP; is the STUN server listening on the map's STUNPort?")
	case len(missing) > 0:
		return res, fmt.Errorf("no latency for regions %s", strings.Join(missing, ","))
	case report.PreferredDERP == 0 || dm.Regions[report.PreferredDERP] == nil:
		return res, fmt.Errorf("preferred (home) DERP region %d is not a region of the map", report.PreferredDERP)
	case !preferredMeasured || preferredLatency != fastest:
		// One report, no history and no HomeParams: netcheck must pick the fastest region.
		return res, fmt.Errorf("preferred region %d (latency %v) is not the fastest (%v)",
			report.PreferredDERP, preferredLatency, fastest)
	case report.IPv4 && report.GlobalV4 != local("udp4"):
		return res, fmt.Errorf("GlobalV4 %v, want this socket's address %v", report.GlobalV4, local("udp4"))
	case report.IPv6 && report.GlobalV6 != local("udp6"):
		return res, fmt.Errorf("GlobalV6 %v, want this socket's address %v", report.GlobalV6, local("udp6"))
	case *want6 && !report.IPv6:
		return res, errors.New("no IPv6 STUN round trip completed (--want-ipv6); does the map's node have IPv6 set and the server listen on [::1]?")
	}
	return res, nil
}

func addrString(a netip.AddrPort) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}
