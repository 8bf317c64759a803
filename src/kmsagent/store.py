"""The agent's secrets: the cache in front of the KMS client, with response bodies rendered once.

The store is where the cache and the KMS client meet: a load waits for its KMS slot inside the
cache's `queued()` (a miss whose clients all hung up leaves the queue there), and each value is
guarded for log redaction from its load until the cache lets go of it. Three rules of SPEC §5
live here because they need both sides:

- a request waits at most RequestTimeoutMs for KMS (`get`'s deadline), then is served stale or
  answered 504, while the load goes on for the next read;
- `Forbidden.ResourceNotFound` is remembered per key for NotFoundTtlSeconds: a program looping on
  a misspelled name costs KMS one call per NotFoundTtlSeconds, not one per read;
- batched refreshes: which keys may share a BatchGetSecretValue call (`batch_group`: ACSCurrent
  entries signed with the same credentials) and how a batch's answers reach the cache (`load_batch`).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from datetime import UTC, datetime

import trio
from loguru import logger

from kmsagent import redact
from kmsagent.cache import Batch, Outcome, SecretCache, WaitTimedOut, queued
from kmsagent.checks import DEFAULT_STAGE, CacheKey, SecretQuery
from kmsagent.conditional import entity_tag
from kmsagent.credentials import CredentialSource
from kmsagent.errors import NOT_FOUND, AgentError, KmsError, UpstreamTimeout
from kmsagent.formats import ResponseFormat
from kmsagent.kms import KmsClient, SecretValue
from kmsagent.roles import refuse_roles

Key = CacheKey
#: The batch group of keys signed with the agent's own credentials. Per-request roles (SPEC §6)
#: will give each role's keys the role as their group: batches never mix credentials.
AGENT_CREDENTIALS = "agent"
#: Not-found answers remembered at most (oldest forgotten first); a bound on what a client
#: asking for random names can make the agent keep.
NOT_FOUND_LIMIT = 1000


class CachedSecret:
    """What the cache holds of one KMS answer: its response body, rendered once, and the little
    the body does not give back (issue 17: one copy of the value per cached secret, the body).

    `secret` reads the answer back from the body (for files and `[Exec]`, on each change only);
    the fields that would not come back exactly (ResponseType 1 and 2 keep only the value in their
    bodies) are kept beside it. The redaction guard holds the value's prints (`held`), not a copy.
    """

    __slots__ = ("_format", "_others", "body", "etag", "held", "next_rotation")

    def __init__(self, secret: SecretValue, body: bytes, response_format: ResponseFormat, held: redact.Held) -> None:
        self.body = body
        #: The `ETag` header's value, `"<VersionId>"` (SPEC §3), rendered once like the body.
        self.etag = entity_tag(secret.version_id)
        rotation = secret.fields.get("NextRotationDate")
        #: KMS's NextRotationDate, when it gave one.
        self.next_rotation = rotation if isinstance(rotation, str) else None
        self.held = held
        self._format = response_format
        try:
            kept = response_format.read_back(body)
        except (ValueError, RecursionError, LookupError, TypeError):  # then every field is kept as it is
            kept = {}
        others = {name: value for name, value in secret.fields.items() if name not in kept or kept[name] != value}
        self._others = others or None

    @property
    def secret(self) -> SecretValue:
        """KMS's answer, read back from the body (its fields in KMS's order for ResponseType 0)."""
        try:
            fields = self._format.read_back(self.body)
        except (ValueError, RecursionError, LookupError, TypeError):  # then `_others` holds every field
            fields = {}
        if self._others:
            fields.update(self._others)
        return SecretValue(fields)


class SecretStore:
    """Answers secret queries from the cache, loading from KMS on a miss."""

    def __init__(
        self,
        cache: SecretCache[Key, CachedSecret],
        kms: KmsClient,
        response_format: ResponseFormat,
        *,
        clock: Callable[[], float] = time.time,
        request_timeout: float = math.inf,
        not_found_ttl: float = 0.0,
        roles: Callable[[str], CredentialSource] = refuse_roles,
    ) -> None:
        """`roles`: a query's role → its session (raises RoleNotAllowed, StsRefused): roles.py."""
        self.cache = cache
        self._roles = roles
        cache.released = self._released
        self._kms = kms
        self._format = response_format
        self._clock = clock
        self._next_load: dict[Key, trio.Event] = {}
        self._request_timeout = request_timeout
        self._not_found_ttl = not_found_ttl
        #: key -> (until when, KMS's code and message) of a remembered not-found answer.
        self._not_found: OrderedDict[Key, tuple[float, str]] = OrderedDict()

    async def get(
        self, query: SecretQuery, *, keep_loading: bool = False, deadline: float | None = None
    ) -> tuple[CachedSecret, Outcome]:
        """The secret for `query`; `keep_loading`: its load goes on even if this read gives up.

        The read waits for KMS until `deadline` (trio time; default RequestTimeoutMs from now):
        then the cached value if the stale rules allow, else 504 UpstreamTimeout.
        """
        key = query.cache_key
        if not query.refresh:
            self._raise_if_not_found(key)
        credentials = self._roles(query.role) if query.role else None  # before the cache: SPEC §3's order

        async def load() -> CachedSecret:
            try:
                secret = await self._kms.get_secret_value(
                    query.secret_id,
                    version_id=query.version_id,
                    version_stage=query.version_stage,
                    queued=queued,
                    credentials=credentials,
                )
            except KmsError as error:
                self._note_not_found(key, error)
                raise
            finally:
                self._load_ended(key)
            return self._hold(key, secret)

        if deadline is None:
            deadline = trio.current_time() + self._request_timeout
        try:
            return await self.cache.get(key, load, refresh=query.refresh, keep_loading=keep_loading, deadline=deadline)
        except WaitTimedOut:
            waited = (
                f"{self._request_timeout * 1000:.0f} ms" if math.isfinite(self._request_timeout) else "its deadline"
            )
            raise UpstreamTimeout(f"KMS did not answer within RequestTimeoutMs ({waited})") from None

    def _hold(self, key: Key, secret: SecretValue) -> CachedSecret:
        """The cache's form of a value KMS answered; guarded until `_released` (the cache sees it once)."""
        self._not_found.pop(key, None)
        return CachedSecret(secret, self._format.secret(secret), self._format, redact.hold_secret(secret.data))

    @staticmethod
    def _released(cached: CachedSecret) -> None:
        redact.release_secret(cached.held)

    def next_load(self, key: Key) -> trio.Event:
        """Set when the next load of `key` ends, with a value or an error (a refresh-ahead, a
        rotation reload, a client's refreshNow, a miss): how files and a child's environment
        follow their secrets without polling. Waiters run after the cache has stored the result."""
        return self._next_load.setdefault(key, trio.Event())

    def _load_ended(self, key: Key) -> None:
        loaded = self._next_load.pop(key, None)
        if loaded is not None:
            loaded.set()

    # --- not-found memory (NotFoundTtlSeconds) ---------------------------------------------------

    def _note_not_found(self, key: Key, error: KmsError) -> None:
        if error.code != NOT_FOUND or self._not_found_ttl <= 0:
            return
        self._not_found[key] = (trio.current_time() + self._not_found_ttl, error.message)
        self._not_found.move_to_end(key)
        while len(self._not_found) > NOT_FOUND_LIMIT:
            self._not_found.popitem(last=False)

    def _raise_if_not_found(self, key: Key) -> None:
        remembered = self._not_found.get(key)
        if remembered is None:
            return
        until, message = remembered
        if trio.current_time() >= until:
            del self._not_found[key]
            return
        raise KmsError(404, NOT_FOUND, message)  # a new one each time: a raised error keeps its traceback

    # --- batched refreshes (BatchRefresh) --------------------------------------------------------

    def batch_group(self, key: Key) -> Hashable | None:
        """The credentials `key`'s refresh is signed with, when it may share a BatchGetSecretValue
        call: an ACSCurrent entry without a VersionId, of the agent's own credentials (a role's
        entries refresh one by one, each with its session), while batching is on; else None."""
        role, _, version_id, version_stage = key
        if role or not self._kms.batching or version_id or version_stage != DEFAULT_STAGE:
            return None
        return AGENT_CREDENTIALS

    async def load_batch(self, batch: Batch[Key, CachedSecret]) -> None:
        """One BatchGetSecretValue call for the batch's keys; each answer goes to the cache.

        A per-secret error is that secret's answer (transient or final, SPEC §5). A failure of the
        whole call answers none: the cache then refreshes each key with its own call.
        """
        names = {key[1]: key for key in batch.keys}
        try:
            answers = await self._kms.batch_get_secret_values(list(names), queued=queued)
        except AgentError as error:
            logger.debug(
                "batched refresh of {} secrets failed ({}); refreshing them one by one", len(names), error.code
            )
            return
        for name, answer in answers.items():
            # One answer at a time between requests: storing 20 (rendering, guarding, waking the
            # held reads) in one go held a hot secret's hits back by as long (issue 17's tails).
            await trio.lowlevel.cancel_shielded_checkpoint()
            key = names[name]
            if isinstance(answer, KmsError):
                self._note_not_found(key, answer)
                batch.failed(key, answer)
            else:
                batch.loaded(key, self._hold(key, answer))
            self._load_ended(key)

    # --- start-up ---------------------------------------------------------------------------------

    async def prefetch(self, names: Sequence[str], *, wait: float) -> None:
        """Loads `names` (their ACSCurrent versions) as hot entries, waiting at most `wait` seconds.

        Loads go through the KMS client's concurrency bound; the ones not done when the wait ends
        go on in the background. Failures are logged, never fatal. A few workers take the names
        in turn, twice as many as KMS calls may be in flight, so that every slot stays busy: a
        task per name (and with it a waiting load per name) took ≈ 11 MB at once for 1000 names,
        memory that stayed with the process.
        """
        if not names or self.cache.ttl <= 0:
            return
        unique = list(dict.fromkeys(names))
        pending = iter(unique)
        loaded = 0
        done = trio.Event()

        async def worker() -> None:
            nonlocal loaded
            for name in pending:  # shared: each name goes to one worker
                query = SecretQuery(name, "", DEFAULT_STAGE)
                try:
                    await self.get(query, keep_loading=True, deadline=math.inf)
                except AgentError as error:
                    logger.warning("prefetch of {!r} failed: {}: {}", name, error.code, error.message)
                else:
                    self.cache.mark_read(query.cache_key)
                    loaded += 1

        async def run_workers() -> None:
            async with trio.open_nursery() as workers:
                for _ in range(min(len(unique), 2 * self._kms.max_in_flight)):
                    workers.start_soon(worker)
            done.set()

        started = trio.current_time()
        self.cache.loads.start_soon(run_workers)  # the cache's nursery: what the wait leaves goes on
        with trio.move_on_after(wait):
            await done.wait()
        logger.info("prefetched {} of {} secrets in {:.2f}s", loaded, len(unique), trio.current_time() - started)

    def rotation_due(self, cached: CachedSecret) -> float | None:
        """KMS's NextRotationDate of the secret, on trio's clock, if it gave one."""
        text = cached.next_rotation
        if text is None:
            return None
        try:
            moment = datetime.fromisoformat(text)  # KMS: "2024-07-06T08:22:03Z"
        except ValueError:
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return trio.current_time() + (moment.timestamp() - self._clock())
