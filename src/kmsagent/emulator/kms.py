"""An in-process fake of KMS Secrets Manager's GetSecretValue and BatchGetSecretValue that checks
requests like KMS does.

Why a real HTTP server that verifies ACS3-HMAC-SHA256 signatures: the agent's KMS client is only
trustworthy if the official SDK and our own client are both accepted by the same strict checks
(signed headers, payload hash, clock skew, nonce replay, STS tokens). A fake that accepts anything
would hide exactly the bugs that break against the real service.

Each request goes through these steps, in this order; the first failure answers:

1. Record a `CallRecord` (so injected faults never hide a call from the counters).
2. Injected fault, if any (the oldest one whose endpoint, action and secret fit the request):
   sleep `delay`; then `drop` (close without answering), or answer `status`/`code`/`message`, or a
   200 with truncated JSON (`malformed`). A delay-only fault falls through to the normal checks.
3. `x-acs-action` is GetSecretValue, or BatchGetSecretValue while `batch_enabled` (else 404
   `InvalidAction.NotFound`, what a gateway that does not know an action answers) and
   `x-acs-version` is 2016-01-20 (else 400 `InvalidVersion`).
4. `Authorization` parses as `ACS3-HMAC-SHA256 Credential=..,SignedHeaders=..,Signature=..`, every
   signed header is present, and `host` plus every `x-acs-*` header is signed
   (else 400 `IncompleteSignature`).
5. `x-acs-content-sha256` is the hex SHA-256 of the body (else 400 `SignatureDoesNotMatch`).
6. `x-acs-date` parses (else 400 `InvalidTimeStamp.Format`) and is within 15 min of `clock()`
   (else 400 `InvalidTimeStamp.Expired`).
7. The AccessKey is registered and not revoked (else 404 `InvalidAccessKeyId.NotFound`); an
   `x-acs-accesskey-id` header must name the same key (else 400 `IncompleteSignature`).
8. The signature matches (else 400 `SignatureDoesNotMatch`).
9. Security token: a key registered with one needs exactly it (else 400
   `InvalidSecurityToken.MismatchWithAccessKey`); a key registered without one must not send one
   (else 400 `InvalidSecurityToken.Malformed`); past `expires_at` → 400
   `InvalidSecurityToken.Expired`.
10. `x-acs-signature-nonce` is present (else 400 `MissingSignatureNonce`) and unseen in the last
    15 min (else 400 `SignatureNonceUsed`); it is remembered only once the signature is valid.
11. GetSecretValue: `SecretName` given (else 400 `MissingSecretName`), the key may read it (a key
    registered with `secrets=` reads only those, as an STS role session does: else 403
    `Forbidden.NoPermission`), secret and version exist (else 404 `Forbidden.ResourceNotFound`).
    BatchGetSecretValue (SDK 3.3.1's model): `SecretsList` is a JSON array of 1..20 objects
    `{SecretName, VersionId?, VersionStage?, FetchExtendedConfig?}` (else 400 `MissingParameter`
    or `InvalidParameter`); the answer is `{RequestId, SecretValues: [GetSecretValue's fields],
    Errors: [{SecretName, Code, HttpStatus, Message}]}`: a secret that cannot be read is an entry
    of `Errors`, the call itself succeeds. A fault injected for one secret (`secret=`) becomes
    that secret's entry of `Errors` when it has a status.

One emulator can serve the same secrets at several endpoints (call `serve` again: a replica, as
a KMS instance replicating to another region). Faults can be aimed at one endpoint, and
`take_down` closes an endpoint's listener (connections refused) until `bring_up`.

Nothing is logged: request headers carry credentials and answers carry secret values.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import ssl
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from http.client import responses as http_reasons
from typing import Any

import trio
from alibabacloud_tea_openapi.utils import Utils

from kmsagent.emulator.gateway import TIME_FORMAT, Nonces, check_security_token, check_timestamp, same
from kmsagent.emulator.http import HttpRequest, HttpResponse, serve_http

__all__ = [
    "ACS_CURRENT",
    "ACS_PREVIOUS",
    "BATCH_GET_SECRET_VALUE",
    "BATCH_LIMIT",
    "GET_SECRET_VALUE",
    "CallRecord",
    "Fault",
    "KmsEmulator",
]

ACS_CURRENT = "ACSCurrent"
ACS_PREVIOUS = "ACSPrevious"
API_VERSION = "2016-01-20"
SIGNATURE_ALGORITHM = "ACS3-HMAC-SHA256"
GET_SECRET_VALUE = "GetSecretValue"
BATCH_GET_SECRET_VALUE = "BatchGetSecretValue"
#: BatchGetSecretValue's documented limit of names per call.
BATCH_LIMIT = 20
_JSON_TYPE = "application/json;charset=utf-8"
_AUTHORIZATION = re.compile(
    rf"^{SIGNATURE_ALGORITHM} Credential=(?P<ak>[^,\s]+),"
    r"\s*SignedHeaders=(?P<signed>[^,\s]+),"
    r"\s*Signature=(?P<signature>[0-9a-f]{64})$"
)
# Code -> (HTTP status, message), worded like the real gateway where its wording is known.
_ERRORS: dict[str, tuple[int, str]] = {
    "InvalidAction.NotFound": (
        404,
        "Specified api is not found, please check your url and method.",
    ),
    "InvalidVersion": (400, "Specified parameter Version is not valid."),
    "IncompleteSignature": (400, "The request signature does not conform to Aliyun standards."),
    "SignatureDoesNotMatch": (400, "Specified signature is not matched with our calculation."),
    "InvalidTimeStamp.Format": (400, "Specified time stamp or date value is not well formatted."),
    "InvalidTimeStamp.Expired": (400, "Specified time stamp or date value is expired."),
    "InvalidAccessKeyId.NotFound": (
        404,
        "The AccessKey ID provided does not exist in our records.",
    ),
    "InvalidSecurityToken.MismatchWithAccessKey": (
        400,
        "The security token does not match the AccessKey.",
    ),
    "InvalidSecurityToken.Malformed": (400, "The security token is malformed."),
    "InvalidSecurityToken.Expired": (400, "The security token has expired."),
    "MissingSignatureNonce": (400, "SignatureNonce is mandatory for this action."),
    "SignatureNonceUsed": (400, "Specified signature nonce was used already."),
    "MissingSecretName": (400, "SecretName is mandatory for this action."),
    "MissingParameter": (400, "A required parameter is missing."),
    "InvalidParameter": (400, "The specified parameter is not valid."),
    "Forbidden.ResourceNotFound": (404, "The resource not exists."),
    "Forbidden.NoPermission": (403, "This operation is forbidden by permission system."),
}


@dataclass(frozen=True)
class Fault:
    """A misbehaviour to apply to upcoming requests; see the module docstring for the order."""

    status: int = 0
    code: str = ""
    message: str = ""
    retry_after_ms: int | None = None
    delay: float = 0.0
    drop: bool = False
    malformed: bool = False

    @classmethod
    def server_error(cls) -> Fault:
        """KMS's generic 500."""
        return cls(status=500, code="InternalFailure", message="Internal Failure")

    @classmethod
    def throttling(cls, retry_after_ms: int | None = None) -> Fault:
        """KMS's 429; with `retry_after_ms` the SDK raises ThrottlingException instead."""
        return cls(
            status=429,
            code="Rejected.Throttling",
            message="QPS Limit Exceeded",
            retry_after_ms=retry_after_ms,
        )

    @classmethod
    def unavailable(cls) -> Fault:
        """KMS's 503 during a transient outage."""
        return cls(
            status=503, code="ServiceUnavailableTemporary", message="Service Unavailable Temporary"
        )


