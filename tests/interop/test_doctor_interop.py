"""``derpd doctor`` against Tailscale's own derper (the pinned tailscale.com/cmd/derper) with a
self-signed IP certificate, STUN and its plain-HTTP port: every check derper can pass passes,
so the doctor's idea of a healthy relay is the real one (meta-certificate, WebSocket,
/generate_204's challenge, the Date header, admission of a fresh key); and ``derpd check
--throughput`` through derper, with derper's counters read from its /debug/varz."""

from __future__ import annotations

import functools
import hashlib
import socket
import ssl

import pytest
import trio

from derpd.check import run_throughput
from derpd.doctor import OK, SKIP, DoctorOptions, run_doctor
from derpd.keys import NodePrivate

from tests.derpd.test_derper_endpoints import get

from .interop_harness import clean_env
from .test_mesh_interop import BIND_TRIES, unused_tcp_port

pytestmark = pytest.mark.interop


def unused_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def start_derper(go_tools, nursery: trio.Nursery, tmp_path) -> tuple[int, int, int]:  # noqa: ANN001
    """derper with TLS (a self-signed certificate for 127.0.0.1), STUN and a plain-HTTP port;
    returns (TLS port, HTTP port, STUN port) once /generate_204 answers."""
    for attempt in range(BIND_TRIES):
        port, http_port, stun_port = unused_tcp_port(), unused_tcp_port(), unused_udp_port()
        argv = [go_tools.derper, "-a", f"127.0.0.1:{port}", "-c", str(tmp_path / "derper.key"),
                "-certmode", "manual", "-certdir", str(tmp_path / "certs"), "-hostname", "127.0.0.1",
                "-http-port", str(http_port), "-stun-port", str(stun_port)]
        with (tmp_path / f"derper-{attempt}.log").open("wb") as log:
            proc = await nursery.start(functools.partial(trio.run_process, argv, stdout=log, stderr=log,
                                                         env=clean_env(), check=False))
        while proc.poll() is None:
            try:
                if (await get(http_port, "/generate_204"))[0] == 204:
                    return port, http_port, stun_port
            except OSError:
                pass
            await trio.sleep(0.05)
    raise AssertionError("derper did not start: " + (tmp_path / "derper-0.log").read_text()[-2000:])


async def test_the_doctor_passes_tailscales_derper(go_tools, nursery, tmp_path):
    with trio.fail_after(60):
        port, http_port, stun_port = await start_derper(go_tools, nursery, tmp_path)
        der = ssl.PEM_cert_to_DER_cert((tmp_path / "certs" / "127.0.0.1.crt").read_text())
        pin = "sha256-raw:" + hashlib.sha256(der).hexdigest()
        findings = await run_doctor(DoctorOptions(f"https://127.0.0.1:{port}/derp", timeout=5, cert_pin=pin,
                                                  http_port=http_port, stun_port=stun_port,
                                                  key=NodePrivate.generate()))
    print("\n".join(f.line() for f in findings))  # for `pytest -rP`
    status = {f.check: f.status for f in findings}
    assert status.pop("mesh") == SKIP
    assert set(status.values()) == {OK}, status


async def test_throughput_through_tailscales_derper(go_tools, nursery, tmp_path):
    with trio.fail_after(60):
        port, _, _ = await start_derper(go_tools, nursery, tmp_path)
        der = ssl.PEM_cert_to_DER_cert((tmp_path / "certs" / "127.0.0.1.crt").read_text())
        pin = "sha256-raw:" + hashlib.sha256(der).hexdigest()
        url = f"https://127.0.0.1:{port}/derp"
        run = await run_throughput(url, 0.5, cert_pin=pin)
    assert run.received > 0 and run.rtts and run.corrupted == 0
    # derper has no /metrics: its counters come from /debug/varz, under the same names as ours
    where, counters = run.counters[url]
    assert where.endswith("/debug/varz")
    assert counters["received"] >= run.sent and counters["sent"] >= run.received
