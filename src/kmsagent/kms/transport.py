"""HTTP/1.1 to KMS: kept-alive connections to a few known endpoints, one request at a time on each.

Why not httpx or httpcore: the agent talks to one service, with one method and a handful of
headers it builds itself, so their generality is pure cost on every cache miss. Measured CPU per
GetSecretValue call on trio (signing and parsing included, the emulator in another process, 2
cores): httpx 2.0–2.5 ms, httpcore used directly 1.45 ms (its pool bookkeeping, tracing hooks and
locks), h11 for both directions 0.9 ms, this 0.5 ms. The request is written here (`request_head`,
which refuses what could not go on the wire as is); an answer with a plain head and a
Content-Length, which is what KMS sends, is read here too, and any other (chunked, an interim 1xx,
one that ends with the connection, anything odd) is handed to h11 with the bytes already read, so
the hard cases get a full HTTP/1.1 parser.

What the agent needs of a client stays: connect, read and write timeouts; keep-alive connections,
checked before reuse (an idle one the server closed or wrote to is dropped, as httpcore does) and
closed after `keepalive_seconds` idle; TLS with the caller's context; no proxy, cookie jar or
redirect (none of them was ever wanted here).

Errors are `TransportError`s (`Timeout`s for timeouts) carrying the low-level cause in their
chain, e.g. an `ssl.SSLError` under a failed handshake; the KMS client turns them into the agent's
502 and 504. A connection that saw an error, a cancellation or an unfinished answer is closed,
never reused.
"""

from __future__ import annotations

import re
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11
import trio

#: Bytes read from a connection at once (httpcore's figure).
READ_SIZE = 64 * 1024
#: The longest answer head h11 buffers before it gives up (httpcore's figure).
MAX_HEAD_BYTES = 100 * 1024


class TransportError(Exception):
    """No usable answer: the connection failed or broke, or what came back is not HTTP/1.1."""


class ConnectError(TransportError):
    pass


class WriteError(TransportError):
    pass


class ReadError(TransportError):
    pass


class RemoteProtocolError(TransportError):
    pass


class Timeout(TransportError):
    """Connecting, sending or waiting for (part of) the answer took longer than its timeout."""


class ConnectTimeout(Timeout):
    pass


class WriteTimeout(Timeout):
    pass


class ReadTimeout(Timeout):
    pass


class AnswerTooLarge(Exception):
    """The answer's body is longer than the caller's limit (the connection is closed)."""


@dataclass(frozen=True)
class Endpoint:
    """A `host[:port]` (IPv6 in brackets) with its scheme, parsed once."""

    authority: str
    tls: bool
    host: str
    port: int

    @classmethod
    def parse(cls, protocol: str, authority: str) -> Endpoint:
        parts = urlsplit(f"//{authority}")
        tls = protocol == "https"
        return cls(authority, tls, parts.hostname or "", parts.port or (443 if tls else 80))


@dataclass(frozen=True)
class Answer:
    """An answer's status, its headers (names lower-cased) and its body."""

    status: int
    headers: Sequence[tuple[bytes, bytes]]
    body: bytearray

    def header(self, name: bytes) -> bytes | None:
        """The first value of header `name` (lower case), or None."""
        return next((value for key, value in self.headers if key == name), None)


#: What h11 is told of the request when an answer goes to it: it means the same to h11 as the
#: real one (a POST with an empty body, over HTTP/1.1, to be kept alive), which went out as
#: `request_head` wrote it.
_STAND_IN = h11.Request(method="POST", target="/", headers=[("host", "kms"), ("content-length", "0")])
_TOKEN = re.compile(r"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")  # a header name (RFC 9110 token)
_VALUE = re.compile(r"(?:[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?)?")  # printable ASCII, no spaces around
_TARGET = re.compile(r"/[\x21-\x7e]*")


def request_head(target: str, headers: Sequence[tuple[str, str]]) -> bytes:
    """The request line and headers of a POST with an empty body; ValueError for a target or a
    header that could not go on the wire as is (a control character, a line break, non-ASCII)."""
    if not _TARGET.fullmatch(target):
        raise ValueError("a request target that is not printable ASCII")
    lines = [f"POST {target} HTTP/1.1\r\n"]
    for name, value in headers:
        if not _TOKEN.fullmatch(name) or not _VALUE.fullmatch(value):
            raise ValueError(f"header {name[:40]!r} cannot be sent as it is")  # never its value: it may be a token
        lines.append(f"{name}: {value}\r\n")
    lines.append("content-length: 0\r\n\r\n")
    return "".join(lines).encode("ascii")


