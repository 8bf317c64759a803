"""STS AssumeRole: a renewing session of a RAM role, signed with other credentials (SPEC §6).

`AssumeRoleSession` is one role's session: given source credentials (any `CredentialSource`) and
a `RoleRequest`, its trio task calls AssumeRole, renews before `Expiration` by the shared rule
(`renewing.py`), keeps the current credentials until they expire when STS fails, and backs off.
`[Credentials] Type = "ram_role_arn"` runs one for the agent itself; a per-request role is the
same class with the agent's credentials as the source (`owns_source=False`: the source's task
already runs in the agent's nursery).

What comes from the SDK and what is owned here: the parameters are the ones
alibabacloud-credentials' `RamRoleArnCredentialsProvider` builds (a test compares them, and the
signature, byte for byte), signed with the legacy RPC HMAC-SHA1 signature by `signing.py`, which
tests/test_signing.py checks byte for byte against the OpenAPI SDK's `Utils.get_rpcsignature`
(whose module costs 48 MB to import). The SDK's sending (`TeaCore.do_action`:
blocking `requests`, or aiohttp under asyncio, which fails under trio) and its answer parsing (a
strict `%Y-%m-%dT%H:%M:%SZ` and error messages that quote STS's whole answer) are replaced by
httpx with bounded timeouts. One deliberate difference: the SDK sends a GET with every parameter,
the security token included, in the URL; here they go in a POST form (RPC takes either, the
signature then starts with "POST"), because URLs end up in request logs (httpx logs each one at
INFO; proxies and access logs keep them).

The two SDK signers differ only for a space in a value (`Policy` JSON with spaces):
`get_rpcsignature` (and so ours) encodes it `%20` as the RPC signature documentation says, the
credentials package's `quote_plus` helper `+`; a test checks they agree byte for byte everywhere
else.

STS's error `Message` is never logged or returned: for `SignatureDoesNotMatch` the gateway quotes
its string to sign, which holds the caller's security token. Only its `Code` travels.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING
from urllib.parse import quote

import trio

from kmsagent import __version__, signing
from kmsagent.credentials.base import Credentials, CredentialSource
from kmsagent.credentials.renewing import FetchError, RenewingCredentials
from kmsagent.errors import AgentError, UpstreamUnavailable

if TYPE_CHECKING:
    import httpx

API_VERSION = "2015-04-01"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
#: Seconds for each step of an AssumeRole call (httpx.Timeout's).
STS_TIMEOUT = {"connect": 3.0, "read": 5.0, "write": 5.0, "pool": 3.0}
#: STS's own error codes are short dotted words; anything else is reported as HTTP<status>.
_CODE = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: STS refusing the caller's security token: its source may renew and the next try succeed.
SOURCE_REJECTED_CODES = frozenset(
    {"InvalidSecurityToken.Expired", "InvalidSecurityToken.MismatchWithAccessKey", "InvalidSecurityToken.Malformed"}
)


class StsRefused(AgentError):
    """STS answered 4xx to AssumeRole: a request that needs the session gets 403 and STS's Code."""

    def __init__(self, code: str, role_arn: str) -> None:
        super().__init__(403, code, f"STS refused to assume {role_arn} ({code})")


@dataclass(frozen=True)
class StsEndpoint:
    """Where AssumeRole goes: `host[:port]` and "https" (or "http" for a loopback emulator)."""

    host: str
    protocol: str = "https"

    @property
    def url(self) -> str:
        return f"{self.protocol}://{self.host}"

    @classmethod
    def of(
        cls,
        endpoint: str,
        protocol: str,
        *,
        region: str,
        env: Mapping[str, str],
        profile_region: str = "",
        vpc: bool | None = None,
    ) -> StsEndpoint:
        """`StsEndpoint` when set; else sts[-vpc].<region>.aliyuncs.com.

        A CLI profile's own `sts_region`/`enable_vpc` come first (`profile_region`, `vpc`); then
        `StsEndpoint`; then ALIBABA_CLOUD_STS_REGION (else the [KMS] Region) with
        ALIBABA_CLOUD_VPC_ENDPOINT_ENABLED=true for the VPC endpoint, as the SDK reads them.
        """
        if vpc is None:
            vpc = env.get("ALIBABA_CLOUD_VPC_ENDPOINT_ENABLED", "").strip().lower() == "true"
        prefix = "sts-vpc" if vpc else "sts"
        if profile_region:
            return cls(f"{prefix}.{profile_region}.aliyuncs.com")
        if endpoint:
            return cls(endpoint, protocol)
        region = env.get("ALIBABA_CLOUD_STS_REGION", "").strip() or region
        return cls(f"{prefix}.{region}.aliyuncs.com")


@dataclass(frozen=True)
class RoleRequest:
    """The AssumeRole parameters of one session."""

    role_arn: str
    session_name: str = "kmsagent"
    duration_seconds: int = 3600
    external_id: str = ""
    policy: str = ""


