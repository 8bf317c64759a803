"""One KMS call on the wire: the signed request, the bounded answer, and what the answer means.

We keep the SDK's response models (`GetSecretValueResponseBody`, `BatchGetSecretValueResponseBody`)
and sign with signing.py, our own copy of its ACS3-HMAC-SHA256 signer checked byte for byte against
`Utils.get_authorization` in the tests (importing the SDK's signer module costs 48 MB and 0.3 s:
aiohttp, apscheduler, urllib3, cryptography). The request goes over httpx, which runs on trio
natively (NOTES.md: the SDK's clients do not).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import httpx
from alibabacloud_kms20160120.models import BatchGetSecretValueResponseBody, GetSecretValueResponseBody

from kmsagent import __version__, signing
from kmsagent.credentials import Credentials
from kmsagent.errors import AgentError, KmsError, UpstreamUnavailable

API_VERSION = "2016-01-20"
SIGNATURE_ALGORITHM = "ACS3-HMAC-SHA256"
EMPTY_BODY_SHA256 = hashlib.sha256(b"").hexdigest()
GET_SECRET_VALUE = "GetSecretValue"
BATCH_GET_SECRET_VALUE = "BatchGetSecretValue"
#: BatchGetSecretValue takes at most this many secrets (SDK 3.3.1's model, KMS's API reference).
BATCH_LIMIT = 20
#: A GetSecretValue answer is one secret (KMS stores at most 64 KB) in JSON; more is not KMS's.
MAX_ANSWER_BYTES = 2**20
#: A batch answer holds up to 20 secrets; JSON escaping can make 64 KB of text ≈ 6 times longer.
MAX_BATCH_ANSWER_BYTES = 8 * MAX_ANSWER_BYTES


@dataclass(frozen=True)
class SecretValue:
    """One GetSecretValue answer: KMS's fields under KMS's names, without `RequestId`."""

    fields: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.fields["SecretName"])

    @property
    def data(self) -> str:
        return str(self.fields["SecretData"])

    @property
    def is_binary(self) -> bool:
        return self.fields.get("SecretDataType") == "binary"

    @property
    def version_id(self) -> str:
        return str(self.fields["VersionId"])

    @property
    def version_stages(self) -> list[str]:
        return list(self.fields.get("VersionStages", {}).get("VersionStage", []))

    def __repr__(self) -> str:  # the value must never reach a log through a repr
        return f"SecretValue(name={self.fields.get('SecretName')!r}, version={self.fields.get('VersionId')!r})"


def canonical_query(query: dict[str, str]) -> str:
    """The query string as signed: sorted, every byte but unreserved ones percent-encoded."""
    return "&".join(f"{key}={quote(value, safe='~')}" for key, value in sorted(query.items()))


def signed_headers(
    host: str, action: str, query: dict[str, str], credentials: Credentials, now: float
) -> dict[str, str]:
    """The headers the SDK sends, signed exactly as its `do_request` signs them."""
    headers = {
        "host": host,
        "x-acs-version": API_VERSION,
        "x-acs-action": action,
        "user-agent": f"kmsagent/{__version__}",
        "x-acs-date": datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "x-acs-signature-nonce": secrets.token_hex(16),
        "accept": "application/json",
        "content-type": "application/x-www-form-urlencoded",
        "x-acs-content-sha256": EMPTY_BODY_SHA256,
    }
    if credentials.security_token:
        headers["x-acs-accesskey-id"] = credentials.access_key_id
        headers["x-acs-security-token"] = credentials.security_token
    request = SimpleNamespace(method="POST", pathname="/", query=query, headers=headers)
    headers["Authorization"] = signing.acs3_authorization(
        request,
        SIGNATURE_ALGORITHM,
        EMPTY_BODY_SHA256,
        credentials.access_key_id,
        credentials.access_key_secret,
    )
    return headers


_CLOSED = httpx.ByteStream(b"")


async def post(
    http: httpx.AsyncClient, url: str, headers: dict[str, str], *, host: str, limit: int
) -> tuple[httpx.Response, bytearray]:
    """The answer's head and its body, read up to `limit` bytes.

    httpx ties every response and its stream in a reference cycle, so a response, with the
    secret it carries, lived until the next garbage collection; and with cli.py's sparse
    collections, `refreshNow=true` in a loop on a 60 KB secret grew RSS by ≈25 MB in 15 s.
    Breaking the cycle once the response is closed frees it as soon as it is parsed.
    """
    response: httpx.Response | None = None
    try:
        async with http.stream("POST", url, headers=headers) as response:
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > limit:
                    raise UpstreamUnavailable(f"KMS at {host} answered more than {limit} bytes")
    finally:
        if response is not None:
            response.stream = _CLOSED
    assert response is not None
    return response, body


def describe(error: BaseException) -> str:
    """The useful part of a transport error: under trio a TLS failure hides in the cause chain."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ssl.SSLError):
            return f"TLS handshake failed: {cause.reason or cause}"
        cause = cause.__cause__ or cause.__context__
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def parse_secret(body: bytes | bytearray) -> SecretValue:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise UpstreamUnavailable("KMS answered 200 with a body that is not GetSecretValue JSON") from None
    secret = _secret_fields(document)
    if secret is None:
        raise UpstreamUnavailable("KMS answered 200 without SecretName, SecretData or VersionId")
    return secret


