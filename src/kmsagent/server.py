"""Hypercorn's trio HTTP/1.1 protocol behind our own accept loop, bound to loopback only (and to a
Unix socket when `[Server] UnixSocket` is set).

Why not `hypercorn.trio.serve`: it has no connection cap (its `backlog` is the kernel's queue),
so this module owns accepting and counting (SPEC §3's MaxConn, 429, and the `/ping` reserve);
each connection is served by connection.py, hypercorn's protocol on a leaner I/O layer. Every
listener feeds the same accept loop and the same count: the Unix socket serves the same API with
the same checks, and MaxConn bounds TCP and Unix connections together.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import socket
import stat
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
from kmsagent.config import ConfigError, ServerConfig, check_unix_socket
from kmsagent.connection import Connection, ErrorBody
from kmsagent.errors import AgentError

#: Connections beyond MaxConn that are still read, so `/ping` can answer (SPEC §3).
PING_RESERVE = 2
KEEP_ALIVE_TIMEOUT = 5.0
GRACEFUL_TIMEOUT = 3.0
#: How long a refused connection may take to receive its 429 and close.
REFUSAL_LINGER = 1.0
#: How long a connection accepted at MaxConn waits for a slot before it is only in the /ping
#: reserve or refused: a client that closed a connection and opened another at once is not over
#: the cap, though its new connection may be accepted before the old one's end is read.
ADMISSION_WAIT = 0.2
#: Connections beyond MaxConn waiting for a slot or being refused, at once; beyond it a
#: connection gets the /ping reserve at once, or is closed without a word.
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


def listening_addresses(port: int, server: ServerConfig) -> list[str]:
    """What the start line names (SPEC §1): `http://127.0.0.1:<port>`, then the other listeners."""
    addresses = listen_urls(port, server.bind_ipv6)
    if server.unix_socket:
        addresses.append(f"unix:{server.unix_socket}")
    return addresses


class UnixListener:
    """A bound Unix socket and the node it made, which `remove` deletes only while it is still that
    one (a node replaced by someone else since is theirs)."""

    def __init__(self, path: str, sock: socket.socket, node: tuple[int, int]) -> None:
        self.path = path
        self.sock = sock
        self.node = node  # (st_dev, st_ino)
        self._removed = False

    def remove(self) -> None:
        """Closes the socket and removes its node (SPEC §2: removed at exit). Only once: after the
        unlink, the inode number may come back with another program's node."""
        self.sock.close()
        if self._removed:
            return
        self._removed = True
        try:
            info = os.lstat(self.path)
            if (info.st_dev, info.st_ino) == self.node:
                os.unlink(self.path)
        except OSError:
            pass


