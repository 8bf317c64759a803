"""Per-request roles (SPEC §6): `roleArn=ARN` reads a secret with an STS session of that role.

`RoleSessions` keeps one renewing `AssumeRoleSession` per role that requests name, signed with
the agent's own credentials (whose task already runs: `owns_source=False`), each session's task
in the agent's nursery under a cancel scope of its own. Only roles listed in AllowedRoleArns are
assumed (an empty list allows none). At most MAX_ACTIVE_ROLES are active: naming one more drops
the least recently used, its renewal task cancelled and its cache entries dropped (`CacheKey`
starts with the role), so memory and STS calls stay bounded whatever the clients name.

An STS refusal (any 4xx: the role does not trust the agent, or does not exist) drops the role's
session too, and is remembered for NotFoundTtlSeconds: requests meanwhile get the same 403
without calling STS, as KMS's not-found answers are remembered per key (SPEC §5). A role refused
for good thus costs STS one call per NotFoundTtlSeconds while clients insist, none when they stop.
Refusals are kept only for allowed roles, so that table is bounded by the config.

RAM names ignore case: checks.py lower-cases the role of a query (one cache key and one session
per role however it is spelt) and STS is asked for the ARN as AllowedRoleArns spells it.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import trio
from loguru import logger

from kmsagent.cache import SecretCache
from kmsagent.checks import CacheKey
from kmsagent.config import CredentialsConfig
from kmsagent.credentials import Credentials, CredentialSource
from kmsagent.credentials.sts import AssumeRoleSession, RoleRequest, StsEndpoint, StsRefused
from kmsagent.errors import AgentError

#: SPEC §6: at most this many roles have a session; the least recently used one goes beyond it.
MAX_ACTIVE_ROLES = 20
#: `[Cache] NotFoundTtlSeconds`' default, for a config that does not carry the key.
DEFAULT_REFUSAL_TTL = 5.0


class RoleNotAllowed(AgentError):
    """The request named a role that AllowedRoleArns does not list."""

    def __init__(self, role_arn: str) -> None:
        # checks.py let through only acs:ram::<digits>:role/<[A-Za-z0-9._@-]>: safe to show.
        super().__init__(403, "RoleNotAllowed", f"roleArn {role_arn} is not in [Credentials] AllowedRoleArns")


def refuse_roles(role: str) -> CredentialSource:
    """The store's rule when the agent runs no `RoleSessions`: no role is allowed."""
    raise RoleNotAllowed(role)


class RoleSession(AssumeRoleSession):
    """One per-request role's session; tells its owner when STS refuses it."""

    def __init__(self, *args: Any, refused: Callable[[RoleSession, StsRefused], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._refused = refused

    async def current(self) -> Credentials:
        try:
            return await super().current()
        except StsRefused as refusal:
            self._refused(self, refusal)
            raise


@dataclass(eq=False)
class _Active:
    session: RoleSession
    #: The session's renewal task runs inside it; cancelled when the role is dropped.
    scope: trio.CancelScope


class RoleSessions:
    """The sessions of the roles requests name; `session(role)` is the store's `roles` rule."""

    def __init__(
        self,
        allowed: Iterable[str],
        source: CredentialSource,
        endpoint: StsEndpoint,
        *,
        cache: SecretCache[CacheKey, Any],
        tasks: trio.Nursery,
        session_name: str = "kmsagent",
        duration_seconds: int = 3600,
        renew_before: float = 900,
        refusal_ttl: float = DEFAULT_REFUSAL_TTL,
        clock: Callable[[], float] = time.time,
        max_active: int = MAX_ACTIVE_ROLES,
    ) -> None:
        """`source`: the agent's own credentials, already running; `tasks`: the agent's nursery."""
        self._allowed = {arn.lower(): arn for arn in allowed}
        self._source = source
        self._endpoint = endpoint
        self._cache = cache
        self._tasks = tasks
        self._session_name = session_name
        self._duration = duration_seconds
        self._renew_before = renew_before
        #: NotFoundTtlSeconds in force (a reload may change it); 0 remembers no refusal.
        self.refusal_ttl = refusal_ttl
        self._clock = clock
        self._max_active = max_active
        self._active: OrderedDict[str, _Active] = OrderedDict()  # least recently used first
        self._refusals: dict[str, tuple[float, str]] = {}  # role → (until, on trio's clock; STS's code)

    @classmethod
    def from_config(
        cls,
        config: CredentialsConfig,
        source: CredentialSource,
        *,
        region: str,
        cache: SecretCache[CacheKey, Any],
        tasks: trio.Nursery,
        refusal_ttl: float = DEFAULT_REFUSAL_TTL,
        clock: Callable[[], float] = time.time,
        env: Mapping[str, str] = os.environ,
    ) -> RoleSessions:
        """Sessions with [Credentials]' STS settings: StsEndpoint, RoleSessionName, DurationSeconds."""
        endpoint = StsEndpoint.of(config.sts_endpoint, config.sts_protocol, region=region, env=env)
        return cls(
            config.allowed_role_arns,
            source,
            endpoint,
            cache=cache,
            tasks=tasks,
            session_name=config.role_session_name,
            duration_seconds=config.duration_seconds,
            renew_before=config.renew_before_seconds,
            refusal_ttl=refusal_ttl,
            clock=clock,
        )

    def __len__(self) -> int:
        """Roles with a session now (the `kmsagent_active_roles` gauge: a count, never ARNs)."""
        return len(self._active)

    def session(self, role: str) -> CredentialSource:
        """The session of `role` (a lower-cased ARN), started on first use and marked as used.

        Raises RoleNotAllowed, or StsRefused while STS's last refusal of the role is remembered.
        A new session's first credentials are what the KMS call waits for (a bounded wait).
        """
        arn = self._allowed.get(role)
        if arn is None:
            raise RoleNotAllowed(role)
        refusal = self._refusals.get(role)
        if refusal is not None:
            until, code = refusal
            if trio.current_time() < until:
                raise StsRefused(code, arn)
            del self._refusals[role]
        active = self._active.get(role)
        if active is not None:
            self._active.move_to_end(role)
            return active.session
        session = RoleSession(
            self._source,
            RoleRequest(arn, self._session_name, self._duration),
            self._endpoint,
            renew_before=self._renew_before,
            clock=self._clock,
            owns_source=False,
            refused=self._refused,
        )
        active = self._active[role] = _Active(session, trio.CancelScope())
        self._tasks.start_soon(self._run, active)
        logger.info(
            "per-request role {}: assuming it ({} of at most {} roles active)", arn, len(self._active), self._max_active
        )
        while len(self._active) > self._max_active:
            self._drop(next(iter(self._active)), f"least recently used of more than {self._max_active}")
        return session

    @staticmethod
    async def _run(active: _Active) -> None:
        with active.scope:
            await active.session.run()

    def _refused(self, session: RoleSession, refusal: StsRefused) -> None:
        role = session.request.role_arn.lower()
        if self.refusal_ttl > 0:
            self._refusals[role] = (trio.current_time() + self.refusal_ttl, refusal.code)
        active = self._active.get(role)
        if active is not None and active.session is session:
            self._drop(role, f"STS refused it ({refusal.code})")

    def _drop(self, role: str, why: str) -> None:
        """Cancels the role's renewal and drops its cache entries (and values its loads bring)."""
        active = self._active.pop(role)
        active.scope.cancel()
        dropped = self._cache.drop_where(lambda key: key[0] == role)
        logger.info(
            "per-request role {} dropped ({}) with {} cache entries", active.session.request.role_arn, why, dropped
        )