@dataclass
class CallRecord:
    """One request as the emulator saw it; `status` stays None until answered (None if dropped)."""

    action: str
    secret_name: str | None
    version_id: str | None
    version_stage: str | None
    access_key_id: str | None
    status: int | None = None
    #: The emulator's `clock()` when the request arrived.
    at: float = 0.0
    #: The endpoint (host:port) that received it.
    endpoint: str = ""
    #: BatchGetSecretValue: the names of its SecretsList (`secret_name` is then None).
    secret_names: tuple[str, ...] = ()


class _KmsError(Exception):
    """An answer in KMS's error shape; raised by the checks, turned into a response once."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(code)
        self.status = status
        self.code = code
        self.message = message


@dataclass
class _Credential:
    secret: str
    security_token: str | None
    expires_at: float | None
    secrets: frozenset[str] | None = None  # the secret names this key may read; None: all


@dataclass(frozen=True)
class _Version:
    version_id: str
    data: str
    data_type: str
    create_time: float


@dataclass
class _Secret:
    name: str
    secret_type: str
    versions: dict[str, _Version] = field(default_factory=dict)
    stages: dict[str, str] = field(default_factory=dict)  # stage -> version id
    rotation: dict[str, str] = field(default_factory=dict)  # KMS field name -> value

    def stages_of(self, version_id: str) -> list[str]:
        """The stages a version carries, in a stable order."""
        return sorted(stage for stage, owner in self.stages.items() if owner == version_id)


@dataclass(eq=False)  # each is its own: `remove` takes this one, not an equal one
class _ActiveFault:
    fault: Fault
    remaining: int | None
    endpoint: str | None = None
    action: str | None = None
    secret: str | None = None

    def fits(self, endpoint: str, action: str, secret: str | None, *, one_secret: bool) -> bool:
        """Aimed at this endpoint, action and secret (None: any); `one_secret`: only a fault aimed
        at `secret` (one entry of a batch), not one for whole requests."""
        if one_secret and self.secret is None:
            return False
        return (
            self.endpoint in (None, endpoint)
            and self.action in (None, action)
            and (self.secret is None or self.secret == secret)
        )


@dataclass(frozen=True)
class _Authorization:
    access_key_id: str
    signed_headers: list[str]
    signature: str


@dataclass(frozen=True)
class _SigningInput:
    """The shape `Utils.get_authorization` reads, so the SDK's own signer checks signatures."""

    method: str
    pathname: str
    query: dict[str, str]
    headers: dict[str, str]


