package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"reflect"
	"sort"
	"strings"

	"gopkg.in/yaml.v3"
	"tailscale.com/tailcfg"
)

// runDERPMap decodes a coordinator's map the two ways headscale does: the JSON
// at derp.urls with encoding/json, and the YAML of derp.paths with
// gopkg.in/yaml.v3, both into tailcfg.DERPMap. The two must be the same map.
//
//	derpinterop derpmap --url http://127.0.0.1:8080
func runDERPMap(ctx context.Context, args []string) (result, error) {
	fs := flag.NewFlagSet("derpmap", flag.ContinueOnError)
	fs.SetOutput(os.Stderr)
	base := fs.String("url", "", "coordinator base URL, e.g. http://127.0.0.1:8080")
	if err := fs.Parse(args); err != nil {
		return nil, usageError{err}
	}
	if *base == "" || fs.NArg() != 0 {
		return nil, usageError{errors.New("--url is required (and nothing else)")}
	}
	root := strings.TrimRight(*base, "/")
	jsonBody, err := get(ctx, root+"/derpmap/default")
	if err != nil {
		return nil, err
	}
	yamlBody, err := get(ctx, root+"/derpmap/default.yaml")
	if err != nil {
		return nil, err
	}
	var fromJSON, fromYAML tailcfg.DERPMap
	if err := json.Unmarshal(jsonBody, &fromJSON); err != nil {
		return nil, fmt.Errorf("encoding/json into tailcfg.DERPMap: %w", err)
	}
	if err := yaml.Unmarshal(yamlBody, &fromYAML); err != nil {
		return nil, fmt.Errorf("yaml.v3 into tailcfg.DERPMap: %w", err)
	}
	res := result{"regions": describeMap(&fromJSON), "yaml_regions": describeMap(&fromYAML),
		"omit_default_regions": fromJSON.OmitDefaultRegions}
	if !reflect.DeepEqual(fromJSON, fromYAML) {
		return res, fail(nil, "the JSON and the YAML decode to different maps")
	}
	for id, r := range fromJSON.Regions {
		if r == nil {
			return res, fail(nil, "region %d is null", id)
		}
	}
	return res, nil
}

// describeMap lists each region as "ID:CODE:node,node" with every node's
// HostName, ports and CertName, sorted, so the test can compare exactly.
func describeMap(m *tailcfg.DERPMap) []string {
	out := []string{}
	for id, r := range m.Regions {
		if r == nil {
			out = append(out, fmt.Sprintf("%d:null", id))
			continue
		}
		nodes := []string{}
		for _, n := range r.Nodes {
			nodes = append(nodes, fmt.Sprintf("%s@%s:%d/stun%d/%s/ipv4=%s/insecure=%v", n.Name, n.HostName,
				n.DERPPort, n.STUNPort, n.CertName, n.IPv4, n.InsecureForTests))
		}
		out = append(out, fmt.Sprintf("%d:%s:%s", id, r.RegionCode, strings.Join(nodes, ",")))
	}
	sort.Strings(out)
	return out
}

func get(ctx context.Context, u string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, "GET", u, nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", u, resp.Status)
	}
	return io.ReadAll(io.LimitReader(resp.Body, 4<<20))
}
