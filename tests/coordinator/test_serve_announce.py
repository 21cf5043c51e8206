"""`derpd serve --coordinator A,B` as a real process: it registers with both replicas, and a
replaced certificate shows its new pin in both maps within one second of SIGHUP.  A CA-signed
certificate is not pinned."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import trio
import trustme

from derpd.coordinator.announce import certificate_is_trusted
from derpd.coordinator.server import RunningCoordinator, serve_coordinator
from derpd.relay.tls import cert_file_base, generate_self_signed_ip_cert
from tests.derpd.test_cli import start_serve

from .conftest import TOKEN, FakeProbe, make_config


def pin_in_map(coord: RunningCoordinator, name: str) -> str | None:
    for node in coord.state.published.dmap.nodes():
        if node.name == name:
            return node.cert_name
    return None


async def wait_for_pin(coords: list[RunningCoordinator], name: str) -> str:
    """Waits until every coordinator publishes the node with one and the same pin."""
    done = trio.Event()

    def check() -> None:
        pins = {pin_in_map(c, name) for c in coords}
        if len(pins) == 1 and None not in pins:
            done.set()

    for c in coords:
        c.state.listeners.append(check)
    check()
    await done.wait()
    pin = pin_in_map(coords[0], name)
    assert pin is not None
    return pin


async def test_new_certificate_pin_reaches_both_replicas_within_a_second(nursery: trio.Nursery,
                                                                         tmp_path: Path) -> None:
    coords = []
    for _ in range(2):
        coords.append(await nursery.start(lambda task_status: serve_coordinator(
            make_config(), listen="127.0.0.1:0", probe=FakeProbe(), probing=False, task_status=task_status)))
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    certdir = tmp_path / "certs"
    with trio.fail_after(40):
        proc, _ = await start_serve(
            "-c", str(tmp_path / "k"), "-a", "127.0.0.1:0", "--certmode", "manual", "--certdir", str(certdir),
            "--hostname", "127.0.0.1", "--http-port", "-1", "--stun-port", "-1",
            "--coordinator", f"{coords[0].url},{coords[1].url}", "--coordinator-token-file", str(token_file),
            "--region-id", "901", "--node-name", "901x", nursery=nursery)
        old_pin = await wait_for_pin(coords, "901x")
        assert old_pin.startswith("sha256-raw:")

        base = cert_file_base("127.0.0.1")
        generate_self_signed_ip_cert("127.0.0.1", certdir / f"{base}.crt", certdir / f"{base}.key")
        proc.send_signal(signal.SIGHUP)
        with trio.fail_after(1.0):  # announced at once, not at the next heartbeat (15 s)
            new_pin = await _changed(coords, old_pin)
        assert new_pin != old_pin and new_pin.startswith("sha256-raw:")
        proc.send_signal(signal.SIGTERM)
        assert await proc.wait() == 0


async def _changed(coords: list[RunningCoordinator], old_pin: str) -> str:
    changed = trio.Event()

    def check() -> None:
        pins = {pin_in_map(c, "901x") for c in coords}
        if old_pin not in pins and None not in pins and len(pins) == 1:
            changed.set()

    for c in coords:
        c.state.listeners.append(check)
    check()
    await changed.wait()
    pin = pin_in_map(coords[0], "901x")
    assert pin is not None
    return pin


def test_ca_signed_certificate_needs_no_pin(tmp_path: Path) -> None:
    ca = trustme.CA()
    roots = tmp_path / "roots.pem"
    ca.cert_pem.write_to_path(str(roots))
    for name in ("127.0.0.1", "derp.example.net"):
        leaf = ca.issue_cert(name)
        chain, key = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
        chain.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        assert certificate_is_trusted(chain, key, name, cafile=str(roots))
        assert not certificate_is_trusted(chain, key, "other.example.net", cafile=str(roots))
        assert not certificate_is_trusted(chain, key, name)  # the test CA is not a system root
    self_signed, key = tmp_path / "self.crt", tmp_path / "self.key"
    generate_self_signed_ip_cert("127.0.0.1", self_signed, key)
    assert not certificate_is_trusted(self_signed, key, "127.0.0.1", cafile=str(roots))
    assert not certificate_is_trusted(tmp_path / "missing.crt", key, "127.0.0.1")


async def test_certificate_file_change_is_announced_at_once(nursery: trio.Nursery, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The relay notices new certificate files by itself (no SIGHUP): the same hook announces
    the new pin at once, not at the next heartbeat."""
    import derpd.relay.listener as listener
    from derpd.coordinator.announce import Announcer
    from derpd.keys import NodePrivate
    from derpd.settings import RelaySettings

    monkeypatch.setattr(listener, "CERT_WATCH_INTERVAL", 0.2)
    certdir = tmp_path / "certs"
    coord = await nursery.start(lambda task_status: serve_coordinator(
        make_config(), listen="127.0.0.1:0", probe=FakeProbe(), probing=False, task_status=task_status))
    relay = await nursery.start(listener.serve_relay, RelaySettings(
        addr="127.0.0.1:0", private_key=NodePrivate.generate(), certmode="manual", certdir=certdir,
        hostname="127.0.0.1"))

    def entry() -> dict[str, object]:
        assert relay.server.cert is not None
        return {"Name": "901f", "RegionID": 901, "HostName": "127.0.0.1", "IPv4": "127.0.0.1",
                "DERPPort": relay.port, "STUNPort": -1, "CertName": relay.server.cert.pin,
                "PublicKey": str(relay.public_key)}

    announcer = Announcer([coord.url], TOKEN, entry, interval=60)
    relay.server.cert_hooks.append(announcer.notify)
    with trio.fail_after(20):
        nursery.start_soon(announcer.run)
        old_pin = await wait_for_pin([coord], "901f")
        base = cert_file_base("127.0.0.1")
        generate_self_signed_ip_cert("127.0.0.1", certdir / f"{base}.crt", certdir / f"{base}.key")
        with trio.fail_after(0.2 + 1.0):  # one watch interval, then at once (the heartbeat is 60 s)
            changed = trio.Event()

            def check() -> None:
                if pin_in_map(coord, "901f") not in (None, old_pin):
                    changed.set()

            coord.state.listeners.append(check)
            await changed.wait()
    assert pin_in_map(coord, "901f") == relay.server.cert.pin
    nursery.cancel_scope.cancel()
