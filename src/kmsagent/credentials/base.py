"""The credential types every source shares, and the static sources.

The KMS client asks a `CredentialSource` for the current credentials before every signed call, so
a source that renews them in the background (the ECS RAM role task) plugs in without the client
knowing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import trio

from kmsagent import redact


@dataclass(frozen=True)
class Credentials:
    """An AccessKey, with an STS security token when temporary. `repr` shows only the key id."""

    access_key_id: str
    access_key_secret: str = field(repr=False)
    security_token: str | None = field(default=None, repr=False)
    #: When STS credentials stop working, as a wall-clock timestamp; None for a permanent key.
    expiration: float | None = None

    def __post_init__(self) -> None:
        redact.remember(self.access_key_secret, self.security_token)


class CredentialSource(Protocol):
    """What the agent needs from a credential provider."""

    #: Which source this is, for the log (never the values).
    kind: str

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The source's background task (renewal), run in the agent's nursery until cancelled."""
        ...

    async def current(self) -> Credentials:
        """The credentials to sign with now; waits a bounded time, then raises `UpstreamUnavailable`."""
        ...

    async def rejected(self, credentials: Credentials) -> bool:
        """KMS said `credentials` expired: renew now; True when a retry may succeed."""
        ...

    def expiration(self) -> float | None:
        """When the credentials in use expire (wall clock), for the metrics; None if never."""
        ...


def parse_expiration(text: str) -> float:
    """An STS `Expiration` as a wall-clock timestamp; raises ValueError when it is not a time.

    Any ISO 8601 form: `2026-01-01T00:00:00Z` as the metadata service sends it, but also with a
    fraction (`.123Z`) or an offset (`+08:00`), which a strict `%Y-%m-%dT%H:%M:%SZ` refused,
    leaving the agent without credentials. A time without a zone is UTC.
    """
    moment = datetime.fromisoformat(text.strip())
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


#: A renewal never comes sooner than this after the previous one (a loop guard for tiny lifetimes).
MIN_RENEW_INTERVAL = 1.0


def renewal_delay(expiration: float, now: float, renew_before: float) -> float:
    """Seconds from `now` until STS credentials expiring at `expiration` are renewed (SPEC §6).

    min(RenewBeforeSeconds, a third of the lifetime left) before `Expiration`: a 900 s session
    with the default RenewBeforeSeconds of 900 renews after 600 s, not at once and in a loop as
    "900 s before expiry" alone would; an hour's session renews 900 s before its end.
    """
    remaining = expiration - now
    return max(MIN_RENEW_INTERVAL, remaining - min(renew_before, remaining / 3))


class CredentialsUnavailable(Exception):
    """No credential source could be set up (exit 1 at start-up). Never carries a value."""


class StaticCredentials:
    """An AccessKey (or STS triple) given once, e.g. by environment variables; never renewed."""

    def __init__(self, credentials: Credentials, kind: str) -> None:
        self._credentials = credentials
        self.kind = kind

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    async def current(self) -> Credentials:
        return self._credentials

    async def rejected(self, credentials: Credentials) -> bool:
        return False

    def expiration(self) -> float | None:
        return self._credentials.expiration


def from_environment(env: Mapping[str, str]) -> StaticCredentials | None:
    """The `ALIBABA_CLOUD_ACCESS_KEY_ID`/`_SECRET` pair (plus `_SECURITY_TOKEN` for STS), if set."""
    key_id = env.get("ALIBABA_CLOUD_ACCESS_KEY_ID", "").strip()
    secret = env.get("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "").strip()
    if not key_id or not secret:
        return None
    token = env.get("ALIBABA_CLOUD_SECURITY_TOKEN", "").strip() or None
    kind = "sts (environment)" if token else "access_key (environment)"
    return StaticCredentials(Credentials(key_id, secret, token), kind)
