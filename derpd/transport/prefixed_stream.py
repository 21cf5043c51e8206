"""``PrefixedStream``: a stream whose first bytes were already read (to look for a PROXY
header) and are handed out again before anything else."""

from __future__ import annotations

import trio


class PrefixedStream(trio.abc.Stream):
    """A stream whose first bytes were already read: they are returned again first."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self.transport = stream
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            await trio.lowlevel.checkpoint()
            n = len(self._prefix) if max_bytes is None else max_bytes
            out, self._prefix = self._prefix[:n], self._prefix[n:]
            return out
        return await self.transport.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.transport.aclose()


__all__ = ["PrefixedStream"]
