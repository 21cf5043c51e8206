//go:build !((linux || darwin) && ts_debug_websockets)

package main

const builtWithWebsockets = false
