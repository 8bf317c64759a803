"""SecretCache on its own: LRU, TTL (autojump_clock), single flight, refresh, stale fallback."""

from __future__ import annotations

from collections import Counter
from functools import partial

import pytest
import trio
import trio.testing

from kmsagent.cache import LoadCancelled, Outcome, SecretCache, queued


class Source:
    """A loader that counts calls, can be slow, and can fail."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.delay = 0.0
        self.error: Exception | None = None

    def loader(self, key: str):  # noqa: ANN201 - returns a zero-argument coroutine function
        async def load() -> str:
            self.calls[key] += 1
            await trio.sleep(self.delay)
            if self.error is not None:
                raise self.error
            return f"{key}#{self.calls[key]}"

        return load


class Transient(Exception):
    pass


def make(nursery: trio.Nursery, **kwargs: object) -> SecretCache[str, str]:
    options: dict[str, object] = {"max_entries": 3, "ttl": 10.0, "is_transient": lambda e: isinstance(e, Transient)}
    options.update(kwargs)
    return SecretCache(loads=nursery, **options)  # type: ignore[arg-type]


async def test_miss_then_hit(nursery: trio.Nursery) -> None:
    cache, source = make(nursery), Source()
    assert await cache.get("a", source.loader("a")) == ("a#1", Outcome.MISS)
    assert await cache.get("a", source.loader("a")) == ("a#1", Outcome.HIT)
    assert source.calls["a"] == 1


async def test_ttl_expiry(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    cache, source = make(nursery), Source()
    await cache.get("a", source.loader("a"))
    await trio.sleep(9.9)
    assert await cache.get("a", source.loader("a")) == ("a#1", Outcome.HIT)
    await trio.sleep(0.1)
    assert await cache.get("a", source.loader("a")) == ("a#2", Outcome.MISS)


async def test_ttl_zero_caches_nothing(nursery: trio.Nursery) -> None:
    cache, source = make(nursery, ttl=0), Source()
    assert await cache.get("a", source.loader("a")) == ("a#1", Outcome.MISS)
    assert await cache.get("a", source.loader("a")) == ("a#2", Outcome.MISS)
    assert len(cache) == 0


async def test_lru_evicts_the_least_recently_read(nursery: trio.Nursery) -> None:
    cache, source = make(nursery), Source()
    for key in "abc":
        await cache.get(key, source.loader(key))
    await cache.get("a", source.loader("a"))  # a is now the most recent; b the least
    await cache.get("d", source.loader("d"))
    assert [key in cache for key in "abcd"] == [True, False, True, True]
    assert cache.evictions == 1
    assert await cache.get("b", source.loader("b")) == ("b#2", Outcome.MISS)


async def test_concurrent_misses_make_one_load(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    cache, source = make(nursery), Source()
    source.delay = 1.0
    results: list[tuple[str, Outcome]] = []

    async def read() -> None:
        results.append(await cache.get("a", source.loader("a")))

    async with trio.open_nursery() as readers:
        for _ in range(50):
            readers.start_soon(read)
    assert source.calls["a"] == 1
    assert results == [("a#1", Outcome.MISS)] * 50


async def test_concurrent_misses_share_one_failure(nursery: trio.Nursery) -> None:
    cache, source = make(nursery), Source()
    source.error = ValueError("gone")
    source.delay = 0.01
    errors: list[BaseException] = []

    async def read() -> None:
        with pytest.raises(ValueError, match="gone") as caught:
            await cache.get("a", source.loader("a"))
        errors.append(caught.value)

    async with trio.open_nursery() as readers:
        for _ in range(5):
            readers.start_soon(read)
    assert source.calls["a"] == 1 and len(errors) == 5


async def test_a_reader_that_gives_up_does_not_cancel_the_load(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    cache, source = make(nursery), Source()
    source.delay = 2.0
    with trio.move_on_after(1.0):
        await cache.get("a", source.loader("a"))
    assert await cache.get("a", source.loader("a")) == ("a#1", Outcome.MISS)
    assert source.calls["a"] == 1


async def test_refresh_loads_even_when_fresh(nursery: trio.Nursery) -> None:
    cache, source = make(nursery), Source()
    await cache.get("a", source.loader("a"))
    assert await cache.get("a", source.loader("a"), refresh=True) == ("a#2", Outcome.MISS)
    assert await cache.get("a", source.loader("a")) == ("a#2", Outcome.HIT)


async def test_transient_failure_serves_stale_within_max_stale(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    cache, source = make(nursery, max_stale=5.0), Source()
    await cache.get("a", source.loader("a"))
    source.error = Transient()
    await trio.sleep(12)
    assert await cache.get("a", source.loader("a")) == ("a#1", Outcome.STALE)
    await trio.sleep(3.1)  # 15.1 s after the load: 5.1 s past expiry
    with pytest.raises(Transient):
        await cache.get("a", source.loader("a"))


async def test_without_serve_stale_the_failure_reaches_the_reader(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    cache, source = make(nursery, serve_stale=False), Source()
    await cache.get("a", source.loader("a"))
    source.error = Transient()
    with pytest.raises(Transient):
        await cache.get("a", source.loader("a"), refresh=True)


async def test_a_permanent_failure_drops_the_entry(nursery: trio.Nursery) -> None:
    cache, source = make(nursery), Source()
    await cache.get("a", source.loader("a"))
    source.error = LookupError("deleted")
    with pytest.raises(LookupError):
        await cache.get("a", source.loader("a"), refresh=True)
    assert "a" not in cache


async def test_waiters_learn_when_the_load_is_cancelled() -> None:
    source = Source()
    source.delay = 10.0
    async with trio.open_nursery() as loads:
        cache = make(loads)
        async with trio.open_nursery() as readers:

            async def read() -> None:
                with pytest.raises(LoadCancelled):
                    await cache.get("a", source.loader("a"))

            readers.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            loads.cancel_scope.cancel()


# --- abandoned work: a miss nobody waits for leaves the queue ------------------------------------


class QueuedSource:
    """A loader like the KMS client: waits for one of `slots` inside `queued()`, then calls."""

    def __init__(self, slots: int = 1, call_seconds: float = 1.0) -> None:
        self.slots = trio.CapacityLimiter(slots)
        self.call_seconds = call_seconds
        self.calls: Counter[str] = Counter()

    def loader(self, key: str):  # noqa: ANN201 - returns a zero-argument coroutine function
        async def load() -> str:
            with queued():
                await self.slots.acquire()
            try:
                self.calls[key] += 1
                await trio.sleep(self.call_seconds)
            finally:
                self.slots.release()
            return f"{key}#{self.calls[key]}"

        return load


async def hang_up_after(seconds: float, cache: SecretCache[str, str], key: str, load, **kwargs: object) -> None:  # noqa: ANN001
    """A reader whose client hangs up: the connection layer cancels it explicitly (not a deadline)."""
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(cache.get, key, load, **kwargs))  # type: ignore[arg-type]
            await trio.sleep(seconds)
            scope.cancel()


async def test_queued_misses_whose_readers_hung_up_leave_the_queue(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    cache, source = make(nursery, max_entries=1000), QueuedSource(slots=1, call_seconds=1.0)
    async with trio.open_nursery() as readers:
        for i in range(100):
            readers.start_soon(hang_up_after, 0.5, cache, f"dead{i}", source.loader(f"dead{i}"))
    assert sum(source.calls.values()) == 1  # only the load that had the slot before they left
    started = trio.current_time()
    assert await cache.get("live", source.loader("live")) == ("live#1", Outcome.MISS)
    assert trio.current_time() - started <= 1.5  # not behind 99 dead loads (99 s)
    assert sum(source.calls.values()) == 2
    (called,) = [key for key in source.calls if key.startswith("dead")]
    assert called in cache  # the load that was talking to KMS finished and filled the cache
    assert not cache._flights


async def test_a_queued_miss_is_kept_while_one_reader_still_waits(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    cache, source = make(nursery), QueuedSource(slots=1, call_seconds=1.0)
    nursery.start_soon(cache.get, "busy", source.loader("busy"))  # holds the slot for 1 s
    await trio.testing.wait_all_tasks_blocked()
    async with trio.open_nursery() as readers:
        readers.start_soon(hang_up_after, 0.2, cache, "a", source.loader("a"))
        assert await cache.get("a", source.loader("a")) == ("a#1", Outcome.MISS)
    assert source.calls["a"] == 1


async def test_a_reader_whose_deadline_passed_leaves_its_queued_load_going(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """SPEC §5: a request past RequestTimeoutMs gives up, but its load fills the cache."""
    cache, source = make(nursery), QueuedSource(slots=1, call_seconds=1.0)
    nursery.start_soon(cache.get, "busy", source.loader("busy"))
    await trio.testing.wait_all_tasks_blocked()
    with trio.move_on_after(0.2):
        await cache.get("a", source.loader("a"))
    await trio.sleep(3)
    assert source.calls["a"] == 1 and await cache.get("a", source.loader("a")) == ("a#1", Outcome.HIT)


async def test_prefetches_and_refreshes_are_never_abandoned(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    cache, source = make(nursery), QueuedSource(slots=1, call_seconds=1.0)
    await cache.get("hot", source.loader("hot"))
    nursery.start_soon(cache.get, "busy", source.loader("busy"))
    await trio.testing.wait_all_tasks_blocked()
    entry = cache.peek("hot")
    assert entry is not None and cache.refresh("hot", entry) is not None  # a background refresh, queued
    await hang_up_after(0.2, cache, "hot", source.loader("hot"), refresh=True)  # joins it, hangs up
    await hang_up_after(0.2, cache, "pre", source.loader("pre"), keep_loading=True)
    await trio.sleep(5)
    assert source.calls == {"hot": 2, "busy": 1, "pre": 1}
    assert cache.peek("hot").value == "hot#2" and "pre" in cache  # type: ignore[union-attr]


async def test_an_abandoned_load_that_retries_leaves_the_queue_when_it_queues_again(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Between two tries (a back-off) nothing is queued; the next wait for a slot is."""
    cache, slots, calls = make(nursery), trio.CapacityLimiter(1), Counter[str]()

    async def load() -> str:
        for _ in range(3):
            with queued():
                await slots.acquire()
            calls["a"] += 1
            slots.release()
            await trio.sleep(1)  # a back-off after a failed try
        return "a"

    await hang_up_after(0.5, cache, "a", load)
    await trio.sleep(10)
    assert calls["a"] == 1 and "a" not in cache and not cache._flights


async def test_a_refresh_point_falling_during_a_readers_load_keeps_that_load(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    cache, source = make(nursery), QueuedSource(slots=1, call_seconds=1.0)
    await cache.get("hot", source.loader("hot"))
    nursery.start_soon(cache.get, "busy", source.loader("busy"))
    await trio.testing.wait_all_tasks_blocked()
    async with trio.open_nursery() as readers:
        readers.start_soon(partial(hang_up_after, 0.5, cache, "hot", source.loader("hot"), refresh=True))
        await trio.sleep(0.2)
        entry = cache.peek("hot")
        assert entry is not None and cache.refresh("hot", entry) is None  # the reader's load is the refresh
    await trio.sleep(5)
    assert source.calls["hot"] == 2 and cache.peek("hot").value == "hot#2"  # type: ignore[union-attr]
