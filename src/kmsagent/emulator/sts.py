"""An in-process fake of STS AssumeRole that checks requests as the RPC gateway does.

Roles are added with the secrets their sessions may read in the `KmsEmulator` (a RAM role's
permissions), the callers they trust and the ExternalId their trust policy requires. A granted
AssumeRole mints STS credentials that the KMS emulator accepts until they expire, for those
secrets only. Callers are the account's keys: those registered with the KMS emulator (AccessKeys,
or STS credentials, so role chains work).

Each request goes through these steps, in this order; the first failure answers with STS's
error shape (`RequestId`, `HostId`, `Code`, `Message`, `Recommend`):

1. Record an `AssumeRoleCall`. `outage`: 503 `ServiceUnavailable`.
2. `Action` is AssumeRole (else 404 `InvalidAction.NotFound`), `Version` 2015-04-01 (else 400
   `InvalidVersion`), `SignatureMethod` HMAC-SHA1 and `SignatureVersion` 1.0 (else 400
   `IncompleteSignature`), `AccessKeyId` and `Signature` present (else 400 `IncompleteSignature`).
3. `Timestamp` parses as `%Y-%m-%dT%H:%M:%SZ` (else 400 `InvalidTimeStamp.Format`) and is within
   15 min of `clock()` (else 400 `InvalidTimeStamp.Expired`).
4. The AccessKey is known (else 404 `InvalidAccessKeyId.NotFound`).
5. The signature matches the legacy RPC HMAC-SHA1 over every other parameter, of the query
   (GET) or of the query and the form body (POST), with the request's method (else 400
   `SignatureDoesNotMatch`, whose message quotes the string to sign, security token and all, as
   the real gateway's does: a client must never log STS's messages).
6. Security token: an STS key needs exactly its `SecurityToken` (else 400
   `InvalidSecurityToken.MismatchWithAccessKey`), a permanent key must send none (else 400
   `InvalidSecurityToken.Malformed`), an expired one 400 `InvalidSecurityToken.Expired`.
7. `SignatureNonce` present (else 400 `MissingSignatureNonce`) and unseen for 15 min (else 400
   `SignatureNonceUsed`).
8. Parameters: `RoleArn` (400 `MissingRoleArn`), `RoleSessionName` present and 2..64 of
   [\\w.@-] (400 `MissingRoleSessionName` / `InvalidParameter.RoleSessionName`), `DurationSeconds`
   900..the role's maximum (400 `InvalidParameter.DurationSeconds`), `Policy` a JSON object (400
   `InvalidParameter.PolicyGrammar`).
9. The role exists in this account (else 404 `EntityNotExist.Role`); it trusts the caller and,
   when it requires one, the `ExternalId` matches (else 403 `NoPermission`).
"""

from __future__ import annotations

import json
import re
import ssl
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from urllib.parse import parse_qsl, quote, quote_plus

import trio
from alibabacloud_tea_openapi.utils import Utils

from kmsagent.emulator.gateway import TIME_FORMAT, Nonces, check_security_token, check_timestamp, same
from kmsagent.emulator.http import HttpRequest, HttpResponse, serve_http
from kmsagent.emulator.kms import KmsEmulator
from kmsagent.emulator.metadata import IssuedCredentials, mint

