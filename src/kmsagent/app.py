"""The HTTP application: request → checks → store (cache → KMS client) → response.

A QuartTrio app (its ASGI entry point and lifespan are Quart's) whose HTTP requests all go to one
handler. SPEC §3 fixes the check order (connection cap, Forwarded, Host and token come before
method and path), and Quart's URL map would answer 404 or 405 before the token check, so routing
is `checks.check_request`. The handler is plugged in through Quart's `asgi_http_class`, and works
on the ASGI scope directly: Quart's per-request machinery (request and app contexts, signals,
Request and Response objects, a nursery with a body-reading task) serves features the agent does
not use and cost more than all the rest of a cache hit. A cached secret's body is rendered once,
so a hit sends two ASGI messages built from bytes already in memory.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import trio
from loguru import logger
from quart_trio import QuartTrio

from kmsagent.checks import SECRETS_MANAGER_PATH, Route, SecretQuery, check_request
from kmsagent.config import ServerConfig
from kmsagent.errors import AgentError
from kmsagent.formats import ResponseFormat
from kmsagent.metrics import Metrics
from kmsagent.store import SecretStore
from kmsagent.token import TokenSource

#: Set in the ASGI scope's extensions by the server for connections accepted beyond MaxConn.
OVER_LIMIT = "kmsagent.over_limit"
Headers = list[tuple[bytes, bytes]]
JSON = b"application/json"
SECRET_HEADERS = {
    outcome: [(b"content-type", JSON), (b"x-kms-agent-cache", outcome.encode()), (b"cache-control", b"no-store")]
    for outcome in ("hit", "miss", "stale")
}
PING = (200, [(b"content-type", b"text/plain")], b"healthy")


class _Exchange:
    """One HTTP request/response over ASGI, in place of Quart's `ASGIHTTPConnection`."""

    def __init__(self, app: AgentApp, scope: dict[str, Any]) -> None:
        self._app = app
        self._scope = scope

    async def __call__(self, receive: Any, send: Any) -> None:
        if not _has_body(self._scope["headers"]):
            await self._exchange(send)
            return
        # hypercorn queues at most 10 body messages for the app, then stops reading: drain them,
        # or a body larger than that would stall the connection for good.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_discard_body, receive)
            await self._exchange(send)
            nursery.cancel_scope.cancel()

    async def _exchange(self, send: Any) -> None:
        status, headers, body = await self._app.respond(self._scope)
        length = (b"content-length", b"%d" % len(body))
        await send({"type": "http.response.start", "status": status, "headers": [*headers, length]})
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

    asgi_http_class = _Exchange  # type: ignore[assignment]
    asgi_websocket_class = _RefuseWebsocket  # type: ignore[assignment]

    async def respond(self, scope: dict[str, Any]) -> tuple[int, Headers, bytes]:
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
                status, headers, body = 200, [(b"content-type", self.metrics.content_type.encode())], self.metrics.render()
            else:
                assert isinstance(target, SecretQuery)
                secret_id = target.secret_id
                stage = self.response_format.kms_stage(target.version_stage)
                if stage != target.version_stage:  # ResponseType 1's AWSCURRENT... (SPEC §4)
                    target = replace(target, version_stage=stage)
                cached, cache_outcome = await self.store.get(target)
                outcome = cache_outcome.value
                self.metrics.cache_results.labels(outcome).inc()
                status, headers, body = 200, SECRET_HEADERS[outcome], self.response_format.finish(cached.body)
        except AgentError as error:
            if error.status >= 500:
                logger.warning("secret {!r}: {}: {}", secret_id[:200], error.code, error.message)
            status, headers, body = self._error(error)
        except Exception:
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

    def _route_label(self, scope: dict[str, Any]) -> str:
        path = scope.get("raw_path") or b""
        if path in (Route.PING.value, Route.METRICS.value):
            return "ping" if path == Route.PING.value else "metrics"
        if path == SECRETS_MANAGER_PATH or path.startswith(self.agent_config.path_prefix.encode()):
            return "secret"
        return "other"

    def _error(self, error: AgentError) -> tuple[int, Headers, bytes]:
        headers = [(b"content-type", JSON)]
        if error.code == "ConnectionLimitExceeded":
            headers.append((b"connection", b"close"))  # the slot it would hold is one the agent does not have
        return error.status, headers, self.response_format.error(error)
