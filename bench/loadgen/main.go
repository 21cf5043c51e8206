// Command loadgen drives a DERP relay (derpd or Tailscale's derper) and a STUN
// server with Tailscale's own client code, so that the load generator is not
// the bottleneck of a benchmark and speaks exactly what real clients speak.
//
// Scenarios (first argument):
//
//	throughput  P sender->receiver pairs, packet size S, for T seconds, unpaced or
//	            at an offered rate; delivered packets/s, MB/s, loss, latency
//	            p50/p99/p999 from a timestamp in each packet.
//	idle        K clients log in and stay connected (reading keepalives); prints a
//	            READY line, holds until stdin closes or --hold passes.
//	churn       W workers connect, send one packet, disconnect, in a loop for T.
//	stun        W workers send STUN Binding requests for T (optionally at a rate).
//
// Every scenario is bounded by --duration (or --hold) and by --timeout, and
// prints one JSON object on stdout.  Only loopback addresses are accepted.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"sort"
	"time"

	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"
)

type result map[string]any

// common holds the flags every relay scenario shares.
type common struct {
	url     string
	ca      string
	timeout time.Duration
	tls     *tls.Config
}

func (c *common) register(fs *flag.FlagSet) {
	fs.StringVar(&c.url, "url", "", "relay URL, http(s)://127.0.0.1:PORT/derp (loopback only)")
	fs.StringVar(&c.ca, "ca", "", "PEM file of the CA that signed the relay's certificate (TLS)")
	fs.DurationVar(&c.timeout, "timeout", 120*time.Second, "hard bound on the whole scenario")
}

func (c *common) check() error {
	u, err := url.Parse(c.url)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") {
		return fmt.Errorf("--url %q: want http(s)://HOST:PORT/derp", c.url)
	}
	if err := requireLoopback(u.Hostname()); err != nil {
		return err
	}
	if u.Path == "" || u.Path == "/" {
		u.Path = "/derp"
		c.url = u.String()
	}
	if c.ca == "" {
		return nil
	}
	pem, err := os.ReadFile(c.ca)
	if err != nil {
		return fmt.Errorf("--ca: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return fmt.Errorf("--ca %s: no PEM certificate", c.ca)
	}
	c.tls = &tls.Config{RootCAs: pool}
	if t, ok := http.DefaultTransport.(*http.Transport); ok {
		t.TLSClientConfig = c.tls.Clone()
	}
	return nil
}

// requireLoopback refuses any target that is not on this machine.
func requireLoopback(host string) error {
	if host == "localhost" {
		return nil
	}
	ip := net.ParseIP(host)
	if ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("target %q is not a loopback address; loadgen only drives servers on this machine", host)
	}
	return nil
}

var quiet logger.Logf = func(string, ...any) {}

// dial returns a connected derphttp client with a fresh key.
func (c *common) dial(ctx context.Context) (*derphttp.Client, error) {
	dc, err := derphttp.NewClient(key.NewNode(), c.url, quiet, netmon.NewStatic())
	if err != nil {
		return nil, err
	}
	if c.tls != nil {
		dc.TLSConfig = c.tls.Clone()
	}
	if err := dc.Connect(ctx); err != nil {
		dc.Close()
		return nil, err
	}
	return dc, nil
}

func percentile(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(p * float64(len(sorted)-1))
	return sorted[i]
}

// latencySummary sorts samples (milliseconds) and adds p50/p99/p999 to res.
func latencySummary(res result, samples []float64) {
	sort.Float64s(samples)
	res["latency_samples"] = len(samples)
	res["p50_ms"] = percentile(samples, 0.50)
	res["p99_ms"] = percentile(samples, 0.99)
	res["p999_ms"] = percentile(samples, 0.999)
}

func main() {
	log.SetOutput(io.Discard) // Tailscale's packages log through the standard logger
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: loadgen throughput|idle|churn|stun [flags]  (loadgen SCENARIO -h for flags)")
		os.Exit(2)
	}
	scenarios := map[string]func(context.Context, []string) (result, error){
		"throughput": runThroughput,
		"idle":       runIdle,
		"churn":      runChurn,
		"stun":       runSTUN,
	}
	run, ok := scenarios[os.Args[1]]
	if !ok {
		fmt.Fprintf(os.Stderr, "loadgen: unknown scenario %q (want throughput, idle, churn or stun)\n", os.Args[1])
		os.Exit(2)
	}
	res, err := run(context.Background(), os.Args[2:])
	if res == nil {
		res = result{}
	}
	res["scenario"] = os.Args[1]
	var usage usageError
	if errors.As(err, &usage) {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(2)
	}
	if err != nil {
		res["error"] = err.Error()
	}
	out, _ := json.Marshal(res)
	fmt.Println(string(out))
	if err != nil {
		os.Exit(1)
	}
}

type usageError struct{ error }

func parse(fs *flag.FlagSet, args []string) error {
	fs.SetOutput(os.Stderr)
	if err := fs.Parse(args); err != nil {
		return usageError{err}
	}
	return nil
}