def bind_unix(server: ServerConfig) -> UnixListener:
    """Listens on `server.unix_socket` with UnixSocketMode and UnixSocketGroup from the first instant.

    Linux checks a client's write permission on the node at `connect`, and nothing can connect
    before `listen` (ECONNREFUSED): so the node is bound, given its group and mode, and only then
    listens. The mode the umask gave it at bind is never in force. Not `os.umask` around `bind`:
    it is process-wide, and a log writer thread rotating its file at that instant would create it
    with the socket's wider mode. Not `fchmod`/`fchown` on the socket: on Linux they change the
    socket's own inode, not the node in the folder. The group and mode are set through an
    `O_PATH | O_NOFOLLOW` descriptor of the node (by its /proc/self/fd name), never by path: if
    the node were swapped for a symbolic link meanwhile, a root agent would not chmod its target.

    The folder is checked first (`check_unix_socket`: root's or the agent's, not writable by
    others; else ConfigError, exit 2). A file already at the path is replaced only when it is a
    socket that nothing answers on (left by an agent that was killed); a live agent's socket, or
    anything that is not a socket, is left alone: ServeError, exit 1. Two agents starting at the
    same instant on one path could still both find it stale; the service manager starts one.
    Blocking calls (the group may be looked up over the network): run it in a worker thread.
    """
    path = server.unix_socket
    gid, _ = check_unix_socket(server, starting=True)
    assert gid is not None
    _clear_the_way(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    listener: UnixListener | None = None
    try:
        sock.bind(path)
        info = os.lstat(path)
        listener = UnixListener(path, sock, (info.st_dev, info.st_ino))
        _set_group_and_mode(listener, gid, server)
        sock.listen(4096)
        sock.setblocking(False)
    except BaseException as error:
        if listener is not None:
            listener.remove()
        else:
            sock.close()
        if isinstance(error, OSError):
            raise ServeError(f"cannot listen on unix:{path}: {error.strerror}") from None
        raise
    return listener


def _set_group_and_mode(listener: UnixListener, gid: int, server: ServerConfig) -> None:
    descriptor = os.open(listener.path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        info = os.fstat(descriptor)
        if (info.st_dev, info.st_ino) != listener.node:
            raise ServeError(f"cannot listen on unix:{listener.path}: the socket was replaced while it was made")
        by_descriptor = f"/proc/self/fd/{descriptor}"
        try:
            os.chown(by_descriptor, -1, gid)
        except FileNotFoundError:
            raise ServeError(
                f"cannot listen on unix:{listener.path}: /proc is not mounted (its mode is set through it)"
            ) from None
        except PermissionError:
            raise ConfigError(
                f"[Server] UnixSocketGroup = {server.unix_socket_group!r}: the agent's user (uid {os.geteuid()}) "
                f"may not give the socket to gid {gid}; it must be a member of that group"
            ) from None
        os.chmod(by_descriptor, int(server.unix_socket_mode, 8))
    finally:
        os.close(descriptor)


def _clear_the_way(path: str) -> None:
    """Removes a stale socket at `path`; ServeError for a live one or a file that is not a socket."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ServeError(
            f"cannot listen on unix:{path}: it exists and is not a socket; remove it or choose another path"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        pass  # nothing listens: left by an agent that did not stop cleanly
    except FileNotFoundError:
        return
    except BlockingIOError:  # its backlog is full: very much alive
        raise ServeError(f"cannot listen on unix:{path}: another process is listening on it") from None
    except OSError as error:
        raise ServeError(f"cannot listen on unix:{path}: cannot tell whether it is in use ({error.strerror})") from None
    else:
        raise ServeError(f"cannot listen on unix:{path}: another process (a running kmsagent?) is listening on it")
    finally:
        probe.close()
    with contextlib.suppress(FileNotFoundError):  # gone meanwhile
        os.unlink(path)


class ConnectionSlots:
    """Counts open connections against MaxConn plus the ping reserve."""

    def __init__(self, max_conn: int) -> None:
        self.max_conn = max_conn
        self.open = 0
        self._released = trio.lowlevel.ParkingLot()

    def take(self) -> bool:
        """Takes a slot within MaxConn if one is free."""
        if self.open >= self.max_conn:
            return False
        self.open += 1
        return True

    def admit(self) -> bool | None:
        """Takes a slot: False within MaxConn, True in the ping reserve, None when full."""
        if self.open >= self.max_conn + PING_RESERVE:
            return None
        self.open += 1
        return self.open > self.max_conn

    async def wait_within(self, seconds: float) -> bool | None:
        """`admit`, once a slot within MaxConn is free or `seconds` have passed."""
        with trio.move_on_after(seconds):
            while not self.take():
                await self._released.park()
            return False
        return self.admit()

    def release(self) -> None:
        self.open -= 1
        self._released.unpark()


class HttpServer:
    """Serves `app` on loopback; `run` is started in the agent's nursery and returns the port.

    `unix`: the `[Server]` keys of a Unix socket to listen on as well (none when UnixSocket is "").
    """

    def __init__(
        self,
        app: AgentApp,
        *,
        port: int,
        ipv6: bool,
        max_conn: int,
        error_body: ErrorBody,
        unix: ServerConfig | None = None,
    ) -> None:
        self._agent_app = app
        self._config = HypercornConfig()
        self._config.keep_alive_timeout = KEEP_ALIVE_TIMEOUT
        self._config.keep_alive_max_requests = 2**63  # local clients are never made to reconnect (hypercorn: 1,000)
        self._config.graceful_timeout = GRACEFUL_TIMEOUT
        self._config.accesslog = None
        self._config.errorlog = logging.getLogger("hypercorn.error")  # routed into loguru by logs.py
        self._app = wrap_app(app, self._config.wsgi_max_body_size, None)
        self._over_limit_app = _OverLimitApp(self._app)
        self._port = port
        self._ipv6 = ipv6
        self._unix = unix if unix is not None and unix.unix_socket else None
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
        unix: UnixListener | None = None
        try:
            if self._unix is not None:
                unix = await trio.to_thread.run_sync(bind_unix, self._unix)
                sockets.append(unix.sock)
            await self._serve(sockets, unix, shutdown, task_status)
        finally:  # also when cancelled or failing: no listener stays open, no socket file stays
            for sock in sockets:
                sock.close()
            if unix is not None:
                unix.remove()

    async def _serve(
        self,
        sockets: list[socket.socket],
        unix: UnixListener | None,
        shutdown: Callable[[], Awaitable[object]],
        task_status: trio.TaskStatus[int],
    ) -> None:
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
                if unix is not None:
                    unix.remove()  # no new client finds a socket that no longer accepts
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
        if self.slots.take():
            connections.start_soon(self._serve_connection, stream, False)
        elif self._refusing < MAX_REFUSING:
            self._refusing += 1
            connections.start_soon(self._admit_beyond, stream)
        elif (over_limit := self.slots.admit()) is not None:
            connections.start_soon(self._serve_connection, stream, over_limit)
        else:
            stream.socket.close()

    async def _admit_beyond(self, stream: trio.SocketStream) -> None:
        """A connection accepted at MaxConn: served if a slot frees within ADMISSION_WAIT, else
        in the /ping reserve, else refused (429, then closed). At shutdown, which frees slots,
        it is closed unanswered, like a connection the closed listener no longer accepts."""
        try:
            over_limit = await self.slots.wait_within(ADMISSION_WAIT)
            if over_limit is not None and self._context.terminated.is_set():
                self.slots.release()
                await trio.aclose_forcefully(stream)
                return
            if over_limit is None:
                await _refuse(stream, self._refusal)
                return
        except BaseException:  # cancelled by shutdown while it waited
            await trio.aclose_forcefully(stream)
            raise
        finally:
            self._refusing -= 1
        await self._serve_connection(stream, over_limit)

    async def _serve_connection(self, stream: trio.SocketStream, over_limit: bool) -> None:
        app = self._over_limit_app if over_limit else self._app
        state = ConnectionState(self._lifespan_state.copy())
        connection = Connection(app, self._config, self._context, state, stream, self._error_body)
        self._connections.add(connection)
        try:
            await connection.run()
        except Exception:  # noqa: BLE001 - one broken connection must never take the server down
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
