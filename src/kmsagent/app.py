"""The HTTP application: request → checks → store (cache → KMS client) → response.

A QuartTrio app whose one handler sees every request: SPEC §3 fixes the check order (connection
cap, Forwarded, Host and token come before method and path), and Quart's URL map would answer 404
or 405 before the token check, so routing is done by `checks.check_request` instead.
"""

from __future__ import annotations

from typing import Any

import trio
from loguru import logger
from quart import Response
from quart.ctx import RequestContext
from quart.globals import request_ctx
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
JSON = "application/json"


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

    async def dispatch_request(self, request_context: RequestContext | None = None) -> Response:
        request = (request_context or request_ctx).request
        scope = request.scope
        started = trio.current_time()
        outcome = secret_id = "-"
        try:
            target = check_request(
                method=request.method,
                path=scope.get("raw_path") or scope["path"].encode(),
                query_string=scope.get("query_string", b""),
                headers=scope["headers"],
                over_limit=bool(scope.get("extensions", {}).get(OVER_LIMIT)),
                config=self.agent_config,
                token_matches=self.token.matches,
            )
            if target is Route.PING:
                response = Response("healthy", 200, content_type="text/plain")
            elif target is Route.METRICS:
                response = Response(self.metrics.render(), 200, content_type=self.metrics.content_type)
            else:
                assert isinstance(target, SecretQuery)
                secret_id = target.secret_id
                cached, cache_outcome = await self.store.get(target)
                outcome = cache_outcome.value
                self.metrics.cache_results.labels(outcome).inc()
                response = Response(
                    cached.body,
                    200,
                    headers={"X-KMS-Agent-Cache": outcome, "Cache-Control": "no-store"},
                    content_type=JSON,
                )
        except AgentError as error:
            if error.status >= 500:
                logger.warning("secret {!r}: {}: {}", secret_id[:200], error.code, error.message)
            response = self._error_response(error)
        except Exception:
            logger.exception("unexpected failure serving {}", scope.get("path", "?")[:200])
            response = self._error_response(AgentError(500, "InternalFailure", "internal error"))
        self.metrics.requests.labels(self._route_label(scope), str(response.status_code)).inc()
        logger.debug(
            "{} {} {} cache={} secret={!r} {:.1f}ms",
            request.method[:16],
            scope.get("path", "?")[:200],
            response.status_code,
            outcome,
            secret_id[:200],
            (trio.current_time() - started) * 1000,
        )
        return response

    def _route_label(self, scope: dict[str, Any]) -> str:
        path = scope.get("raw_path") or b""
        if path in (Route.PING.value, Route.METRICS.value):
            return "ping" if path == Route.PING.value else "metrics"
        if path == SECRETS_MANAGER_PATH or path.startswith(self.agent_config.path_prefix.encode()):
            return "secret"
        return "other"

    def _error_response(self, error: AgentError) -> Response:
        headers: dict[str, Any] = {}
        if error.code == "ConnectionLimitExceeded":
            headers["Connection"] = "close"  # the slot it would hold is one the agent does not have
        return Response(self.response_format.error(error), error.status, headers=headers, content_type=JSON)


