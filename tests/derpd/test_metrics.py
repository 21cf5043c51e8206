"""What a relay's and the coordinator's /metrics say before any traffic: counters with known
label values at zero, ``derpd_build_info``, ``derp_tls_cert_pinned``, a ``worker`` label on the
per-process series (as with ``--workers``), and no ``*_created`` series."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import trio
import trustme
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from derpd import __version__, accel
from derpd import metrics as dm

from .conftest import start_relay

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def parse(text: bytes) -> tuple[Samples, dict[str, str]]:
    """Sample name -> (sorted labels) -> value, and family name -> type."""
    samples: Samples = {}
    types = {}
    for fam in text_string_to_metric_families(text.decode()):
        types[fam.name] = fam.type
        for s in fam.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples, types


async def test_counters_with_known_labels_start_at_zero(relay):
    text = relay.server.metrics_text()
    samples, _ = parse(text)
    for name, label, values in (
        ("derp_http_requests_total", "route", dm.HTTP_ROUTES),
        ("derp_frames_received_total", "type", dm.FRAME_TYPES),
        ("derp_admission_refused_total", "reason", dm.ADMISSION_REASONS),
        ("derp_handshake_failures_total", "reason", dm.HANDSHAKE_REASONS),
        ("derp_connection_errors_total", "reason", dm.CONNECTION_ERRORS),
    ):
        got = {dict(labels)[label]: value for labels, value in samples.get(name, {}).items()}
        assert got == dict.fromkeys(values, 0.0), name
    for line in (b'derp_handshake_failures_total{reason="tls"} 0.0', b'derp_http_requests_total{route="derp"} 0.0',
                 b'derp_admission_refused_total{reason="verify_denied"} 0.0'):
        assert line in text


def test_label_vocabularies_match_the_code():
    """The routes are http_front's table (plus /debug and "home"); every reason an admission
    check returns is pre-created; the frame types are frame types."""
    from derpd.protocol.frames import FrameType
    from derpd.relay.http_front import _ROUTE_LABELS

    assert set(dm.HTTP_ROUTES) == set(_ROUTE_LABELS.values()) | {"debug", "home"}
    root = Path(__file__).resolve().parents[2] / "derpd"
    returned = set()
    for module in ("admission.py", "localapi.py"):
        returned |= set(re.findall(r'False, "(\w+)"', (root / module).read_text()))
    assert returned and returned <= set(dm.ADMISSION_REASONS)
    assert set(dm.FRAME_TYPES) <= {t.name.lower() for t in FrameType}


async def test_build_info_names_the_version_and_the_data_plane(relay):
    samples, types = parse(relay.server.metrics_text())
    plane = "compiled" if accel.dataplane is not None else "pure"
    assert types["derpd_build_info"] == "gauge"
    assert samples["derpd_build_info"] == {(("data_plane", plane), ("version", __version__)): 1.0}
    # DERPD_PURE=1 forces the pure-Python path, and the metric says so.
    out = subprocess.run([sys.executable, "-c", "from derpd.metrics import data_plane; print(data_plane())"],
                         env={**os.environ, "DERPD_PURE": "1"}, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "pure", out.stderr


async def test_per_process_series_carry_worker_0_and_no_gauge_is_named_total(relay):
    samples, types = parse(relay.server.metrics_text())
    per_process = {name: series for name, series in samples.items() if name.startswith(dm.PER_PROCESS_PREFIXES)}
    assert {"process_open_fds", "process_max_fds", "process_cpu_seconds_total"} <= set(per_process)
    for name, series in per_process.items():
        assert all(dict(labels).get("worker") == "0" for labels in series), name
    for name, series in samples.items():
        if not name.startswith(dm.PER_PROCESS_PREFIXES):
            assert all("worker" not in dict(labels) for labels in series), name
    assert not [n for n, t in types.items() if t == "gauge" and n.endswith("_total")]
    assert "derp_clients" in samples
    assert not [n for n in samples if n.endswith("_created")]


async def test_cert_pinned_follows_the_derp_map_pin(nursery, tmp_path, monkeypatch):
    """1 for a generated self-signed certificate and for one no system root trusts (the map
    pins both), 0 for one that chains to a trusted root; no series without TLS."""
    from derpd.node import install_cert_pin_check

    def pinned(relay) -> dict:
        return parse(relay.server.metrics_text())[0].get("derp_tls_cert_pinned")

    with trio.fail_after(30):
        plain = await start_relay(nursery)
        assert pinned(plain) is None
        generated = await start_relay(nursery, certmode="manual", certdir=tmp_path / "ip", hostname="127.0.0.1")
        assert pinned(generated) == {(): 1.0}

        ca = trustme.CA()
        leaf = ca.issue_cert("derp.example.test")
        certdir = tmp_path / "ca"
        certdir.mkdir()
        leaf.private_key_pem.write_to_path(certdir / "derp.example.test.key")
        leaf.cert_chain_pems[0].write_to_path(certdir / "derp.example.test.crt")
        signed = await start_relay(nursery, certmode="manual", certdir=certdir, hostname="derp.example.test")
        install_cert_pin_check(signed.server.settings, signed.server)
        assert pinned(signed) == {(): 1.0}  # the system roots do not know this CA: the map pins it
        # Trust the CA as a system root, and renew (the check is cached per certificate).
        ca.cert_pem.write_to_path(tmp_path / "roots.pem")
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "roots.pem"))
        leaf = ca.issue_cert("derp.example.test")
        leaf.private_key_pem.write_to_path(certdir / "derp.example.test.key")
        leaf.cert_chain_pems[0].write_to_path(certdir / "derp.example.test.crt")
        assert signed.server.reload_tls()
        assert pinned(signed) == {(): 0.0}


def test_coordinator_metrics_have_no_created_series_and_no_stun():
    from derpd.coordinator.metrics import CoordinatorMetrics

    metrics = CoordinatorMetrics()
    metrics.registrations.labels("created").inc()
    text = generate_latest(metrics.registry)
    samples, _ = parse(text)
    assert not [n for n in samples if n.endswith("_created")]
    assert not [n for n in samples if n.startswith("stun_")]
    assert "derpd_build_info" in samples and "process_open_fds" in samples
    assert samples["derpd_coordinator_map_requests_total"] == {
        (("format", f), ("status", s)): 0.0 for f in ("json", "yaml") for s in ("200", "304")}


async def test_labelling_leaves_the_default_registry_untouched(relay):
    """The coordinator (in the same process, as under ``derpd dev``) serves the same
    prometheus-client collectors without a worker label, however often the relay is scraped."""
    from prometheus_client import REGISTRY

    relay.server.process_metrics.worker = "7"
    relay.server.metrics_text()
    relay.server.metrics_text()
    samples, _ = parse(generate_latest(REGISTRY))
    assert samples["python_info"] and all("worker" not in dict(labels) for labels in samples["python_info"])