@dataclass(eq=False)
class _Connection:
    stream: trio.abc.Stream
    socket: trio.socket.SocketType
    idle_since: float = 0.0


class Transport:
    """Kept-alive HTTP/1.1 connections; `post` sends one request and reads its answer.

    Not a limiter: callers bound the requests in flight (the KMS client's MaxConcurrentRequests
    slots), and every request in flight holds one connection, so at most that many are open per
    endpoint; `max_idle` of them are kept between requests.
    """

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None,
        connect_timeout: float,
        read_timeout: float,
        write_timeout: float,
        keepalive_seconds: float,
        max_idle: int,
    ) -> None:
        if ssl_context is not None:
            ssl_context.set_alpn_protocols(["http/1.1"])
        self._ssl_context = ssl_context
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._write_timeout = write_timeout
        self._keepalive_seconds = keepalive_seconds
        self._max_idle = max_idle
        #: Idle connections per endpoint, the most recently used last.
        self._idle: dict[Endpoint, list[_Connection]] = {}

    async def post(self, endpoint: Endpoint, target: str, headers: Sequence[tuple[str, str]], *, limit: int) -> Answer:
        """POSTs an empty body to `target` at `endpoint`; the answer, its body read up to `limit` bytes.

        `headers` go out as given (with `content-length: 0`). Raises `TransportError`, or
        `AnswerTooLarge` past `limit` bytes of body; ValueError for a header `request_head` refuses.
        """
        head = request_head(target, headers)
        connection = self._reuse(endpoint) or await self._connect(endpoint)
        reusable = False
        try:
            await self._send(connection, head)
            answer, reusable = await self._receive(connection, limit)
        finally:
            if reusable:
                self._keep(endpoint, connection)
            else:
                await trio.aclose_forcefully(connection.stream)
        return answer

    async def aclose(self) -> None:
        """Closes the idle connections (a request still under way closes its own)."""
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                await trio.aclose_forcefully(connection.stream)

    def _reuse(self, endpoint: Endpoint) -> _Connection | None:
        """The most recently used idle connection to `endpoint` still fit for a request."""
        idle = self._idle.get(endpoint)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            # Readable while idle: the server closed it, or sent what no request asked for.
            if now - connection.idle_since < self._keepalive_seconds and not connection.socket.is_readable():
                return connection
            connection.socket.close()  # nothing to flush: a TLS close_notify is not owed to a peer that left
        return None

    def _keep(self, endpoint: Endpoint, connection: _Connection) -> None:
        connection.idle_since = time.monotonic()
        idle = self._idle.setdefault(endpoint, [])
        idle.append(connection)
        while len(idle) > self._max_idle:
            idle.pop(0).socket.close()

    async def _connect(self, endpoint: Endpoint) -> _Connection:
        with trio.move_on_after(self._connect_timeout) as scope:
            try:
                tcp = await trio.open_tcp_stream(endpoint.host, endpoint.port)
            except OSError as error:
                raise ConnectError(str(error)) from error
            stream: trio.abc.Stream = tcp
            if endpoint.tls:
                assert self._ssl_context is not None
                stream = trio.SSLStream(tcp, self._ssl_context, server_hostname=endpoint.host, https_compatible=True)
                try:
                    await stream.do_handshake()
                except (trio.BrokenResourceError, OSError) as error:
                    await trio.aclose_forcefully(tcp)
                    raise ConnectError(str(error)) from error
                except BaseException:
                    await trio.aclose_forcefully(tcp)
                    raise
            return _Connection(stream, tcp.socket)
        if scope.cancelled_caught:
            raise ConnectTimeout(f"no connection to {endpoint.authority} within {self._connect_timeout:g}s")
        raise AssertionError("unreachable")  # pragma: no cover

    async def _send(self, connection: _Connection, data: bytes) -> None:
        with trio.move_on_after(self._write_timeout) as scope:
            try:
                await connection.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
                raise WriteError(str(error)) from error
        if scope.cancelled_caught:
            raise WriteTimeout(f"the request was not sent within {self._write_timeout:g}s")

    async def _receive(self, connection: _Connection, limit: int) -> tuple[Answer, bool]:
        """The answer, and whether the connection may carry another request.

        KMS answers with a plain head and a Content-Length, which is read here directly; any
        other answer (chunked, an interim 1xx, one that ends when the connection closes, one
        this reading does not vouch for) goes to h11 with what was read of it, so the cheap
        path never decides a hard case.
        """
        buffer = bytearray()
        end = -1
        while end < 0 and len(buffer) <= MAX_HEAD_BYTES:
            data = await self._read(connection)
            if not data:
                break
            buffer += data
            end = buffer.find(b"\r\n\r\n")
        plain = _plain_head(bytes(buffer[:end])) if end >= 0 else None
        if plain is None:
            return await self._receive_h11(connection, limit, buffer)
        status, headers, length, keep_alive = plain
        if length > limit:
            raise AnswerTooLarge(f"more than {limit} bytes")
        body = buffer[end + 4 :]
        del buffer
        while len(body) < length:
            data = await self._read(connection)
            if not data:
                raise RemoteProtocolError("the server closed the connection in the middle of an answer")
            body += data
        if len(body) > length:  # bytes no request asked for: the connection is not reused
            del body[length:]
            keep_alive = False
        return Answer(status, headers, body), keep_alive

    async def _receive_h11(self, connection: _Connection, limit: int, received: bytearray) -> tuple[Answer, bool]:
        protocol = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        protocol.send(_STAND_IN)  # h11 learns that a request went out (the bytes were `request_head`'s)
        protocol.send(h11.EndOfMessage())
        response: h11.Response | None = None
        body = bytearray()
        data: bytes | None = bytes(received)
        while True:
            try:
                if data is not None:
                    protocol.receive_data(data)  # b"": the server closed; h11 knows whether that ends the answer
                    data = None
                event = protocol.next_event()
            except h11.RemoteProtocolError as error:
                raise RemoteProtocolError(str(error)) from error
            if event is h11.NEED_DATA:
                data = bytes(await self._read(connection))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > limit:
                    raise AnswerTooLarge(f"more than {limit} bytes")
            elif isinstance(event, h11.EndOfMessage):
                assert response is not None
                reusable = protocol.our_state is h11.DONE and protocol.their_state is h11.DONE
                return Answer(response.status_code, list(response.headers), body), reusable
            elif isinstance(event, h11.ConnectionClosed):
                raise RemoteProtocolError("the server closed the connection without an answer")
            # h11.InformationalResponse (1xx): the answer follows.

    async def _read(self, connection: _Connection) -> bytes | bytearray:
        """What the server sent next (b"" once it closed), within the read timeout."""
        with trio.move_on_after(self._read_timeout) as scope:
            try:
                return await connection.stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
                raise ReadError(str(error)) from error
        assert scope.cancelled_caught
        raise ReadTimeout(f"no answer within {self._read_timeout:g}s")


