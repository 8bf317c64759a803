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
"""

from __future__ import annotations

import enum
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import trio

from kmsagent.changes import Changes

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
Load = Callable[[], Awaitable[V]]
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
    #: How long the load that produced this value took.
    load_seconds: float = 0.0
    #: Loaded in place of an earlier value (a refresh), not on a first miss.
    reloaded: bool = False
    #: Read since it was loaded (a hot entry, worth reloading before it expires).
    read: bool = False
    failures: int = 0
    retry_at: float = 0.0
    #: Its refresh point passed while nobody read it (the refresh policy's bookkeeping).
    refresh_due: bool = False


class RefreshPolicy(Protocol[K]):
    """Told what happens to entries; decides when to call `SecretCache.refresh`."""

    def loaded(self, key: K, entry: Entry) -> None: ...

    def read(self, key: K, entry: Entry) -> None: ...

    def failed(self, key: K, entry: Entry) -> None: ...

    def forgotten(self, key: K) -> None:
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

    def abandon_if_unwanted(self) -> None:
        """Cancels a queued miss-load that no reader waits for; new readers start a new one."""
        if self.abandonable and self.queued and self.waiters == 0 and not self.done.is_set():
            self.scope.cancel()
            if self.flights.get(self.key) is self:
                del self.flights[self.key]


#: The flight whose load runs in the current task (set in the load's own task only).
_current_flight: ContextVar[_Flight | None] = ContextVar("kmsagent_cache_flight", default=None)


@contextmanager
def queued() -> Iterator[None]:
    """Marks the part of a running load that only waits its turn (a KMS concurrency slot).

    A miss-load whose readers have all hung up is cancelled here ("leaves the queue"), so live
    requests are never queued behind dead ones. Outside this block a load is never abandoned,
    so a load that is talking to KMS finishes and fills the cache. Outside a load, a no-op.
    """
    flight = _current_flight.get()
    if flight is None:
        yield
        return
    flight.queued = True
    try:
        flight.abandon_if_unwanted()
        yield
    finally:
        flight.queued = False


class LoadCancelled(Exception):
    """The load that a reader waited on was cancelled (the agent is shutting down, or nobody waited)."""


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
        self._is_transient = is_transient
        self._serve_stale = serve_stale
        self._max_stale = max_stale
        self.policy: RefreshPolicy[K] | None = None
        #: Called once with every value a load produced, when the cache lets go of it.
        self.released: Callable[[V], None] = lambda value: None
        self.evictions = 0
        #: Announces each stored value and each final failure per key (held reads wait on it).
        self.changes: Changes[K] = Changes()

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
        self, key: K, load: Load[V], *, refresh: bool = False, keep_loading: bool = False
    ) -> tuple[V, Outcome]:
        """The value for `key`: from the cache while fresh, else from `load` (joined if running).

        `refresh=True` skips the fresh entry and loads now. A transient load failure returns the
        last value as `Outcome.STALE` when it is within `max_stale` of its expiry; any other
        failure is raised to every waiting reader. A load this read starts or joins is
        abandoned when every reader hung up while it is queued, unless `keep_loading` (a
        prefetch: its value is wanted whoever waits).
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
        await self._wait(flight)
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

    def mark_read(self, key: K) -> None:
        """Counts as a read of `key` (a prefetched secret is hot before its first request)."""
        entry = self._entries.get(key)
        if entry is not None:
            self._mark_read(key, entry)

    def _mark_read(self, key: K, entry: Entry[V]) -> None:
        entry.read = True
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
        return self._start(key, entry.load, abandonable=False).done

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
        except Exception as error:
            flight.error = error
            self._failed(key, error)
        except BaseException:
            flight.error = LoadCancelled(f"load of {key!r} was cancelled")
            raise
        else:
            if flight.scope.cancelled_caught:
                flight.error = LoadCancelled(f"load of {key!r} was abandoned: nobody waited for it")
            else:
                self._store(key, flight.value, load, trio.current_time() - started)  # type: ignore[arg-type]
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]
            flight.done.set()

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
            self.evictions += 1
            self._forget(*self._entries.popitem(last=False))
        if self.policy is not None:
            self.policy.loaded(key, entry)
        self.changes.announce(key)

    def _forget(self, key: K, entry: Entry[V]) -> None:
        """`entry` has left the cache: its refresh schedule and its value go too."""
        if self.policy is not None:
            self.policy.forgotten(key)
        self.released(entry.value)
