"""ECS RAM role credentials: a trio task that fetches STS credentials from the instance metadata
service and renews them before they expire (the loop is `renewing.py`'s).

Why not alibabacloud-credentials' `EcsRamRoleCredentialsProvider`: it hard-codes the metadata
host (so no emulator or test can serve it), starts an APScheduler thread per instance, has no
async path that runs under trio, and attaches stderr handlers to its logger (NOTES.md). The
protocol is three small HTTP calls, spoken here with httpx, cancellable and time-bounded.

`probe` is how `auto` decides whether it runs on ECS at all: a laptop has no metadata service,
and retrying 100.100.100.200 for ever there (issue 11) hid the real problem; a service that does
not answer within PROBE_WAIT means "not on ECS".
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import trio

from kmsagent.config import CredentialsConfig
from kmsagent.credentials.base import Credentials
from kmsagent.credentials.renewing import REJECTION_RENEW_INTERVAL, FetchError, RenewingCredentials
from kmsagent.errors import AgentError, UpstreamUnavailable

if TYPE_CHECKING:
    import httpx

__all__ = ["REJECTION_RENEW_INTERVAL", "EcsRamRoleCredentials", "MetadataError", "probe"]

TOKEN_PATH = "/latest/api/token"
ROLES_PATH = "/latest/meta-data/ram/security-credentials/"
TOKEN_TTL_HEADER = "X-aliyun-ecs-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aliyun-ecs-metadata-token"
#: The metadata token is fetched anew for each renewal, so it only needs to outlive one.
TOKEN_TTL_SECONDS = 300
#: Seconds for each step of a metadata call (httpx.Timeout's).
METADATA_TIMEOUT = {"connect": 1.0, "read": 2.0, "write": 2.0, "pool": 1.0}
#: How long `auto` waits for the metadata service before deciding this is not an ECS instance.
#: On ECS it answers in milliseconds (it is on the hypervisor); elsewhere the connect times out.
PROBE_WAIT = 2.0
ROLE_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")  # as config.py accepts for RoleName

MetadataError = FetchError  # the name this module's errors had before the loop was shared


class EcsRamRoleCredentials(RenewingCredentials):
    """STS credentials of the instance's RAM role, kept fresh by `run` in the agent's nursery."""

    label = "ECS RAM role credentials"

    def __init__(
        self, config: CredentialsConfig, *, clock: Callable[[], float] = time.time, role_name: str | None = None
    ) -> None:
        super().__init__(renew_before=config.renew_before_seconds, clock=clock)
        self._config = config
        self._role = config.role_name if role_name is None else role_name
        role = self._role or "role to be discovered"
        self.kind = f"ecs_ram_role ({role} via {config.metadata_endpoint})"

    def _http_client(self) -> httpx.AsyncClient:
        return _metadata_client(self._config.metadata_endpoint)

    def _unavailable(self) -> AgentError:
        return UpstreamUnavailable(
            f"no valid credentials: the ECS metadata service at {self._config.metadata_endpoint} "
            "has not provided any (see the agent's log)"
        )

    async def _fetch(self, http: httpx.AsyncClient) -> Credentials:
        headers = await _token_headers(http, self._config)
        role = self._role or await self._discover_role(http, headers)
        document = _json_object(await self._get(http, ROLES_PATH + quote(role, safe=""), headers))
        if document.get("Code") != "Success":
            raise FetchError(f"the metadata service answered Code {str(document.get('Code'))[:40]!r}")
        return self._checked(document, "the metadata service")

    async def _discover_role(self, http: httpx.AsyncClient, headers: dict[str, str]) -> str:
        return _role_from(await self._get(http, ROLES_PATH, headers))

    async def _get(self, http: httpx.AsyncClient, path: str, headers: dict[str, str]) -> bytes:
        import httpx

        try:
            response = await http.get(path, headers=headers)
        except httpx.HTTPError as error:
            raise FetchError(
                f"cannot reach the metadata service at {self._config.metadata_endpoint}: {type(error).__name__}"
            ) from None
        if response.status_code != 200:
            raise FetchError(f"the metadata service answered HTTP {response.status_code} for {path}")
        return response.content


async def probe(config: CredentialsConfig, *, role_name: str = "", wait: float = PROBE_WAIT) -> tuple[str | None, str]:
    """Whether the metadata service is there: (None, role) when it lists a RAM role within
    `wait` seconds (or answers at all, with `role_name` given), else (why not, "")."""
    import httpx

    endpoint = config.metadata_endpoint
    async with _metadata_client(endpoint) as http:
        with trio.move_on_after(wait):
            try:
                headers = await _token_headers(http, config)
                response = await http.get(ROLES_PATH, headers=headers)
            except FetchError as error:
                return str(error), ""
            except httpx.HTTPError as error:
                return f"{endpoint} cannot be reached ({type(error).__name__})", ""
            if role_name and response.status_code in (200, 404):
                return None, role_name
            if response.status_code != 200:
                return f"{endpoint} answered HTTP {response.status_code} for {ROLES_PATH}", ""
            try:
                return None, _role_from(response.content)
            except FetchError as error:
                return f"{endpoint}: {error}", ""
    return f"{endpoint} did not answer within {wait:g} s (not an ECS instance)", ""


def _metadata_client(endpoint: str) -> httpx.AsyncClient:
    import httpx  # on first use: an agent on static keys never loads it (≈ 35 ms of start-up)

    return httpx.AsyncClient(base_url=endpoint, timeout=httpx.Timeout(**METADATA_TIMEOUT), trust_env=False)


async def _token_headers(http: httpx.AsyncClient, config: CredentialsConfig) -> dict[str, str]:
    """A hardened-mode token header; none means IMDSv1 (allowed unless DisableIMDSv1)."""
    import httpx

    try:
        response = await http.put(TOKEN_PATH, headers={TOKEN_TTL_HEADER: str(TOKEN_TTL_SECONDS)})
        reason = f"HTTP {response.status_code}"
        if response.status_code == 200 and response.text.strip():
            return {TOKEN_HEADER: response.text.strip()}
    except httpx.HTTPError as error:
        reason = type(error).__name__
    if config.disable_imdsv1:
        raise FetchError(f"no metadata token ({reason}) and DisableIMDSv1 forbids going on without one")
    return {}


def _role_from(body: bytes) -> str:
    lines = body.decode("utf-8", "replace").split()
    if not lines:
        raise FetchError("no RAM role is attached to this instance")
    if not ROLE_NAME.fullmatch(lines[0]):
        raise FetchError("the metadata service answered a role name that is not one")
    return lines[0]


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise FetchError("the metadata service answered credentials that are not a JSON object")
    return document
