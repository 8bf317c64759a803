"""Response bodies of SPEC §4: one formatter per `ResponseType`, for secrets and for errors.

A secret body is rendered once when KMS's answer arrives and cached as bytes, so a cache hit
encodes no JSON.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Protocol

from kmsagent.errors import AgentError
from kmsagent.kms import SecretValue


class ResponseFormat(Protocol):
    def secret(self, secret: SecretValue) -> bytes: ...

    def error(self, error: AgentError) -> bytes: ...


def _json(document: Any) -> bytes:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


class KmsFormat:
    """ResponseType 0: KMS GetSecretValue's own body (without RequestId), and KMS's error shape."""

    def secret(self, secret: SecretValue) -> bytes:
        return _json(secret.fields)

    def error(self, error: AgentError) -> bytes:
        return _json({"Code": error.code, "Message": error.message, "HttpStatus": error.status})


class AwsFormat:
    """ResponseType 1: the AWS Secrets Manager GetSecretValue shape, for AWS agent clients."""

    def __init__(self, region: str) -> None:
        self._region = region

    def secret(self, secret: SecretValue) -> bytes:
        name = secret.name
        arn = name if name.startswith("acs:") else f"acs:kms:{self._region}::secret/{name}"
        document: dict[str, Any] = {"ARN": arn, "Name": name, "VersionId": secret.version_id}
        document["SecretBinary" if secret.is_binary else "SecretString"] = secret.data
        document["VersionStages"] = secret.version_stages
        document["CreatedDate"] = secret.fields.get("CreateTime")
        return _json(document)

    def error(self, error: AgentError) -> bytes:
        return _json({"__type": error.code, "message": error.message})


class VaultFormat:
    """ResponseType 2: a Vault KV v1 read; a JSON-object secret is `data`, else `{"value": ...}`."""

    def __init__(self, ttl_seconds: int) -> None:
        self._ttl = ttl_seconds

    def secret(self, secret: SecretValue) -> bytes:
        data: Any = None
        if not secret.is_binary:
            try:
                data = json.loads(secret.data)
            except ValueError:
                pass
        if not isinstance(data, dict):
            data = {"value": secret.data}
        return _json(
            {
                "request_id": str(uuid.uuid4()),
                "lease_id": "",
                "renewable": False,
                "lease_duration": self._ttl,
                "data": data,
                "wrap_info": None,
                "warnings": None,
                "auth": None,
            }
        )

    def error(self, error: AgentError) -> bytes:
        return _json({"errors": [f"{error.code}: {error.message}"]})


def response_format(response_type: int, *, region: str, ttl_seconds: int) -> ResponseFormat:
    """The formatter for `[Server] ResponseType`."""
    if response_type == 1:
        return AwsFormat(region)
    if response_type == 2:
        return VaultFormat(ttl_seconds)
    return KmsFormat()
