"""An in-process fake of the ECS instance metadata service's RAM-role credentials.

It speaks what the agent's credential task uses: `PUT /latest/api/token` (hardened mode),
`GET /latest/meta-data/ram/security-credentials/` (role discovery) and `.../<role>` (credentials).
Each credentials fetch mints new STS credentials with a configurable lifetime and registers them
with the `KmsEmulator`, which accepts them until they expire and rejects them after, as KMS does.
Switches let tests take the service down, make it answer garbage or a failure Code, require the
token (hardened only) or lack the token API (old hosts).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial

import trio

from kmsagent.emulator.http import HttpRequest, HttpResponse, serve_http
from kmsagent.emulator.kms import KmsEmulator

TOKEN_PATH = "/latest/api/token"
ROLES_PATH = "/latest/meta-data/ram/security-credentials/"
TOKEN_TTL_HEADER = "x-aliyun-ecs-metadata-token-ttl-seconds"
TOKEN_HEADER = "x-aliyun-ecs-metadata-token"
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


@dataclass(frozen=True)
class IssuedCredentials:
    access_key_id: str
    access_key_secret: str
    security_token: str
    expires_at: float

    def document(self, now: float) -> dict[str, str]:
        """The JSON the metadata service (and a credentials URI) answers, Code "Success"."""
        return {
            "AccessKeyId": self.access_key_id,
            "AccessKeySecret": self.access_key_secret,
            "SecurityToken": self.security_token,
            "Expiration": _utc(self.expires_at),
            "LastUpdated": _utc(now),
            "Code": "Success",
        }


def mint(kms: KmsEmulator, lifetime: float, now: float, may_read: Iterable[str] | None = None) -> IssuedCredentials:
    """New STS credentials valid for `lifetime` seconds from `now`, which `kms` accepts until then
    (for only the secrets `may_read` names, when given)."""
    issued = IssuedCredentials(
        f"STS.{secrets.token_hex(10)}", secrets.token_urlsafe(30), secrets.token_urlsafe(60), now + lifetime
    )
    kms.add_credentials(
        issued.access_key_id,
        issued.access_key_secret,
        issued.security_token,
        expires_at=issued.expires_at,
        secrets=may_read,
    )
    return issued


class MetadataEmulator:
    """The metadata service of one ECS instance with one RAM role attached."""

    def __init__(
        self,
        kms: KmsEmulator,
        *,
        role: str = "KmsAgentRole",
        lifetime: float = 6 * 3600,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.kms = kms
        self.role = role
        self.lifetime = lifetime
        self.clock = clock
        #: Switches: answer 503 to everything; answer credentials that are not JSON; answer this
        #: Code instead of "Success"; refuse GETs without a token; answer 404 to the token PUT.
        self.outage = False
        self.malformed = False
        self.failure_code: str | None = None
        self.require_token = False
        self.token_api = True
        self.issued: list[IssuedCredentials] = []
        self.requests: list[tuple[str, str, bool]] = []  # (method, path, carried a valid token)
        self._tokens: dict[str, float] = {}
        self.port: int | None = None
        self.endpoint: str | None = None

    async def serve(
        self, *, host: str = "127.0.0.1", port: int = 0, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serves until cancelled; afterwards `endpoint` is the `http://127.0.0.1:<port>` to configure."""

        async with trio.open_nursery() as nursery:
            self.port = await nursery.start(partial(serve_http, self._handle, host=host, port=port))
            self.endpoint = f"http://{host}:{self.port}"
            task_status.started(self.port)

    async def _handle(self, request: HttpRequest) -> HttpResponse:
        token = request.headers.get(TOKEN_HEADER)
        valid_token = token is not None and self._tokens.get(token, 0) > self.clock()
        self.requests.append((request.method, request.path, valid_token))
        if self.outage:
            return _text(503, "service unavailable")
        if request.path == TOKEN_PATH and request.method == "PUT":
            return self._issue_token(request)
        if request.method != "GET" or not request.path.startswith(ROLES_PATH):
            return _text(404, "not found")
        if (token is not None and not valid_token) or (self.require_token and not valid_token):
            return _text(401, "unauthorized")
        role = request.path.removeprefix(ROLES_PATH)
        if role == "":
            return _text(200, self.role)
        if role != self.role:
            return _text(404, "not found")
        return self._credentials()

    def _issue_token(self, request: HttpRequest) -> HttpResponse:
        if not self.token_api:
            return _text(404, "not found")
        try:
            ttl = int(request.headers.get(TOKEN_TTL_HEADER, ""))
        except ValueError:
            return _text(400, "missing or invalid token TTL")
        if not 1 <= ttl <= 21600:
            return _text(400, "token TTL must be 1..21600")
        token = secrets.token_urlsafe(32)
        self._tokens[token] = self.clock() + ttl
        return _text(200, token)

    def _credentials(self) -> HttpResponse:
        if self.malformed:
            return _text(200, '{"AccessKeyId": "STS.trunc')
        now = self.clock()
        issued = mint(self.kms, self.lifetime, now)
        self.issued.append(issued)
        document = {**issued.document(now), "Code": self.failure_code or "Success"}
        return HttpResponse(200, [("content-type", "text/plain")], json.dumps(document).encode())


def _utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime(_TIME_FORMAT)


def _text(status: int, text: str) -> HttpResponse:
    return HttpResponse(status, [("content-type", "text/plain")], text.encode())
