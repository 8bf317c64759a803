"""An LRU cache with a TTL, single-flight loads, stale fallback with back-off, and refresh hooks.

It knows nothing of HTTP or KMS: the caller hands it a `load` coroutine function per key and two
rules, which errors allow serving the last value (`is_transient`) and for how long past its TTL
(`max_stale`). Loads run in a nursery the cache is given, not in the reader's task, so a client
that hangs up does not cancel a load that other readers are waiting for. When to reload ahead
of expiry is a `RefreshPolicy`'s business (refresher.py); the cache tells it what was loaded,
read, failed and forgotten, and starts the background loads it asks for.

Memory is bounded by `max_entries` (SPEC §2: CacheSize is the memory limit): once a value leaves
the cache (replaced, evicted, dropped, or never kept with `ttl == 0`) the cache holds no reference
to it, tells `released` (the store unguards it for log redaction), and `forgotten` tells the
policy to drop the key. Before that fix, 1000 distinct 60 KB secrets read once with CacheSize=1
kept +153 MB alive.

Dead work leaves the queue: a miss-load counts its readers, and when the last one is cancelled
(its client hung up) while the load only waits its turn (inside `queued()`, e.g. for a KMS
concurrency slot), the load is cancelled. 1400 misses whose clients hung up at once made ≈1280
KMS calls and kept a fresh miss waiting 16.8 s. A load that already talks to KMS finishes and
fills the cache; background refreshes and prefetches (`keep_loading`) are never abandoned, nor
is a load one of whose readers gave up on its own deadline (SPEC §5: a request that times out
leaves its load going, to fill the cache for the next read).

A reader waits for a load until its `deadline` at most (RequestTimeoutMs): then it gets the last
value as stale when the stale rules allow, else `WaitTimedOut`. Several entries can be reloaded
by one load (`refresh_batch`: one BatchGetSecretValue call for up to 20 secrets); each keeps its
own flight, so readers of one key still join the load under way, and a key the batch did not
answer is loaded by itself.
"""

from __future__ import annotations

import enum
import math
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import trio

from kmsagent.changes import Changes
from kmsagent.slots import ORDINARY, URGENT

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
#: A policy that takes any key of a kind takes a narrower kind too (the Protocol's variance).
K_contra = TypeVar("K_contra", bound=Hashable, contravariant=True)
Load = Callable[[], Awaitable[V]]
#: Loads several keys at once; reports each key's answer to the `Batch` it is given.
BatchLoad = Callable[["Batch[K, V]"], Awaitable[None]]
#: After a transient failure the key is not tried again for this long (doubling, capped):
#: readers get the stale value meanwhile, so KMS load does not grow with the number of readers.
RETRY_BASE, RETRY_CAP = 1.0, 60.0


class Outcome(enum.Enum):
    """How a read was answered; the value of the `X-KMS-Agent-Cache` header."""

    HIT = "hit"
    MISS = "miss"
    STALE = "stale"


@dataclass(eq=False)
class Entry(Generic[V]):
    """One cached value and what its refresh policy needs to know about it."""

    value: V
    load: Load[V]
    loaded_at: float
    expires_at: float
    #: How long the load that produced this value talked to KMS (its wait for a slot left out).
    load_seconds: float = 0.0
    #: Loaded in place of an earlier value (a refresh), not on a first miss.
    reloaded: bool = False
    #: Read since it was loaded, or kept hot by Prefetch (worth reloading before it expires).
    read: bool = False
    #: Requests that read it since it was loaded (0 when only Prefetch keeps it hot): the
    #: refresher serves busier entries first when refreshes queue up.
    reads: int = 0
    failures: int = 0
    retry_at: float = 0.0
    #: Its refresh point passed while nobody read it (the refresh policy's bookkeeping).
    refresh_due: bool = False


class RefreshPolicy(Protocol[K_contra]):
    """Told what happens to entries; decides when to call `SecretCache.refresh`."""

    def loaded(self, key: K_contra, entry: Entry[Any]) -> None: ...

    def read(self, key: K_contra, entry: Entry[Any]) -> None: ...

    def failed(self, key: K_contra, entry: Entry[Any]) -> None: ...

    def forgotten(self, key: K_contra) -> None:
        """`key` left the cache (evicted, dropped, cleared): nothing of it may be kept."""


