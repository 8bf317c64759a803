"""OIDC role credentials (RRSA, for Kubernetes): alibabacloud-credentials' provider, off the trio thread.

The SDK's `OIDCRoleArnCredentialsProvider` reads the projected service-account token, calls STS
AssumeRoleWithOIDC and caches the answer until 15 minutes before it expires, all with blocking
`requests`; its `_async` path needs asyncio. So each `current()` runs its `get_credentials` in a
worker thread (cheap while cached), bounded in time. Its error messages can quote STS's answer,
so only the exception's type is ever logged or returned.

The SDK's provider is imported only when an OIDC source is built: the credentials package costs
≈385 ms and pulls in requests, aiohttp and apscheduler, which static keys or an ECS role never
need (issue 17; tests/test_footprint.py). That import happens at start-up, before the port
opens; only a watched profile that turns into an OIDC one while serving pays it on the trio
thread, once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import trio

from kmsagent.credentials.base import Credentials, CredentialsUnavailable
from kmsagent.errors import UpstreamUnavailable

ENVIRONMENT = ("ALIBABA_CLOUD_ROLE_ARN", "ALIBABA_CLOUD_OIDC_PROVIDER_ARN", "ALIBABA_CLOUD_OIDC_TOKEN_FILE")
#: STS is a remote call: the SDK's own timeouts are 5 s connect and 10 s read.
STS_WAIT = 15.0


class OidcRoleCredentials:
    kind = "oidc_role_arn (RRSA, from ALIBABA_CLOUD_ROLE_ARN)"

    def __init__(self, provider: Any) -> None:
        self._provider = provider
        self._expiration: float | None = None

    @classmethod
    def from_environment(
        cls, env: Mapping[str, str], *, sts_endpoint: str = "", sts_region: str = ""
    ) -> OidcRoleCredentials:
        """The SDK provider for the RRSA variables in `env` (it reads os.environ only at import).

        STS: `sts_endpoint` when set, else sts.<ALIBABA_CLOUD_STS_REGION, else `sts_region`>.
        """
        return cls.from_profile(
            role_arn=env.get("ALIBABA_CLOUD_ROLE_ARN", ""),
            provider_arn=env.get("ALIBABA_CLOUD_OIDC_PROVIDER_ARN", ""),
            token_file=env.get("ALIBABA_CLOUD_OIDC_TOKEN_FILE", ""),
            session_name=env.get("ALIBABA_CLOUD_ROLE_SESSION_NAME") or "kmsagent",
            sts_endpoint=sts_endpoint,
            sts_region=env.get("ALIBABA_CLOUD_STS_REGION") or sts_region,
        )

    @classmethod
    def from_profile(
        cls,
        *,
        role_arn: str,
        provider_arn: str,
        token_file: str,
        session_name: str,
        duration_seconds: int = 3600,
        policy: str = "",
        sts_endpoint: str = "",
        sts_region: str = "",
    ) -> OidcRoleCredentials:
        """The SDK provider for these settings (a CLI profile's or an ini section's)."""
        from alibabacloud_credentials.provider.oidc import OIDCRoleArnCredentialsProvider

        # The SDK attaches its own stderr handlers to this logger at import; ours (logs.py) route it.
        logging.getLogger("credentials").handlers.clear()
        try:
            provider = OIDCRoleArnCredentialsProvider(
                role_arn=role_arn or None,
                oidc_provider_arn=provider_arn or None,
                oidc_token_file_path=token_file or None,
                role_session_name=session_name,
                duration_seconds=duration_seconds,
                policy=policy or None,
                sts_endpoint=sts_endpoint or None,
                sts_region_id=sts_region or None,
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
            except Exception as error:  # noqa: BLE001 - the SDK raises any kind; only its type is shown
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
