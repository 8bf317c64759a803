"""Secrets that feed a file or a child's environment: always hot, and followed as they change.

SPEC §5: such an entry is never evicted and is refreshed ahead (rotation-aware) whether or not an
HTTP client reads it; a rotation reaches the file or the child within TtlSeconds, or seconds after
NextRotationDate. `PinnedSecret` pins the cache key, then loops: read through the store (a hit
while fresh), hand a new value to its consumer, and sleep until the store's next load of the key
ends (a refresh-ahead, a rotation reload, a client's `refreshNow`). A secret that cannot be loaded
(KMS 4xx, or down with nothing cached) is tried again with back-off, 1 s doubling to 60 s,
jittered: the same bound as the cache's own retries.

Backstop: when no load has come by shortly before expiry (`BACKSTOP_SHARE` of the TTL, or twice
the last load's duration if longer), the refresher is behind, and the follower starts the reload
itself. It costs KMS nothing extra (whichever starts first, the other finds the entry reloaded),
but a file no longer waits for the refresher's queue: in a 10-minute soak with ~450 hot entries
per 30 s TTL against a refresher that starts 8 a second, 2 of 100 files lagged a rotation by
32.4 s (TTL + 2.4 s) before it, reloading only once their entry had expired.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

import trio

from kmsagent.cache import RETRY_BASE, RETRY_CAP, Outcome
from kmsagent.checks import SecretQuery
from kmsagent.errors import AgentError
from kmsagent.store import CachedSecret, SecretStore

Update = CachedSecret | AgentError
#: The backstop reload starts this share of the TTL before expiry (after the refresher's points,
#: which come 2–5 % before it), or twice the last load's duration before it if that is longer.
BACKSTOP_SHARE = 0.01


class PinnedSecret:
    """One pinned cache key and the loop (`follow`) that reports its values."""

    def __init__(self, store: SecretStore, query: SecretQuery) -> None:
        self._store = store
        self.query = query
        store.cache.pin(query.cache_key)

    async def follow(self, on_update: Callable[[Update], Awaitable[None]]) -> None:
        """Calls `on_update` with each new value, and with each failure to load one; runs until
        cancelled. Calls never overlap: a slow consumer delays the next look, never loses it."""
        key = self.query.cache_key
        last: CachedSecret | None = None
        failures = 0
        while True:
            try:
                cached, outcome = await self._store.get(self.query)
            except AgentError as error:
                loaded = self._store.next_load(key)  # taken now: loads after this point wake us
                failures += 1
                await on_update(error)
                wake = trio.current_time() + _backoff(failures)
            else:
                loaded = self._store.next_load(key)
                if cached is not last:
                    last = cached
                    await on_update(cached)
                entry = self._store.cache.peek(key)
                if outcome is Outcome.STALE or entry is None:
                    failures += 1
                    wake = trio.current_time() + _backoff(failures)
                elif entry.value is not cached:
                    continue  # it changed while the consumer worked
                else:
                    failures = 0
                    lead = max(BACKSTOP_SHARE * (entry.expires_at - entry.loaded_at), 2 * entry.load_seconds)
                    backstop = max(entry.expires_at - lead, entry.retry_at)  # a failed try backs off
                    if backstop < entry.expires_at:
                        with trio.move_on_at(backstop):
                            await loaded.wait()
                        if not loaded.is_set():
                            self._store.cache.refresh(key, entry)  # the refresher is behind
                    wake = entry.expires_at
            with trio.move_on_at(wake):
                await loaded.wait()


def _backoff(failures: int) -> float:
    delay = min(RETRY_CAP, RETRY_BASE * 2 ** (failures - 1))
    return random.uniform(delay / 2, delay)