@dataclass(eq=False)
class _Flight(Generic[K, V]):
    """One load in progress; every reader of the key waits on `done`."""

    key: K
    #: The cache's table of flights, which an abandoned flight leaves at once.
    flights: dict[K, _Flight[K, V]]
    done: trio.Event = field(default_factory=trio.Event)
    value: V | None = None
    error: BaseException | None = None
    #: The load runs inside it; cancelled only to abandon the load.
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    #: Readers waiting on `done` now.
    waiters: int = 0
    #: A readers' miss that may be abandoned once none of them waits (not a refresh or prefetch).
    abandonable: bool = False
    #: The load is waiting its turn (inside `queued()`): abandoning it costs nothing.
    queued: bool = False
    #: Seconds the load has spent inside `queued()` (left out of the entry's `load_seconds`).
    queued_seconds: float = 0.0
    #: A background refresh (`refresh`, `refresh_batch`): its turn for a KMS slot comes before
    #: misses' (`queued()` yields its rank); the refresher keeps at most MaxConcurrentRequests going.
    urgent: bool = False
    #: Its key was dropped (`drop_where`) while it ran: readers get the value, the cache keeps none.
    discard: bool = False

    def abandon_if_unwanted(self) -> None:
        """Cancels a queued miss-load that no reader waits for; new readers start a new one."""
        if self.abandonable and self.queued and self.waiters == 0 and not self.done.is_set():
            self.scope.cancel()
            if self.flights.get(self.key) is self:
                del self.flights[self.key]


#: The flight whose load runs in the current task (set in the load's own task only).
_current_flight: ContextVar[_Flight[Any, Any] | None] = ContextVar("kmsagent_cache_flight", default=None)
#: The batch whose load runs in the current task (set in that task only).
_current_batch: ContextVar[Batch[Any, Any] | None] = ContextVar("kmsagent_cache_batch", default=None)


@contextmanager
def queued() -> Iterator[int]:
    """Marks the part of a running load that only waits its turn (a KMS concurrency slot).

    A miss-load whose readers have all hung up is cancelled here ("leaves the queue"), so live
    requests are never queued behind dead ones. Outside this block a load is never abandoned,
    so a load that is talking to KMS finishes and fills the cache. The time spent here is left
    out of the load time the refresher plans with. Yields the load's rank for its turn
    (kmsagent.slots): `URGENT` for a background refresh, so that a hot entry's refresh does not
    wait behind a queue of misses and expire. Outside a load, a no-op.
    """
    flight = _current_flight.get()
    if flight is None:
        batch = _current_batch.get()
        started = trio.current_time()
        try:
            yield URGENT if batch is not None else ORDINARY  # a batch is always a refresh
        finally:
            if batch is not None:
                batch.queued_seconds += trio.current_time() - started
        return
    flight.queued = True
    started = trio.current_time()
    try:
        flight.abandon_if_unwanted()
        yield URGENT if flight.urgent else ORDINARY
    finally:
        flight.queued = False
        flight.queued_seconds += trio.current_time() - started


class LoadCancelled(Exception):
    """The load that a reader waited on was cancelled (the agent is shutting down, or nobody waited)."""


class WaitTimedOut(Exception):
    """A reader's deadline passed before the load ended, with no value the stale rules allow.

    The load goes on and fills the cache for the next read.
    """


class Batch(Generic[K, V]):
    """The keys of one batched reload; the batch's load reports each key's answer here.

    An answer lands at once (its readers are answered then, not when the whole batch ends). A
    key with no answer when the batch's load returns or raises is loaded by itself.
    """

    def __init__(self, cache: SecretCache[K, V], flights: dict[K, tuple[_Flight[K, V], Load[V]]]) -> None:
        self._cache = cache
        self._pending = flights
        self._started = trio.current_time()
        #: Seconds the batch's load has waited inside `queued()` so far.
        self.queued_seconds = 0.0
        self.keys: list[K] = list(flights)

    def loaded(self, key: K, value: V) -> None:
        """`key`'s new value (a value the cache does not take is released at once)."""
        item = self._pending.pop(key, None)
        if item is None:
            self._cache.released(value)
            return
        flight, load = item
        flight.value = value
        self._cache._store(key, value, load, trio.current_time() - self._started - self.queued_seconds)
        self._cache._landed(key, flight)

    def failed(self, key: K, error: Exception) -> None:
        """`key`'s own failure: transient or final by the cache's `is_transient`, as for a single load."""
        item = self._pending.pop(key, None)
        if item is None:
            return
        flight, _ = item
        flight.error = error
        self._cache._failed(key, error)
        self._cache._landed(key, flight)

    def unanswered(self) -> dict[K, tuple[_Flight[K, V], Load[V]]]:
        """The keys still without an answer, taken: answers for them are no longer accepted."""
        pending, self._pending = self._pending, {}
        return pending