def assume_role_query(
    request: RoleRequest, credentials: Credentials, *, timestamp: float, nonce: str, method: str = "POST"
) -> dict[str, str]:
    """The signed parameters of an AssumeRole call, parameter for parameter as the SDK sends them."""
    query = {
        "Action": "AssumeRole",
        "Format": "JSON",
        "Version": API_VERSION,
        "DurationSeconds": str(request.duration_seconds),
        "RoleArn": request.role_arn,
        "RoleSessionName": request.session_name,
        "SignatureMethod": "HMAC-SHA1",
        "SignatureVersion": "1.0",
        "Timestamp": datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "SignatureNonce": nonce,
    }
    if request.policy:
        query["Policy"] = request.policy
    if request.external_id:
        query["ExternalId"] = request.external_id
    query["AccessKeyId"] = credentials.access_key_id
    if credentials.security_token:
        query["SecurityToken"] = credentials.security_token
    query["Signature"] = rpc_signature(query, credentials.access_key_secret, method)
    return query


def rpc_signature(params: Mapping[str, str], secret: str, method: str = "POST") -> str:
    """The legacy RPC signature: base64(HMAC-SHA1(secret + "&", method&%2F&<encoded sorted query>))."""
    return signing.rpc_signature(params, method, secret)


def encode_form(params: Mapping[str, str]) -> str:
    """The form body as signed: RFC 3986 percent-encoding (a space is %20, `~` stays)."""
    return "&".join(f"{quote(key, safe='~')}={quote(value, safe='~')}" for key, value in params.items())


class AssumeRoleSession(RenewingCredentials):
    """A renewing session of one RAM role; a `CredentialSource` whose `run` must be running."""

    def __init__(
        self,
        source: CredentialSource,
        request: RoleRequest,
        endpoint: StsEndpoint,
        *,
        renew_before: float,
        clock: Callable[[], float] = time.time,
        owns_source: bool = True,
    ) -> None:
        """`owns_source`: `run` runs the source's task too (False when it runs elsewhere already)."""
        super().__init__(renew_before=renew_before, clock=clock)
        self._source = source
        self._request = request
        self._endpoint = endpoint
        self._owns_source = owns_source
        self.label = f"AssumeRole session of {request.role_arn}"
        self.kind = f"ram_role_arn ({request.role_arn} via {endpoint.host}, signed with {source.kind})"

    @property
    def request(self) -> RoleRequest:
        return self._request

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if not self._owns_source:
            await super().run(task_status=task_status)
            return
        async with trio.open_nursery() as nursery:
            await nursery.start(self._source.run)
            await super().run(task_status=task_status)

    def _http_client(self) -> httpx.AsyncClient:
        import httpx  # on first use: an agent on static keys never loads it (≈ 35 ms of start-up)

        return httpx.AsyncClient(
            base_url=self._endpoint.url,
            timeout=httpx.Timeout(**STS_TIMEOUT),
            trust_env=False,
            headers={"User-Agent": f"kmsagent/{__version__}"},
        )

    def _unavailable(self) -> AgentError:
        return UpstreamUnavailable(
            f"no valid credentials for {self._request.role_arn}: STS at {self._endpoint.host} "
            "has not provided any (see the agent's log)"
        )

    async def _fetch(self, http: httpx.AsyncClient, *, retry: bool = True) -> Credentials:
        import httpx

        try:
            source = await self._source.current()
        except AgentError as error:
            raise FetchError(
                f"the credentials that sign AssumeRole ({self._source.kind}) are unavailable: {error.code}"
            ) from None
        query = assume_role_query(self._request, source, timestamp=self._clock(), nonce=str(uuid.uuid4()))
        host = self._endpoint.host
        try:
            response = await http.post("/", content=encode_form(query).encode(), headers=FORM)
        except httpx.HTTPError as error:
            raise FetchError(f"cannot reach STS at {host}: {type(error).__name__}") from None
        document = _json(response.content)
        code = document.get("Code") if isinstance(document, dict) else None
        code = code if isinstance(code, str) and _CODE.fullmatch(code) else f"HTTP{response.status_code}"
        if 400 <= response.status_code < 500:
            if code in SOURCE_REJECTED_CODES and await self._source.rejected(source) and retry:
                return await self._fetch(http, retry=False)  # renewed source credentials: try once more now
            refusal = partial(StsRefused, code, self._request.role_arn)
            raise FetchError(f"STS at {host} refused AssumeRole of {self._request.role_arn}: {code}", refusal=refusal)
        if response.status_code != 200:
            raise FetchError(f"STS at {host} answered HTTP {response.status_code} ({code})")
        credentials = document.get("Credentials") if isinstance(document, dict) else None
        return self._checked(credentials, f"STS at {host}")


def _json(body: bytes) -> object:
    try:
        return json.loads(body)
    except ValueError:
        return None
