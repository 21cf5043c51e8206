//go:build tools

// Package tools pins the anchor the benchmarks build from this module
// (Tailscale's derper, which also serves STUN with -stun), so that
// `go mod tidy` keeps its dependencies in go.sum.
package tools

import (
	_ "tailscale.com/cmd/derper"
)
