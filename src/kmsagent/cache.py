"""An LRU cache with a TTL, single-flight loads, stale fallback with back-off, and refresh hooks.

It knows nothing of HTTP or KMS: the caller hands it a `load` coroutine function per key and two
rules, which errors allow serving the last value (`is_transient`) and for how long past its TTL
(`max_stale`). Loads run in a nursery the cache is given, not in the reader's task, so a client
that hangs up does not cancel a load that other readers are waiting for. When to reload ahead
of expiry is a `RefreshPolicy`'s business (refresher.py); the cache tells it what was loaded,
read and failed, and starts the background loads it asks for.
"""

from __future__ import annotations

import enum
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import trio

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


@dataclass
class _Flight(Generic[V]):
    """One load in progress; every reader of the key waits on `done`."""

    done: trio.Event = field(default_factory=trio.Event)
    value: V | None = None
    error: BaseException | None = None


class LoadCancelled(Exception):
    """The load that a reader waited on was cancelled (the agent is shutting down)."""


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
        self._flights: dict[K, _Flight[V]] = {}
        self._max_entries = max_entries
        self.ttl = ttl
        self._loads = loads
        self._is_transient = is_transient
        self._serve_stale = serve_stale
        self._max_stale = max_stale
        self.policy: RefreshPolicy[K] | None = None
        self.evictions = 0
        #: Keys that feed files or a child's environment (SPEC §5): never evicted by LRU, and
        #: refreshed ahead whether or not anyone reads them (the refresh policy asks).
        self.pinned: set[K] = set()

    def pin(self, key: K) -> None:
        """Keeps `key` always hot. When pinned keys fill the cache, other values are served but not kept."""
        self.pinned.add(key)

    def configure(self, *, ttl: float, serve_stale: bool, max_stale: float | None) -> None:
        """New rules (a config reload); a shorter TTL applies to the values already cached."""
        self.ttl = ttl
        self._serve_stale = serve_stale
        self._max_stale = max_stale
        if ttl <= 0:
            self._entries.clear()
        for entry in self._entries.values():
            entry.expires_at = min(entry.expires_at, entry.loaded_at + ttl)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def peek(self, key: K) -> Entry[V] | None:
        """The entry for `key`, fresh or not, without touching its LRU position."""
        return self._entries.get(key)

    async def get(self, key: K, load: Load[V], *, refresh: bool = False) -> tuple[V, Outcome]:
        """The value for `key`: from the cache while fresh, else from `load` (joined if running).

        `refresh=True` skips the fresh entry and loads now. A transient load failure returns the
        last value as `Outcome.STALE` when it is within `max_stale` of its expiry; any other
        failure is raised to every waiting reader.
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
        flight = self._start(key, load)
        await flight.done.wait()
        if flight.error is None:
            return flight.value, Outcome.MISS  # type: ignore[return-value]
        stale = self._entries.get(key)
        if stale is not None and self._is_transient(flight.error) and self._stale_allowed(stale, trio.current_time()):
            return stale.value, Outcome.STALE
        raise flight.error

    def mark_read(self, key: K) -> None:
        """Counts as a read of `key` (a prefetched secret is hot before its first request)."""
        entry = self._entries.get(key)
        if entry is not None:
            self._mark_read(key, entry)

    def _mark_read(self, key: K, entry: Entry[V]) -> None:
        entry.read = True
        if self.policy is not None:
            self.policy.read(key, entry)

    def refresh(self, key: K, entry: Entry[V]) -> bool:
        """Starts a background reload of `entry` if it is still the cached one; True if started."""
        if self._entries.get(key) is not entry or key in self._flights:
            return False
        self._start(key, entry.load)
        return True

    def _stale_allowed(self, entry: Entry[V], now: float) -> bool:
        if not self._serve_stale:
            return False
        return self._max_stale is None or now <= entry.expires_at + self._max_stale

    def _start(self, key: K, load: Load[V]) -> _Flight[V]:
        flight = self._flights.get(key)
        if flight is None:
            flight = self._flights[key] = _Flight()
            self._loads.start_soon(self._fly, key, load, flight)
        return flight

    async def _fly(self, key: K, load: Load[V], flight: _Flight[V]) -> None:
        started = trio.current_time()
        try:
            flight.value = await load()
        except Exception as error:
            flight.error = error
            self._failed(key, error)
        except BaseException:
            flight.error = LoadCancelled(f"load of {key!r} was cancelled")
            raise
        else:
            self._store(key, flight.value, load, trio.current_time() - started)
        finally:
            del self._flights[key]
            flight.done.set()

    def _failed(self, key: K, error: Exception) -> None:
        entry = self._entries.get(key)
        if entry is None:
            return
        if not self._is_transient(error):
            del self._entries[key]
            return
        entry.failures += 1
        backoff = min(RETRY_CAP, RETRY_BASE * 2 ** (entry.failures - 1))
        entry.retry_at = trio.current_time() + random.uniform(backoff / 2, backoff)
        if self.policy is not None:
            self.policy.failed(key, entry)

    def _store(self, key: K, value: V, load: Load[V], load_seconds: float) -> None:
        if self.ttl <= 0:
            return
        now = trio.current_time()
        reloaded = key in self._entries
        entry = Entry(value, load, now, now + self.ttl, load_seconds=load_seconds, reloaded=reloaded)
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            victim = next((old for old in self._entries if old not in self.pinned), None)
            if victim is None:
                break
            del self._entries[victim]
            self.evictions += 1
        if self.policy is not None:
            self.policy.loaded(key, entry)
