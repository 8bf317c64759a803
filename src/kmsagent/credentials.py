"""Where the KMS client's AccessKey comes from.

The KMS client asks a `CredentialSource` for the current credentials before every signed call, so
a source that renews them in the background (the ECS RAM role task) plugs in without the client
knowing. This module has the static sources of the standard `ALIBABA_CLOUD_*` variables.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from kmsagent.config import CredentialsConfig


@dataclass(frozen=True)
class Credentials:
    """An AccessKey, with an STS security token when temporary. `repr` shows only the key id."""

    access_key_id: str
    access_key_secret: str = field(repr=False)
    security_token: str | None = field(default=None, repr=False)


class CredentialSource(Protocol):
    """What the KMS client needs from a credential provider."""

    #: Which source this is, for the log (never the values).
    kind: str

    async def current(self) -> Credentials:
        """The credentials to sign with now; may wait a bounded time for the first ones."""
        ...

    async def rejected(self, credentials: Credentials) -> bool:
        """KMS said `credentials` expired: renew now; True when a retry may succeed."""
        ...


class CredentialsUnavailable(Exception):
    """No credential source could be set up (exit 1 at start-up). Never carries a value."""


class StaticCredentials:
    """An AccessKey (or STS triple) given once, e.g. by environment variables; never renewed."""

    def __init__(self, credentials: Credentials, kind: str) -> None:
        self._credentials = credentials
        self.kind = kind

    async def current(self) -> Credentials:
        return self._credentials

    async def rejected(self, credentials: Credentials) -> bool:
        return False


def from_environment(env: Mapping[str, str]) -> StaticCredentials | None:
    """The `ALIBABA_CLOUD_ACCESS_KEY_ID`/`_SECRET` pair (plus `_SECURITY_TOKEN` for STS), if set."""
    key_id = env.get("ALIBABA_CLOUD_ACCESS_KEY_ID", "").strip()
    secret = env.get("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "").strip()
    if not key_id or not secret:
        return None
    token = env.get("ALIBABA_CLOUD_SECURITY_TOKEN", "").strip() or None
    kind = "sts (environment)" if token else "access_key (environment)"
    return StaticCredentials(Credentials(key_id, secret, token), kind)


def credential_source(config: CredentialsConfig, env: Mapping[str, str]) -> CredentialSource:
    """The source that `[Credentials] Type` selects (SPEC §2); `auto` tries them in order."""
    if config.type in ("auto", "access_key", "sts"):
        source = from_environment(env)
        if source is not None:
            if config.type == "sts" and source.kind.startswith("access_key"):
                raise CredentialsUnavailable("Type = \"sts\" needs ALIBABA_CLOUD_SECURITY_TOKEN")
            return source
        if config.type != "auto":
            raise CredentialsUnavailable(
                f"Type = \"{config.type}\" needs ALIBABA_CLOUD_ACCESS_KEY_ID and "
                "ALIBABA_CLOUD_ACCESS_KEY_SECRET in the environment"
            )
    raise CredentialsUnavailable(
        f"no credentials for Type = \"{config.type}\": set ALIBABA_CLOUD_ACCESS_KEY_ID and "
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET (the ECS RAM role and OIDC sources are not built yet)"
    )
