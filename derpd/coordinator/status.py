"""The ``/status`` page: regions, nodes, health, latency history and last error.

Rendered on the server from the ``/status.json`` document; no scripts, no external
assets (inline CSS and SVG only, so it passes a ``default-src 'none'`` CSP); it reloads
itself with ``<meta http-equiv="refresh">``.  Each node row carries
``data-node``/``data-status`` attributes so tests and scrapers need not parse text.
"""

from __future__ import annotations

import time
from html import escape
from typing import Any

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}
.meta{color:#666;font-size:.9em}
table{border-collapse:collapse;width:100%;background:#fff;box-shadow:0 1px 2px #0002}
th,td{padding:.35em .6em;border-bottom:1px solid #eee;text-align:left;vertical-align:middle}
th{background:#f0f0f0;font-weight:600}
.badge{display:inline-block;min-width:5em;text-align:center;border-radius:3px;padding:.1em .4em;
font-weight:700;color:#fff}
.up{background:#2e7d32}.down{background:#c62828}.unknown{background:#757575}
.kept{color:#b26a00;font-size:.85em}.err{color:#c62828;font-size:.9em;max-width:32em;word-break:break-word}
.mono{font-family:ui-monospace,monospace;font-size:.9em}
"""


def _ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "never"
    secs = max(0.0, now - ts)
    if secs < 120:
        return f"{secs:.0f} s ago"
    if secs < 7200:
        return f"{secs / 60:.0f} min ago"
    return f"{secs / 3600:.1f} h ago"


def _sparkline(history: list[dict[str, Any]]) -> str:
    """An inline SVG bar chart of probe latency; failed probes are full-height red bars."""
    if not history:
        return '<span class="meta">no probes yet</span>'
    width, height, bar = 4 * len(history), 24, 3
    top = max([h["ms"] for h in history if h["ms"] is not None] or [1.0]) or 1.0
    bars = []
    for i, h in enumerate(history):
        if not h["ok"] or h["ms"] is None:
            bars.append(f'<rect x="{i * 4}" y="0" width="{bar}" height="{height}" fill="#c62828"/>')
        else:
            hgt = max(2, round(h["ms"] / top * height))
            bars.append(f'<rect x="{i * 4}" y="{height - hgt}" width="{bar}" height="{hgt}" fill="#2e7d32"/>')
    title = escape(", ".join("fail" if not h["ok"] else f"{h['ms']:.1f} ms" for h in history[-10:]))
    return (f'<svg width="{width}" height="{height}" role="img" aria-label="latency history">'
            f'<title>last probes: {title}</title>{"".join(bars)}</svg>')


def _latency(lat: dict[str, float]) -> str:
    if not lat:
        return "–"
    return " ".join(f"{escape(k)} {v:.1f} ms" for k, v in sorted(lat.items()))


def render_status(doc: dict[str, Any], *, refresh: int = 5) -> str:
    """Returns the status page HTML for a ``/status.json`` document."""
    now = doc.get("generated_at") or time.time()
    counts = {"up": 0, "down": 0, "unknown": 0}
    sections = []
    for region in doc["regions"]:
        rows = []
        for n in region["nodes"]:
            counts[n["status"]] = counts.get(n["status"], 0) + 1
            status = n["status"]
            kept = ('<div class="kept">kept in map: every node of the region is down</div>'
                    if status == "down" and n["published"] else "")
            note = f'<div class="kept">{escape(n["note"])}</div>' if n.get("note") else ""
            if n.get("draining"):
                note += '<div class="kept">draining for maintenance: clients are moved away</div>'
            unpublished = (' <span class="meta">(not in map)</span>'
                           if not n["published"] and status != "down" else "")
            expires = (f'<div class="meta">registered; expires in {n["expires_in"]:.0f} s</div>'
                       if n["expires_in"] is not None else '<div class="meta">config</div>')
            err = ""
            if n["last_error"]:
                err = (f'<div class="err">{escape(n["last_error"])}</div>'
                       f'<div class="meta">{_ago(n["last_error_at"], now)}</div>')
            rows.append(
                f'<tr class="node" data-node="{escape(n["name"])}" data-status="{status}">'
                f'<td><b>{escape(n["name"])}</b>{expires}</td>'
                f'<td><span class="badge {status}">{status.upper()}</span>{unpublished}{kept}{note}</td>'
                f'<td class="mono">{escape(n["host"])}:{n["derp_port"]}<br>stun {n["stun_port"]}</td>'
                f'<td>{_latency(n["latency_ms"])}</td>'
                f'<td>{_sparkline(n["history"])}</td>'
                f'<td>{_ago(n["last_success"], now)}</td>'
                f'<td>{err or "–"}</td></tr>')
        if not rows:
            rows.append('<tr><td colspan="7" class="meta">no nodes: register one with '
                        f'derpd serve --coordinator URL --region-id {region["id"]}</td></tr>')
        state = "" if region["published"] else ' <span class="meta">(not in the published map)</span>'
        sections.append(
            f'<h2 data-region="{region["id"]}">Region {region["id"]} · {escape(region["code"])} · '
            f'{escape(region["name"])}{state}</h2>'
            '<table><thead><tr><th>Node</th><th>Health</th><th>Address</th><th>Latency</th>'
            '<th>History</th><th>Last success</th><th>Last error</th></tr></thead><tbody>'
            + "".join(rows) + "</tbody></table>")
    if not sections:
        sections.append('<p class="meta">No regions configured yet.</p>')
    generated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now))
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="{int(refresh)}">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f'<title>derpd coordinator: {counts["up"]} up, {counts["down"]} down</title>'
        f'<style>{_CSS}</style></head><body>'
        '<h1>derpd coordinator</h1>'
        f'<div class="meta" id="summary">{counts["up"]} up · {counts["down"]} down · '
        f'{counts["unknown"]} not probed yet · probe every {doc["probe_interval"]:g} s · '
        f'map ETag <span class="mono">{escape(doc["etag"])}</span> · {generated} · '
        f'refreshes every {int(refresh)} s · '
        '<a href="/derpmap/default">map JSON</a> · <a href="/derpmap/default.yaml">YAML</a> · '
        '<a href="/status.json">status JSON</a> · <a href="/metrics">metrics</a></div>'
        + "".join(sections) + "</body></html>\n")
