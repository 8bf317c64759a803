"""OIDC role credentials (RRSA, for Kubernetes): alibabacloud-credentials' provider, off the trio thread.

The SDK's `OIDCRoleArnCredentialsProvider` reads the projected service-account token, calls STS
AssumeRoleWithOIDC and caches the answer until 15 minutes before it expires, all with blocking
`requests`; its `_async` path needs asyncio. So each `current()` runs its `get_credentials` in a
worker thread (cheap while cached), bounded in time. Its error messages can quote STS's answer,
so only the exception's type is ever logged or returned.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import trio
from alibabacloud_credentials.provider.oidc import OIDCRoleArnCredentialsProvider

from kmsagent.credentials.base import Credentials, CredentialsUnavailable
from kmsagent.errors import UpstreamUnavailable

# The SDK attaches its own stderr handlers to this logger at import; ours (logs.py) route it.
logging.getLogger("credentials").handlers.clear()

ENVIRONMENT = ("ALIBABA_CLOUD_ROLE_ARN", "ALIBABA_CLOUD_OIDC_PROVIDER_ARN", "ALIBABA_CLOUD_OIDC_TOKEN_FILE")
#: STS is a remote call: the SDK's own timeouts are 5 s connect and 10 s read.
STS_WAIT = 15.0


class OidcRoleCredentials:
    kind = "oidc_role_arn (RRSA, from ALIBABA_CLOUD_ROLE_ARN)"

    def __init__(self, provider: Any) -> None:
        self._provider = provider
        self._expiration: float | None = None

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> OidcRoleCredentials:
        """The SDK provider for the RRSA variables in `env` (it reads os.environ only at import)."""
        try:
            provider = OIDCRoleArnCredentialsProvider(
                role_arn=env.get("ALIBABA_CLOUD_ROLE_ARN"),
                oidc_provider_arn=env.get("ALIBABA_CLOUD_OIDC_PROVIDER_ARN"),
                oidc_token_file_path=env.get("ALIBABA_CLOUD_OIDC_TOKEN_FILE"),
                role_session_name=env.get("ALIBABA_CLOUD_ROLE_SESSION_NAME") or "kmsagent",
                sts_region_id=env.get("ALIBABA_CLOUD_STS_REGION"),
            )
        except ValueError:
            raise CredentialsUnavailable(f"Type = \"oidc_role_arn\" needs {', '.join(ENVIRONMENT)}") from None
        return cls(provider)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()  # the SDK provider refreshes inside get_credentials

    async def current(self) -> Credentials:
        with trio.move_on_after(STS_WAIT):
            try:
                answer = await trio.to_thread.run_sync(self._provider.get_credentials, abandon_on_cancel=True)
            except Exception as error:
                raise UpstreamUnavailable(f"OIDC role credentials unavailable ({type(error).__name__})") from None
            self._expiration = float(answer.get_expiration()) if answer.get_expiration() else None
            return Credentials(
                answer.get_access_key_id(),
                answer.get_access_key_secret(),
                answer.get_security_token(),
                self._expiration,
            )
        raise UpstreamUnavailable("OIDC role credentials unavailable (STS did not answer in time)")

    async def rejected(self, credentials: Credentials) -> bool:
        return False  # the SDK provider has no way to force a refresh

    def expiration(self) -> float | None:
        return self._expiration
