package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"

	"go4.org/mem"
	"tailscale.com/derp/derpconst"
	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
)

// metaCertKey finds derper's meta-certificate (spec 11.2) among the peer
// certificates the way derphttp's parseMetaCert does, and returns the server
// key and protocol version it carries. ok is false when there is none.
func metaCertKey(cs *tls.ConnectionState) (pub key.NodePublic, version int, ok bool) {
	for _, cert := range cs.PeerCertificates {
		hexKey, found := strings.CutPrefix(cert.Subject.CommonName, derpconst.MetaCertCommonNamePrefix)
		if !found {
			continue
		}
		k, err := key.ParseNodePublicUntyped(mem.S(hexKey))
		if err == nil && cert.SerialNumber.BitLen() <= 8 {
			return k, int(cert.SerialNumber.Int64()), true
		}
	}
	return key.NodePublic{}, 0, false
}

// fastStartState describes whether derphttp took the fast-start path on dc:
// that happens exactly when TLS 1.3 was negotiated and a meta-certificate with
// a key and a non-zero version was presented (derphttp Client.connect).
func fastStartState(dc *derphttp.Client) (fast bool, version uint16, meta key.NodePublic, err error) {
	cs, ok := dc.TLSConnectionState()
	if !ok {
		return false, 0, key.NodePublic{}, errors.New("no TLS connection state: did the client use TLS?")
	}
	pub, v, found := metaCertKey(cs)
	return cs.Version >= tls.VersionTLS13 && found && v != 0 && !pub.IsZero(), cs.Version, pub, nil
}

func runFastClient(ctx context.Context, args []string) (result, error) {
	var c commonFlags
	fs := newFlagSet("fastclient", &c)
	serverKey := fs.String("server-key", "", "expected server key (nodekey:...) in the meta-certificate")
	pairs := fs.Int("pairs", 2, "client pairs that relay through the fast-start connections")
	packets := fs.Int("packets", 20, "packets per direction per pair")
	if err := parseFlags(fs, args, &c, true); err != nil {
		return nil, err
	}
	if !strings.HasPrefix(c.url, "https://") {
		return nil, usageError{errors.New("fastclient needs an https:// --url")}
	}
	var want key.NodePublic
	if *serverKey != "" {
		if err := want.UnmarshalText([]byte(*serverKey)); err != nil {
			return nil, usageError{fmt.Errorf("--server-key: %w", err)}
		}
	}
	if err := configureTransport(false); err != nil {
		return nil, err
	}
	tc, err := c.tlsConfig()
	if err != nil {
		return nil, usageError{err}
	}
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()

	var metaKey key.NodePublic
	var tlsVersion uint16
	check := func(dc *derphttp.Client) error {
		fast, v, meta, err := fastStartState(dc)
		if err != nil {
			return err
		}
		tlsVersion = v
		if !fast {
			return fmt.Errorf("client did not take the fast-start path: TLS version %#04x, meta-certificate key %q; "+
				"the relay must negotiate TLS 1.3 and append a derpkey<hex> meta-certificate with serial 2 (spec 11.2)",
				v, meta.String())
		}
		if !want.IsZero() && meta != want {
			return fmt.Errorf("meta-certificate carries %v, want --server-key %v", meta, want)
		}
		if got := dc.ServerPublicKey(); got != meta {
			return fmt.Errorf("client's server key %v differs from the meta-certificate's %v", got, meta)
		}
		metaKey = meta
		return nil
	}
	dial := func(ctx context.Context) (*derphttp.Client, error) { return dialURL(ctx, &c, tc) }
	res, err := relayPairs(ctx, dial, check, *pairs, *packets, 8)
	res["url"] = c.url
	res["fast_start"] = err == nil
	res["tls_version"] = tls.VersionName(tlsVersion)
	res["meta_cert_key"] = metaKey.String()
	return res, err
}

// pinnedRegion builds a one-node DERP region for an https://IP:PORT URL with a
// CertName pin, as derper's self-signed IP mode prints it (spec 11.3, 11.4).
func pinnedRegion(rawURL, certName string) (*tailcfg.DERPRegion, error) {
	u, err := url.Parse(rawURL)
	if err != nil || u.Scheme != "https" {
		return nil, fmt.Errorf("--url %q: want https://IP:PORT", rawURL)
	}
	host, portStr, err := net.SplitHostPort(u.Host)
	if err != nil {
		return nil, fmt.Errorf("--url %q: %w", rawURL, err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		return nil, fmt.Errorf("--url %q: bad port", rawURL)
	}
	node := &tailcfg.DERPNode{
		Name:     "900a",
		RegionID: 900,
		HostName: host,
		CertName: certName,
		DERPPort: port,
	}
	if ip := net.ParseIP(host); ip != nil && ip.To4() != nil {
		node.IPv4, node.IPv6 = host, "none"
	} else if ip != nil {
		node.IPv4, node.IPv6 = "none", host
	}
	return &tailcfg.DERPRegion{RegionID: 900, RegionCode: "interop", RegionName: "interop", Nodes: []*tailcfg.DERPNode{node}}, nil
}

func dialRegion(ctx context.Context, region *tailcfg.DERPRegion) (*derphttp.Client, error) {
	dc := derphttp.NewRegionClient(key.NewNode(), logf(), netmon.NewStatic(), func() *tailcfg.DERPRegion { return region })
	if err := dc.Connect(ctx); err != nil {
		dc.Close()
		return nil, err
	}
	return dc, nil
}

func runPin(ctx context.Context, args []string) (result, error) {
	var c commonFlags
	fs := newFlagSet("pin", &c)
	certName := fs.String("certname", "", "the node's CertName, sha256-raw:<64 lower-case hex>")
	pairs := fs.Int("pairs", 2, "client pairs that relay through pinned connections")
	packets := fs.Int("packets", 20, "packets per direction per pair")
	if err := parseFlags(fs, args, &c, true); err != nil {
		return nil, err
	}
	if !strings.HasPrefix(*certName, "sha256-raw:") {
		return nil, usageError{errors.New("--certname sha256-raw:<hex> is required")}
	}
	region, err := pinnedRegion(c.url, *certName)
	if err != nil {
		return nil, usageError{err}
	}
	if err := configureTransport(false); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()

	// A wrong pin must be refused; otherwise the positive case proves nothing.
	wrong := *region
	wrongNode := *region.Nodes[0]
	wrongNode.CertName = "sha256-raw:" + strings.Repeat("0", 64)
	wrong.Nodes = []*tailcfg.DERPNode{&wrongNode}
	if dc, err := dialRegion(ctx, &wrong); err == nil {
		dc.Close()
		return result{"url": c.url}, errors.New("a client with a wrong sha256-raw pin connected; pinning is not in effect")
	}

	var fast bool
	check := func(dc *derphttp.Client) error {
		f, _, _, err := fastStartState(dc)
		fast = f
		return err
	}
	dial := func(ctx context.Context) (*derphttp.Client, error) { return dialRegion(ctx, region) }
	res, err := relayPairs(ctx, dial, check, *pairs, *packets, 8)
	res["url"] = c.url
	res["certname"] = *certName
	res["wrong_pin_refused"] = true
	res["fast_start"] = fast
	return res, err
}
