"""deploy/prometheus and deploy/grafana against real tools.

* ``promtool check rules`` and ``promtool test rules`` (the rule unit tests);
* a real Prometheus scraping a running relay (TLS, self-signed IP certificate, in-process
  STUN, ``--metrics-addr``) and a coordinator probing it, with 1 s scrape/evaluation intervals
  and every ``for:`` shortened to 1 s. Through Prometheus's HTTP API the test checks that the
  expected series exist, that every Grafana panel's PromQL evaluates (with data where data is
  expected), and that DerpRelayDown fires once the relay is stopped;
* the same with a ``--workers 2`` relay: the per-process alerts (descriptors, CPU) and panels
  evaluate for every process, and the pinned certificate gets its own alert, not the renewal one
  (thresholds lowered so that they fire on an idle relay);
* ``promtool check metrics`` on what each real server exposes: a relay, a ``--workers 2`` relay,
  stund and the coordinator.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import DEPLOY, derpd_bin, free_port, poll, require_tool

RULES = DEPLOY / "prometheus" / "rules.yml"
DASHBOARD = DEPLOY / "grafana" / "derpd.json"

# Series the relay, STUN and coordinator must export (names as Prometheus stores them).
EXPECTED_SERIES = [
    'up{job="derpd"}', 'up{job="derpd-coordinator"}',
    "derp_current_connections", "derp_clients_local", "derp_accepts_total",
    "derp_packets_received_total", "derp_packets_sent_total", "derp_bytes_received_total",
    'derp_packets_dropped_total{reason="queue_head"}', 'derp_packets_dropped_total{reason="unknown_dest"}',
    "derp_packets_forwarded_in_total", "derp_packets_forwarded_out_total", "derp_handshake_failures_total",
    'stun_requests_total{kind="rfc5389"}', 'stun_ignored_total{reason="not_stun"}', "stun_responses_total",
    'process_open_fds{worker="0"}', 'process_max_fds{worker="0"}', 'process_cpu_seconds_total{worker="0"}',
    "derp_mesh_peers_connected", "derp_mesh_peers_configured", "derp_tls_cert_not_after_seconds",
    "derp_tls_cert_pinned", "derp_clients",
    'derpd_build_info{job="derpd"}', 'derpd_build_info{job="derpd-coordinator"}',
    'derpd_coordinator_node_up{node="900a"}', 'derpd_coordinator_probe_success{node="900a"}',
    'derpd_coordinator_probe_last_success_timestamp_seconds{node="900a"}',
]


def _promtool() -> str:
    return require_tool("promtool", "the Debian package `prometheus`")


def test_promtool_check_rules() -> None:
    r = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout, r.stdout


def test_promtool_rule_unit_tests() -> None:
    """Every alert has a unit test in rules.test.yml (firing and, where it matters, not firing)."""
    tests = yaml.safe_load((DEPLOY / "prometheus" / "rules.test.yml").read_text())
    tested = {t["alertname"] for case in tests["tests"] for t in case.get("alert_rule_test", [])}
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}
    assert alerts - tested == set(), "alerts without a promtool unit test"
    r = subprocess.run([_promtool(), "test", "rules", "rules.test.yml"], cwd=RULES.parent,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# --------------------------------------------------------------------------- live Prometheus


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.load(resp)


class PromAPI:
    def __init__(self, base: str) -> None:
        self.base = base

    def query(self, expr: str) -> dict[str, Any]:
        """Returns the API's ``data``; fails on an error status (a PromQL error)."""
        url = f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            body = _get_json(url)
        except urllib.error.HTTPError as e:
            body = json.load(e)
        assert body.get("status") == "success", f"{expr}: {body}"
        return body["data"]

    def result(self, expr: str) -> list[dict[str, Any]]:
        return self.query(expr)["result"]

    def alerts(self) -> list[dict[str, Any]]:
        return _get_json(f"{self.base}/api/v1/alerts")["data"]["alerts"]


