"""``RawSocketIO``: the relay's reads and writes on a plain TCP ``trio.SocketStream``, with
fewer system calls and fewer trips through trio's scheduler than the stream's own methods.

``SocketStream.receive_some`` first tries ``recv`` (which fails with EAGAIN whenever the
previous read emptied the socket), then waits in epoll, reads, and yields once more before
returning; ``send_all`` also yields after a write that went through at once.  On a relay
with paced traffic nearly every wakeup carries one or two packets, so those extra calls and
yields are a large share of the cost of a packet.  Here:

* a read that did not fill the caller's buffer emptied the socket, so the next read waits in
  epoll first and skips the EAGAIN attempt; after a full read it yields once (fairness)
  and reads again;
* a write that the kernel takes whole returns without yielding; only a partial write waits
  for the socket to become writable.  ``send_now`` is that first, non-waiting write on its
  own, so the relay's writer arms its write deadline only when it has to wait.

Semantics kept: EOF is ``b""``; a reset or a write to a closed peer raises
``trio.BrokenResourceError``; a closed stream raises ``trio.ClosedResourceError``; waits
are cancellable.  Anything but a plain ``trio.SocketStream`` (TLS, WebSocket) keeps its own
methods (:func:`raw_io_for` returns None).
"""

from __future__ import annotations

import os

import trio

__all__ = ["RawSocketIO", "raw_io_for"]


class RawSocketIO:
    __slots__ = ("_sock", "_drained")

    def __init__(self, stream: trio.SocketStream) -> None:
        self._sock = stream.socket
        self._drained = False

    def _fd(self) -> int:
        fd = self._sock.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the stream was closed")
        return fd

    async def receive_some(self, max_bytes: int) -> bytes:
        if self._drained:
            await trio.lowlevel.wait_readable(self._sock)
        else:
            await trio.lowlevel.checkpoint()
        while True:
            try:
                data = os.read(self._fd(), max_bytes)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._sock)
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(exc) from exc
            self._drained = len(data) < max_bytes
            return data

    def mark_drained(self) -> None:
        """The next read waits for the socket first (no read attempt that would fail with
        EAGAIN, no extra yield): for a read of what the peer sends only after our write."""
        self._drained = True

    def send_now(self, data: bytes) -> int:
        """Write what the kernel takes now, without waiting: the number of bytes written.

        Raises:
            trio.BrokenResourceError: the peer is gone.
            trio.ClosedResourceError: the stream was closed.
        """
        try:
            return os.write(self._fd(), data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise trio.BrokenResourceError(exc) from exc

    async def send_all(self, data: bytes) -> None:
        n = self.send_now(data)
        if n == len(data):
            return
        view = memoryview(data)[n:]
        while view:
            await trio.lowlevel.wait_writable(self._sock)
            view = view[self.send_now(view) :]


def raw_io_for(stream: trio.abc.Stream) -> RawSocketIO | None:
    """A ``RawSocketIO`` for a plain ``trio.SocketStream``; None for anything else."""
    if type(stream) is trio.SocketStream:
        return RawSocketIO(stream)
    return None
