"""A trio-native KMS client: GetSecretValue and BatchGetSecretValue, cancellable, time-bounded,
retried, bounded in flight, and moved to a replica endpoint when one fails.

Why not the SDK's client: its sync methods block on `requests` (and cannot be cancelled from a
thread), and its `_async` methods need asyncio's event loop, so neither fits trio (NOTES.md).
"""

from __future__ import annotations

import json
import random
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractContextManager, asynccontextmanager, nullcontext
from typing import TypeVar

import trio
from loguru import logger

from kmsagent.config import KmsConfig
from kmsagent.credentials import Credentials, CredentialSource
from kmsagent.errors import THROTTLING, AgentError, KmsError, UpstreamTimeout, UpstreamUnavailable, is_transient
from kmsagent.kms.endpoints import Endpoints
from kmsagent.kms.transport import AnswerTooLarge, Endpoint, Timeout, Transport, TransportError
from kmsagent.kms.wire import (
    BATCH_GET_SECRET_VALUE,
    BATCH_LIMIT,
    GET_SECRET_VALUE,
    MAX_ANSWER_BYTES,
    MAX_BATCH_ANSWER_BYTES,
    SecretValue,
    describe,
    parse_batch,
    parse_error,
    parse_secret,
    signed_request,
)
from kmsagent.slots import ORDINARY, Slots

T = TypeVar("T")
BACKOFF_BASE = 0.2  # seconds; KMS's guidance is 2^n × 200 ms
MAX_RETRY_WAIT = 10.0  # a longer x-acs-retry-after is not waited for: the error goes back
#: Seconds an idle connection to KMS is kept open for the next call (httpx's default, which the agent used).
KEEPALIVE_SECONDS = 5.0
TOKEN_REJECTED_CODES = frozenset({"InvalidSecurityToken.Expired", "InvalidSecurityToken.Malformed"})
#: Whole-batch answers that mean "this KMS (or this RAM policy) has no BatchGetSecretValue for
#: us": batching stops for the run. `Forbidden.*` (e.g. Forbidden.NoPermission) is matched by prefix.
BATCH_UNKNOWN_CODES = frozenset({"InvalidAction.NotFound", "InvalidApi.NotFound", "UnsupportedOperation"})
#: (endpoint, action, outcome, seconds) of each try, for the metrics: the call alone.
Observe = Callable[[str, str, str, float], None]
#: Seconds each try waited for one of the MaxConcurrentRequests slots, for the metrics.
ObserveWait = Callable[[float], None]
#: Wraps each wait for a slot; what it yields, an int, is the call's rank (kmsagent.slots; lower first).
Queued = Callable[[], AbstractContextManager[object]]


def _ignore(endpoint: str, action: str, outcome: str, seconds: float) -> None:
    pass


def _ignore_wait(seconds: float) -> None:
    pass