# Thresholds lowered so that these alerts fire on an idle relay with a fresh certificate.
LOWERED = {
    "DerpFileDescriptorsNearLimit": ("> 0.8", "> 0"),
    "DerpCPUSaturated": ("> 0.9", ">= 0"),
    "DerpTLSCertificateExpiring": ("< 14 * 86400", "< 400 * 86400"),
    "DerpTLSPinnedCertificateExpiring": ("< 30 * 86400", "< 400 * 86400"),
}


def _short_rules(dest: Path) -> Path:
    """rules.yml with every ``for:`` set to 1s, so alerts fire within a test, and the
    ``LOWERED`` thresholds."""
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "1s"
            if rule.get("alert") in LOWERED:
                old, new = LOWERED[rule["alert"]]
                assert old in rule["expr"], (rule["alert"], rule["expr"])
                rule["expr"] = rule["expr"].replace(old, new)
    dest.write_text(yaml.safe_dump(doc, sort_keys=False))
    return dest


def _panel_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def _grafana_to_promql(expr: str) -> str:
    """Substitutes the dashboard variables the way Grafana would for 'All' relays and a
    1 s scrape interval ($__rate_interval = 4 x scrape interval at least)."""
    return expr.replace("$__rate_interval", "10s").replace("$instance", ".*")


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b((?:derp|stun|process|derpd_coordinator)_[a-z_]+)", expr))