API_VERSION = "2015-04-01"
_SESSION_NAME = re.compile(r"[A-Za-z0-9_.@-]{2,64}")
_ERRORS: dict[str, tuple[int, str]] = {
    "ServiceUnavailable": (503, "The request has failed due to a temporary failure of the server."),
    "InvalidAction.NotFound": (404, "Specified api is not found, please check your url and method."),
    "InvalidVersion": (400, "Specified parameter Version is not valid."),
    "IncompleteSignature": (400, "The request signature does not conform to Aliyun standards."),
    "InvalidTimeStamp.Format": (400, "Specified time stamp or date value is not well formatted."),
    "InvalidTimeStamp.Expired": (400, "Specified time stamp or date value is expired."),
    "InvalidAccessKeyId.NotFound": (404, "Specified access key is not found."),
    "SignatureDoesNotMatch": (400, "Specified signature is not matched with our calculation."),
    "InvalidSecurityToken.MismatchWithAccessKey": (
        400,
        "The security token you provided does not match the access key.",
    ),
    "InvalidSecurityToken.Malformed": (400, "The security token you provided is malformed."),
    "InvalidSecurityToken.Expired": (400, "The security token you provided has expired."),
    "MissingSignatureNonce": (400, "SignatureNonce is mandatory for this action."),
    "SignatureNonceUsed": (400, "Specified signature nonce was used already."),
    "MissingRoleArn": (400, "RoleArn is mandatory for this action."),
    "MissingRoleSessionName": (400, "RoleSessionName is mandatory for this action."),
    "InvalidParameter.RoleSessionName": (400, "The parameter RoleSessionName is wrongly formed."),
    "InvalidParameter.DurationSeconds": (
        400,
        "The Min/Max value of DurationSeconds is 15min/the role's max session duration.",
    ),
    "InvalidParameter.PolicyGrammar": (400, "The parameter Policy has not passed grammar check."),
    "EntityNotExist.Role": (404, "The specified Role not exists ."),
    "NoPermission": (403, "You are not authorized to do this action. You should be authorized by RAM."),
}


@dataclass
class Role:
    """A RAM role of the account: what its sessions may read, whom and on what it trusts."""

    arn: str
    secrets: frozenset[str] | None = None  # secret names its sessions may read; None: all
    max_session_duration: int = 3600
    trusted: frozenset[str] | None = None  # AccessKeyIds that may assume it; None: any of the account
    external_id: str | None = None  # the ExternalId its trust policy requires


@dataclass
class AssumeRoleCall:
    """One request as the emulator saw it (no secret or token is kept)."""

    access_key_id: str | None
    role_arn: str | None
    session_name: str | None
    duration_seconds: str | None
    policy: str | None
    external_id: str | None
    status: int | None = None
    code: str | None = None


