"""One HTTP/1.1 connection: hypercorn's protocol code on a trio stream, with a lean I/O layer.

Hypercorn's own trio `TCPServer` spends most of a cached read's time around the protocol rather
than in it (NOTES.md: about 0.6 ms of CPU per request): the keep-alive timer is a task started
and cancelled twice per request, and each of the three or four pieces of a response is written
under a lock and a shielded cancel scope of its own. Here the timer is a deadline on the read
that the protocol's idle/busy events move, and a response is buffered and leaves in one send
when the protocol has finished it. The protocol itself (`ProtocolWrapper`, h11) and the app
(Quart-trio) are hypercorn's and Quart's, unchanged.

It also ends the connection as soon as the client is gone, so the slot of the cap comes back:
- in hypercorn 0.18.0, requests pipelined behind one in progress park the read loop on h11's
  PAUSED state, and when the client then hangs up the failed send never wakes it, so the
  connection waited forever; a failed send here cancels the read;
- a client that hangs up while its request waits (on a slow KMS) cancels that request; the KMS
  load goes on in the cache's nursery. TCP cannot tell this from a client that only half-closed,
  which therefore gets a close instead of a late answer.
"""

from __future__ import annotations

import math
import h11
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ConnectionState
from hypercorn.utils import parse_socket_addr

MAX_RECEIVE = 2**16
#: A response that cannot be written in this long (a client that stopped reading) ends the connection.
SEND_TIMEOUT = 10.0
#: Responses are flushed when done; a larger buffer is flushed early.
FLUSH_SIZE = 2**16
_INFORMATIONAL = b"HTTP/1.1 1"


class _Http11Only(H11Protocol):
    """Hypercorn's HTTP/1.1 protocol without its ways out of HTTP/1.1, and with 4xx for bad framing.

    SPEC §3 is HTTP/1.1: an `Upgrade: h2c` or an HTTP/2 preface would move the connection to
    HTTP/2, where one connection carries many requests (MaxConn no longer bounds them) and the
    idle deadline is never re-armed. Here they are plain HTTP/1.1 requests that the checks refuse.
    h11 hints 501 for a Transfer-Encoding it does not implement; a client's malformed request is a
    client error, and the agent answers no 5xx to one.
    """

    async def _check_protocol(self, event: h11.Request) -> None:
        return None

    async def _send_error_response(self, status_code: int) -> None:
        await super()._send_error_response(400 if status_code >= 500 else status_code)


class Connection:
    """Serves one accepted stream until the client leaves, idles out, or the server stops."""

    def __init__(
        self,
        app: AppWrapper,
        config: HypercornConfig,
        context: WorkerContext,
        state: ConnectionState,
        stream: trio.SocketStream,
    ) -> None:
        self._app = app
        self._config = config
        self._context = context
        self._state = state
        self._stream = stream
        self._buffer: list[bytes] = []
        self._send_lock = trio.Lock()
        self._reading = trio.CancelScope(deadline=trio.current_time() + config.keep_alive_timeout)
        self._exchanges = trio.CancelScope()
        self.idle = True
        self._protocol: _Http11Only

    async def run(self) -> None:
        socket = self._stream.socket
        try:
            client = parse_socket_addr(socket.family, socket.getpeername())
            server = parse_socket_addr(socket.family, socket.getsockname())
            # A client that hangs up mid-request cancels it, so its slot of the cap comes back at
            # once rather than when a slow KMS answers (the load itself goes on for the cache).
            with self._exchanges:
                async with TaskGroup() as task_group:
                    self._protocol = _Http11Only(
                        self._app,
                        self._config,
                        self._context,
                        task_group,
                        self._state,
                        False,
                        client,
                        server,
                        self._protocol_send,
                    )
                    await self._protocol.initiate()
                    await self._read()
        except OSError:
            pass
        finally:
            await trio.aclose_forcefully(self._stream)

    def close_if_idle(self) -> None:
        """Server shutdown: an idle keep-alive connection ends now; a busy one after its response."""
        if self.idle:
            self._reading.cancel()

    async def _read(self) -> None:
        with self._reading:
            while True:
                try:
                    data = await self._stream.receive_some(MAX_RECEIVE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                if not data:
                    if not self.idle:
                        self._exchanges.cancel()
                    break
                await self._protocol.handle(RawData(data))
        await self._protocol.handle(Closed())

    async def _protocol_send(self, event: Event) -> None:
        if isinstance(event, RawData):
            if event.data:
                self._buffer.append(event.data)
                if event.data.startswith(_INFORMATIONAL) or sum(map(len, self._buffer)) >= FLUSH_SIZE:
                    await self._flush()  # a 100 Continue must go out before the body comes in
        elif isinstance(event, Updated):
            await self._flush()
            self.idle = event.idle
            self._reading.deadline = trio.current_time() + self._config.keep_alive_timeout if event.idle else math.inf
        elif isinstance(event, Closed):
            self._reading.cancel()
            await self._flush(eof=True)  # the client reads to the end, then sees the close

    async def _flush(self, *, eof: bool = False) -> None:
        """Sends what is buffered (and with `eof`, half-closes), one task at a time."""
        if not self._buffer and not eof:
            return
        data = self._buffer[0] if len(self._buffer) == 1 else b"".join(self._buffer)
        self._buffer.clear()
        # Shielded: a response is flushed whole even from a task being cancelled (the server is
        # stopping, a request body is being discarded). Bounded: a client that stopped reading
        # cannot hold the task forever.
        with trio.CancelScope(shield=True, deadline=trio.current_time() + SEND_TIMEOUT) as sending:
            async with self._send_lock:
                try:
                    if data:
                        await self._stream.send_all(data)
                    if eof:
                        await self._stream.send_eof()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._reading.cancel()
        if sending.cancelled_caught:
            self._reading.cancel()
