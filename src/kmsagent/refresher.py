"""Refresh-ahead: hot entries are reloaded in the background before they expire.

A program that keeps reading a secret should never wait for KMS at a TTL boundary, and a secret
that nobody reads should cost KMS nothing. So each loaded entry gets a refresh point: after a
first load, at a random place in the second half of its window, so that entries loaded together
(a prefetch, a restart) spread out; after a refresh, just before expiry, so a hot secret costs
about one call per TTL and keeps the phase it was given. Either point leaves room for a load as
slow as the last one. KMS's `NextRotationDate` brings the point forward to just after it. At
that point an entry read since its load is reloaded; one not read yet is reloaded on its first
read, if that comes before it expires. Refreshes start at most `rate` per second, so a wave of
them never bursts past what the KMS client lets through at once.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

import trio

from kmsagent.cache import Entry, SecretCache

K = TypeVar("K", bound=Hashable)
#: Where in the TTL window the first refresh point falls, uniformly (a third of the window wide).
FIRST_REFRESH = (0.5, 0.85)
#: How far before expiry later refresh points fall, as a share of the TTL.
LATER_REFRESH_LEAD = (0.02, 0.05)
#: Seconds after NextRotationDate: KMS needs a moment to finish the rotation.
ROTATION_DELAY = (1.0, 5.0)


class Refresher(Generic[K]):
    """The `RefreshPolicy` of one cache, and the task (`run`) that carries its refreshes out."""

    def __init__(
        self,
        cache: SecretCache[K, Any],
        *,
        rate: float,
        rotation_due: Callable[[Any], float | None] = lambda value: None,
    ) -> None:
        self._cache = cache
        self._interval = 1 / rate
        self._rotation_due = rotation_due
        self._schedule: list[tuple[float, int, K, Entry[Any]]] = []
        self._order = itertools.count()
        self._wake = trio.Event()
        #: Background refreshes started so far.
        self.started = 0
        cache.policy = self

    def loaded(self, key: K, entry: Entry[Any]) -> None:
        window = entry.expires_at - entry.loaded_at
        if entry.reloaded:
            at = entry.expires_at - window * random.uniform(*LATER_REFRESH_LEAD)
        else:
            at = entry.loaded_at + window * random.uniform(*FIRST_REFRESH)
        at -= 2 * entry.load_seconds
        rotation = self._rotation_due(entry.value)
        if rotation is not None and rotation < entry.expires_at:
            at = min(at, rotation + random.uniform(*ROTATION_DELAY))
        self._push(max(at, entry.loaded_at), key, entry)

    def read(self, key: K, entry: Entry[Any]) -> None:
        if entry.refresh_due:  # its refresh point passed while nobody read it
            entry.refresh_due = False
            self._push(trio.current_time(), key, entry)

    def failed(self, key: K, entry: Entry[Any]) -> None:
        """A transient failure: a hot entry is tried again after the back-off, while still fresh."""
        if (entry.read or key in self._cache.pinned) and entry.retry_at < entry.expires_at:
            self._push(entry.retry_at, key, entry)

    async def run(self) -> None:
        """Starts due refreshes, paced; runs until cancelled."""
        while True:
            with trio.move_on_at(self._schedule[0][0] if self._schedule else math.inf):
                await self._wake.wait()
            self._wake = trio.Event()
            while self._schedule and self._schedule[0][0] <= trio.current_time():
                _, _, key, entry = heapq.heappop(self._schedule)
                if self._cache.peek(key) is not entry:
                    continue  # reloaded, evicted or dropped since
                if not entry.read and key not in self._cache.pinned:
                    entry.refresh_due = True
                elif self._cache.refresh(key, entry):
                    self.started += 1
                    await trio.sleep(self._interval)

    def _push(self, at: float, key: K, entry: Entry[Any]) -> None:
        order = next(self._order)
        heapq.heappush(self._schedule, (at, order, key, entry))
        if self._schedule[0][1] == order:
            self._wake.set()
