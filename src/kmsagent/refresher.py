"""Refresh-ahead: hot entries are reloaded in the background before they expire.

A program that keeps reading a secret should never wait for KMS at a TTL boundary, and a secret
that nobody reads should cost KMS nothing. So each loaded entry gets a refresh point: after a
first load, at a random place in the second half of its window, so that entries loaded together
(a prefetch, a restart) spread out; after a refresh, just before expiry, so a hot secret costs
about one call per TTL and keeps the phase it was given. Either point leaves room for a load as
slow as the last one. KMS's `NextRotationDate` brings the point forward to just after it. At
that point an entry read since its load is reloaded; one not read yet is reloaded on its first
read, if that comes before it expires.

Refreshes are paced by calls in flight, not by starts per second: at most `max_in_flight`
(MaxConcurrentRequests) run at once, and the next starts as soon as one ends, so refresh
throughput follows KMS latency (8 in flight at 100 ms give 80 refreshes/s). Pacing at 8 starts
per second let 60 hot secrets with a 5 s TTL fall behind: 170–334 misses in 15 s.

When more refreshes are due than slots are free, the next one is chosen when a slot frees, not
when it fell due (SPEC §5's order): pinned entries, then by how many requests read the entry
since its load (in powers of two), entries kept hot only by Prefetch last; among equals the one
that expires first; an entry that expired while it waited goes after every live one. Its call
then takes the next free KMS slot ahead of waiting misses (kmsagent.slots). So a hot secret never
queues behind a backlog: with 1000 secrets at TTL 10 s each refreshed alone, a KMS slowed to
100 ms (8 slots: 80 calls/s for about 100 due a second) made a secret read every 2 ms miss 163–190
of 15,000 reads in 30 s when refreshes went in due order and calls first come, first served;
none now (tests/test_freshness.py).

Batching (BatchRefresh, SPEC §5): when a key falls due and may be batched (`batch_group`: the
credentials its refresh is signed with, or None), the keys of the same group that fall due
within the next few seconds (`BATCH_WINDOW`: 5 % of the TTL, at most 5 s) join it, up to 20, in
one reload through `load_batch` holding one slot. Keys only ever join early: no refresh happens
later than it would alone, so none is moved past its entry's expiry. Entries refreshed together
share their next refresh window, so batches fill up: 1,000 hot secrets with a 60 s TTL cost 53
calls per window (mean of windows 1-9, at most 55) instead of 1,038 (scripts/bench freshness).

The schedule holds keys, not entries, and one item per key: a key's newer refresh point replaces
its older one (stale heap items are skipped, and dropped whenever they outnumber the live ones),
and an evicted key leaves it. Its size is O(entries in the cache); it used to keep every replaced
value until its old due time (`refreshNow=true` in a loop: +15 MB/s).
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

import trio

from kmsagent.cache import BatchLoad, Entry, SecretCache

K = TypeVar("K", bound=Hashable)
#: A due refresh's place in the queue, lowest first: (expired, -heat, expiry).
Rank = tuple[bool, int, float]
#: The heat of a pinned entry: above any read count's (a bit length).
PINNED_HEAT = 1 << 10
#: Where in the TTL window the first refresh point falls, uniformly (a third of the window wide).
FIRST_REFRESH = (0.5, 0.85)
#: How far before expiry later refresh points fall, as a share of the TTL.
LATER_REFRESH_LEAD = (0.02, 0.05)
#: Seconds after NextRotationDate: KMS needs a moment to finish the rotation.
ROTATION_DELAY = (1.0, 5.0)
#: Stale heap items tolerated beyond the live ones before the heap is rebuilt.
STALE_SLACK = 64
#: How far ahead keys that fall due join a batch: this share of the TTL, at most this many seconds.
BATCH_WINDOW = (0.05, 5.0)
#: Keys per batch (BatchGetSecretValue's limit).
BATCH_SIZE = 20


class Refresher(Generic[K]):
    """The `RefreshPolicy` of one cache, and the task (`run`) that carries its refreshes out."""

    def __init__(
        self,
        cache: SecretCache[K, Any],
        *,
        max_in_flight: int,
        rotation_due: Callable[[Any], float | None] = lambda value: None,
        batch_group: Callable[[K], Hashable | None] = lambda key: None,
        load_batch: BatchLoad[K, Any] | None = None,
        batch_size: int = BATCH_SIZE,
    ) -> None:
        self._cache = cache
        self._slots = trio.Semaphore(max_in_flight)
        self._rotation_due = rotation_due
        self._batch_group = batch_group
        self._load_batch = load_batch
        self._batch_size = batch_size
        #: Each scheduled key not yet due: its one live item, (due time, sequence number).
        self._due: dict[K, tuple[float, int]] = {}
        #: Min-heap of (due time, sequence number, key); an item not in `_due` is stale.
        self._schedule: list[tuple[float, int, K]] = []
        #: Each key that is due and waits for a slot: its one live item, (rank, sequence number).
        self._ready: dict[K, tuple[Rank, int]] = {}
        #: Min-heap of (rank, sequence number, key); an item not in `_ready` is stale.
        self._queue: list[tuple[Rank, int, K]] = []
        self._order = itertools.count()
        self._wake = trio.Event()
        #: Background refreshes started so far (each key of a batch counts).
        self.started = 0
        #: Batched refreshes started so far (one KMS call each, unless the batch fails).
        self.batches = 0
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
        self._push(key, max(at, entry.loaded_at))

    def read(self, key: K, entry: Entry[Any]) -> None:
        if entry.refresh_due:  # its refresh point passed while nobody read it
            entry.refresh_due = False
            self._push(key, trio.current_time())
        elif entry.reads and entry.reads & (entry.reads - 1) == 0 and key in self._ready:
            self._enqueue(key, entry)  # its read count reached a power of two: a step up the queue

    def failed(self, key: K, entry: Entry[Any]) -> None:
        """A transient failure: a hot entry is tried again after the back-off, while still fresh."""
        if (entry.read or key in self._cache.pinned) and entry.retry_at < entry.expires_at:
            self._push(key, entry.retry_at)

    def forgotten(self, key: K) -> None:
        scheduled = self._due.pop(key, None) is not None
        if self._ready.pop(key, None) is not None or scheduled:
            self._drop_stale()

    def __len__(self) -> int:
        """Keys with a refresh point (due or not)."""
        return len(self._due) + len(self._ready)

    async def run(self) -> None:
        """Starts due refreshes, at most `max_in_flight` at once; runs until cancelled."""
        async with trio.open_nursery() as holders:
            while True:
                # A slot first, then the key: the choice sees every refresh due by then.
                await self._slots.acquire()
                try:
                    key, entry = await self._next_ready()
                except BaseException:
                    self._slots.release()
                    raise
                group = self._batch_group(key) if self._load_batch is not None else None
                companions = self._companions(entry, group) if group is not None else []
                if companions:
                    assert self._load_batch is not None
                    done = self._cache.refresh_batch([(key, entry), *companions], self._load_batch)
                    count = 1 + len(companions)
                else:
                    done = self._cache.refresh(key, entry)  # None if a load of it is running
                    count = 1
                if done is None:
                    self._slots.release()
                    continue
                self.started += count
                if count > 1:
                    self.batches += 1
                holders.start_soon(self._hold_slot, done)

    async def _next_ready(self) -> tuple[K, Entry[Any]]:
        """The first key of the queue of due refreshes, taken off it; waits for one if none is due."""
        while True:
            self._take_due()
            taken = self._pop_ready()
            if taken is not None:
                return taken
            with trio.move_on_at(self._next_due()):
                await self._wake.wait()
            self._wake = trio.Event()

    def _take_due(self) -> None:
        """Moves the keys whose refresh point has passed from the schedule to the queue.

        An entry nobody read since its load (and not pinned, nor kept hot) leaves the schedule
        instead: it expires, unless a read comes first (`read` then schedules it at once).
        """
        now = trio.current_time()
        while self._schedule and self._schedule[0][0] <= now:
            item = heapq.heappop(self._schedule)
            if not self._live(item):
                continue
            key = item[2]
            del self._due[key]
            entry = self._cache.peek(key)
            if entry is None:
                continue
            if not entry.read and key not in self._cache.pinned:
                entry.refresh_due = True
                continue
            self._enqueue(key, entry)

    def _enqueue(self, key: K, entry: Entry[Any], *, expired: bool = False) -> None:
        """Puts `key` in the queue of due refreshes at its rank, replacing any earlier item."""
        heat = PINNED_HEAT if key in self._cache.pinned else entry.reads.bit_length()
        rank: Rank = (expired, -heat, entry.expires_at)
        order = next(self._order)
        self._ready[key] = (rank, order)
        heapq.heappush(self._queue, (rank, order, key))
        self._drop_stale()

    def _pop_ready(self) -> tuple[K, Entry[Any]] | None:
        """The first live key of the queue and its entry, taken off it; None if the queue is empty."""
        now = trio.current_time()
        while self._queue:
            rank, order, key = heapq.heappop(self._queue)
            if self._ready.get(key) != (rank, order):
                continue
            entry = self._cache.peek(key)
            if entry is None:
                del self._ready[key]
                continue
            if not rank[0] and entry.expires_at <= now:
                # Expired while it waited: its refresh saves no read now, so every live one goes first.
                self._enqueue(key, entry, expired=True)
                continue
            del self._ready[key]
            return key, entry
        return None

    def _companions(self, first: Entry[Any], group: Hashable) -> list[tuple[K, Entry[Any]]]:
        """Keys of `group` that wait in the queue, then those due within the batch window from
        now, taken off the queue and the schedule (up to a batch).

        A key joins before its own refresh point: joining moves a refresh earlier, never later.
        Keys in that stretch that cannot join (unread, another group) keep their items.
        """
        taken: list[tuple[K, Entry[Any]]] = []
        passed_ready: list[tuple[Rank, int, K]] = []
        while self._queue and len(taken) < self._batch_size - 1:
            ready = heapq.heappop(self._queue)
            key = ready[2]
            if self._ready.get(key) != ready[:2]:
                continue
            entry = self._cache.peek(key)
            if entry is None or self._batch_group(key) != group:
                passed_ready.append(ready)
                continue
            del self._ready[key]
            taken.append((key, entry))
        for ready in passed_ready:
            heapq.heappush(self._queue, ready)
        window = first.expires_at - first.loaded_at
        horizon = trio.current_time() + min(window * BATCH_WINDOW[0], BATCH_WINDOW[1])
        passed: list[tuple[float, int, K]] = []
        while self._schedule and self._schedule[0][0] <= horizon and len(taken) < self._batch_size - 1:
            item = heapq.heappop(self._schedule)
            if not self._live(item):
                continue
            key = item[2]
            entry = self._cache.peek(key)
            if entry is None or not entry.read or self._batch_group(key) != group:
                passed.append(item)  # the run loop deals with it when it falls due
                continue
            del self._due[key]
            taken.append((key, entry))
        for item in passed:
            heapq.heappush(self._schedule, item)
        return taken

    async def _hold_slot(self, done: trio.Event) -> None:
        try:
            await done.wait()
        finally:
            self._slots.release()

    def _push(self, key: K, at: float) -> None:
        """Sets `key`'s refresh point to `at`, replacing any earlier one (due or not)."""
        self._ready.pop(key, None)
        order = next(self._order)
        self._due[key] = (at, order)
        heapq.heappush(self._schedule, (at, order, key))
        self._drop_stale()
        if self._schedule[0][1] == order:
            self._wake.set()

    def _drop_stale(self) -> None:
        """Rebuilds a heap from its live items once stale ones outnumber them."""
        if len(self._schedule) > 2 * len(self._due) + STALE_SLACK:
            self._schedule = [(at, order, key) for key, (at, order) in self._due.items()]
            heapq.heapify(self._schedule)
        if len(self._queue) > 2 * len(self._ready) + STALE_SLACK:
            self._queue = [(rank, order, key) for key, (rank, order) in self._ready.items()]
            heapq.heapify(self._queue)

    def _live(self, item: tuple[float, int, K]) -> bool:
        at, order, key = item
        return self._due.get(key) == (at, order)

    def _next_due(self) -> float:
        while self._schedule and not self._live(self._schedule[0]):
            heapq.heappop(self._schedule)
        return self._schedule[0][0] if self._schedule else math.inf