class _StsError(Exception):
    def __init__(self, code: str, message: str | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.status, default = _ERRORS[code]
        self.message = message or default


class StsEmulator:
    """A fake STS endpoint for one account: add roles, switch outages on and off, count calls."""

    def __init__(self, kms: KmsEmulator, *, clock: Callable[[], float] | None = None) -> None:
        self.kms = kms
        self.account_id = kms.account_id
        self.clock = clock or kms._clock
        self.roles: dict[str, Role] = {}
        #: Switch: answer 503 ServiceUnavailable to everything.
        self.outage = False
        self.calls: list[AssumeRoleCall] = []
        self.issued: list[IssuedCredentials] = []
        self._nonces = Nonces()
        self.port: int | None = None
        self.endpoint: str | None = None

    def add_role(
        self,
        name: str,
        *,
        secrets: Iterable[str] | None = None,
        max_session_duration: int = 3600,
        trusted: Iterable[str] | None = None,
        external_id: str | None = None,
    ) -> str:
        """Creates (or replaces) role `name` (or a whole ARN); returns its ARN, `acs:ram::<account>:role/<name>`."""
        arn = name if name.startswith("acs:ram::") else f"acs:ram::{self.account_id}:role/{name}"
        self.roles[arn.lower()] = Role(
            arn,
            frozenset(secrets) if secrets is not None else None,
            max_session_duration,
            frozenset(trusted) if trusted is not None else None,
            external_id,
        )
        return arn

    async def serve(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serves until cancelled; `endpoint` is then the `host:port` to configure as StsEndpoint."""
        async with trio.open_nursery() as nursery:
            bound: int = await nursery.start(
                partial(serve_http, self._handle, host=host, port=port, ssl_context=ssl_context)
            )
            self.port = bound
            self.endpoint = f"{host}:{bound}"
            task_status.started(bound)

    async def _handle(self, request: HttpRequest) -> HttpResponse:
        params = dict(parse_qsl(request.raw_query, keep_blank_values=True))
        if request.method == "POST" and request.body:
            params.update(parse_qsl(request.body.decode("utf-8", "replace"), keep_blank_values=True))
        call = AssumeRoleCall(
            params.get("AccessKeyId"),
            params.get("RoleArn"),
            params.get("RoleSessionName"),
            params.get("DurationSeconds"),
            params.get("Policy"),
            params.get("ExternalId"),
        )
        self.calls.append(call)
        try:
            if self.outage:
                raise _StsError("ServiceUnavailable")
            body = self._assume_role(params, request.method)
            status = 200
        except _StsError as error:
            body = {"Code": error.code, "Message": error.message, "Recommend": "https://api.aliyun.com/troubleshoot"}
            body["HostId"] = "sts.aliyuncs.com"
            status = error.status
            call.code = error.code
        call.status = status
        payload = json.dumps({"RequestId": str(uuid.uuid4()).upper(), **body}).encode()
        return HttpResponse(status, [("content-type", "application/json;charset=utf-8")], payload)

    # --- the checks, in the module docstring's order ----------------------------------------

    def _assume_role(self, params: dict[str, str], method: str) -> dict[str, object]:
        if params.get("Action") != "AssumeRole":
            raise _StsError("InvalidAction.NotFound")
        if params.get("Version") != API_VERSION:
            raise _StsError("InvalidVersion")
        if params.get("SignatureMethod") != "HMAC-SHA1" or params.get("SignatureVersion") != "1.0":
            raise _StsError("IncompleteSignature")
        access_key_id, signature = params.get("AccessKeyId"), params.get("Signature")
        if not access_key_id or not signature:
            raise _StsError("IncompleteSignature")
        check_timestamp(params.get("Timestamp", ""), self.clock(), _StsError)
        caller = self.kms.registered(access_key_id)
        if caller is None:
            raise _StsError("InvalidAccessKeyId.NotFound")
        secret, security_token, expires_at = caller
        self._check_signature(params, signature, secret, method)
        check_security_token(params.get("SecurityToken"), security_token, expires_at, self.clock(), _StsError)
        self._nonces.check(params.get("SignatureNonce", ""), self.clock(), _StsError)
        role, session_name, duration = self._check_parameters(params)
        if role.trusted is not None and access_key_id not in role.trusted:
            raise _StsError("NoPermission")
        if role.external_id is not None and params.get("ExternalId") != role.external_id:
            raise _StsError("NoPermission")
        now = self.clock()
        issued = mint(self.kms, duration, now, role.secrets)
        self.issued.append(issued)
        return {
            "AssumedRoleUser": {
                "AssumedRoleId": f"3{uuid.uuid4().int % 10**17}:{session_name}",
                "Arn": f"{role.arn}/{session_name}",
            },
            "Credentials": {
                "AccessKeyId": issued.access_key_id,
                "AccessKeySecret": issued.access_key_secret,
                "SecurityToken": issued.security_token,
                "Expiration": datetime.fromtimestamp(issued.expires_at, UTC).strftime(TIME_FORMAT),
            },
        }

    def _check_signature(self, params: dict[str, str], signature: str, secret: str, method: str) -> None:
        signed = {key: value for key, value in params.items() if key != "Signature"}
        expected = Utils.get_rpcsignature(signed, method, secret)
        if not same(expected, signature):
            canonical = "&".join(f"{quote(k, safe='~')}={quote(v, safe='~')}" for k, v in sorted(signed.items()))
            string_to_sign = f"{method}&%2F&{quote_plus(canonical, safe='~')}"
            message = f"{_ERRORS['SignatureDoesNotMatch'][1]} server string to sign is:{string_to_sign}"
            raise _StsError("SignatureDoesNotMatch", message)

    def _check_parameters(self, params: dict[str, str]) -> tuple[Role, str, int]:
        arn = params.get("RoleArn")
        if not arn:
            raise _StsError("MissingRoleArn")
        session_name = params.get("RoleSessionName")
        if not session_name:
            raise _StsError("MissingRoleSessionName")
        if not _SESSION_NAME.fullmatch(session_name):
            raise _StsError("InvalidParameter.RoleSessionName")
        role = self.roles.get(arn.lower())
        text = params.get("DurationSeconds", "3600")
        max_duration = role.max_session_duration if role is not None else 43200
        if not text.isdigit() or not 900 <= int(text) <= max_duration:
            raise _StsError("InvalidParameter.DurationSeconds")
        policy = params.get("Policy")
        if policy is not None:
            try:
                valid = isinstance(json.loads(policy), dict)
            except ValueError:
                valid = False
            if not valid:
                raise _StsError("InvalidParameter.PolicyGrammar")
        if role is None:
            raise _StsError("EntityNotExist.Role")
        return role, session_name, int(text)
