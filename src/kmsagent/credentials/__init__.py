"""Where the KMS client's credentials come from: static keys, the ECS RAM role, or an OIDC role."""

from kmsagent.credentials.base import Credentials, CredentialSource, CredentialsUnavailable, StaticCredentials
from kmsagent.credentials.chain import credential_source

__all__ = ["Credentials", "CredentialSource", "CredentialsUnavailable", "StaticCredentials", "credential_source"]
