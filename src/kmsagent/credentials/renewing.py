"""The renewal loop that every source of STS credentials shares: the ECS RAM role, a credentials
URI and an STS AssumeRole session (SPEC §6).

One trio task per source fetches credentials, installs them, and sleeps until
min(RenewBeforeSeconds, a third of their lifetime) before `Expiration` (`renewal_delay`). A
failed fetch keeps the current credentials until they expire and is retried with jittered
exponential back-off (1 s doubling to 30 s). KMS rejecting a security token asks for one renewal
now, shared by every rejection that arrives meanwhile and at most one per
REJECTION_RENEW_INTERVAL. A subclass says only how to fetch once (`_fetch`) and what its log
lines and errors call it.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio
from loguru import logger

from kmsagent.credentials.base import Credentials, parse_expiration, renewal_delay
from kmsagent.errors import AgentError, UpstreamUnavailable

if TYPE_CHECKING:
    import httpx  # the subclasses import it when they build a client

#: How long a KMS call waits for credentials that are not there (yet, or any more).
CREDENTIALS_WAIT = 2.0
RETRY_BASE, RETRY_CAP = 1.0, 30.0
#: A renewal asked for by KMS's rejection comes at most this often (trio seconds): KMS answering
#: "security token expired" to every call once made 286 metadata fetches for 300 reads, while the
#: metadata service hands out the same credentials that soon anyway.
REJECTION_RENEW_INTERVAL = 5.0


class FetchError(Exception):
    """A fetch gave no usable credentials. Never carries a credential value.

    `refusal` is set when the issuer refused for good (STS answered 4xx): it makes the error a
    request that needs these credentials gets instead of a 502 once none are valid (a new one for
    each request: one exception object raised in many tasks would share its traceback).
    """

    def __init__(self, message: str, *, refusal: Callable[[], AgentError] | None = None) -> None:
        super().__init__(message)
        self.refusal = refusal


class RenewingCredentials:
    """Temporary credentials kept fresh by `run` in the agent's nursery (a `CredentialSource`)."""

    #: What the log lines call these credentials, e.g. "ECS RAM role credentials".
    label = "credentials"
    kind = "renewing credentials"

    def __init__(self, *, renew_before: float, clock: Callable[[], float] = time.time) -> None:
        self._renew_before = renew_before
        self._clock = clock
        self._credentials: Credentials | None = None
        self._refusal: Callable[[], AgentError] | None = None  # the last fetch's refusal, until one succeeds
        self._renew_now = trio.Event()
        self._fetching = False
        self._last_forced = -math.inf  # trio.current_time() of the last renewal a rejection asked for
        self._fetched = trio.Event()  # set, then replaced, when a fetch ends, failed or not
        #: Successful fetches so far (the first one included).
        self.fetches = 0

    # --- what a subclass provides -------------------------------------------------------------

    def _http_client(self) -> httpx.AsyncClient:
        """The client `_fetch` uses, open while `run` runs."""
        raise NotImplementedError

    async def _fetch(self, http: httpx.AsyncClient) -> Credentials:
        """One fetch; raises FetchError (with a message naming fields, never values)."""
        raise NotImplementedError

    def _unavailable(self) -> AgentError:
        """The error of a KMS call that finds no valid credentials."""
        return UpstreamUnavailable(f"no valid {self.label} (see the agent's log)")

    # --- the CredentialSource protocol --------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Fetches, then renews before expiry; on failure keeps the old credentials and backs off."""
        async with self._http_client() as http:
            task_status.started()
            failures = 0
            while True:
                self._renew_now = trio.Event()
                self._fetching = True
                try:
                    credentials = await self._fetch(http)
                except FetchError as error:
                    failures += 1
                    self._refusal = error.refusal
                    delay = random.uniform(0.5, 1.0) * min(RETRY_CAP, RETRY_BASE * 2 ** (failures - 1))
                    logger.warning(
                        "{}: {}; {}; retrying in {:.1f}s",
                        self.label,
                        error,
                        "keeping the current ones until they expire" if self._valid() else "none valid now",
                        delay,
                    )
                else:
                    failures = 0
                    self._install(credentials)
                    assert credentials.expiration is not None
                    delay = renewal_delay(credentials.expiration, self._clock(), self._renew_before)
                    logger.info("{} renewed; next renewal in {:.0f}s", self.label, delay)
                finally:
                    self._fetching = False
                    self._fetched.set()
                    self._fetched = trio.Event()
                with trio.move_on_after(delay):
                    await self._renew_now.wait()

    async def current(self) -> Credentials:
        with trio.move_on_after(CREDENTIALS_WAIT):
            while (credentials := self._valid()) is None:
                if self._refusal is not None and not self._fetching:
                    raise self._refusal()
                await self._fetched.wait()  # new credentials, or a refusal to answer at once (not in 2 s)
            return credentials
        raise self._refusal() if self._refusal is not None else self._unavailable()

    async def rejected(self, credentials: Credentials) -> bool:
        """Renews at once, unless newer credentials already replaced the rejected ones.

        Single flight: every rejection during a fetch (asked for or scheduled) waits for that
        fetch. At most one renewal per REJECTION_RENEW_INTERVAL: a rejection sooner after the
        last one renews nothing and only says whether newer credentials exist (here: they do not).
        """
        if credentials is not self._credentials:
            return True
        if not (self._fetching or self._renew_now.is_set()):  # else join the fetch under way
            now = trio.current_time()
            if now - self._last_forced < REJECTION_RENEW_INTERVAL:
                return False
            self._last_forced = now
            self._renew_now.set()
        fetched = self._fetched
        with trio.move_on_after(CREDENTIALS_WAIT):
            await fetched.wait()
        return credentials is not self._credentials

    def expiration(self) -> float | None:
        return self._credentials.expiration if self._credentials is not None else None

    # --- helpers --------------------------------------------------------------------------------

    def _valid(self) -> Credentials | None:
        credentials = self._credentials
        if credentials is None or credentials.expiration is None or self._clock() >= credentials.expiration:
            return None
        return credentials

    def _install(self, credentials: Credentials) -> None:
        self._credentials = credentials
        self._refusal = None
        self.fetches += 1

    def _checked(self, document: object, issuer: str) -> Credentials:
        """STS credentials from a JSON object with SPEC §6's field names; errors name fields only."""
        if not isinstance(document, dict):
            raise FetchError(f"{issuer} answered credentials that are not a JSON object")
        fields = ("AccessKeyId", "AccessKeySecret", "SecurityToken", "Expiration")
        missing = [name for name in fields if not isinstance(document.get(name), str) or not document[name]]
        if missing:
            raise FetchError(f"{issuer} answered credentials without {', '.join(missing)}")
        try:
            expiration = parse_expiration(document["Expiration"])
        except ValueError:
            raise FetchError(f"{issuer} answered an Expiration that is not an ISO 8601 time") from None
        if expiration <= self._clock():
            raise FetchError(f"{issuer} answered credentials that have already expired")
        return Credentials(document["AccessKeyId"], document["AccessKeySecret"], document["SecurityToken"], expiration)
