"""Response bodies of SPEC §4: one formatter per `ResponseType`, for secrets and for errors.

A secret body is rendered once when KMS's answer arrives and cached as bytes, so a cache hit
encodes no JSON; it is also the one copy of the value the cache keeps (`read_back` reads the
value back from it). `finish` completes that cached part for one answer: ResponseType 2 (Vault)
needs a fresh `request_id` per answer and the `lease_duration` in force after a reload, so only
its `data` member is cached and the envelope is put around it per answer (≈3 µs: a random UUID
and one bytes formatting); the other formats return the cached body as is.

Any value KMS can store is served in every format: JSON secrets are never decoded into Python
values on the way out (that turned `1e400` into `Infinity`, `1.10` into `1.1`, merged duplicate
keys and hit the recursion limit on deep nesting), and strings UTF-8 cannot encode (a lone
surrogate, which KMS's JSON may carry as `"\\ud800"`) are written as JSON escapes.

A format may also speak its own stage names: ResponseType 1 answers and takes AWS's
(`AWSCURRENT` for `ACSCurrent`...), as AWS Secrets Manager Agent clients know them; `kms_stage`
turns a request's `versionStage` into KMS's before the cache and KMS see it, so `AWSCURRENT` and
`ACSCurrent` are one cache entry.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NoReturn, Protocol

from kmsagent.errors import AgentError
from kmsagent.kms import SecretValue


class ResponseFormat(Protocol):
    def secret(self, secret: SecretValue) -> bytes:
        """The cacheable part of a 200 answer for `secret`, rendered once per load."""
        ...

    def finish(self, rendered: bytes) -> bytes:
        """The body of one answer, from what `secret` rendered (called on every hit)."""
        ...

    def read_back(self, rendered: bytes) -> dict[str, Any]:
        """KMS's fields as far as `rendered` (what `secret` rendered) gives them back: every one
        (ResponseType 0), or `SecretData` (1, 2). The store checks them against the answer and
        keeps the ones that do not come back exactly, so the body is the one copy of the value."""
        ...

    def error(self, error: AgentError) -> bytes: ...

    def kms_stage(self, stage: str) -> str:
        """The KMS stage that a request's `versionStage` names in this format."""
        ...


def _encode(text: str) -> bytes:
    """UTF-8; a lone surrogate, which UTF-8 cannot encode, becomes its JSON escape `\\udXXX`.

    Only used on JSON text in which such a character can only sit inside a string (json.dumps
    output, or text that parsed as JSON), where the escape means the same character.
    """
    return text.encode("utf-8", "backslashreplace")


def _json(document: Any) -> bytes:
    return _encode(json.dumps(document, ensure_ascii=False, separators=(",", ":")))


class KmsFormat:
    """ResponseType 0: KMS GetSecretValue's own body (without RequestId), and KMS's error shape."""

    def secret(self, secret: SecretValue) -> bytes:
        return _json(secret.fields)

    def finish(self, rendered: bytes) -> bytes:
        return rendered

    def read_back(self, rendered: bytes) -> dict[str, Any]:
        fields: dict[str, Any] = json.loads(rendered)
        return fields

    def error(self, error: AgentError) -> bytes:
        return _json({"Code": error.code, "Message": error.message, "HttpStatus": error.status})

    def kms_stage(self, stage: str) -> str:
        return stage


#: KMS's stage names and AWS's (SPEC §4); any other stage name is the same in both.
AWS_STAGES = {"ACSCurrent": "AWSCURRENT", "ACSPrevious": "AWSPREVIOUS", "ACSPending": "AWSPENDING"}
KMS_STAGES = {aws: kms for kms, aws in AWS_STAGES.items()}
#: CreatedDate when KMS's CreateTime is missing or not a date: the epoch, which a client's
#: `float()` or `datetime.fromtimestamp()` reads, where the raw text would make it raise.
UNKNOWN_DATE = "0.000"


def epoch_seconds(create_time: object) -> str:
    """KMS's `CreateTime` as the AWS agent's `CreatedDate`: epoch seconds with three decimals.

    KMS writes "2024-07-06T08:22:03Z"; a fraction, an offset, a space for the `T` or lower-case
    letters are read too, and a time without an offset is UTC (as KMS's are).
    """
    if not isinstance(create_time, str):
        return UNKNOWN_DATE
    try:
        moment = datetime.fromisoformat(create_time.strip().upper())
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return f"{moment.timestamp():.3f}"
    except (ValueError, OverflowError):
        return UNKNOWN_DATE