def _start_relay(tmp_path: Path, processes: Any, name: str = "relay", *extra: str) -> dict[str, Any]:
    """A relay (TLS, self-signed for 127.0.0.1, in-process STUN, dedicated metrics listener)."""
    relay = processes([derpd_bin(), "serve", "-a", "127.0.0.1:0", "--http-port", "-1", "--stun-port", "0",
                       "--certmode", "manual", "--hostname", "127.0.0.1", "--certdir", str(tmp_path / f"{name}-certs"),
                       "-c", str(tmp_path / f"{name}.key"), "--metrics-addr", "127.0.0.1:0", *extra], name=name)
    node = json.loads(relay.expect(r"(?m)^(\{.*\"CertName\".*\})$", timeout=90).group(1))
    stun_port = int(relay.expect(r"STUN on 127\.0\.0\.1:(\d+)", timeout=90).group(1))
    metrics_port = int(relay.expect(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", timeout=90).group(1))
    return {"relay": relay, "node": node, "derp_url": f"https://127.0.0.1:{node['DERPPort']}/derp",
            "pin": node["CertName"], "stun": f"127.0.0.1:{stun_port}", "metrics": f"127.0.0.1:{metrics_port}"}


def _start_coordinator(tmp_path: Path, processes: Any, relay: dict[str, Any]) -> tuple[Any, str]:
    """A coordinator probing ``relay`` every second; returns it and its address."""
    node = relay["node"]
    stun_port = int(relay["stun"].rsplit(":", 1)[1])
    (tmp_path / "coordinator.toml").write_text(f"""
[coordinator]
probe_interval = 1
probe_timeout = 0.8
[[regions]]
id = 900
code = "ci"
name = "CI region"
[[regions.nodes]]
name = "900a"
hostname = "127.0.0.1"
ipv4 = "127.0.0.1"
derp_port = {node["DERPPort"]}
stun_port = {stun_port}
cert_name = "{node["CertName"]}"
""")
    coordinator = processes([derpd_bin(), "coordinator", "--config", str(tmp_path / "coordinator.toml"),
                             "-a", "127.0.0.1:0", "--state-dir", str(tmp_path / "state")], name="coordinator")
    map_url = coordinator.expect(r"map at (http://127\.0\.0\.1:\d+)/derpmap/default").group(1)
    return coordinator, map_url.removeprefix("http://")


@pytest.fixture
def region(tmp_path: Path, processes: Any) -> dict[str, Any]:
    """A relay (TLS, self-signed for 127.0.0.1, in-process STUN, dedicated metrics listener)
    and a coordinator probing it every second."""
    relay = _start_relay(tmp_path, processes)
    coordinator, map_addr = _start_coordinator(tmp_path, processes, relay)
    return {**relay, "coordinator": coordinator, "map": map_addr}


def _traffic(region: dict[str, Any]) -> None:
    """Relayed packets, STUN answers, an ignored datagram and a failed TLS handshake."""
    r = subprocess.run([derpd_bin(), "check", region["derp_url"], "--cert-pin", region["pin"], "-n", "50"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([derpd_bin("stund"), "check", region["stun"]], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    host, port = region["stun"].rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"not a STUN message, but long enough to be looked at", (host, int(port)))
    dhost, dport = urllib.parse.urlsplit(region["derp_url"]).netloc.rsplit(":", 1)
    with socket.create_connection((dhost, int(dport)), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # plain HTTP on the TLS port
        s.settimeout(5)
        try:
            s.recv(100)
        except OSError:
            pass


def _start_prometheus(tmp_path: Path, processes: Any, jobs: dict[str, str]) -> tuple[PromAPI, Any]:
    """A real Prometheus scraping ``jobs`` (job name -> host:port) every second, with the
    rules of ``_short_rules``."""
    prometheus = require_tool("prometheus", "the Debian package `prometheus`")
    rules = _short_rules(tmp_path / "rules.yml")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}
                           for job, target in jobs.items()],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    r = subprocess.run([_promtool(), "check", "config", str(tmp_path / "prometheus.yml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    port = free_port()
    prom = processes([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                      f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}",
                      "--web.enable-lifecycle"], name="prometheus")
    api = PromAPI(f"http://127.0.0.1:{port}")
    poll(lambda: _get_json(f"{api.base}/api/v1/status/runtimeinfo"), 60,
         f"Prometheus to answer its API\n{prom.output()[-2000:]}")
    return api, prom


def _alerts(api: PromAPI, name: str, state: str | None = "firing") -> list[dict[str, Any]]:
    return [a for a in api.alerts() if a["labels"]["alertname"] == name and state in (None, a["state"])]


def test_live_prometheus_scrapes_relay_panels_and_relay_down_alert(
        tmp_path: Path, processes: Any, region: dict[str, Any]) -> None:
    api, prom = _start_prometheus(tmp_path, processes, {"derpd": region["metrics"],
                                                        "derpd-coordinator": region["map"]})
    _traffic(region)

    # The expected series exist (and both targets are up).
    for series in EXPECTED_SERIES:
        poll(lambda: api.result(series), 60, f"series {series} in Prometheus\n{prom.output()[-2000:]}")
    assert all(s["value"][1] == "1" for s in api.result('up{job=~"derpd|derpd-coordinator"}'))
    poll(lambda: [s for s in api.result("derp_packets_received_total") if float(s["value"][1]) >= 100] or None,
         30, "the 2 x 50 relayed packets in derp_packets_received_total")
    poll(lambda: api.result('derpd_coordinator_probe_success{node="900a"} == 1'), 60,
         f"a successful probe of node 900a\n{region['coordinator'].output()[-2000:]}")

    # Every Grafana panel's PromQL evaluates and returns data.
    for title, expr in _panel_queries():
        promql = _grafana_to_promql(expr)
        poll(lambda: api.result(promql), 30, f"data for panel {title!r}: {promql}")

    # The per-process alerts evaluate for the one process, worker "0" (thresholds lowered).
    fds = poll(lambda: _alerts(api, "DerpFileDescriptorsNearLimit") or None, 60, "DerpFileDescriptorsNearLimit")
    assert [a["labels"].get("worker") for a in fds] == ["0"]

    # Stop the relay: DerpRelayDown fires, and the coordinator marks the node down.
    assert not [a for a in api.alerts() if a["labels"]["alertname"] == "DerpRelayDown"]
    region["relay"].stop()

    def firing(name: str) -> list[dict[str, Any]] | None:
        return [a for a in api.alerts() if a["labels"]["alertname"] == name and a["state"] == "firing"] or None

    down = poll(lambda: firing("DerpRelayDown"), 60, "DerpRelayDown to fire")
    assert down[0]["labels"]["job"] == "derpd"
    assert down[0]["labels"]["instance"] == region["metrics"]
    assert down[0]["labels"]["severity"] == "critical"
    probe = poll(lambda: firing("DerpNodeProbeFailing"), 60, "DerpNodeProbeFailing to fire")
    assert probe[0]["labels"]["node"] == "900a"


def test_live_prometheus_with_workers_evaluates_per_process_alerts_and_panels(
        tmp_path: Path, processes: Any) -> None:
    """A ``--workers 2`` relay with a pinned self-signed certificate: the descriptor and CPU
    alerts fire for each of its three processes, every process panel has data, the pinned
    certificate gets DerpTLSPinnedCertificateExpiring and not the renewal advice, and the links
    between the workers are no mesh peers (no DerpMeshPeerMissing)."""
    relay = _start_relay(tmp_path, processes, "workers", "--workers", "2")
    api, prom = _start_prometheus(tmp_path, processes, {"derpd": relay["metrics"]})
    _traffic(relay)
    processes_ = {"0", "1", "parent"}
    for name in ("DerpFileDescriptorsNearLimit", "DerpCPUSaturated"):
        fired = poll(lambda: (lambda a: a if {x["labels"].get("worker") for x in a} == processes_ else None)(
            _alerts(api, name)), 90, f"{name} for workers 0, 1 and parent\n{prom.output()[-2000:]}")
        assert {a["labels"]["instance"] for a in fired} == {relay["metrics"]}
    pinned = poll(lambda: _alerts(api, "DerpTLSPinnedCertificateExpiring") or None, 60,
                  "DerpTLSPinnedCertificateExpiring for the self-signed certificate")
    assert pinned[0]["labels"]["instance"] == relay["metrics"]
    assert "CertName" in pinned[0]["annotations"]["description"]
    assert api.result("derp_tls_cert_pinned == 1")
    assert not _alerts(api, "DerpTLSCertificateExpiring", None)  # not pending, not firing
    assert not _alerts(api, "DerpMeshPeerMissing", None)
    assert [s["value"][1] for s in api.result("derp_mesh_peers_configured")] == ["0"]
    build = api.result("derpd_build_info")
    assert len(build) == 1 and build[0]["metric"]["data_plane"] in ("compiled", "pure")
    for title, expr in _panel_queries():
        names = _metric_names(expr)
        if names and all(n.startswith("process_") for n in names):
            data = poll(lambda: api.result(_grafana_to_promql(expr)), 30, f"data for panel {title!r}: {expr}")
            if "by (instance)" in expr:
                assert len(data) == 1, (title, data)
            if "worker" in expr:
                assert {d["metric"]["worker"] for d in data} == processes_, (title, data)


def _body(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def test_promtool_check_metrics_on_every_server(tmp_path: Path, processes: Any) -> None:
    """What a relay, a ``--workers 2`` relay, stund and the coordinator expose passes
    ``promtool check metrics`` (no gauge named ``_total``, ...), has no ``*_created`` series,
    and carries ``derpd_build_info`` (the relays and the coordinator)."""
    promtool = _promtool()
    relay = _start_relay(tmp_path, processes)
    workers = _start_relay(tmp_path, processes, "workers", "--workers", "2")
    stund = processes([derpd_bin("stund"), "-v", "serve", "-a", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0"],
                      name="stund")
    stund_metrics = stund.expect(r"metrics on (http://127\.0\.0\.1:\d+/metrics)").group(1)
    coordinator, map_addr = _start_coordinator(tmp_path, processes, relay)
    _traffic(relay)
    sources = {
        "relay": f"http://{relay['metrics']}/metrics",
        "workers": f"http://{workers['metrics']}/metrics",
        "stund": stund_metrics,
        "coordinator": f"http://{map_addr}/metrics",
    }
    # The coordinator has probed the relay (its per-node series and histograms exist), and the
    # --workers parent has merged its workers' metrics once.
    poll(lambda: "derpd_coordinator_probe_latency_seconds_bucket" in _body(sources["coordinator"]), 60,
         "the coordinator's first probe")
    poll(lambda: "derp_accepts_total" in _body(sources["workers"]), 60, "the workers' merged metrics")
    for name, url in sources.items():
        text = _body(url)
        r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), f"{name}: {r.stdout}{r.stderr}"
        assert not re.findall(r"(?m)^\w+_created\b", text), f"{name} exposes *_created series"
        if name != "stund":
            assert re.search(r'(?m)^derpd_build_info\{.*data_plane="(compiled|pure)".*\} 1\.0$', text), name
