"""Where the KMS client's credentials come from (SPEC §6): the environment, profile files, the
ECS RAM role, a credentials URI, an OIDC role, or an STS AssumeRole session of any of those."""

from kmsagent.credentials.base import Credentials, CredentialSource, CredentialsUnavailable, StaticCredentials
from kmsagent.credentials.chain import check_credentials, credential_source

__all__ = [
    "CredentialSource",
    "Credentials",
    "CredentialsUnavailable",
    "StaticCredentials",
    "check_credentials",
    "credential_source",
]
