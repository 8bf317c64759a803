"""ECS RAM role credentials: a trio task that fetches STS credentials from the instance metadata
service and renews them `RenewBeforeSeconds` before they expire.

Why not alibabacloud-credentials' `EcsRamRoleCredentialsProvider`: it hard-codes the metadata
host (so no emulator or test can serve it), starts an APScheduler thread per instance, has no
async path that runs under trio, and attaches stderr handlers to its logger (NOTES.md). The
protocol is three small HTTP calls, spoken here with httpx, cancellable and time-bounded.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import httpx
import trio
from loguru import logger

from kmsagent.config import CredentialsConfig
from kmsagent.credentials.base import Credentials, parse_expiration
from kmsagent.errors import UpstreamUnavailable

TOKEN_PATH = "/latest/api/token"
ROLES_PATH = "/latest/meta-data/ram/security-credentials/"
TOKEN_TTL_HEADER = "X-aliyun-ecs-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aliyun-ecs-metadata-token"
#: The metadata token is fetched anew for each renewal, so it only needs to outlive one.
TOKEN_TTL_SECONDS = 300
METADATA_TIMEOUT = httpx.Timeout(connect=1.0, read=2.0, write=2.0, pool=1.0)
#: How long a KMS call waits for credentials that are not there (yet, or any more).
CREDENTIALS_WAIT = 2.0
RETRY_BASE, RETRY_CAP = 1.0, 30.0
MIN_RENEW_INTERVAL = 1.0
#: A renewal asked for by KMS's rejection comes at most this often (trio seconds): KMS answering
#: "security token expired" to every call once made 286 metadata fetches for 300 reads, while the
#: metadata service hands out the same credentials that soon anyway.
REJECTION_RENEW_INTERVAL = 5.0
ROLE_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")  # as config.py accepts for RoleName


class MetadataError(Exception):
    """The metadata service did not give usable credentials. Never carries a credential value."""


class EcsRamRoleCredentials:
    """STS credentials of the instance's RAM role, kept fresh by `run` in the agent's nursery."""

    def __init__(self, config: CredentialsConfig, *, clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._clock = clock
        self._credentials: Credentials | None = None
        self._changed = trio.Event()  # set, then replaced, each time new credentials arrive
        self._renew_now = trio.Event()
        self._fetching = False
        self._last_forced = -math.inf  # trio.current_time() of the last renewal a rejection asked for
        self._fetched = trio.Event()  # set, then replaced, when a fetch ends, failed or not
        role = config.role_name or "discovered role"
        self.kind = f"ecs_ram_role ({role} via {config.metadata_endpoint})"
        #: Successful fetches so far (the first one included).
        self.fetches = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Fetches, then renews before expiry; on failure keeps the old credentials and backs off."""
        async with httpx.AsyncClient(
            base_url=self._config.metadata_endpoint, timeout=METADATA_TIMEOUT, trust_env=False
        ) as http:
            task_status.started()
            failures = 0
            while True:
                self._renew_now = trio.Event()
                self._fetching = True
                try:
                    credentials = await self._fetch(http)
                except MetadataError as error:
                    failures += 1
                    delay = random.uniform(0.5, 1.0) * min(RETRY_CAP, RETRY_BASE * 2 ** (failures - 1))
                    logger.warning(
                        "ECS RAM role credentials: {}; {}; retrying in {:.1f}s",
                        error,
                        "keeping the current ones until they expire" if self._valid() else "none valid now",
                        delay,
                    )
                else:
                    failures = 0
                    self._install(credentials)
                    delay = self._renewal_delay(credentials)
                    logger.info("ECS RAM role credentials renewed; next renewal in {:.0f}s", delay)
                finally:
                    self._fetching = False
                    self._fetched.set()
                    self._fetched = trio.Event()
                with trio.move_on_after(delay):
                    await self._renew_now.wait()

    async def current(self) -> Credentials:
        with trio.move_on_after(CREDENTIALS_WAIT):
            while (credentials := self._valid()) is None:
                await self._changed.wait()
            return credentials
        raise UpstreamUnavailable(
            f"no valid credentials: the ECS metadata service at {self._config.metadata_endpoint} "
            "has not provided any (see the agent's log)"
        )

    async def rejected(self, credentials: Credentials) -> bool:
        """Renews at once, unless newer credentials already replaced the rejected ones.

        Single flight: every rejection during a fetch (asked for or scheduled) waits for that
        fetch. At most one renewal per REJECTION_RENEW_INTERVAL: a rejection sooner after the
        last one renews nothing and only says whether newer credentials exist (here: they do not).
        """
        if credentials is not self._credentials:
            return True
        if not (self._fetching or self._renew_now.is_set()):  # else join the fetch under way
            now = trio.current_time()
            if now - self._last_forced < REJECTION_RENEW_INTERVAL:
                return False
            self._last_forced = now
            self._renew_now.set()
        fetched = self._fetched
        with trio.move_on_after(CREDENTIALS_WAIT):
            await fetched.wait()
        return credentials is not self._credentials

    def expiration(self) -> float | None:
        return self._credentials.expiration if self._credentials is not None else None

    def _valid(self) -> Credentials | None:
        credentials = self._credentials
        if credentials is None or credentials.expiration is None or self._clock() >= credentials.expiration:
            return None
        return credentials

    def _install(self, credentials: Credentials) -> None:
        self._credentials = credentials
        self.fetches += 1
        self._changed.set()
        self._changed = trio.Event()

    def _renewal_delay(self, credentials: Credentials) -> float:
        """Seconds until renewal: RenewBeforeSeconds before expiry, or at half-life if sooner."""
        assert credentials.expiration is not None
        remaining = credentials.expiration - self._clock()
        delay = remaining - self._config.renew_before_seconds
        return delay if delay >= MIN_RENEW_INTERVAL else remaining / 2

    async def _fetch(self, http: httpx.AsyncClient) -> Credentials:
        headers = {}
        token = await self._metadata_token(http)
        if token is not None:
            headers[TOKEN_HEADER] = token
        role = self._config.role_name or await self._discover_role(http, headers)
        document = _json_object(await self._get(http, ROLES_PATH + quote(role, safe=""), headers))
        return self._credentials_from(document)

    async def _metadata_token(self, http: httpx.AsyncClient) -> str | None:
        """A hardened-mode token; None means IMDSv1 (allowed unless DisableIMDSv1)."""
        try:
            response = await http.put(TOKEN_PATH, headers={TOKEN_TTL_HEADER: str(TOKEN_TTL_SECONDS)})
            reason = f"HTTP {response.status_code}"
            if response.status_code == 200 and response.text.strip():
                return response.text.strip()
        except httpx.HTTPError as error:
            reason = type(error).__name__
        if self._config.disable_imdsv1:
            raise MetadataError(f"no metadata token ({reason}) and DisableIMDSv1 forbids going on without one")
        return None

    async def _discover_role(self, http: httpx.AsyncClient, headers: dict[str, str]) -> str:
        lines = (await self._get(http, ROLES_PATH, headers)).decode("utf-8", "replace").split()
        if not lines:
            raise MetadataError("no RAM role is attached to this instance")
        if not ROLE_NAME.fullmatch(lines[0]):
            raise MetadataError("the metadata service answered a role name that is not one")
        return lines[0]

    async def _get(self, http: httpx.AsyncClient, path: str, headers: dict[str, str]) -> bytes:
        try:
            response = await http.get(path, headers=headers)
        except httpx.HTTPError as error:
            raise MetadataError(
                f"cannot reach the metadata service at {self._config.metadata_endpoint}: {type(error).__name__}"
            ) from None
        if response.status_code != 200:
            raise MetadataError(f"the metadata service answered HTTP {response.status_code} for {path}")
        return response.content

    def _credentials_from(self, document: dict[str, Any]) -> Credentials:
        """Validates the role's credentials; errors name fields, never their values."""
        if document.get("Code") != "Success":
            raise MetadataError(f"the metadata service answered Code {str(document.get('Code'))[:40]!r}")
        fields = ("AccessKeyId", "AccessKeySecret", "SecurityToken", "Expiration")
        missing = [name for name in fields if not isinstance(document.get(name), str) or not document[name]]
        if missing:
            raise MetadataError(f"the metadata service answered credentials without {', '.join(missing)}")
        try:
            expiration = parse_expiration(document["Expiration"])
        except ValueError:
            raise MetadataError("the metadata service answered an Expiration that is not an ISO 8601 time") from None
        if expiration <= self._clock():
            raise MetadataError("the metadata service answered credentials that have already expired")
        return Credentials(document["AccessKeyId"], document["AccessKeySecret"], document["SecurityToken"], expiration)


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise MetadataError("the metadata service answered credentials that are not a JSON object")
    return document
