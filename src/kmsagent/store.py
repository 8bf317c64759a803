"""The agent's secrets: the cache in front of the KMS client, with response bodies rendered once.

The store is where the cache and the KMS client meet: a load waits for its KMS slot inside the
cache's `queued()` (a miss whose clients all hung up leaves the queue there), and each value is
guarded for log redaction from its load until the cache lets go of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

import trio
from loguru import logger

from kmsagent import redact
from kmsagent.cache import Outcome, SecretCache, queued
from kmsagent.checks import DEFAULT_STAGE, SecretQuery
from kmsagent.conditional import entity_tag
from kmsagent.errors import AgentError
from kmsagent.formats import ResponseFormat
from kmsagent.kms import KmsClient, SecretValue



@dataclass(frozen=True)
class CachedSecret:
    """What the cache holds: KMS's answer and its response body, rendered once."""

    secret: SecretValue
    body: bytes
    #: The `ETag` header's value, `"<VersionId>"` (SPEC §3), rendered once like the body.
    etag: bytes = field(init=False, default=b"")

    def __post_init__(self) -> None:
        object.__setattr__(self, "etag", entity_tag(self.secret.version_id))


class SecretStore:
    """Answers secret queries from the cache, loading from KMS on a miss."""

    def __init__(
        self,
        cache: SecretCache[tuple[str, str, str], CachedSecret],
        kms: KmsClient,
        response_format: ResponseFormat,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cache = cache
        cache.released = self._released
        self._kms = kms
        self._format = response_format
        self._clock = clock

    async def get(self, query: SecretQuery, *, keep_loading: bool = False) -> tuple[CachedSecret, Outcome]:
        """The secret for `query`; `keep_loading`: its load goes on even if this read gives up."""

        async def load() -> CachedSecret:
            secret = await self._kms.get_secret_value(
                query.secret_id, version_id=query.version_id, version_stage=query.version_stage, queued=queued
            )
            cached = CachedSecret(secret, self._format.secret(secret))
            redact.hold_secret(secret.data)  # until `_released`: the cache sees every value once
            return cached

        return await self.cache.get(query.cache_key, load, refresh=query.refresh, keep_loading=keep_loading)

    @staticmethod
    def _released(cached: CachedSecret) -> None:
        redact.release_secret(cached.secret.data)

    async def prefetch(self, names: Sequence[str], *, wait: float) -> None:
        """Loads `names` (their ACSCurrent versions) as hot entries, waiting at most `wait` seconds.

        Loads go through the KMS client's concurrency bound; one that is still running when the
        wait ends finishes in the background. Failures are logged, never fatal.
        """
        if not names or self.cache.ttl <= 0:
            return
        loaded = 0

        async def prefetch_one(name: str) -> None:
            nonlocal loaded
            query = SecretQuery(name, "", DEFAULT_STAGE)
            try:
                await self.get(query, keep_loading=True)
            except AgentError as error:
                logger.warning("prefetch of {!r} failed: {}: {}", name, error.code, error.message)
            else:
                self.cache.mark_read(query.cache_key)
                loaded += 1

        started = trio.current_time()
        with trio.move_on_after(wait):
            async with trio.open_nursery() as nursery:
                for name in dict.fromkeys(names):
                    nursery.start_soon(prefetch_one, name)
        logger.info(
            "prefetched {} of {} secrets in {:.2f}s", loaded, len(set(names)), trio.current_time() - started
        )

    def rotation_due(self, cached: CachedSecret) -> float | None:
        """KMS's NextRotationDate of the secret, on trio's clock, if it gave one."""
        text = cached.secret.fields.get("NextRotationDate")
        if not isinstance(text, str):
            return None
        try:
            moment = datetime.fromisoformat(text)  # KMS: "2024-07-06T08:22:03Z"
        except ValueError:
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        return trio.current_time() + (moment.timestamp() - self._clock())