class KmsClient:
    """KMS calls with the retry, fallback and concurrency rules of SPEC §2/§5."""

    def __init__(
        self,
        config: KmsConfig,
        credentials: CredentialSource,
        http: Transport,
        clock: Callable[[], float] = time.time,
        observe: Observe = _ignore,
        observe_wait: ObserveWait = _ignore_wait,
    ) -> None:
        self._config = config
        self._clock = clock
        self._observe = observe
        self._observe_wait = observe_wait
        self._credentials = credentials
        self._http = http
        self.endpoints = Endpoints(config.endpoints)
        self._addresses = {host: Endpoint.parse(config.protocol, host) for host in config.endpoints}
        self._in_flight = Slots(config.max_concurrent_requests)
        self._attempt_limit = (config.connect_timeout_ms + config.read_timeout_ms) / 1000
        #: BatchRefresh is on and KMS has not refused BatchGetSecretValue (SPEC §5).
        self.batching = config.batch_refresh

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        config: KmsConfig,
        credentials: CredentialSource,
        *,
        clock: Callable[[], float] = time.time,
        observe: Observe = _ignore,
        observe_wait: ObserveWait = _ignore_wait,
    ) -> AsyncIterator[KmsClient]:
        """A client with its own kept-alive connections (to every endpoint), closed on exit."""
        read = config.read_timeout_ms / 1000
        http = Transport(
            ssl_context=tls_context(config) if config.protocol == "https" else None,
            connect_timeout=config.connect_timeout_ms / 1000,
            read_timeout=read,
            write_timeout=read,
            keepalive_seconds=KEEPALIVE_SECONDS,
            max_idle=config.max_concurrent_requests,
        )
        try:
            yield cls(config, credentials, http, clock, observe, observe_wait)
        finally:
            with trio.CancelScope(shield=True):
                await http.aclose()

    @property
    def in_flight(self) -> int:
        """KMS calls under way now (each holds one of the MaxConcurrentRequests slots)."""
        return self._in_flight.held

    @property
    def max_in_flight(self) -> int:
        """MaxConcurrentRequests: KMS calls that may be under way at once."""
        return self._in_flight.total

    async def get_secret_value(
        self,
        secret_id: str,
        *,
        version_id: str = "",
        version_stage: str = "",
        queued: Queued = nullcontext,
        credentials: CredentialSource | None = None,
    ) -> SecretValue:
        """The secret as KMS returns it; raises `AgentError` subclasses with SPEC §3 statuses.

        `credentials`: a per-request role's session instead of the agent's own (SPEC §6).

        A transient failure (errors.is_transient) moves the call to the next endpoint that it has
        not tried yet, at once; when each has been tried it is retried up to MaxRetries times with
        exponential back-off and jitter (at least `x-acs-retry-after`). An expired security token
        makes the credential source renew once, and the call is tried again. Each wait for one
        of the MaxConcurrentRequests slots runs inside `queued()`: the only part of a call that
        the caller may cancel without having cost KMS anything.
        """
        query = {"SecretName": secret_id}
        if version_id:
            query["VersionId"] = version_id
        if version_stage:
            query["VersionStage"] = version_stage
        return await self._call(
            GET_SECRET_VALUE,
            query,
            parse_secret,
            MAX_ANSWER_BYTES,
            self._config.max_retries,
            queued,
            secret_id,
            self._credentials if credentials is None else credentials,
        )

    async def batch_get_secret_values(
        self, names: Sequence[str], *, queued: Queued = nullcontext
    ) -> dict[str, SecretValue | KmsError]:
        """The ACSCurrent values of up to 20 `names` in one BatchGetSecretValue call.

        Returns each name's answer: its value, or its entry of KMS's `Errors` list (a `KmsError`,
        transient or final by SPEC §5's list); a name KMS did not answer is absent. Raises when
        the call as a whole failed: no name's answer then. There are no retries (the caller falls
        back to single calls at once), but endpoint fallback applies. An answer that KMS does not
        know the action, or a whole-batch `Forbidden.*`, also turns `batching` off for the run.
        """
        if not 0 < len(names) <= BATCH_LIMIT:
            raise ValueError(f"a batch holds 1..{BATCH_LIMIT} names")
        # SDK 3.3.1 sends SecretsList as one JSON query parameter ("json" style, compact).
        secrets_list = json.dumps([{"SecretName": name} for name in names], separators=(",", ":"), ensure_ascii=False)
        try:
            return await self._call(
                BATCH_GET_SECRET_VALUE,
                {"SecretsList": secrets_list},
                lambda body: parse_batch(body, names),
                MAX_BATCH_ANSWER_BYTES,
                0,
                queued,
                f"{len(names)} secrets",
            )
        except KmsError as error:
            if self.batching and (error.code in BATCH_UNKNOWN_CODES or error.code.startswith("Forbidden.")):
                self.batching = False
                logger.info(
                    "KMS answered BatchGetSecretValue with {} ({}): batched refreshes are off until restart; "
                    "each secret is refreshed with its own GetSecretValue call",
                    error.code,
                    error.kms_status,
                )
            raise

    async def _call(
        self,
        action: str,
        query: dict[str, str],
        parse: Callable[[bytearray], T],
        limit: int,
        max_retries: int,
        queued: Queued,
        what: str,
        source: CredentialSource | None = None,
    ) -> T:
        source = self._credentials if source is None else source
        renewed = False
        retries = 0
        tried: set[str] = set()
        while True:
            credentials = await source.current()
            host = self.endpoints.pick(exclude=tried) or self.endpoints.pick()
            assert host is not None
            try:
                result = await self._attempt(host, action, query, credentials, parse, limit, queued)
            except AgentError as error:
                if error.code in TOKEN_REJECTED_CODES and not renewed:
                    renewed = True
                    if await source.rejected(credentials):
                        continue
                if not is_transient(error):
                    self.endpoints.succeeded(host)  # it answered: the answer is the secret's
                    raise
                failure = error
            else:
                self.endpoints.succeeded(host)
                return result
            self.endpoints.failed(host, failure.code)
            tried.add(host)
            following = self.endpoints.pick(exclude=tried)
            if following is not None:
                logger.debug(
                    "KMS {} for {!r} failed at {} ({}); trying {}", action, what, host, failure.code, following
                )
                continue
            retry_after = failure.retry_after if isinstance(failure, KmsError) else None
            delay = _backoff(retries, retry_after)
            if retries >= max_retries or delay is None:
                raise failure
            retries += 1
            logger.debug(
                "KMS {} try {} for {!r} failed ({}); retrying in {:.2f}s", action, retries, what, failure.code, delay
            )
            await trio.sleep(delay)

    async def _attempt(
        self,
        host: str,
        action: str,
        query: dict[str, str],
        credentials: Credentials,
        parse: Callable[[bytearray], T],
        limit: int,
        queued: Queued,
    ) -> T:
        """One signed call, once a slot is free; the wait for the slot goes to `observe_wait`,
        the call's outcome and duration from the moment it had the slot to `observe` (the metrics)."""
        with queued() as rank:
            waited = trio.current_time()
            await self._in_flight.acquire(rank if isinstance(rank, int) else ORDINARY)
        started = trio.current_time()
        outcome: str | None = None  # stays None when cancelled: not an outcome of KMS's
        try:
            self._observe_wait(started - waited)
            result = await self._send(host, action, query, credentials, parse, limit)
            outcome = "success"
            return result
        except KmsError as error:
            if error.code == THROTTLING:
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
            self._in_flight.release()
            if outcome is not None:
                self._observe(host, action, outcome, trio.current_time() - started)

    async def _send(
        self,
        host: str,
        action: str,
        query: dict[str, str],
        credentials: Credentials,
        parse: Callable[[bytearray], T],
        limit: int,
    ) -> T:
        target, headers = signed_request(host, action, query, credentials, self._clock())
        endpoint = self._addresses[host]
        with trio.move_on_after(self._attempt_limit) as attempt_scope:
            try:
                answer = await self._http.post(endpoint, target, headers, limit=limit)
            except Timeout:
                raise UpstreamTimeout(f"KMS at {host} did not answer in time") from None
            except TransportError as error:
                raise UpstreamUnavailable(f"cannot reach KMS at {host}: {describe(error)}") from None
            except AnswerTooLarge:
                raise UpstreamUnavailable(f"KMS at {host} answered more than {limit} bytes") from None
        if attempt_scope.cancelled_caught:
            raise UpstreamTimeout(f"KMS at {host} did not answer in time")
        if answer.status == 200:
            return parse(answer.body)
        raise parse_error(answer, endpoint.host)


def tls_context(config: KmsConfig) -> ssl.SSLContext:
    """The TLS context of KMS calls: CaFilePath's CAs, else certifi's bundle (httpx's default)."""
    if config.ca_file_path:
        return ssl.create_default_context(cafile=config.ca_file_path)
    import certifi  # only for https: a start against a plain-http emulator does not load it

    return ssl.create_default_context(cafile=certifi.where())


def _backoff(attempt: int, retry_after: float | None) -> float | None:
    """Seconds before retry number `attempt + 1`, or None when KMS asks for too long a wait."""
    step = BACKOFF_BASE * 2**attempt
    delay = random.uniform(step / 2, step)
    if retry_after is not None:
        if retry_after > MAX_RETRY_WAIT:
            return None
        delay = max(delay, retry_after)
    return min(delay, MAX_RETRY_WAIT)
