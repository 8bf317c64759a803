"""MaxConcurrentRequests as slots that waiting calls take by rank, not only in arrival order.

trio's CapacityLimiter serves waiters first come, first served, so a refresh that keeps a hot
secret from expiring waited behind every miss and prefetch queued before it: with 1000 secrets
prefetched through 8 slots from a KMS at 100 ms, a refresh started 5.7 s in waited 6.9 s for its
slot, and the secret, read every 2 ms, missed (tests/test_freshness.py has the steady case).
Here a call waits with a rank (the cache's `queued()` gives it: a background refresh is
`URGENT`) and a freed slot goes to the lowest rank, first come first served within it. Misses
are not starved: the refresher keeps at most MaxConcurrentRequests refreshes going and starts
the next only once one has ended, so a slot freed while no refresh waits goes to the next miss.
"""

from __future__ import annotations

import heapq
import itertools

import trio

#: A background refresh (the refresher has chosen it as the most needed one).
URGENT = 0
#: Any other call: a miss, a prefetch.
ORDINARY = 1


class _Waiter:
    __slots__ = ("handed", "left", "wake")

    def __init__(self) -> None:
        self.wake = trio.Event()
        #: Given a slot by `release` (set together with `wake`).
        self.handed = False
        #: Stopped waiting (cancelled) before it was given one: `release` passes it by.
        self.left = False


class Slots:
    """At most `total` holders at once; waiters are served by rank, lowest first."""

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError("total must be at least 1")
        self.total = total
        #: Slots held now.
        self.held = 0
        self._order = itertools.count()
        self._waiting: list[tuple[int, int, _Waiter]] = []
        #: Waiters in `_waiting` that left (cancelled); swept out once they are half of it, so a
        #: stream of hung-up misses while KMS hangs cannot grow it past twice the live waiters.
        self._left = 0

    @property
    def waiting(self) -> int:
        """Calls waiting for a slot now."""
        return len(self._waiting) - self._left

    async def acquire(self, rank: int = ORDINARY) -> None:
        """Takes a slot, waiting behind lower ranks and earlier waiters of the same rank.

        A checkpoint, like trio's `acquire`; cancelled while waiting, it holds no slot.
        """
        if self.held < self.total:  # then nobody waits: a freed slot goes to a waiter at once
            await trio.lowlevel.checkpoint_if_cancelled()
            self.held += 1
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        waiter = _Waiter()
        heapq.heappush(self._waiting, (rank, next(self._order), waiter))
        try:
            await waiter.wake.wait()
        except BaseException:
            if waiter.handed:  # given a slot as the cancellation arrived: it goes to the next
                self.release()
            else:
                waiter.left = True
                self._left += 1
                if self._left * 2 > len(self._waiting):
                    self._waiting = [item for item in self._waiting if not item[2].left]
                    heapq.heapify(self._waiting)
                    self._left = 0
            raise

    def release(self) -> None:
        """Gives the slot to the first waiter still waiting, else frees it."""
        while self._waiting:
            _, _, waiter = heapq.heappop(self._waiting)
            if waiter.left:
                self._left -= 1
                continue
            waiter.handed = True
            waiter.wake.set()
            return
        if self.held <= 0:
            raise RuntimeError("release without acquire")
        self.held -= 1