class AwsFormat:
    """ResponseType 1: the AWS Secrets Manager GetSecretValue shape, for AWS agent clients."""

    def __init__(self, region: str) -> None:
        self._region = region

    def secret(self, secret: SecretValue) -> bytes:
        name = secret.name
        arn = name if name.startswith("acs:") else f"acs:kms:{self._region}::secret/{name}"
        document: dict[str, Any] = {"ARN": arn, "Name": name, "VersionId": secret.version_id}
        document["SecretBinary" if secret.is_binary else "SecretString"] = secret.data
        document["VersionStages"] = [AWS_STAGES.get(stage, stage) for stage in secret.version_stages]
        document["CreatedDate"] = epoch_seconds(secret.fields.get("CreateTime"))
        return _json(document)

    def finish(self, rendered: bytes) -> bytes:
        return rendered

    def read_back(self, rendered: bytes) -> dict[str, Any]:
        document = json.loads(rendered)
        return {"SecretData": document["SecretBinary" if "SecretBinary" in document else "SecretString"]}

    def error(self, error: AgentError) -> bytes:
        return _json({"__type": error.code, "message": error.message})

    def kms_stage(self, stage: str) -> str:
        return KMS_STAGES.get(stage, stage)


#: Vault's envelope around `data`; the first field is a fresh UUID per answer.
_VAULT_BODY = (
    b'{"request_id":"%s","lease_id":"","renewable":false,"lease_duration":%d,"data":%s,'
    b'"wrap_info":null,"warnings":null,"auth":null}'
)


class VaultFormat:
    """ResponseType 2: a Vault KV v1 read; a JSON-object secret is `data`, else `{"value": ...}`.

    `data` is the secret's text itself, spliced into the body byte for byte, so numbers, key
    order, duplicate keys and spacing stay exactly as written in KMS.
    """

    def __init__(self, lease_seconds: Callable[[], float]) -> None:
        self._lease_seconds = lease_seconds

    def secret(self, secret: SecretValue) -> bytes:
        """The `data` member only; `finish` puts the envelope around it."""
        text = secret.data
        if not secret.is_binary and is_json_object(text):
            return _encode(text)
        return _json({"value": text})

    def finish(self, rendered: bytes) -> bytes:
        return _VAULT_BODY % (_uuid4(), int(self._lease_seconds()), rendered)

    def read_back(self, rendered: bytes) -> dict[str, Any]:
        """`{"value": text}` gives back text, anything else is the text itself (a JSON object
        `{"value": "..."}` secret, or one with a lone surrogate, reads back wrong: the store
        keeps its text then)."""
        text = rendered.decode("utf-8")
        if rendered.startswith(b'{"value":'):
            try:
                wrapped = json.loads(text)
            except (ValueError, RecursionError):  # a JSON object secret Python's parser refuses
                wrapped = None
            if isinstance(wrapped, dict) and len(wrapped) == 1 and isinstance(wrapped.get("value"), str):
                return {"SecretData": wrapped["value"]}
        return {"SecretData": text}

    def error(self, error: AgentError) -> bytes:
        return _json({"errors": [f"{error.code}: {error.message}"]})

    def kms_stage(self, stage: str) -> str:
        return stage


_VARIANT = "89ab" * 4


def _uuid4() -> bytes:
    """A random (version 4) UUID as text: 2.4 µs, where `str(uuid.uuid4())` took 10.6 µs."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[int(h[16], 16)]}{h[17:20]}-{h[20:]}".encode()


def _ignore(_: Any) -> None:
    return None


def _reject(constant: str) -> NoReturn:
    raise ValueError(f"{constant} is not JSON")


def is_json_object(text: str) -> bool:
    """Whether `text` is exactly one JSON object (RFC 8259), surrounding whitespace allowed.

    The parse builds nothing that could fail on a valid document: numbers stay unparsed (an
    integer over 4300 digits would raise), objects are not made into dicts. Python's extensions
    (`NaN`, `Infinity`) are refused. A document nested deeper than the parser's recursion limit
    (about 1000 levels) counts as text: the clients' own JSON parsers (hvac uses `json`) could not
    read it inside `data` either, while `{"value": text}` they can.
    """
    if not text.lstrip(" \t\n\r").startswith("{"):
        return False
    try:
        json.loads(
            text,
            parse_float=_ignore,
            parse_int=_ignore,
            parse_constant=_reject,
            object_pairs_hook=_ignore,
        )
    except (ValueError, RecursionError):
        return False
    return True


def response_format(response_type: int, *, region: str, lease_seconds: Callable[[], float]) -> ResponseFormat:
    """The formatter for `[Server] ResponseType`; `lease_seconds` gives the TtlSeconds in force."""
    if response_type == 1:
        return AwsFormat(region)
    if response_type == 2:
        return VaultFormat(lease_seconds)
    return KmsFormat()
