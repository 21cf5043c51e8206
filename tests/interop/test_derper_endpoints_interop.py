"""derpd's /debug/ and /bootstrap-dns side by side with Tailscale's own derper (the pinned
tailscale.com/cmd/derper), given the same names: the same status codes for the same /debug
requests from loopback, and the same /bootstrap-dns answers (the JSON as derper writes it, the
same names and addresses, ``?q=`` for an unpublished name)."""

from __future__ import annotations

import functools
import json

import pytest
import trio

from derpd.bootstrapdns import BootstrapDNS
from derpd.relay.listener import serve_relay
from derpd.settings import RelaySettings

from tests.derpd.test_derper_endpoints import get

from .interop_harness import clean_env
from .test_mesh_interop import BIND_TRIES, unused_tcp_port

pytestmark = pytest.mark.interop

NAMES = "localhost"
DEBUG_REQUESTS = [("/debug/varz", ()), ("/debug/", ()), ("/debug/no-such-page", ()),
                  ("/debug/varz", ("X-Forwarded-For: 198.51.100.7",))]


async def answers(port: int) -> dict[str, object]:
    out: dict[str, object] = {}
    for path, headers in DEBUG_REQUESTS:
        status, fields, _ = await get(port, path, *headers)
        out[f"{path} {headers}"] = (status, fields.get("content-type", "").split(";")[0])
    for query in ("", "?q=localhost", "?q=elsewhere.example"):
        status, fields, body = await get(port, "/bootstrap-dns" + query)
        doc = json.loads(body)
        out[f"bootstrap {query}"] = (status, fields["content-type"], {k: sorted(v) for k, v in doc.items()},
                                     body.startswith(b'{\n\t"localhost": [\n\t\t"'))
    return out


async def start_derper(go_tools, nursery: trio.Nursery, tmp_path) -> int:  # noqa: ANN001
    key = tmp_path / "derper.key"
    for attempt in range(BIND_TRIES):
        port = unused_tcp_port()
        argv = [go_tools.derper, "-a", f"127.0.0.1:{port}", "-c", str(key), "-stun=false",
                f"-bootstrap-dns-names={NAMES}", f"-unpublished-bootstrap-dns-names={NAMES}"]
        with (tmp_path / f"derper-{attempt}.log").open("wb") as log:
            proc = await nursery.start(functools.partial(trio.run_process, argv, stdout=log, stderr=log,
                                                         env=clean_env(), check=False))
        while proc.poll() is None:  # up, and its first lookup round done (the body is no longer empty)
            try:
                if (await get(port, "/bootstrap-dns"))[2]:
                    return port
            except OSError:
                pass
            await trio.sleep(0.05)
    raise AssertionError("derper did not start: " + (tmp_path / "derper-0.log").read_text()[-2000:])


async def test_debug_and_bootstrap_dns_answer_as_derper_does(go_tools, nursery, tmp_path):
    with trio.fail_after(60):
        derper_port = await start_derper(go_tools, nursery, tmp_path)
        relay = await nursery.start(serve_relay, RelaySettings(addr="127.0.0.1:0"))
        names = BootstrapDNS([NAMES], [NAMES])
        relay.server.bootstrap_dns = names.answer
        await nursery.start(names.run)
        theirs, ours = await answers(derper_port), await answers(relay.port)
    print(json.dumps(theirs, indent=1))  # for `pytest -rP`
    assert ours == theirs
    assert theirs["/debug/varz ()"] == (200, "text/plain")
    assert theirs["/debug/no-such-page ()"][0] == 404
    assert theirs["/debug/varz ('X-Forwarded-For: 198.51.100.7',)"][0] == 403
