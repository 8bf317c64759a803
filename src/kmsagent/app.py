"""The HTTP application: request → checks → store (cache → KMS client) → response.

A QuartTrio app (its lifespan is Quart's) whose HTTP requests all go to one handler. SPEC §3
fixes the check order (connection cap, Forwarded, Host and token come before method and path),
and Quart's URL map would answer 404 or 405 before the token check, so routing is
`checks.check_request`. HTTP requests are answered in the app's own ASGI `__call__`, on the ASGI
scope directly: Quart's per-request machinery (request and app contexts, signals, Request and
Response objects, a nursery with a body-reading task) serves features the agent does not use and
cost more than all the rest of a cache hit. A cached secret's body is rendered once,
so a hit sends two ASGI messages built from bytes already in memory.

Conditional and waiting reads (SPEC §3) are answered here too: an `If-None-Match` that names the
cached version gets a 304, and with `Prefer: wait=N` the request is held in its own connection's
task on the cache's per-key change announcement (changes.py), so a held request costs no task
and no KMS call, and all the requests held on a key wake in one pass when its value changes. A
held request counts as a read each time it wakes, which keeps its entry refreshed ahead; the
server's shutdown (`stop_waiting`) and the client hanging up (connection.py cancels the
request) end it at once.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import trio
from loguru import logger
from quart_trio import QuartTrio

from kmsagent.checks import SECRETS_MANAGER_PATH, CacheKey, Route, SecretQuery, check_request
from kmsagent.conditional import Conditions, read_conditions
from kmsagent.config import ServerConfig
from kmsagent.errors import AgentError
from kmsagent.formats import ResponseFormat
from kmsagent.metrics import Metrics
from kmsagent.store import CachedSecret, SecretStore
from kmsagent.token import TokenSource

#: Set in the ASGI scope's extensions by the server for connections accepted beyond MaxConn.
OVER_LIMIT = "kmsagent.over_limit"
Headers = list[tuple[bytes, bytes]]
JSON = b"application/json"
SECRET_HEADERS = {
    outcome: [(b"content-type", JSON), (b"x-kms-agent-cache", outcome.encode()), (b"cache-control", b"no-store")]
    for outcome in ("hit", "miss", "stale")
}
#: A 304 carries no body, so no Content-Type (SPEC §3); its ETag comes first.
NOT_MODIFIED_HEADERS = {
    outcome: [(b"x-kms-agent-cache", outcome.encode()), (b"cache-control", b"no-store")]
    for outcome in ("hit", "miss", "stale")
}
PING = (200, [(b"content-type", b"text/plain")], b"healthy")
Answer = tuple[int, Headers, bytes]


async def _send_answer(send: Any, status: int, headers: Headers, body: bytes) -> None:
    if status != 304:  # RFC 9110 §8.6: a 304's Content-Length would be the 200's, so none
        headers = [*headers, (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _has_body(headers: Headers) -> bool:
    return any(
        name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"0", b""))
        for name, value in headers
    )


async def _discard_body(receive: Any) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return


class _RefuseWebsocket:
    """A WebSocket handshake gets SPEC §3's checks like any request, then 405: it is not a GET."""

    def __init__(self, app: AgentApp, scope: dict[str, Any]) -> None:
        self._app = app
        self._scope = scope

    async def __call__(self, receive: Any, send: Any) -> None:
        await receive()  # websocket.connect
        status, headers, body = await self._app.respond({**self._scope, "method": "WEBSOCKET"})
        length = (b"content-length", b"%d" % len(body))
        await send({"type": "websocket.http.response.start", "status": status, "headers": [*headers, length]})
        await send({"type": "websocket.http.response.body", "body": body, "more_body": False})


