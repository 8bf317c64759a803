"""Per-key change announcements: how a waiting reader learns at once that a key's value changed.

The cache announces every value it stores for a key (a refresh-ahead, a rotation reload, a
`refreshNow`, a load after expiry) and every final failure that drops it; what "changed" means
(a new VersionId, say) is the waiter's business, so this module knows nothing of HTTP or KMS.

Why one parking lot per key, swapped on each announcement (a `trio.Event` is one lot and a flag):
the waiters of a key all park in the same lot inside their own tasks (a held HTTP request waits
in its connection's task, no task of its own), and `unpark_all()` reschedules them all in one
pass: 10,000 waiters on one key wake in one call. The next waiter finds no lot and makes a fresh
one, so an announcement is never seen twice. The lot itself rather than an Event: a waiter costs
one coroutine frame less (memory per held request is the measure here, issue 12: 20 KB), and
its length is the waiter count. A lot lives only while someone waits in it: the table holds at
most one entry per key with waiters.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

import trio

K = TypeVar("K", bound=Hashable)


class _Change:
    """The next change of one key: its waiters, and the error that dropped the key, if one did."""

    __slots__ = ("error", "lot")

    def __init__(self) -> None:
        self.lot = trio.lowlevel.ParkingLot()
        self.error: BaseException | None = None


class Changes(Generic[K]):
    """Waiters per key, woken together by `announce`."""

    def __init__(self) -> None:
        self._next: dict[K, _Change] = {}

    async def wait(self, key: K) -> BaseException | None:
        """Returns at `key`'s next announcement: None for a stored value, else the error that
        dropped it. The wait begins when this is called, before its first checkpoint, so a caller
        that looked at the cache and then calls this without awaiting in between misses nothing."""
        change = self._next.get(key)
        if change is None:
            change = self._next[key] = _Change()
        try:
            await change.lot.park()
        finally:
            # A cancelled waiter has left the lot by now; the last one takes the lot away.
            if not change.lot and self._next.get(key) is change:
                del self._next[key]
        return change.error

    def announce(self, key: K, error: BaseException | None = None) -> None:
        """`key` has a new value (`error` None) or was dropped by `error`: wakes its waiters."""
        change = self._next.pop(key, None)
        if change is not None:
            change.error = error
            change.lot.unpark_all()

    def waiting(self, key: K) -> int:
        """How many wait on `key` now."""
        change = self._next.get(key)
        return 0 if change is None else len(change.lot)

    def __len__(self) -> int:
        """Keys with waiters."""
        return len(self._next)
