"""A trio-native KMS client for GetSecretValue: cancellable, time-bounded, retried, bounded in flight.

Why not the SDK's client: its sync methods block on `requests` (and cannot be cancelled from a
thread), and its `_async` methods need asyncio's event loop, so neither fits trio (NOTES.md). We
keep what it does well — the ACS3-HMAC-SHA256 signer (`Utils.get_authorization`) and the response
model (`GetSecretValueResponseBody`) — and speak the same wire request over httpx, which runs on
trio natively.
"""

from __future__ import annotations

import hashlib
import json
import random
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import httpx
import trio
from alibabacloud_kms20160120.models import GetSecretValueResponseBody
from alibabacloud_tea_openapi.utils import Utils
from loguru import logger

from kmsagent import __version__
from kmsagent.config import KmsConfig
from kmsagent.credentials import CredentialSource, Credentials
from kmsagent.errors import AgentError, KmsError, UpstreamTimeout, UpstreamUnavailable

API_VERSION = "2016-01-20"
SIGNATURE_ALGORITHM = "ACS3-HMAC-SHA256"
EMPTY_BODY_SHA256 = hashlib.sha256(b"").hexdigest()
BACKOFF_BASE = 0.2  # seconds; KMS's guidance is 2^n × 200 ms
MAX_RETRY_WAIT = 10.0  # a longer x-acs-retry-after is not waited for: the error goes back
TOKEN_REJECTED_CODES = frozenset({"InvalidSecurityToken.Expired", "InvalidSecurityToken.Malformed"})
#: A GetSecretValue answer is one secret (KMS stores at most 64 KB) in JSON; more is not KMS's.
MAX_ANSWER_BYTES = 2**20


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