class AgentApp(QuartTrio):
    """Serves `/ping`, `/metrics` and secrets; every failure becomes SPEC §4's error body."""

    def __init__(
        self,
        *,
        config: ServerConfig,
        token: TokenSource,
        store: SecretStore,
        response_format: ResponseFormat,
        metrics: Metrics,
    ) -> None:
        super().__init__("kmsagent")
        self.agent_config = config
        self.token = token
        self.store = store
        self.response_format = response_format
        self.metrics = metrics
        #: The cancel scope of each held request (`Prefer: wait`); cancelled: answered 304.
        self._held: set[trio.CancelScope] = set()
        self._stopping = False
        metrics.watch("kmsagent_waiting_requests", "Requests held by Prefer: wait.", lambda: len(self._held))

    asgi_websocket_class = _RefuseWebsocket  # type: ignore[assignment]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """ASGI entry: an HTTP request is answered here, in place of Quart's `asgi_app` and its
        `ASGIHTTPConnection`; lifespan and WebSocket go the Quart way.

        Flat on purpose: every coroutine frame between hypercorn and `respond` is kept by every
        request in progress, a held one (`Prefer: wait`) for minutes: Quart's `__call__`,
        `asgi_app` and a handler object took 750 bytes of each of 900 held requests.
        """
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
        elif not _has_body(scope["headers"]):
            await _send_answer(send, *await self.respond(scope))
        else:
            # hypercorn queues at most 10 body messages for the app, then stops reading: drain
            # them, or a body larger than that would stall the connection for good.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_discard_body, receive)
                await _send_answer(send, *await self.respond(scope))
                nursery.cancel_scope.cancel()

    async def respond(self, scope: dict[str, Any]) -> Answer:
        """Status, headers and body for one request (never raises, but for cancellation)."""
        started = trio.current_time()
        outcome = secret_id = "-"
        method = scope["method"]
        try:
            target = check_request(
                method=method,
                path=scope.get("raw_path") or scope["path"].encode(),
                query_string=scope.get("query_string", b""),
                headers=scope["headers"],
                over_limit=bool(scope.get("extensions", {}).get(OVER_LIMIT)),
                config=self.agent_config,
                token_matches=self.token.matches,
                http_version=scope.get("http_version", "1.1"),
            )
            if target is Route.PING:
                status, headers, body = PING
            elif target is Route.METRICS:
                status, headers, body = (
                    200,
                    [(b"content-type", self.metrics.content_type.encode())],
                    self.metrics.render(),
                )
            else:
                assert isinstance(target, SecretQuery)
                secret_id = target.secret_id
                stage = self.response_format.kms_stage(target.version_stage)
                if stage != target.version_stage:  # ResponseType 1's AWSCURRENT... (SPEC §4)
                    target = replace(target, version_stage=stage)
                cached, cache_outcome = await self.store.get(target)
                outcome = cache_outcome.value
                self.metrics.cache_results.labels(outcome).inc()
                conditions = read_conditions(scope["headers"])
                if conditions is None or not conditions.matches(cached.etag):
                    status, headers, body = self._secret(cached, outcome)
                elif conditions.wait is None or self.store.cache.ttl <= 0:  # TtlSeconds = 0: nothing to watch
                    status, headers, body = 304, [(b"etag", cached.etag), *NOT_MODIFIED_HEADERS[outcome]], b""
                else:
                    status, headers, body = await self._hold(target.cache_key, conditions, cached, outcome)
        except AgentError as error:
            if error.status >= 500:
                logger.warning("secret {!r}: {}: {}", secret_id[:200], error.code, error.message)
            status, headers, body = self._error(error)
        except Exception:  # noqa: BLE001 - a bug costs its request a 500, logged with its traceback
            logger.exception("unexpected failure serving {}", scope.get("path", "?")[:200])
            status, headers, body = self._error(AgentError(500, "InternalFailure", "internal error"))
        self.metrics.requests.labels(self._route_label(scope), str(status)).inc()
        logger.debug(
            "{} {} {} cache={} secret={!r} {:.1f}ms",
            method[:16],
            scope.get("path", "?")[:200],
            status,
            outcome,
            secret_id[:200],
            (trio.current_time() - started) * 1000,
        )
        return status, headers, body

    def _secret(self, cached: CachedSecret, outcome: str, *extra: tuple[bytes, bytes]) -> Answer:
        headers = [*SECRET_HEADERS[outcome], (b"etag", cached.etag), *extra]
        return 200, headers, self.response_format.finish(cached.body)

    async def _hold(
        self, key: CacheKey, conditions: Conditions, cached: CachedSecret, outcome: str
    ) -> Answer:
        """Holds a conditional read (`Prefer: wait`): 200 once `key`'s cached version is news to
        the client, 304 when the wait ends or the server stops, or the error that dropped the key.

        Called right after the read that found `cached`, with no checkpoint in between, so no
        change can slip past: `changes.wait` subscribes before it yields. One coroutine, not a
        chain of them: each frame is memory that every held request keeps.
        """
        seconds = min(conditions.wait or 0, self.agent_config.max_wait_seconds)
        applied = (b"preference-applied", b"wait=%d" % seconds)
        cache = self.store.cache
        news: CachedSecret | None = None
        error: BaseException | None = None
        with trio.move_on_after(seconds) as held:
            self._held.add(held)
            try:
                while news is None and error is None and not self._stopping:
                    error = await cache.changes.wait(key)
                    entry = cache.peek(key)
                    if error is None and entry is not None:  # else not kept (TtlSeconds became 0)
                        cache.mark_read(key, request=True)  # a held request keeps its entry hot (refreshed ahead)
                        if conditions.is_news(entry.value.etag, cached.etag):
                            news = entry.value
            finally:
                self._held.discard(held)
        if news is not None:
            return self._secret(news, "hit", applied)
        if error is None:
            return 304, [(b"etag", cached.etag), *NOT_MODIFIED_HEADERS[outcome], applied], b""
        # KMS answered 4xx for the key (deleted, access revoked): that error, raised as a fresh
        # object per request (one object raised in many tasks would grow its traceback each time).
        if isinstance(error, AgentError):
            raise AgentError(error.status, error.code, error.message) from None
        raise AgentError(500, "InternalFailure", "internal error") from None

    def stop_waiting(self) -> None:
        """The server is stopping: held requests are answered 304 now, and no new one is held."""
        self._stopping = True
        for held in self._held:
            held.cancel()

    def _route_label(self, scope: dict[str, Any]) -> str:
        path = scope.get("raw_path") or b""
        if path in (Route.PING.value, Route.METRICS.value):
            return "ping" if path == Route.PING.value else "metrics"
        if path == SECRETS_MANAGER_PATH or path.startswith(self.agent_config.path_prefix.encode()):
            return "secret"
        return "other"

    def _error(self, error: AgentError) -> Answer:
        headers = [(b"content-type", JSON)]
        if error.code == "ConnectionLimitExceeded":
            headers.append((b"connection", b"close"))  # the slot it would hold is one the agent does not have
        return error.status, headers, self.response_format.error(error)
