"""Hypercorn's trio HTTP/1.1 protocol behind our own accept loop, bound to loopback only.

Why not `hypercorn.trio.serve`: it has no connection cap (its `backlog` is the kernel's queue),
so this module owns accepting and counting (SPEC §3's MaxConn, 429, and the `/ping` reserve);
each connection is served by connection.py, hypercorn's protocol on a leaner I/O layer.
"""

from __future__ import annotations

import errno
import logging
import resource
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ConnectionState
from hypercorn.utils import wrap_app
from loguru import logger

from kmsagent.app import OVER_LIMIT, AgentApp
from kmsagent.connection import Connection, ErrorBody
from kmsagent.errors import AgentError

#: Connections beyond MaxConn that are still read, so `/ping` can answer (SPEC §3).
PING_RESERVE = 2
KEEP_ALIVE_TIMEOUT = 5.0
GRACEFUL_TIMEOUT = 3.0
#: How long a refused connection may take to receive its 429 and close.
REFUSAL_LINGER = 1.0
#: Refusals in progress at once; beyond it a connection is closed without a word.
MAX_REFUSING = 64
#: Descriptors besides connections: the KMS client's pool (MaxConcurrentRequests, at most 100),
#: STS and metadata clients, log files, listeners, trio's wake-up pipe, stdio. The agent holds
#: 15 when idle (`ls /proc/<pid>/fd` under --dev).
OTHER_DESCRIPTORS = 192


class ServeError(Exception):
    """The server cannot start (e.g. the port is in use): one line, exit 1."""


class _OverLimitApp:
    """Marks every request of a connection accepted beyond MaxConn, for the app's 429 check."""

    def __init__(self, app: AppWrapper) -> None:
        self._app = app

    async def __call__(self, scope: Any, receive: Any, send: Any, sync_spawn: Any, call_soon: Any) -> None:
        scope.setdefault("extensions", {})[OVER_LIMIT] = True
        await self._app(scope, receive, send, sync_spawn, call_soon)


def _loopback(ipv6: bool) -> list[tuple[socket.AddressFamily, str]]:
    return [(socket.AF_INET, "127.0.0.1")] + ([(socket.AF_INET6, "::1")] if ipv6 else [])


def listen_urls(port: int, ipv6: bool) -> list[str]:
    """The URLs `bind_loopback(port, ipv6)` listens on, IPv4 first (SPEC §1's start line)."""
    return [
        f"http://{host}:{port}" if family == socket.AF_INET else f"http://[{host}]:{port}"
        for family, host in _loopback(ipv6)
    ]


def bind_loopback(port: int, ipv6: bool) -> list[socket.socket]:
    """Listening sockets on 127.0.0.1 (and [::1]) only; port 0 picks one free port for both."""
    addresses = _loopback(ipv6)
    sockets: list[socket.socket] = []
    try:
        for family, host in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]
            sock.listen(4096)
            sock.setblocking(False)
    except OSError as error:
        for sock in sockets:
            sock.close()
        where = f"{host}:{port}" if family == socket.AF_INET else f"[{host}]:{port}"
        reason = error.strerror
        if error.errno == errno.EADDRINUSE:
            reason = "the port is in use; pick another with --port N or [Server] HttpPort"
        raise ServeError(f"cannot listen on {where}: {reason}") from None
    return sockets


class ConnectionSlots:
    """Counts open connections against MaxConn plus the ping reserve."""

    def __init__(self, max_conn: int) -> None:
        self.max_conn = max_conn
        self.open = 0

    def admit(self) -> bool | None:
        """Takes a slot: False within MaxConn, True in the ping reserve, None when full."""
        if self.open >= self.max_conn + PING_RESERVE:
            return None
        self.open += 1
        return self.open > self.max_conn

    def release(self) -> None:
        self.open -= 1


