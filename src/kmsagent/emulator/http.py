"""A tiny HTTP/1.1 server on trio + h11, just enough to host the KMS emulator.

Why not hypercorn: the emulator must be able to misbehave on purpose (drop a connection without
an answer, answer with a truncated body), must answer fast (one write per response, TCP_NODELAY:
Nagle + delayed ACK otherwise cost ~44 ms per call), and must start inside a test's nursery with
port 0. A hand-written h11 loop gives all three in a page of code.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from urllib.parse import parse_qsl, unquote

import h11
import trio

__all__ = ["Handler", "HttpRequest", "HttpResponse", "serve_http"]

_RECEIVE_SIZE = 65536
# Errors that only mean "this one connection is gone"; they must never reach the server nursery.
_CONNECTION_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


@dataclass(frozen=True)
class HttpRequest:
    """One parsed request, decoded once so handlers never touch h11."""

    method: str
    target: str
    path: str
    raw_query: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


@dataclass
class HttpResponse:
    """What a handler answers; sent as one write, with Content-Length added when missing."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


Handler = Callable[[HttpRequest], Awaitable[HttpResponse | None]]


async def serve_http(
    handler: Handler,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Bind `host:port`, report the bound port through `task_status`, serve until cancelled.

    `handler` is awaited once per request; returning None closes the connection without an
    answer (how a test simulates a dropped connection).
    """
    listeners: list[trio.abc.Listener[trio.abc.Stream]] = list(
        await trio.open_tcp_listeners(port, host=host)
    )
    bound_port = listeners[0].socket.getsockname()[1]  # type: ignore[attr-defined]
    if ssl_context is not None:
        listeners = [
            trio.SSLListener(listener, ssl_context, https_compatible=True) for listener in listeners
        ]
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, partial(_serve_connection, handler), listeners)
        task_status.started(bound_port)


async def _serve_connection(handler: Handler, stream: trio.abc.Stream) -> None:
    """Serve keep-alive requests on one connection; any failure here ends only this connection."""
    _set_nodelay(stream)
    conn = h11.Connection(h11.SERVER)
    try:
        while await _serve_one(handler, conn, stream):
            conn.start_next_cycle()
    except h11.RemoteProtocolError as exc:
        await _send_error_if_possible(conn, stream, exc.error_status_hint)
    except (*_CONNECTION_ERRORS, h11.LocalProtocolError):  # gone, or a handler's invalid response
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def _serve_one(handler: Handler, conn: h11.Connection, stream: trio.abc.Stream) -> bool:
    """Read one request, answer it; True when the connection may carry another request."""
    request = await _read_request(conn, stream)
    if request is None:
        return False
    try:
        response = await handler(request)
    except Exception:  # noqa: BLE001 - a handler bug must cost one 500, not the whole server
        response = HttpResponse(500, [("content-type", "text/plain")], b"Internal Server Error")
    if response is None:
        return False
    await stream.send_all(_encode_response(conn, response, head_only=request.method == "HEAD"))
    return conn.our_state is h11.DONE and conn.their_state is h11.DONE


async def _read_request(conn: h11.Connection, stream: trio.abc.Stream) -> HttpRequest | None:
    """Return the next complete request, or None when the client closed the connection."""
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(_RECEIVE_SIZE)))
        elif isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None  # h11 never ends a message it did not start
            return _to_request(head, bytes(body))
        elif isinstance(event, h11.ConnectionClosed):
            return None


def _to_request(head: h11.Request, body: bytes) -> HttpRequest:
    """Decode an h11 request head into the handler-facing dataclass."""
    target = head.target.decode("ascii", errors="surrogateescape")
    raw_path, _, raw_query = target.partition("?")
    query: dict[str, str] = {}
    for name, value in parse_qsl(raw_query, keep_blank_values=True):
        query.setdefault(name, value)
    headers: dict[str, str] = {}
    for raw_name, raw_value in head.headers:
        name, value = raw_name.decode("ascii").lower(), raw_value.decode("latin-1")
        headers[name] = f"{headers[name]},{value}" if name in headers else value
    return HttpRequest(
        method=head.method.decode("ascii"),
        target=target,
        path=unquote(raw_path),
        raw_query=raw_query,
        query=query,
        headers=headers,
        body=body,
    )


def _encode_response(conn: h11.Connection, response: HttpResponse, *, head_only: bool) -> bytes:
    """Serialize head and body together so the answer leaves in a single write."""
    headers = list(response.headers)
    if not any(name.lower() == "content-length" for name, _ in headers):
        headers.append(("content-length", str(len(response.body))))
    data = conn.send(h11.Response(status_code=response.status, headers=headers))
    if not head_only:
        data += conn.send(h11.Data(data=response.body))
    return data + conn.send(h11.EndOfMessage())


async def _send_error_if_possible(
    conn: h11.Connection, stream: trio.abc.Stream, status: int
) -> None:
    """Answer a malformed request with `status` when h11 still allows a response, then give up."""
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    response = HttpResponse(status, [("content-type", "text/plain"), ("connection", "close")])
    try:
        await stream.send_all(_encode_response(conn, response, head_only=False))
    except (*_CONNECTION_ERRORS, h11.LocalProtocolError):
        pass


def _set_nodelay(stream: trio.abc.Stream) -> None:
    """Disable Nagle on the TCP socket under `stream` (also under TLS)."""
    inner = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    if isinstance(inner, trio.SocketStream):
        inner.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
