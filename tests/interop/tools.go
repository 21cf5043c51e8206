//go:build tools

// Package tools pins the Tailscale commands the interop suite builds from this
// module (derpprobe, and derper for validating the harness) so that `go mod tidy`
// keeps their dependencies in go.sum.
package tools

import (
	_ "tailscale.com/cmd/derper"
	_ "tailscale.com/cmd/derpprobe"
)