class SecretCache(Generic[K, V]):
    """LRU at `max_entries`, fresh for `ttl` seconds after a load, one load per key at a time.

    `ttl == 0` means no caching: every read loads (still single flight) and nothing is kept.
    With `serve_stale`, the last value stands in for a failure that `is_transient` accepts, up
    to `max_stale` seconds past its expiry (`None`: no bound), and the key is retried only after
    a back-off. Any other failure (the secret was deleted, access revoked) drops the entry, so
    the cache never hides such an answer.
    """

    def __init__(
        self,
        *,
        max_entries: int,
        ttl: float,
        loads: trio.Nursery,
        is_transient: Callable[[BaseException], bool] = lambda error: False,
        serve_stale: bool = True,
        max_stale: float | None = None,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._entries: OrderedDict[K, Entry[V]] = OrderedDict()
        self._flights: dict[K, _Flight[K, V]] = {}
        self._max_entries = max_entries
        self.ttl = ttl
        self._loads = loads
        #: Where loads run: background work that must outlive its reader may run there too.
        self.loads = loads
        self._is_transient = is_transient
        self._serve_stale = serve_stale
        self._max_stale = max_stale
        self.policy: RefreshPolicy[K] | None = None
        #: Called once with every value a load produced, when the cache lets go of it.
        self.released: Callable[[V], None] = lambda value: None
        self.evictions = 0
        #: Keys that feed files or a child's environment (SPEC §5): never evicted by LRU, and
        #: refreshed ahead whether or not anyone reads them (the refresh policy asks).
        self.pinned: set[K] = set()
        #: Announces each stored value and each final failure per key (held reads wait on it).
        self.changes: Changes[K] = Changes()

    def pin(self, key: K) -> None:
        """Keeps `key` always hot. When pinned keys fill the cache, other values are served but not kept."""
        self.pinned.add(key)

    def configure(self, *, ttl: float, serve_stale: bool, max_stale: float | None) -> None:
        """New rules (a config reload); a shorter TTL applies to the values already cached."""
        self.ttl = ttl
        self._serve_stale = serve_stale
        self._max_stale = max_stale
        if ttl <= 0:
            while self._entries:
                self._forget(*self._entries.popitem(last=False))
        for entry in self._entries.values():
            entry.expires_at = min(entry.expires_at, entry.loaded_at + ttl)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def peek(self, key: K) -> Entry[V] | None:
        """The entry for `key`, fresh or not, without touching its LRU position."""
        return self._entries.get(key)

    async def get(
        self,
        key: K,
        load: Load[V],
        *,
        refresh: bool = False,
        keep_loading: bool = False,
        deadline: float = math.inf,
    ) -> tuple[V, Outcome]:
        """The value for `key`: from the cache while fresh, else from `load` (joined if running).

        `refresh=True` skips the fresh entry and loads now. A transient load failure returns the
        last value as `Outcome.STALE` when it is within `max_stale` of its expiry; any other
        failure is raised to every waiting reader. A load this read starts or joins is
        abandoned when every reader hung up while it is queued, unless `keep_loading` (a
        prefetch: its value is wanted whoever waits). At `deadline` (trio time) the read stops
        waiting: the last value as `Outcome.STALE` if the same rules allow, else `WaitTimedOut`;
        the load goes on.
        """
        now = trio.current_time()
        entry = self._entries.get(key)
        if entry is not None:
            if not refresh and now < entry.expires_at:
                self._entries.move_to_end(key)
                self._mark_read(key, entry)
                return entry.value, Outcome.HIT
            backing_off = now < entry.retry_at and key not in self._flights
            if backing_off and not refresh and self._stale_allowed(entry, now):
                return entry.value, Outcome.STALE  # KMS failed moments ago: not asked again yet
        flight = self._start(key, load, abandonable=not keep_loading)
        with trio.move_on_at(deadline):
            await self._wait(flight)
        if not flight.done.is_set():  # the deadline passed; `_wait` left the load going
            stale = self._entries.get(key)
            if stale is not None and self._stale_allowed(stale, trio.current_time()):
                return stale.value, Outcome.STALE
            raise WaitTimedOut(f"no answer for {key!r} before the read's deadline")
        if flight.error is None:
            return flight.value, Outcome.MISS  # type: ignore[return-value]
        stale = self._entries.get(key)
        if stale is not None and self._is_transient(flight.error) and self._stale_allowed(stale, trio.current_time()):
            return stale.value, Outcome.STALE
        raise flight.error

    @staticmethod
    async def _wait(flight: _Flight[K, V]) -> None:
        """Waits for `flight` as one of its readers, and abandons it if this was the last one."""
        flight.waiters += 1
        try:
            await flight.done.wait()
        except trio.Cancelled as cancelled:
            # A reader whose own deadline passed still wants the value cached for the next read
            # (SPEC §5); one cancelled otherwise (the connection layer: its client hung up) not.
            if getattr(cancelled, "source", "unknown") == "deadline":
                flight.abandonable = False
            flight.waiters -= 1
            flight.abandon_if_unwanted()
            raise
        flight.waiters -= 1

    def mark_read(self, key: K, *, request: bool = False) -> None:
        """Keeps `key` hot: Prefetch's (a prefetched secret is hot before its first request, and
        refreshed after the entries that requests read), or with `request` a read by a request
        that did not go through `get` (a held read)."""
        entry = self._entries.get(key)
        if entry is not None:
            self._mark_read(key, entry, request=request)

    def _mark_read(self, key: K, entry: Entry[V], *, request: bool = True) -> None:
        entry.read = True
        if request:
            entry.reads += 1
        if self.policy is not None:
            self.policy.read(key, entry)

    def refresh(self, key: K, entry: Entry[V]) -> trio.Event | None:
        """Starts a background reload of `entry` if it is still the cached one.

        Returns the event set when that load ends (the refresher holds a slot until then), or
        None when nothing was started (the entry changed, or a load of it is already running:
        that load is then the refresh, and is no longer abandoned when its readers hang up).
        """
        if self._entries.get(key) is not entry:
            return None
        running = self._flights.get(key)
        if running is not None:
            running.abandonable = False
            return None
        flight = self._start(key, entry.load, abandonable=False)
        flight.urgent = True
        return flight.done

    def refresh_batch(self, entries: Sequence[tuple[K, Entry[V]]], load_batch: BatchLoad[K, V]) -> trio.Event | None:
        """Starts one background reload of several entries, each still the cached one.

        `load_batch` gets a `Batch` of the keys and reports each answer to it. An entry no longer
        cached is left out; so is one already loading (that load is its refresh, as in
        `refresh`). Returns the event set once every key's load has ended (the refresher holds
        one slot for the batch until then), or None when nothing was started.
        """
        flights: dict[K, tuple[_Flight[K, V], Load[V]]] = {}
        for key, entry in entries:
            if self._entries.get(key) is not entry or key in flights:
                continue
            running = self._flights.get(key)
            if running is not None:
                running.abandonable = False
                continue
            flight = self._flights[key] = _Flight(key, self._flights, urgent=True)
            flights[key] = (flight, entry.load)
        if not flights:
            return None
        done = trio.Event()
        self._loads.start_soon(self._fly_batch, Batch(self, flights), load_batch, done)
        return done

    async def _fly_batch(self, batch: Batch[K, V], load_batch: BatchLoad[K, V], done: trio.Event) -> None:
        _current_batch.set(batch)  # this task's own context: what `queued()` finds
        try:
            with suppress(Exception):  # a whole-batch failure is no key's answer: loaded one by one below
                await load_batch(batch)
            async with trio.open_nursery() as singles:
                for key, (flight, load) in batch.unanswered().items():
                    singles.start_soon(self._fly, key, load, flight)
        finally:
            for key, (flight, _) in batch.unanswered().items():  # cancelled before an answer
                flight.error = LoadCancelled(f"load of {key!r} was cancelled")
                self._landed(key, flight)
            done.set()

    def _landed(self, key: K, flight: _Flight[K, V]) -> None:
        """`flight` has ended: new readers start a new load, its readers are answered."""
        if self._flights.get(key) is flight:
            del self._flights[key]
        flight.done.set()

    def _stale_allowed(self, entry: Entry[V], now: float) -> bool:
        if not self._serve_stale:
            return False
        return self._max_stale is None or now <= entry.expires_at + self._max_stale

    def _start(self, key: K, load: Load[V], *, abandonable: bool) -> _Flight[K, V]:
        flight = self._flights.get(key)
        if flight is None:
            flight = self._flights[key] = _Flight(key, self._flights, abandonable=abandonable)
            self._loads.start_soon(self._fly, key, load, flight)
        elif not abandonable:
            flight.abandonable = False  # a refresh or prefetch joined: its value is wanted
        return flight

    async def _fly(self, key: K, load: Load[V], flight: _Flight[K, V]) -> None:
        _current_flight.set(flight)  # this task's own context: what `queued()` finds
        started = trio.current_time()
        try:
            with flight.scope:
                flight.value = await load()
        except Exception as error:  # noqa: BLE001 - whatever the load raised is its readers' answer
            flight.error = error
            self._failed(key, error)
        except BaseException:
            flight.error = LoadCancelled(f"load of {key!r} was cancelled")
            raise
        else:
            if flight.scope.cancelled_caught:
                flight.error = LoadCancelled(f"load of {key!r} was abandoned: nobody waited for it")
            elif flight.discard:
                self.released(flight.value)  # type: ignore[arg-type]
            else:
                took = trio.current_time() - started - flight.queued_seconds
                self._store(key, flight.value, load, took)  # type: ignore[arg-type]
        finally:
            self._landed(key, flight)

    def _failed(self, key: K, error: Exception) -> None:
        entry = self._entries.get(key)
        if entry is None:
            return
        if not self._is_transient(error):
            del self._entries[key]
            self._forget(key, entry)
            self.changes.announce(key, error)
            return
        entry.failures += 1
        backoff = min(RETRY_CAP, RETRY_BASE * 2 ** (entry.failures - 1))
        entry.retry_at = trio.current_time() + random.uniform(backoff / 2, backoff)
        if self.policy is not None:
            self.policy.failed(key, entry)

    def _store(self, key: K, value: V, load: Load[V], load_seconds: float) -> None:
        if self.ttl <= 0:
            self.released(value)  # not kept at all
            return
        now = trio.current_time()
        replaced = self._entries.get(key)
        entry = Entry(value, load, now, now + self.ttl, load_seconds=load_seconds, reloaded=replaced is not None)
        self._entries[key] = entry
        self._entries.move_to_end(key)
        if replaced is not None:
            self.released(replaced.value)  # after the new value is in: an unchanged secret stays guarded
        while len(self._entries) > self._max_entries:
            # The oldest unpinned entry; the new one itself when pinned entries fill the cache.
            victim = next((old for old in self._entries if old not in self.pinned), None)
            if victim is None:
                break
            self.evictions += 1
            self._forget(victim, self._entries.pop(victim))
        if self.policy is not None and key in self._entries:
            self.policy.loaded(key, entry)
        self.changes.announce(key)

    def drop_where(self, predicate: Callable[[K], bool]) -> int:
        """Drops the entries whose key `predicate` accepts, and the values their running loads
        bring (readers still get them): a dropped per-request role takes its entries with it."""
        keys = [key for key in self._entries if predicate(key)]
        for key in keys:
            self._forget(key, self._entries.pop(key))
        for key, flight in self._flights.items():
            flight.discard = flight.discard or predicate(key)
        return len(keys)

    def _forget(self, key: K, entry: Entry[V]) -> None:
        """`entry` has left the cache: its refresh schedule and its value go too."""
        if self.policy is not None:
            self.policy.forgotten(key)
        self.released(entry.value)
