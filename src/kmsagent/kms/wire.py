"""One KMS call on the wire: the signed request, the bounded answer, and what the answer means.

Signed with signing.py, our own copy of the SDK's ACS3-HMAC-SHA256 signer checked byte for byte
against `Utils.get_authorization` in the tests (importing the SDK's signer module costs 48 MB and
0.3 s: aiohttp, apscheduler, urllib3, cryptography). Answers are read into the fields the SDK's
response models (`GetSecretValueResponseBody`, `BatchGetSecretValueResponseBody`) give, by our
own few lines: importing any model module runs `alibabacloud_kms20160120.models`' `__init__`,
which imports all ≈280 of them (≈0.1 s of start-up); tests/test_wire.py checks the two against
each other on random answers. The request goes over transport.py, on trio (NOTES.md: the SDK's
clients do not run on it).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import secrets
import ssl
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from kmsagent.credentials import Credentials
from kmsagent.errors import AgentError, KmsError, UpstreamUnavailable
from kmsagent.kms.transport import Answer

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


def signed_request(
    host: str, action: str, query: dict[str, str], credentials: Credentials, now: float
) -> tuple[str, list[tuple[str, str]]]:
    """The request target and the headers the SDK sends, signed as its `do_request` signs them.

    `signing.acs3_authorization` computed for these headers, which are few, lower-case and known:
    their canonical form is built directly (the generic one, for any header set, cost a tenth of
    a call's CPU). tests/test_wire.py checks the result against the SDK's signer.
    """
    canonical = canonical_query(query)
    headers = {
        "host": host,
        "x-acs-version": API_VERSION,
        "x-acs-action": action,
        "user-agent": _user_agent(),
        "x-acs-date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "x-acs-signature-nonce": secrets.token_hex(16),
        "accept": "application/json",
        "content-type": "application/x-www-form-urlencoded",
        "x-acs-content-sha256": EMPTY_BODY_SHA256,
    }
    if credentials.security_token:
        headers["x-acs-accesskey-id"] = credentials.access_key_id
        headers["x-acs-security-token"] = credentials.security_token
    names = sorted(headers)
    canonical_headers = "".join(f"{name}:{headers[name].strip()}\n" for name in names)
    signed = ";".join(names)
    canonical_request = f"POST\n/\n{canonical}\n{canonical_headers}\n{signed}\n{EMPTY_BODY_SHA256}"
    string_to_sign = f"{SIGNATURE_ALGORITHM}\n{hashlib.sha256(canonical_request.encode('utf-8')).hexdigest()}"
    key = credentials.access_key_secret.encode("utf-8")
    signature = hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
    credential = f"Credential={credentials.access_key_id}"
    headers["Authorization"] = f"{SIGNATURE_ALGORITHM} {credential},SignedHeaders={signed},Signature={signature}"
    return f"/?{canonical}", list(headers.items())


@functools.cache
def _user_agent() -> str:
    from kmsagent import __version__  # looked up once, on the first call (importlib.metadata)

    return f"kmsagent/{__version__}"


def describe(error: BaseException) -> str:
    """The useful part of a transport error: under trio a TLS failure hides in the cause chain."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ssl.SSLError):
            return f"TLS handshake failed: {cause.reason or cause}"
        cause = cause.__cause__ or cause.__context__
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


#: The fields of a GetSecretValue answer, in the order the SDK's model (3.3.1) maps them.
SECRET_FIELDS = (
    "AutomaticRotation",
    "CiphertextForRecipient",
    "CreateTime",
    "ExtendedConfig",
    "LastRotationDate",
    "NextRotationDate",
    "RequestId",
    "RotationInterval",
    "SecretData",
    "SecretDataType",
    "SecretName",
    "SecretType",
    "VersionId",
    "VersionStages",
)
#: A BatchGetSecretValue answer's `SecretValues` entry: the same but `CiphertextForRecipient`.
BATCH_SECRET_FIELDS = tuple(name for name in SECRET_FIELDS if name != "CiphertextForRecipient")
#: A BatchGetSecretValue answer's `Errors` entry.
BATCH_ERROR_FIELDS = ("Code", "HttpStatus", "Message", "SecretName")
#: What reading an answer that is not the JSON the SDK's models expect raises.
NOT_AN_ANSWER = (ValueError, TypeError, AttributeError, RecursionError)


def model_map(document: Any, fields: Iterable[str]) -> dict[str, Any]:
    """`document` read as the SDK's models read it: `Model().from_map(document).to_map()`.

    Known fields only, in the model's order; a null is left out; `VersionStages` keeps only its
    `VersionStage`. A falsy document is an empty one and anything else without `.get` raises
    AttributeError, as in the SDK.
    """
    document = document or {}
    mapped: dict[str, Any] = {}
    for name in fields:
        value = document.get(name)
        if value is not None:
            if name == "VersionStages":
                stage = (value or {}).get("VersionStage")
                value = {} if stage is None else {"VersionStage": stage}
            mapped[name] = value
    return mapped


def parse_secret(body: bytes | bytearray) -> SecretValue:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise UpstreamUnavailable("KMS answered 200 with a body that is not GetSecretValue JSON") from None
    secret = _secret_fields(document, SECRET_FIELDS)
    if secret is None:
        raise UpstreamUnavailable("KMS answered 200 without SecretName, SecretData or VersionId")
    return secret


def _secret_fields(document: object, fields: Iterable[str]) -> SecretValue | None:
    """GetSecretValue's fields of one answer (a batch's entry too), or None when it is not one."""
    try:
        mapped = model_map(document, fields)
    except NOT_AN_ANSWER:
        return None
    mapped.pop("RequestId", None)
    named = isinstance(mapped.get("SecretName"), str) and isinstance(mapped.get("VersionId"), str)
    if not named or "SecretData" not in mapped:
        return None
    return SecretValue(mapped)


def parse_batch(body: bytes | bytearray, names: Sequence[str]) -> dict[str, SecretValue | KmsError]:
    """Each asked name's answer from a BatchGetSecretValue body: its value or its `Errors` entry.

    A name KMS did not answer (or answered with an entry that is not a secret) is left out: it
    has no answer. KMS may answer a name asked as an ARN under the plain name, so an entry also
    answers an ARN `acs:kms:<region>:<account>:secret/<name>`.
    """
    try:
        document = json.loads(body) or {}
        errors = [model_map(entry, BATCH_ERROR_FIELDS) for entry in _entries(document.get("Errors"))]
        values = [model_map(entry, BATCH_SECRET_FIELDS) for entry in _entries(document.get("SecretValues"))]
    except NOT_AN_ANSWER:
        raise UpstreamUnavailable("KMS answered 200 with a body that is not BatchGetSecretValue JSON") from None
    answers: dict[str, SecretValue | KmsError] = {}
    for entry in values:
        secret = _secret_fields(entry, SECRET_FIELDS)
        if secret is not None:
            for name in _asked_as(secret.name, names):
                answers.setdefault(name, secret)
    for error in errors:
        secret_name, code = error.get("SecretName"), error.get("Code")
        if not isinstance(secret_name, str) or not isinstance(code, str):
            continue
        try:
            status = int(error.get("HttpStatus"))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            status = 500  # an entry without a status says nothing about the secret: transient
        failure = KmsError(status, code, str(error.get("Message") or ""))
        for name in _asked_as(secret_name, names):
            answers.setdefault(name, failure)
    return answers


def _entries(listed: Any) -> Iterable[Any]:
    """A list field of the batch answer as the SDK iterates it (null: none; not iterable: TypeError)."""
    return () if listed is None else listed


def _asked_as(answered: str, names: Sequence[str]) -> list[str]:
    return [
        name for name in names if name == answered or (name.startswith("acs:") and name.endswith(f":secret/{answered}"))
    ]


def parse_error(answer: Answer, host: str) -> AgentError:
    """KMS's error as the client will see it: 4xx as is, 5xx as 502 with KMS's code.

    Any other status (a 3xx redirect, which the client does not follow: it would carry the
    signed request elsewhere; a 1xx; a 2xx other than 200) is not KMS's answer but a proxy's
    or a gateway's: 502 UpstreamUnavailable, transient (SPEC §5), so it is retried. `host`: the
    endpoint's host, for the message.
    """
    status = answer.status
    if not 400 <= status < 600:
        return UpstreamUnavailable(f"KMS at {host} answered HTTP {status}, not a KMS answer")
    try:
        document = json.loads(answer.body)
        code = str(document.get("Code") or f"HTTP{status}")
        message = str(document.get("Message") or "")
    except (ValueError, AttributeError, RecursionError):
        code, message = f"HTTP{status}", "KMS answered without a JSON error body"
    return KmsError(status, code, message, retry_after=_retry_after(answer.header(b"x-acs-retry-after")))


def _retry_after(value: bytes | None) -> float | None:
    """`x-acs-retry-after` is in milliseconds."""
    if value is None:
        return None
    try:
        return max(0.0, float(value) / 1000)
    except ValueError:
        return None
