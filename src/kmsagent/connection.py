"""One HTTP/1.1 connection: hypercorn's protocol code on a trio stream, with a lean I/O layer.

Hypercorn's own trio `TCPServer` spends most of a cached read's time around the protocol rather
than in it (NOTES.md: about 0.6 ms of CPU per request): the keep-alive timer is a task started
and cancelled twice per request, and each of the three or four pieces of a response is written
under a lock and a shielded cancel scope of its own. Here the timer is a deadline on the read
that the protocol's idle/busy events move, and a response is buffered and leaves in one send
when the protocol has finished it. The protocol's parser (h11), its streams and the app
(Quart-trio) are hypercorn's and Quart's; its event loop over h11 is ours (`_Http11Only`).

Memory per connection is bounded: one response rendered and unsent, at most HOLD_LIMIT bytes
read ahead of it, and what h11 keeps (one read, MAX_RECEIVE, plus an incomplete request of at
most hypercorn's `h11_max_incomplete_size`, 16 KB). In hypercorn 0.18.0 the next pipelined
request is parsed as soon as a response is rendered, before it is sent, so a client that
pipelines and never reads had every answer rendered and queued: 20 connections pipelining 1000
`GET /metrics` each took the agent from 74 to 152 MB, held until a 10 s send timeout (now 77 MB).

It also ends the connection as soon as the client is gone, so the slot of the cap comes back:
- requests pipelined behind one in progress are held unparsed, and reading goes on (up to
  HOLD_LIMIT) so that a hang-up is seen; in hypercorn the read loop parked on h11's PAUSED state
  and a failed send never woke it, so the connection waited forever;
- a client that hangs up while its request waits (on a slow KMS) cancels that request; the KMS
  load goes on in the cache's nursery. TCP cannot tell this from a client that only half-closed,
  which therefore gets a close instead of a late answer.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from http import HTTPStatus

import h11
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.events import Body, Data, EndBody, Response
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.h11 import STREAM_ID, H11Protocol
from hypercorn.trio.task_group import _handle as run_app
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ASGIReceiveEvent, ASGISendEvent, ConnectionState, Scope
from hypercorn.utils import parse_socket_addr

from kmsagent.errors import AgentError

MAX_RECEIVE = 2**16
#: Read ahead while a request is served, to see the client hang up; then reading waits.
HOLD_LIMIT = 2**16
#: A response that cannot be written in this long (a client that stopped reading) ends the connection.
SEND_TIMEOUT = 10.0
#: Responses are flushed when done; a larger buffer is flushed early.
FLUSH_SIZE = 2**16
#: SPEC §3: every status line carries its standard reason phrase.
REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
#: SPEC §4 bodies for requests h11 refuses before the app sees them, by h11's status hint.
PARSER_ERRORS = {
    400: AgentError(400, "BadRequest", "malformed HTTP request"),
    431: AgentError(431, "RequestHeaderFieldsTooLarge", "the request line and headers are over 16 KB"),
}
#: Renders an error in the configured ResponseType (formats.ResponseFormat.error).
ErrorBody = Callable[[AgentError], bytes]


def _refusal(request: h11.Request) -> AgentError | None:
    """Requests answered without the app, then closed: other protocols and ambiguous framing.

    An HTTP/2 prior-knowledge preface parses as `PRI * HTTP/2.0`; one readable HTTP/1.1 answer
    tells the client what went wrong (SPEC §3 is HTTP/1.1; on HTTP/2 one connection would carry
    many requests, and MaxConn would no longer bound them). RFC 9112 §6.1: a request with both
    Content-Length and Transfer-Encoding may be a smuggling attempt, and the connection must close.
    """
    if not request.http_version.startswith(b"1."):
        version = request.http_version.decode("ascii", "replace")
        return AgentError(400, "UnsupportedProtocol", f"HTTP/{version} is not supported; use HTTP/1.1")
    names = {name for name, _ in request.headers}  # lower-cased by h11
    if b"content-length" in names and b"transfer-encoding" in names:
        return AgentError(400, "BadRequest", "Content-Length and Transfer-Encoding together are ambiguous")
    return None


class _Http11Only(H11Protocol):
    """Hypercorn's HTTP/1.1 protocol, one request at a time, with SPEC §3/§4 answers of its own.

    - One exchange at a time: h11's PAUSED (a request pipelined behind the one in progress) ends
      `feed` instead of parking it; the connection feeds again once the response has been sent.
    - No way out of HTTP/1.1: an `Upgrade: h2c` is a plain HTTP/1.1 request that the checks
      refuse, and an HTTP/2 preface gets a 400 (see `_refusal`).
    - No `100 Continue` before the app has decided: every request the agent serves is a GET
      without a body, so a client that sent `Expect: 100-continue` gets the final answer at once
      (RFC 9110 §10.1.1 allows it), and one that would be refused never sends its body.
    - Reason phrases on every status line, and SPEC §4 bodies on h11's own 400/431 (a 5xx hint,
      such as 501 for an unknown Transfer-Encoding, is a client error: 400).
    """

    def __init__(self, *args: object, error_body: ErrorBody) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self._error_body = error_body
        #: h11 holds a request (or more) behind the one in progress.
        self.paused = False

    @property
    def receiving_body(self) -> bool:
        """The request in progress has more body to come: data read now is its, not a next request's."""
        return self.connection.their_state is h11.SEND_BODY

    async def feed(self, data: bytes) -> None:
        """Parses `data` (or, with none, what h11 kept) until the next request is in progress."""
        if data:
            self.connection.receive_data(data)
        await self._handle_events()

    async def _handle_events(self) -> None:
        self.paused = False
        while True:
            try:
                event = self.connection.next_event()
            except h11.RemoteProtocolError as error:
                if self.connection.our_state in {h11.IDLE, h11.SEND_RESPONSE}:
                    await self._send_error_response(error.error_status_hint)
                await self.send(Closed())
                return
            if isinstance(event, h11.Request):
                await self.send(Updated(idle=False))
                refusal = _refusal(event)
                if refusal is not None:
                    await self._send_error(refusal)
                    await self.send(Closed())
                    return
                await self._create_stream(event)
            elif event is h11.PAUSED:
                self.paused = True
                return
            elif isinstance(event, h11.ConnectionClosed) or event is h11.NEED_DATA or self.stream is None:
                return
            elif isinstance(event, h11.Data):
                await self.stream.handle(Body(stream_id=STREAM_ID, data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                await self.stream.handle(EndBody(stream_id=STREAM_ID))
            elif isinstance(event, Data):  # a WebSocket handshake's pass-through
                await self.stream.handle(event)

    async def stream_send(self, event: StreamEvent) -> None:
        if isinstance(event, Response) and event.status_code >= 200:
            headers = [*event.headers, *self.config.response_headers("h11")]
            if self.keep_alive_requests >= self.config.keep_alive_max_requests:
                headers.append((b"connection", b"close"))
            reason = REASONS.get(event.status_code, b"")
            await self._send_h11_event(h11.Response(status_code=event.status_code, headers=headers, reason=reason))
        else:
            await super().stream_send(event)

    async def _send_error_response(self, status_code: int) -> None:
        status = 400 if status_code >= 500 else status_code
        await self._send_error(PARSER_ERRORS.get(status) or AgentError(status, "BadRequest", "malformed request"))

    async def _send_error(self, error: AgentError) -> None:
        """SPEC §4's body for `error`, with `Connection: close`: the rest of the stream is not trusted."""
        body = self._error_body(error)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
            (b"connection", b"close"),
            *self.config.response_headers("h11"),
        ]
        reason = REASONS.get(error.status, b"")
        await self._send_h11_event(h11.Response(status_code=error.status, headers=headers, reason=reason))
        await self._send_h11_event(h11.Data(data=body))
        await self._send_h11_event(h11.EndOfMessage())


class _AppInbox:
    """The ASGI `receive` queue of one request: at most `limit` messages, then `put` waits.

    hypercorn gives every request a trio memory channel (about 1.5 KB with its deque and
    bookkeeping) and puts at least two messages in it (the end of the request, then
    `http.disconnect`). The agent's requests are GETs without a body, whose app never calls
    `receive`, and a held one (`Prefer: wait`) kept that channel for minutes; a waiter may cost
    20 KB in all (issue 12). Here the queue is a list, and a parking lot is made only when one
    side has to wait for the other (one producer, the connection; one consumer, the app).
    """

    __slots__ = ("_limit", "_messages", "_waiting")

    def __init__(self, limit: int) -> None:
        self._limit = max(1, limit)
        self._messages: list[ASGIReceiveEvent] = []
        self._waiting: trio.lowlevel.ParkingLot | None = None

    async def _wait(self) -> None:
        if self._waiting is None:
            self._waiting = trio.lowlevel.ParkingLot()
        await self._waiting.park()

    async def put(self, message: ASGIReceiveEvent) -> None:
        while len(self._messages) >= self._limit:
            await self._wait()
        self._messages.append(message)
        if self._waiting:
            self._waiting.unpark_all()

    async def receive(self) -> ASGIReceiveEvent:
        while not self._messages:
            await self._wait()
        message = self._messages.pop(0)
        if self._waiting:
            self._waiting.unpark_all()
        return message


class _Exchanges:
    """hypercorn's trio `TaskGroup` on a nursery of the connection's, with a lazy `_AppInbox`
    per request in place of its memory channel (and no context manager of its own: the nursery's
    cancel scope is the one a hang-up cancels)."""

    __slots__ = ("_nursery",)

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    async def spawn_app(
        self,
        app: AppWrapper,
        config: HypercornConfig,
        scope: Scope,
        send: Callable[[ASGISendEvent | None], Awaitable[None]],
    ) -> Callable[[ASGIReceiveEvent], Awaitable[None]]:
        inbox = _AppInbox(config.max_app_queue_size)
        self._nursery.start_soon(
            run_app, app, config, scope, inbox.receive, send, trio.to_thread.run_sync, trio.from_thread.run
        )
        return inbox.put

    def spawn(self, func: Callable[..., Awaitable[object]], *args: object) -> None:
        self._nursery.start_soon(func, *args)


class Connection:
    """Serves one accepted stream until the client leaves, idles out, or the server stops."""

    def __init__(
        self,
        app: AppWrapper,
        config: HypercornConfig,
        context: WorkerContext,
        state: ConnectionState,
        stream: trio.SocketStream,
        error_body: ErrorBody,
    ) -> None:
        self._app = app
        self._config = config
        self._context = context
        self._state = state
        self._stream = stream
        self._error_body = error_body
        self._buffer: list[bytes] = []
        #: A flush is under way; `_flushed` is made only when another one waits for it. A
        #: `trio.Lock` cost every connection 0.5 KB and every response a checkpoint.
        self._flushing = False
        self._flushed: trio.Event | None = None
        self._reading = trio.CancelScope(deadline=trio.current_time() + config.keep_alive_timeout)
        #: The cancel scope of the nursery that runs the requests (and the read loop).
        self._exchanges: trio.CancelScope | None = None
        #: Bytes read while a request was in progress, not yet given to the parser.
        self._held = bytearray()
        #: Set while the read loop waits for a request in progress that has more behind it.
        self._wake: trio.CancelScope | None = None
        #: Sends under way or waiting their turn (shielded), whose deadline a server shutdown
        #: brings forward; made at the first send.
        self._sendings: set[trio.CancelScope] | None = None
        self._stop_deadline = math.inf
        #: No request in progress and no response unsent.
        self.idle = True
        self._protocol: _Http11Only

    async def run(self) -> None:
        socket = self._stream.socket
        try:
            client = parse_socket_addr(socket.family, socket.getpeername())
            server = parse_socket_addr(socket.family, socket.getsockname())
            # A client that hangs up mid-request cancels it, so its slot of the cap comes back at
            # once rather than when a slow KMS answers (the load itself goes on for the cache).
            async with trio.open_nursery() as nursery:
                self._exchanges = nursery.cancel_scope
                self._protocol = _Http11Only(
                    self._app,
                    self._config,
                    self._context,
                    _Exchanges(nursery),
                    self._state,
                    False,
                    client,
                    server,
                    self._protocol_send,
                    error_body=self._error_body,
                )
                await self._read()
        except OSError:
            pass
        finally:
            await trio.aclose_forcefully(self._stream)
            self._release()

    def _release(self) -> None:
        """Breaks the reference cycles of a finished connection, so that it is freed at once.

        The protocol calls back into this object (its `send` is the bound `_protocol_send`), and a
        request's stream into the protocol (`stream_send`), so a closed connection was freed only
        by the garbage collector: about 57 objects each (the task group, its tasks, tracebacks).
        With cli.py's sparse collections (gen-0 at 50,000 objects, start-up frozen) they piled
        up: 1400 hung-up misses every 20 s took the agent from 73 to 128 to 163 MB (issue 16).
        The task group has ended when this runs: nothing calls into the protocol any more.
        """
        protocol: _Http11Only | None = self.__dict__.pop("_protocol", None)
        if protocol is not None:
            protocol.stream = None  # a request the client hung up on was never closed
            protocol.send = protocol.task_group = None  # type: ignore[assignment]
        self._buffer.clear()
        self._held = bytearray()
        self._wake = None
        self._exchanges = None
        self._sendings = None

    def stop(self, deadline: float) -> None:
        """Server shutdown: an idle connection ends now; a busy one may finish its response until
        `deadline`, its send included (SPEC §1: exit within 5 s, whatever the client does)."""
        self._stop_deadline = deadline
        for sending in self._sendings or ():
            sending.deadline = min(sending.deadline, deadline)
        if self.idle:
            self._reading.cancel()

    async def _read(self) -> None:
        with self._reading:
            while True:
                if self.idle and self._waiting:
                    # The last response has left: the next request comes from what h11 kept, else
                    # from what was held meanwhile (never both: h11's buffer stays one read long).
                    data = b""
                    if not self._protocol.paused:
                        data, self._held = bytes(self._held), bytearray()
                    await self._protocol.feed(data)
                    continue
                try:
                    if self._waiting:
                        received = await self._receive_ahead()
                    else:
                        received = await self._stream.receive_some(MAX_RECEIVE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                if received is None:
                    continue  # the exchange ended: on to what waits
                if not received:
                    if not self.idle and self._exchanges is not None:
                        self._exchanges.cancel()
                    break
                if self._waiting or not (self.idle or self._protocol.receiving_body):
                    self._held += received  # behind the request in progress
                else:
                    await self._protocol.feed(bytes(received))  # bytes() of a bytes is the same object
        await self._protocol.handle(Closed())

    @property
    def _waiting(self) -> bool:
        """Bytes wait for the parser: requests h11 kept, or bytes held behind them."""
        return self._protocol.paused or bool(self._held)

    async def _receive_ahead(self) -> bytes | bytearray | None:
        """Reads at most HOLD_LIMIT ahead while a request is in progress; None once it ends."""
        with trio.CancelScope() as wake:
            self._wake = wake
            try:
                room = HOLD_LIMIT - len(self._held)
                if room <= 0:
                    await trio.sleep_forever()  # until the response has left
                return await self._stream.receive_some(min(room, MAX_RECEIVE))
            finally:
                self._wake = None
        return None

    async def _protocol_send(self, event: Event) -> None:
        if isinstance(event, RawData):
            if event.data:
                self._buffer.append(event.data)
                if sum(map(len, self._buffer)) >= FLUSH_SIZE:
                    await self._flush()
        elif isinstance(event, Updated):
            await self._flush()
            self.idle = event.idle
            if event.idle:
                self._reading.deadline = trio.current_time() + self._config.keep_alive_timeout
                if self._wake is not None:
                    self._wake.cancel()  # the next request may be parsed
            else:
                self._reading.deadline = math.inf
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
        # cannot hold the task past SEND_TIMEOUT, nor past the server's shutdown deadline.
        deadline = min(trio.current_time() + SEND_TIMEOUT, self._stop_deadline)
        with trio.CancelScope(shield=True, deadline=deadline) as sending:
            if self._sendings is None:
                self._sendings = set()
            self._sendings.add(sending)
            try:
                while self._flushing:  # one flush at a time: a response's bytes, then the EOF
                    if self._flushed is None:
                        self._flushed = trio.Event()
                    await self._flushed.wait()
                self._flushing = True
                try:
                    if data:
                        await self._stream.send_all(data)
                    if eof:
                        await self._stream.send_eof()
                finally:
                    self._flushing = False
                    flushed, self._flushed = self._flushed, None
                    if flushed is not None:
                        flushed.set()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._reading.cancel()
            finally:
                if self._sendings is not None:
                    self._sendings.discard(sending)
        if sending.cancelled_caught:
            self._reading.cancel()
