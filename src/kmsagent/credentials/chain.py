"""Which credential source `[Credentials] Type` selects; `auto` tries them in SPEC §2's order."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from kmsagent.config import CredentialsConfig
from kmsagent.credentials.base import CredentialSource, CredentialsUnavailable, from_environment
from kmsagent.credentials.ecs_role import EcsRamRoleCredentials
from kmsagent.credentials.oidc import ENVIRONMENT as OIDC_ENVIRONMENT
from kmsagent.credentials.oidc import OidcRoleCredentials


def credential_source(
    config: CredentialsConfig, env: Mapping[str, str], *, clock: Callable[[], float] = time.time
) -> CredentialSource:
    """auto: environment AccessKey/STS → OIDC role (all three variables set) → ECS RAM role."""
    kind = config.type
    if kind in ("auto", "access_key", "sts"):
        source = from_environment(env)
        if source is not None and (kind != "sts" or source.kind.startswith("sts")):
            return source
        if kind == "sts":
            raise CredentialsUnavailable(
                'Type = "sts" needs ALIBABA_CLOUD_ACCESS_KEY_ID, ALIBABA_CLOUD_ACCESS_KEY_SECRET '
                "and ALIBABA_CLOUD_SECURITY_TOKEN in the environment"
            )
        if kind == "access_key":
            raise CredentialsUnavailable(
                'Type = "access_key" needs ALIBABA_CLOUD_ACCESS_KEY_ID and '
                "ALIBABA_CLOUD_ACCESS_KEY_SECRET in the environment"
            )
    if kind == "oidc_role_arn" or (kind == "auto" and all(env.get(name) for name in OIDC_ENVIRONMENT)):
        return OidcRoleCredentials.from_environment(env)
    return EcsRamRoleCredentials(config, clock=clock)