_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([2-5][0-9][0-9])(?: [\t\x20-\x7e\x80-\xff]*)?")
_HEADER_NAME = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_HEADER_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")


def _plain_head(head: bytes) -> tuple[int, list[tuple[bytes, bytes]], int, bool] | None:
    """(status, headers with names lower-cased, Content-Length, keep-alive) of an HTTP/1.1 answer
    head with one Content-Length and no Transfer-Encoding, read as h11 reads it; None for any
    other head (h11 then decides: it may be fine, or not HTTP at all)."""
    lines = head.split(b"\r\n")
    status_line = _STATUS_LINE.fullmatch(lines[0])
    if status_line is None:
        return None
    status = int(status_line[1])
    if status in (204, 304):  # no body whatever the headers say
        return None
    headers: list[tuple[bytes, bytes]] = []
    length: int | None = None
    keep_alive = True
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _HEADER_NAME.fullmatch(name) or not _HEADER_VALUE.fullmatch(value):
            return None  # a line that is no header (or a folded one): h11's call
        name, value = name.lower(), value.strip(b" \t")
        if name == b"content-length":
            if length is not None or not value.isdigit() or len(value) > 18:
                return None
            length = int(value)
        elif name == b"transfer-encoding":
            return None
        elif name == b"connection" and b"close" in (token.strip().lower() for token in value.split(b",")):
            keep_alive = False
        headers.append((name, value))
    if length is None:
        return None
    return status, headers, length, keep_alive