class KmsClient:
    """GetSecretValue against one endpoint, with the retry and concurrency rules of SPEC §2/§5."""

    def __init__(
        self,
        config: KmsConfig,
        credentials: CredentialSource,
        http: httpx.AsyncClient,
        clock: Callable[[], float] = time.time,
        observe: Callable[[str, float], None] = lambda outcome, seconds: None,
    ) -> None:
        self._config = config
        self._clock = clock
        self._observe = observe
        self._credentials = credentials
        self._http = http
        self._host = config.effective_endpoint
        self._base_url = f"{config.protocol}://{self._host}/"
        self._in_flight = trio.CapacityLimiter(config.max_concurrent_requests)
        self._attempt_limit = (config.connect_timeout_ms + config.read_timeout_ms) / 1000

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        config: KmsConfig,
        credentials: CredentialSource,
        *,
        clock: Callable[[], float] = time.time,
        observe: Callable[[str, float], None] = lambda outcome, seconds: None,
    ) -> AsyncIterator[KmsClient]:
        """A client with its own connection pool, closed on exit."""
        connect = config.connect_timeout_ms / 1000
        read = config.read_timeout_ms / 1000
        verify: ssl.SSLContext | bool = True
        if config.ca_file_path:
            verify = ssl.create_default_context(cafile=config.ca_file_path)
        pool = httpx.Limits(
            max_connections=config.max_concurrent_requests,
            max_keepalive_connections=config.max_concurrent_requests,
        )
        async with httpx.AsyncClient(
            timeout=httpx.Timeout(connect=connect, read=read, write=read, pool=connect),
            limits=pool,
            verify=verify,
            trust_env=False,
        ) as http:
            yield cls(config, credentials, http, clock, observe)

    async def get_secret_value(
        self,
        secret_id: str,
        *,
        version_id: str = "",
        version_stage: str = "",
        queued: Callable[[], AbstractContextManager[object]] = nullcontext,
        credentials: CredentialSource | None = None,
    ) -> SecretValue:
        """The secret as KMS returns it; raises `AgentError` subclasses with SPEC §3 statuses.

        `credentials`: a per-request role's session instead of the agent's own (SPEC §6).

        5xx, 3xx, timeouts, connection errors and `Rejected.Throttling` are retried up to
        MaxRetries times with exponential back-off and jitter (at least `x-acs-retry-after`). An
        expired security token makes the credential source renew once, and the call is tried
        again. Each wait for one of the MaxConcurrentRequests slots runs inside `queued()`: the
        only part of a call that the caller may cancel without having cost KMS anything.
        """
        query = {"SecretName": secret_id}
        if version_id:
            query["VersionId"] = version_id
        if version_stage:
            query["VersionStage"] = version_stage
        source = self._credentials if credentials is None else credentials
        renewed = False
        attempt = 0
        while True:
            signing = await source.current()
            try:
                return await self._attempt(query, signing, queued)
            except KmsError as error:
                if error.code in TOKEN_REJECTED_CODES and not renewed:
                    renewed = True
                    if await source.rejected(signing):
                        continue
                if not error.is_transient:
                    raise
                delay = _backoff(attempt, error.retry_after)
                failure: AgentError = error
            except (UpstreamUnavailable, UpstreamTimeout) as error:
                delay, failure = _backoff(attempt, None), error
            if attempt >= self._config.max_retries or delay is None:
                raise failure
            attempt += 1
            logger.debug("KMS try {} for {!r} failed ({}); retrying in {:.2f}s", attempt, secret_id, failure.code, delay)
            await trio.sleep(delay)

    async def _attempt(
        self, query: dict[str, str], credentials: Credentials, queued: Callable[[], AbstractContextManager[object]]
    ) -> SecretValue:
        """One signed call, once a slot is free; its outcome and duration go to `observe` (the metrics)."""
        with queued():
            await self._in_flight.acquire()
        try:
            return await self._observed(query, credentials)
        finally:
            self._in_flight.release()

    async def _observed(self, query: dict[str, str], credentials: Credentials) -> SecretValue:
        started = trio.current_time()
        outcome: str | None = None  # stays None when cancelled: not an outcome of KMS's
        try:
            secret = await self._call(query, credentials)
            outcome = "success"
            return secret
        except KmsError as error:
            if error.code == "Rejected.Throttling":
                outcome = "throttled"
            else:
                outcome = "server_error" if error.kms_status >= 500 else "client_error"
            raise
        except UpstreamTimeout:
            outcome = "timeout"
            raise
        except UpstreamUnavailable:
            outcome = "unreachable"
            raise
        finally:
            if outcome is not None:
                self._observe(outcome, trio.current_time() - started)

    async def _call(self, query: dict[str, str], credentials: Credentials) -> SecretValue:
        canonical_query = "&".join(
            f"{key}={quote(value, safe='~')}" for key, value in sorted(query.items())
        )
        headers = self._signed_headers(query, credentials)
        with trio.move_on_after(self._attempt_limit) as attempt_scope:
            try:
                response, body = await self._post(f"{self._base_url}?{canonical_query}", headers)
            except httpx.TimeoutException:
                raise UpstreamTimeout(f"KMS at {self._host} did not answer in time") from None
            except httpx.TransportError as error:
                raise UpstreamUnavailable(f"cannot reach KMS at {self._host}: {_describe(error)}") from None
        if attempt_scope.cancelled_caught:
            raise UpstreamTimeout(f"KMS at {self._host} did not answer in time")
        if response.status_code == 200:
            return _parse_secret(body)
        raise _parse_error(response, body)

    async def _post(self, url: str, headers: dict[str, str]) -> tuple[httpx.Response, bytearray]:
        """The answer's head and its body, read up to `MAX_ANSWER_BYTES`.

        httpx ties every response and its stream in a reference cycle, so a response, with the
        secret it carries, lived until the next garbage collection; and with cli.py's sparse
        collections, `refreshNow=true` in a loop on a 60 KB secret grew RSS by ≈25 MB in 15 s.
        Breaking the cycle once the response is closed frees it as soon as it is parsed.
        """
        response: httpx.Response | None = None
        try:
            async with self._http.stream("POST", url, headers=headers) as response:
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_ANSWER_BYTES:
                        raise UpstreamUnavailable(f"KMS at {self._host} answered more than {MAX_ANSWER_BYTES} bytes")
        finally:
            if response is not None:
                response.stream = _CLOSED
        assert response is not None
        return response, body

    def _signed_headers(self, query: dict[str, str], credentials: Credentials) -> dict[str, str]:
        """The headers the SDK sends, signed exactly as its `do_request` signs them."""
        headers = {
            "host": self._host,
            "x-acs-version": API_VERSION,
            "x-acs-action": "GetSecretValue",
            "user-agent": f"kmsagent/{__version__}",
            "x-acs-date": datetime.fromtimestamp(self._clock(), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "x-acs-signature-nonce": secrets.token_hex(16),
            "accept": "application/json",
            "content-type": "application/x-www-form-urlencoded",
            "x-acs-content-sha256": EMPTY_BODY_SHA256,
        }
        if credentials.security_token:
            headers["x-acs-accesskey-id"] = credentials.access_key_id
            headers["x-acs-security-token"] = credentials.security_token
        request = SimpleNamespace(method="POST", pathname="/", query=query, headers=headers)
        headers["Authorization"] = Utils.get_authorization(
            request,
            SIGNATURE_ALGORITHM,
            EMPTY_BODY_SHA256,
            credentials.access_key_id,
            credentials.access_key_secret,
        )
        return headers


_CLOSED = httpx.ByteStream(b"")


def _describe(error: BaseException) -> str:
    """The useful part of a transport error: under trio a TLS failure hides in the cause chain."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ssl.SSLError):
            return f"TLS handshake failed: {cause.reason or cause}"
        cause = cause.__cause__ or cause.__context__
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _backoff(attempt: int, retry_after: float | None) -> float | None:
    """Seconds before retry number `attempt + 1`, or None when KMS asks for too long a wait."""
    step = BACKOFF_BASE * 2**attempt
    delay = random.uniform(step / 2, step)
    if retry_after is not None:
        if retry_after > MAX_RETRY_WAIT:
            return None
        delay = max(delay, retry_after)
    return min(delay, MAX_RETRY_WAIT)


def _parse_secret(body: bytes | bytearray) -> SecretValue:
    try:
        document = json.loads(body)
        fields = GetSecretValueResponseBody().from_map(document).to_map()
    except (ValueError, TypeError, AttributeError, RecursionError):
        raise UpstreamUnavailable("KMS answered 200 with a body that is not GetSecretValue JSON") from None
    fields.pop("RequestId", None)
    if not isinstance(fields.get("SecretName"), str) or not isinstance(fields.get("VersionId"), str) or "SecretData" not in fields:
        raise UpstreamUnavailable("KMS answered 200 without SecretName, SecretData or VersionId")
    return SecretValue(fields)


def _parse_error(response: httpx.Response, body: bytes | bytearray) -> AgentError:
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