class KmsEmulator:
    """A fake KMS endpoint: register credentials and secrets, inject faults, count calls, serve."""

    def __init__(
        self,
        *,
        region: str = "cn-hangzhou",
        account_id: str = "1234567890123456",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.region = region
        self.account_id = account_id
        self.calls: list[CallRecord] = []
        #: The first endpoint served (and its port); `endpoints` has every one, in serving order.
        self.port: int | None = None
        self.endpoint: str | None = None
        self.endpoints: list[str] = []
        #: False: BatchGetSecretValue is answered as an unknown action (an older gateway).
        self.batch_enabled = True
        #: Requests being handled now, and the most at any moment (reset with `reset_calls`).
        self.in_flight = 0
        self.max_in_flight = 0
        self._listening: dict[str, trio.CancelScope] = {}
        self._up: dict[str, trio.Event] = {}
        self._closed: dict[str, trio.Event] = {}
        self._serving: dict[str, trio.Event] = {}
        self._clock = clock
        self._credentials: dict[str, _Credential] = {}
        self._secrets: dict[str, _Secret] = {}
        self._faults: list[_ActiveFault] = []
        self._nonces = Nonces()

    # --- credentials -----------------------------------------------------------------------

    def add_credentials(
        self,
        access_key_id: str,
        access_key_secret: str,
        security_token: str | None = None,
        expires_at: float | None = None,
        secrets: Iterable[str] | None = None,
    ) -> None:
        """Accept this key from now on; `expires_at` is a `clock()` value; with `secrets`, it may
        read only the secrets of those names (a RAM role's permissions)."""
        allowed = frozenset(secrets) if secrets is not None else None
        credential = _Credential(access_key_secret, security_token, expires_at, allowed)
        self._credentials[access_key_id] = credential

    def registered(self, access_key_id: str) -> tuple[str, str | None, float | None] | None:
        """(secret, security token, expires_at) of a key this account knows, for the STS emulator."""
        credential = self._credentials.get(access_key_id)
        if credential is None:
            return None
        return credential.secret, credential.security_token, credential.expires_at

    def revoke_credentials(self, access_key_id: str) -> None:
        """Reject this key from now on, as if it were deleted in RAM."""
        del self._credentials[access_key_id]

    # --- secrets ---------------------------------------------------------------------------

    def put_secret(
        self,
        name: str,
        data: str | bytes,
        *,
        secret_type: str = "Generic",
        version_id: str | None = None,
        next_rotation_date: str | None = None,
        rotation_interval: str | None = None,
        automatic_rotation: str | None = None,
        last_rotation_date: str | None = None,
    ) -> str:
        """Create the secret, or rotate it when it exists; returns the new version's id.

        `secret_type` and any rotation field given replace the stored ones. bytes are served as
        SecretDataType "binary" (base64).
        """
        secret = self._secrets.setdefault(name, _Secret(name=name, secret_type=secret_type))
        secret.secret_type = secret_type
        rotation = {
            "NextRotationDate": next_rotation_date,
            "RotationInterval": rotation_interval,
            "AutomaticRotation": automatic_rotation,
            "LastRotationDate": last_rotation_date,
        }
        secret.rotation.update({key: val for key, val in rotation.items() if val is not None})
        return self._add_version(secret, data, version_id)

    def rotate(self, name: str, data: str | bytes, *, version_id: str | None = None) -> str:
        """Add a version to an existing secret (KeyError otherwise), keeping its metadata."""
        return self._add_version(self._secrets[name], data, version_id)

    def delete_secret(self, name: str) -> None:
        """Forget the secret; later reads answer 404 Forbidden.ResourceNotFound."""
        del self._secrets[name]

    def _add_version(self, secret: _Secret, data: str | bytes, version_id: str | None) -> str:
        """Store a version and move the stages: new → ACSCurrent, old current → ACSPrevious."""
        version_id = version_id or uuid.uuid4().hex
        if version_id in secret.versions:
            raise ValueError(f"secret {secret.name!r} already has version {version_id!r}")
        if isinstance(data, bytes):
            text, data_type = base64.b64encode(data).decode("ascii"), "binary"
        else:
            text, data_type = data, "text"
        secret.versions[version_id] = _Version(version_id, text, data_type, self._clock())
        if ACS_CURRENT in secret.stages:
            secret.stages[ACS_PREVIOUS] = secret.stages[ACS_CURRENT]
        secret.stages[ACS_CURRENT] = version_id
        return version_id

    # --- faults and counters ---------------------------------------------------------------

    def inject(
        self,
        fault: Fault,
        times: int | None = None,
        *,
        endpoint: str | None = None,
        action: str | None = None,
        secret: str | None = None,
    ) -> None:
        """Apply `fault` to the next `times` requests (None: until `clear_faults`).

        Faults queue up: each request takes the oldest one still active that fits it. `endpoint`,
        `action` and `secret` (a name as sent) aim it; within a BatchGetSecretValue a fault aimed
        at a secret answers for that secret alone, as an entry of `Errors`.
        """
        if times is not None and times < 1:
            raise ValueError("times must be at least 1, or None")
        self._faults.append(_ActiveFault(fault, times, endpoint, action, secret))

    def clear_faults(self) -> None:
        """Behave normally again."""
        self._faults.clear()

    def call_count(
        self, secret_name: str | None = None, *, action: str | None = None, endpoint: str | None = None
    ) -> int:
        """Requests received (answered or not), of one action or at one endpoint if given; for one
        secret, by name or by its ARN (a BatchGetSecretValue that names it counts)."""
        return sum(
            1
            for call in self.calls
            if (secret_name is None or self._names_secret(call, secret_name))
            and action in (None, call.action)
            and endpoint in (None, call.endpoint)
        )

    def reset_calls(self) -> None:
        """Forget recorded calls, e.g. after a warm-up phase."""
        self.calls.clear()
        self.max_in_flight = self.in_flight

    def _names_secret(self, call: CallRecord, secret_name: str) -> bool:
        sent = (call.secret_name,) if call.secret_name is not None else call.secret_names
        return any(secret_name in (name, self._resolve_name(name)) for name in sent)

    def _take_fault(self, endpoint: str, action: str, secret: str | None, *, one_secret: bool = False) -> Fault | None:
        """The oldest fault that fits, consuming one of its remaining uses."""
        for active in self._faults:
            if active.fits(endpoint, action, secret, one_secret=one_secret):
                break
        else:
            return None
        if active.remaining is not None:
            active.remaining -= 1
            if active.remaining == 0:
                self._faults.remove(active)
        return active.fault

    # --- endpoints up and down -------------------------------------------------------------

    async def take_down(self, endpoint: str) -> None:
        """Close `endpoint`'s listener and its connections: calls to it are refused until `bring_up`."""
        if endpoint in self._up and not self._up[endpoint].is_set():
            return
        self._up[endpoint] = trio.Event()
        self._closed[endpoint] = trio.Event()
        self._listening[endpoint].cancel()
        await self._closed[endpoint].wait()

    async def bring_up(self, endpoint: str) -> None:
        """Listen at `endpoint` (the same port) again; returns once it accepts connections."""
        up = self._up.get(endpoint)
        if up is None or up.is_set():
            return
        self._serving[endpoint] = serving = trio.Event()
        up.set()
        await serving.wait()

    # --- serving ---------------------------------------------------------------------------

    async def serve(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled; reports the bound port. The first call sets `port` and
        `endpoint`; each call adds its endpoint to `endpoints` (a replica of the same secrets)."""
        endpoint = ""

        async def handle(request: HttpRequest) -> HttpResponse | None:
            return await self._handle(request, endpoint)

        while True:
            with trio.CancelScope() as listening:
                async with trio.open_nursery() as nursery:
                    port = await nursery.start(
                        partial(serve_http, handle, host=host, port=port, ssl_context=ssl_context)
                    )
                    if not endpoint:
                        endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                        self.endpoints.append(endpoint)
                        if self.endpoint is None:
                            self.port, self.endpoint = port, endpoint
                        task_status.started(port)
                    self._listening[endpoint] = listening
                    if endpoint in self._serving:
                        self._serving[endpoint].set()
            # Only `take_down` cancels `listening`: wait to be brought up, then listen again.
            self._closed[endpoint].set()
            await self._up[endpoint].wait()

    async def _handle(self, request: HttpRequest, endpoint: str) -> HttpResponse | None:
        """Record, apply any fault, then check and answer (module docstring has the order)."""
        record = self._record(request, endpoint)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            fault = self._take_fault(endpoint, record.action, record.secret_name)
            response: HttpResponse | None = None
            if fault is not None:
                await trio.sleep(fault.delay)
                if fault.drop:
                    return None
                response = self._fault_response(fault)
            if response is None:
                response = self._answer(request, endpoint)
            record.status = response.status
            return response
        finally:
            self.in_flight -= 1

    def _record(self, request: HttpRequest, endpoint: str) -> CallRecord:
        auth = _parse_authorization(request.headers.get("authorization"))
        query = request.query
        action = request.headers.get("x-acs-action", "")
        record = CallRecord(
            action=action,
            secret_name=query.get("SecretName"),
            version_id=query.get("VersionId"),
            version_stage=query.get("VersionStage"),
            access_key_id=auth.access_key_id if auth else request.headers.get("x-acs-accesskey-id"),
            at=self._clock(),
            endpoint=endpoint,
        )
        if action == BATCH_GET_SECRET_VALUE:
            items = _secrets_list(query.get("SecretsList"), strict=False)
            record.secret_names = tuple(item["SecretName"] for item in items)
        self.calls.append(record)
        return record

    def _fault_response(self, fault: Fault) -> HttpResponse | None:
        """The answer a fault forces, or None when it only delays."""
        if fault.status:
            phrase = http_reasons.get(fault.status, "Error")
            code = fault.code or phrase.replace(" ", "")
            error = _KmsError(fault.status, code, fault.message or phrase)
            return self._error_response(error, retry_after_ms=fault.retry_after_ms)
        if fault.malformed:
            request_id = _request_id()
            body = json.dumps({"RequestId": request_id, "SecretName": "truncated"}).encode()
            return _json_response(200, body[: len(body) // 2], request_id)
        return None

    def _answer(self, request: HttpRequest, endpoint: str) -> HttpResponse:
        try:
            credential = self._authenticate(request)
            if request.headers["x-acs-action"] == BATCH_GET_SECRET_VALUE:
                body = self._batch_get_secret_value(request.query, endpoint, credential.secrets)
            else:
                body = self._get_secret_value(request.query, credential.secrets)
        except _KmsError as error:
            return self._error_response(error)
        request_id = _request_id()
        payload = json.dumps({"RequestId": request_id, **body}).encode()
        return _json_response(200, payload, request_id)

    def _error_response(self, error: _KmsError, retry_after_ms: int | None = None) -> HttpResponse:
        request_id = _request_id()
        body = {
            "RequestId": request_id,
            "HostId": f"kms.{self.region}.aliyuncs.com",
            "Code": error.code,
            "Message": error.message,
            "HttpStatus": error.status,
        }
        response = _json_response(error.status, json.dumps(body).encode(), request_id)
        if retry_after_ms is not None:
            response.headers.append(("x-acs-retry-after", str(retry_after_ms)))
        return response

    # --- verification ----------------------------------------------------------------------

    def _authenticate(self, request: HttpRequest) -> _Credential:
        """Steps 3-10 of the module docstring; raises _KmsError on the first failure."""
        headers = request.headers
        self._check_action(headers)
        auth = _parse_authorization(headers.get("authorization"))
        if auth is None:
            raise _kms_error("IncompleteSignature")
        _check_signed_headers(headers, auth.signed_headers)
        payload_hash = _check_content_sha256(headers, request.body)
        check_timestamp(headers.get("x-acs-date", ""), self._clock(), _kms_error)
        credential = self._credential_for(auth, headers)
        _check_signature(request, auth, payload_hash, credential.secret)
        sent_token = headers.get("x-acs-security-token")
        check_security_token(sent_token, credential.security_token, credential.expires_at, self._clock(), _kms_error)
        self._nonces.check(headers.get("x-acs-signature-nonce", ""), self._clock(), _kms_error)
        return credential

    def _credential_for(self, auth: _Authorization, headers: dict[str, str]) -> _Credential:
        credential = self._credentials.get(auth.access_key_id)
        if credential is None:
            raise _kms_error("InvalidAccessKeyId.NotFound")
        if headers.get("x-acs-accesskey-id", auth.access_key_id) != auth.access_key_id:
            raise _kms_error("IncompleteSignature", "x-acs-accesskey-id does not match Credential.")
        return credential

    # --- GetSecretValue --------------------------------------------------------------------

    def _check_action(self, headers: dict[str, str]) -> None:
        actions = (GET_SECRET_VALUE, BATCH_GET_SECRET_VALUE) if self.batch_enabled else (GET_SECRET_VALUE,)
        if headers.get("x-acs-action") not in actions:
            raise _kms_error("InvalidAction.NotFound")
        if headers.get("x-acs-version") != API_VERSION:
            raise _kms_error("InvalidVersion")

    def _get_secret_value(self, query: dict[str, str], allowed: frozenset[str] | None = None) -> dict[str, Any]:
        """The success body without RequestId, following KMS's version selection rules."""
        name = query.get("SecretName")
        if not name:
            raise _kms_error("MissingSecretName")
        return self._secret_value(name, query.get("VersionId") or None, query.get("VersionStage") or None, allowed)

    def _batch_get_secret_value(
        self, query: dict[str, str], endpoint: str, allowed: frozenset[str] | None = None
    ) -> dict[str, Any]:
        """`SecretValues` for the secrets that can be read, an `Errors` entry for each other one."""
        values: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for item in _secrets_list(query.get("SecretsList"), strict=True):
            name = item["SecretName"]
            fault = self._take_fault(endpoint, BATCH_GET_SECRET_VALUE, name, one_secret=True)
            try:
                if fault is not None and fault.status:
                    phrase = http_reasons.get(fault.status, "Error")
                    raise _KmsError(fault.status, fault.code or phrase.replace(" ", ""), fault.message or phrase)
                version_id, stage = item.get("VersionId") or None, item.get("VersionStage") or None
                values.append(self._secret_value(name, version_id, stage, allowed))
            except _KmsError as error:
                errors.append(
                    {"SecretName": name, "Code": error.code, "HttpStatus": error.status, "Message": error.message}
                )
        return {"SecretValues": values, "Errors": errors}

    def _secret_value(
        self, name: str, version_id: str | None, version_stage: str | None, allowed: frozenset[str] | None = None
    ) -> dict[str, Any]:
        resolved = self._resolve_name(name)
        if allowed is not None and resolved not in allowed:
            raise _kms_error("Forbidden.NoPermission")
        secret = self._secrets.get(resolved) if resolved is not None else None
        if secret is None:
            raise _kms_error("Forbidden.ResourceNotFound")
        version = _select_version(secret, version_id, version_stage)
        return {
            "SecretName": secret.name,
            "SecretType": secret.secret_type,
            "SecretData": version.data,
            "SecretDataType": version.data_type,
            "VersionId": version.version_id,
            "VersionStages": {"VersionStage": secret.stages_of(version.version_id)},
            "CreateTime": _format_time(version.create_time),
            **secret.rotation,
        }

    def _resolve_name(self, name: str) -> str | None:
        """A plain name, or the name inside an ARN of this region and account (else None)."""
        if not name.startswith("acs:"):
            return name
        parts = name.split(":", 4)
        if len(parts) != 5 or parts[:4] != ["acs", "kms", self.region, self.account_id]:
            return None
        kind, _, secret_name = parts[4].partition("/")
        return secret_name if kind == "secret" and secret_name else None


def _secrets_list(text: str | None, *, strict: bool) -> list[dict[str, Any]]:
    """BatchGetSecretValue's `SecretsList` (JSON, as the SDK's "json" style writes it).

    `strict`: raise KMS's 400 for a missing or malformed list; else (for the call record) give
    the items that can be read, or none.
    """
    if not text:
        if strict:
            raise _kms_error("MissingParameter", "SecretsList is mandatory for this action.")
        return []
    try:
        items = json.loads(text)
    except (ValueError, RecursionError):
        items = None
    well_formed = (
        isinstance(items, list)
        and 0 < len(items) <= BATCH_LIMIT
        and all(
            isinstance(item, dict) and isinstance(item.get("SecretName"), str) and item["SecretName"] for item in items
        )
    )
    if well_formed:
        checked: list[dict[str, Any]] = items
        return checked
    if strict:
        raise _kms_error(
            "InvalidParameter", f"SecretsList must be a JSON array of 1 to {BATCH_LIMIT} objects with a SecretName."
        )
    return []


def _parse_authorization(value: str | None) -> _Authorization | None:
    match = _AUTHORIZATION.match(value or "")
    if match is None:
        return None
    return _Authorization(match["ak"], match["signed"].split(";"), match["signature"])


def _check_signed_headers(headers: dict[str, str], signed: list[str]) -> None:
    """Everything the gateway relies on must be covered by the signature, and exist."""
    absent = [name for name in signed if name not in headers or name == "authorization"]
    must_sign = [name for name in headers if name == "host" or name.startswith("x-acs-")]
    unsigned = [name for name in must_sign if name not in signed]
    if "host" not in headers or absent or unsigned:
        message = f"Host and x-acs-* must be signed; unsigned: {unsigned}, absent: {absent}."
        raise _kms_error("IncompleteSignature", message)


def _check_content_sha256(headers: dict[str, str], body: bytes) -> str:
    """The payload hash that was signed, once it is known to match the body."""
    expected = hashlib.sha256(body).hexdigest()
    if not same(headers.get("x-acs-content-sha256", ""), expected):
        raise _kms_error("SignatureDoesNotMatch", "x-acs-content-sha256 does not match the body.")
    return expected


def _check_signature(
    request: HttpRequest, auth: _Authorization, payload_hash: str, secret: str
) -> None:
    """Recompute with the SDK's own signer over exactly the headers the client said it signed."""
    signing_input = _SigningInput(
        method=request.method,
        pathname=request.path,
        query=request.query,
        headers={name: request.headers[name] for name in auth.signed_headers},
    )
    expected = Utils.get_authorization(
        signing_input, SIGNATURE_ALGORITHM, payload_hash, auth.access_key_id, secret
    ).rpartition("Signature=")[2]
    if not same(expected, auth.signature):
        raise _kms_error("SignatureDoesNotMatch")


def _select_version(
    secret: _Secret, version_id: str | None, version_stage: str | None
) -> _Version:
    """VersionId wins (and must carry VersionStage when both are given); default ACSCurrent."""
    if version_id is None:
        version_id = secret.stages.get(version_stage or ACS_CURRENT)
    version = secret.versions.get(version_id) if version_id is not None else None
    if version is None:
        raise _kms_error("Forbidden.ResourceNotFound")
    if version_stage is not None and version_stage not in secret.stages_of(version.version_id):
        raise _kms_error("Forbidden.ResourceNotFound")
    return version


def _kms_error(code: str, message: str | None = None) -> _KmsError:
    status, default_message = _ERRORS[code]
    return _KmsError(status, code, message or default_message)


def _json_response(status: int, body: bytes, request_id: str) -> HttpResponse:
    headers = [("content-type", _JSON_TYPE), ("x-acs-request-id", request_id)]
    return HttpResponse(status, headers, body)


def _request_id() -> str:
    return str(uuid.uuid4()).upper()


def _format_time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=UTC).strftime(TIME_FORMAT)