def _secret_fields(document: object) -> SecretValue | None:
    """GetSecretValue's fields of one answer (a batch's entry too), or None when it is not one."""
    try:
        fields = GetSecretValueResponseBody().from_map(document).to_map()
    except (ValueError, TypeError, AttributeError, RecursionError):
        return None
    fields.pop("RequestId", None)
    if (
        not isinstance(fields.get("SecretName"), str)
        or not isinstance(fields.get("VersionId"), str)
        or "SecretData" not in fields
    ):
        return None
    return SecretValue(fields)


def parse_batch(body: bytes | bytearray, names: Sequence[str]) -> dict[str, SecretValue | KmsError]:
    """Each asked name's answer from a BatchGetSecretValue body: its value or its `Errors` entry.

    A name KMS did not answer (or answered with an entry that is not a secret) is left out: it
    has no answer. KMS may answer a name asked as an ARN under the plain name, so an entry also
    answers an ARN `acs:kms:<region>:<account>:secret/<name>`.
    """
    try:
        document = json.loads(body)
        parsed = BatchGetSecretValueResponseBody().from_map(document)
    except (ValueError, TypeError, AttributeError, RecursionError):
        raise UpstreamUnavailable("KMS answered 200 with a body that is not BatchGetSecretValue JSON") from None
    answers: dict[str, SecretValue | KmsError] = {}
    for entry in parsed.secret_values:
        secret = _secret_fields(entry.to_map()) if entry is not None else None
        if secret is not None:
            for name in _asked_as(secret.name, names):
                answers.setdefault(name, secret)
    for error in parsed.errors:
        if error is None or not isinstance(error.secret_name, str) or not isinstance(error.code, str):
            continue
        try:
            status = int(error.http_status)
        except (TypeError, ValueError):
            status = 500  # an entry without a status says nothing about the secret: transient
        failure = KmsError(status, error.code, str(error.message or ""))
        for name in _asked_as(error.secret_name, names):
            answers.setdefault(name, failure)
    return answers


def _asked_as(answered: str, names: Sequence[str]) -> list[str]:
    return [
        name for name in names if name == answered or (name.startswith("acs:") and name.endswith(f":secret/{answered}"))
    ]


def parse_error(response: httpx.Response, body: bytes | bytearray) -> AgentError:
    """KMS's error as the client will see it: 4xx as is, 5xx as 502 with KMS's code.

    Any other status (a 3xx redirect, which the client does not follow: it would carry the
    signed request elsewhere; a 1xx; a 2xx other than 200) is not KMS's answer but a proxy's
    or a gateway's: 502 UpstreamUnavailable, transient (SPEC §5), so it is retried.
    """
    if not 400 <= response.status_code < 600:
        return UpstreamUnavailable(f"KMS at {response.url.host} answered HTTP {response.status_code}, not a KMS answer")
    try:
        document = json.loads(body)
        code = str(document.get("Code") or f"HTTP{response.status_code}")
        message = str(document.get("Message") or "")
    except (ValueError, AttributeError, RecursionError):
        code, message = f"HTTP{response.status_code}", "KMS answered without a JSON error body"
    retry_after = _retry_after(response.headers.get("x-acs-retry-after"))
    return KmsError(response.status_code, code, message, retry_after=retry_after)


def _retry_after(value: str | None) -> float | None:
    """`x-acs-retry-after` is in milliseconds."""
    if value is None:
        return None
    try:
        return max(0.0, float(value) / 1000)
    except ValueError:
        return None
