"""An LRU cache with a TTL, single-flight loads and stale fallback, for any key and value.

It knows nothing of HTTP or KMS: the caller hands it a `load` coroutine function and two rules,
which errors allow serving the last value (`is_transient`) and for how long past its TTL
(`max_stale`). Loads run in a nursery the cache is given, not in the reader's task, so a client
that hangs up does not cancel a load that other readers are waiting for.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Outcome(enum.Enum):
    """How a read was answered; the value of the `X-KMS-Agent-Cache` header."""

    HIT = "hit"
    MISS = "miss"
    STALE = "stale"


@dataclass
class Entry(Generic[V]):
    value: V
    loaded_at: float
    expires_at: float


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
    to `max_stale` seconds past its expiry (`None`: no bound). Any other failure (the secret
    was deleted, access revoked) drops the entry, so the cache never hides such an answer.
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
        self._ttl = ttl
        self._loads = loads
        self._is_transient = is_transient
        self._serve_stale = serve_stale
        self._max_stale = max_stale
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def peek(self, key: K) -> Entry[V] | None:
        """The entry for `key`, fresh or not, without touching its LRU position."""
        return self._entries.get(key)

    async def get(
        self, key: K, load: Callable[[], Awaitable[V]], *, refresh: bool = False
    ) -> tuple[V, Outcome]:
        """The value for `key`: from the cache while fresh, else from `load` (joined if running).

        `refresh=True` skips the fresh entry and loads now. A transient load failure returns the
        last value as `Outcome.STALE` when it is within `max_stale` of its expiry; any other
        failure is raised to every waiting reader.
        """
        entry = self._entries.get(key)
        if entry is not None and not refresh and trio.current_time() < entry.expires_at:
            self._entries.move_to_end(key)
            return entry.value, Outcome.HIT
        flight = self._flights.get(key)
        if flight is None:
            flight = self._flights[key] = _Flight()
            self._loads.start_soon(self._fly, key, load, flight)
        await flight.done.wait()
        if flight.error is None:
            return flight.value, Outcome.MISS  # type: ignore[return-value]
        stale = self._stale_entry(key, flight.error)
        if stale is not None:
            return stale.value, Outcome.STALE
        raise flight.error

    def _stale_entry(self, key: K, error: BaseException) -> Entry[V] | None:
        entry = self._entries.get(key)
        if entry is None or not self._serve_stale or not self._is_transient(error):
            return None
        if self._max_stale is not None and trio.current_time() > entry.expires_at + self._max_stale:
            return None
        return entry

    async def _fly(self, key: K, load: Callable[[], Awaitable[V]], flight: _Flight[V]) -> None:
        try:
            flight.value = await load()
        except Exception as error:
            flight.error = error
            if not self._is_transient(error):
                self._entries.pop(key, None)
        except BaseException:
            flight.error = LoadCancelled(f"load of {key!r} was cancelled")
            raise
        else:
            self._store(key, flight.value)
        finally:
            del self._flights[key]
            flight.done.set()

    def _store(self, key: K, value: V) -> None:
        if self._ttl <= 0:
            return
        now = trio.current_time()
        self._entries[key] = Entry(value, loaded_at=now, expires_at=now + self._ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
            self.evictions += 1
