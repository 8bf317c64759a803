"""SecretCache on its own: LRU, TTL (autojump_clock), single flight, refresh, stale fallback."""

from __future__ import annotations

from collections import Counter

import pytest
import trio
import trio.testing

from kmsagent.cache import LoadCancelled, Outcome, SecretCache


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
    options: dict[str, object] = dict(max_entries=3, ttl=10.0, is_transient=lambda e: isinstance(e, Transient))
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
        with pytest.raises(ValueError) as caught:
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
