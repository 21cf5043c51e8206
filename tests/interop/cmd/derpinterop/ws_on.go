//go:build (linux || darwin) && ts_debug_websockets

package main

// builtWithWebsockets reports whether derphttp's WebSocket dialer is compiled
// in (it needs the ts_debug_websockets build tag outside js/wasm).
const builtWithWebsockets = true