class HttpServer:
    """Serves `app` on loopback; `run` is started in the agent's nursery and returns the port."""

    def __init__(self, app: AgentApp, *, port: int, ipv6: bool, max_conn: int, error_body: ErrorBody) -> None:
        self._agent_app = app
        self._config = HypercornConfig()
        self._config.keep_alive_timeout = KEEP_ALIVE_TIMEOUT
        self._config.graceful_timeout = GRACEFUL_TIMEOUT
        self._config.accesslog = None
        self._config.errorlog = logging.getLogger("hypercorn.error")  # routed into loguru by logs.py
        self._app = wrap_app(app, self._config.wsgi_max_body_size, None)
        self._over_limit_app = _OverLimitApp(self._app)
        self._port = port
        self._ipv6 = ipv6
        self.slots = ConnectionSlots(max_conn)
        self._context = WorkerContext(None)
        self._lifespan_state: dict[str, Any] = {}
        self._connections: set[Connection] = set()
        self._refusing = 0
        self._error_body = error_body
        # Sent without reading the request once even the ping reserve is full.
        refusal_body = error_body(AgentError(429, "ConnectionLimitExceeded", "too many connections open"))
        self._refusal = (
            b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(refusal_body), refusal_body)
        )

    async def run(
        self,
        shutdown: Callable[[], Awaitable[object]],
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accepts until `shutdown()` returns, then lets open requests finish (bounded) and exits."""
        max_conn = self.slots.max_conn
        raise_open_file_limit(max_conn + PING_RESERVE + MAX_REFUSING + OTHER_DESCRIPTORS, max_conn)
        sockets = bind_loopback(self._port, self._ipv6)
        lifespan = Lifespan(self._app, self._config, self._lifespan_state)
        async with trio.open_nursery() as lifespan_nursery:
            await lifespan_nursery.start(lifespan.handle_lifespan)
            await lifespan.wait_for_startup()
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as accepting:
                    for sock in sockets:
                        accepting.start_soon(self._accept_loop, sock, connections)
                    task_status.started(sockets[0].getsockname()[1])
                    await shutdown()
                    accepting.cancel_scope.cancel()
                for sock in sockets:
                    sock.close()
                # Idle keep-alive connections close at once; busy ones get GRACEFUL_TIMEOUT, for
                # their sends too (shielded, they would otherwise take up to SEND_TIMEOUT).
                await self._context.terminated.set()
                self._agent_app.stop_waiting()  # held requests answer 304 now, then their connections close
                deadline = trio.current_time() + GRACEFUL_TIMEOUT
                for connection in self._connections:
                    connection.stop(deadline)
                connections.cancel_scope.deadline = deadline
            await lifespan.wait_for_shutdown()
            lifespan_nursery.cancel_scope.cancel()

    async def _accept_loop(self, sock: socket.socket, connections: trio.Nursery) -> None:
        """Accepts every pending connection each time the socket is readable.

        trio's `SocketListener.accept` takes one connection per turn of the scheduler; under load
        a turn takes tens of milliseconds, and 800 clients connecting at once waited seconds to
        be accepted (wrk counted their first requests as timeouts). Draining the backlog fixes it.
        """
        while True:
            await trio.lowlevel.wait_readable(sock)
            while True:
                try:
                    client, _ = sock.accept()
                except BlockingIOError:
                    break
                except OSError as error:  # EMFILE and friends: back off instead of spinning
                    logger.warning("accept failed: {}", error.strerror)
                    await trio.sleep(0.1)
                    break
                self._admit(trio.SocketStream(trio.socket.from_stdlib_socket(client)), connections)

    def _admit(self, stream: trio.SocketStream, connections: trio.Nursery) -> None:
        over_limit = self.slots.admit()
        if over_limit is None:
            if self._refusing < MAX_REFUSING:
                connections.start_soon(self._refuse, stream)
            else:
                stream.socket.close()
        else:
            connections.start_soon(self._serve_connection, stream, over_limit)

    async def _refuse(self, stream: trio.SocketStream) -> None:
        self._refusing += 1
        try:
            await _refuse(stream, self._refusal)
        finally:
            self._refusing -= 1

    async def _serve_connection(self, stream: trio.SocketStream, over_limit: bool) -> None:
        app = self._over_limit_app if over_limit else self._app
        state = ConnectionState(self._lifespan_state.copy())
        connection = Connection(app, self._config, self._context, state, stream, self._error_body)
        self._connections.add(connection)
        try:
            await connection.run()
        except Exception:  # one broken connection must never take the server down
            logger.exception("connection handler failed")
        finally:
            self._connections.discard(connection)
            self.slots.release()


def raise_open_file_limit(need: int, max_conn: int) -> None:
    """Raises the soft RLIMIT_NOFILE to `need` (at most the hard limit), or says it is too low.

    systemd's default soft limit is 1024: with MaxConn = 1000 the accept loop hit EMFILE and
    connections waited unanswered behind "accept failed" warnings.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        soft = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        except (OSError, ValueError):
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < need:
        logger.warning(
            "open-file limit {} is below the {} that MaxConn = {} needs: connections beyond it wait "
            "unanswered; raise the hard limit (systemd LimitNOFILE, ulimit -n) or lower MaxConn",
            soft,
            need,
            max_conn,
        )


async def _refuse(stream: trio.SocketStream, refusal: bytes) -> None:
    """Answers 429 without parsing the request, then closes gracefully, all within 1 s.

    The request is read and discarded after the answer: closing a socket with unread data makes
    the kernel send a reset, and the client would lose the 429.
    """
    with trio.move_on_after(REFUSAL_LINGER):
        try:
            await stream.send_all(refusal)
            await stream.send_eof()
            while await stream.receive_some(65536):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    await trio.aclose_forcefully(stream)
