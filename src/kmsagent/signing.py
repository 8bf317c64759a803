"""Alibaba Cloud request signatures: ACS3-HMAC-SHA256 (headers, for KMS) and RPC HMAC-SHA1 (STS).

Why our own: the SDK's signers are two pure functions in `alibabacloud_tea_openapi.utils`, but that
module imports aiohttp, apscheduler, urllib3 and cryptography on the way (through darabonba): 48 MB
of RSS and ≈320 ms of start-up for code the agent never runs (issue 17). These are the documented
algorithms, written to the SDK's exact bytes — which headers are signed, how the query and the
header values are normalised — and tests/test_signing.py compares both with the SDK's
`Utils.get_authorization` and `Utils.get_rpcsignature` on thousands of randomised requests. The
SDK stays the reference (the tests and the emulators use it) and a dependency.

Only the standard library here, so that importing this costs nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from typing import Protocol
from urllib.parse import quote, quote_plus

ACS3_HMAC_SHA256 = "ACS3-HMAC-SHA256"


class SignableRequest(Protocol):
    """What the ACS3 signature reads of a request (the SDK's `TeaRequest` has the same fields)."""

    @property
    def method(self) -> str: ...

    @property
    def pathname(self) -> str: ...

    @property
    def query(self) -> Mapping[str, str | None] | None: ...

    @property
    def headers(self) -> Mapping[str, str | bytes | None]: ...


def canonical_query(query: Mapping[str, str | None] | None) -> str:
    """`key=value` pairs sorted by key, values RFC 3986-encoded (`~` kept, space `%20`).

    As the SDK does: keys go in as they are (not encoded), a None value drops its key.
    """
    if not query:
        return ""
    present = {key: value for key, value in query.items() if value is not None}
    return "&".join(f"{key}={quote(present[key], safe='~')}" for key in sorted(present))


def canonical_headers(headers: Mapping[str, str | bytes | None]) -> tuple[str, str]:
    """(canonical headers, signed header names): every header present is signed, as the SDK does.

    Names lower-cased and sorted; values stripped; headers whose names differ only in case are
    joined with "," in sorted order; a None value is left out.
    """
    values: dict[str, list[str]] = {}
    for name, value in headers.items():
        if value is not None:
            text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
            values.setdefault(name.lower(), []).append(text.strip())
    names = sorted(values)
    canonical = "".join(f"{name}:{','.join(sorted(values[name]))}\n" for name in names)
    return canonical, ";".join(names)


def acs3_authorization(
    request: SignableRequest, sign_type: str, payload_hash: str, access_key_id: str, secret: str
) -> str:
    """The `Authorization` header of an ACS3-HMAC-SHA256 request; `Utils.get_authorization`'s drop-in.

    Canonical request: method, path, canonical query, canonical headers, signed header names and
    the payload's hex SHA-256, one per line; the string to sign is the algorithm and the hex
    SHA-256 of that; the signature its hex HMAC-SHA256 under the AccessKeySecret.
    """
    if sign_type != ACS3_HMAC_SHA256:
        raise ValueError(f"unsupported signature algorithm {sign_type!r}")  # SM3 and RSA: not used by the agent
    headers, signed = canonical_headers(request.headers)
    canonical_request = "\n".join(
        (request.method, request.pathname or "/", canonical_query(request.query), headers, signed, payload_hash)
    )
    string_to_sign = f"{sign_type}\n{hashlib.sha256(canonical_request.encode('utf-8')).hexdigest()}"
    signature = hmac.new(secret.encode("utf-8"), string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
    return f"{sign_type} Credential={access_key_id},SignedHeaders={signed},Signature={signature}"


def rpc_signature(params: Mapping[str, str | None], method: str, secret: str) -> str:
    """The legacy RPC signature; `Utils.get_rpcsignature`'s drop-in (same argument order).

    base64(HMAC-SHA1(secret + "&", method + "&%2F&" + encode(sorted `key=value` pairs joined by
    "&"))), keys and values RFC 3986-encoded (a space is %20, `~` stays), None values left out.
    """
    present = {key: value for key, value in params.items() if value is not None}
    pairs = "&".join(f"{quote(key, safe='~')}={quote(present[key], safe='~')}" for key in sorted(present))
    string_to_sign = f"{method}&%2F&{quote_plus(pairs, safe='~')}"
    digest = hmac.new(f"{secret}&".encode(), string_to_sign.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("utf-8")
