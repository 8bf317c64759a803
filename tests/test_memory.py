"""Memory stays within CacheSize (issue 10, item 2; SPEC §2: CacheSize is the memory limit).

Nothing may keep a value the cache let go of: not the refresh schedule, not a flight, not the
redaction guard. Measured by counting live objects after `gc.collect()`, which is exact where
RSS is noisy.
"""

from __future__ import annotations

import gc
import json
from collections.abc import AsyncIterator, Callable

import pytest
import trio
import trio.testing

from conftest import AK_ID, AK_SECRET, agent_config
from kmsagent import redact
from kmsagent.cache import SecretCache
from kmsagent.checks import SecretQuery
from kmsagent.credentials import Credentials, StaticCredentials
from kmsagent.emulator import KmsEmulator
from kmsagent.errors import is_transient
from kmsagent.formats import response_format
from kmsagent.kms import KmsClient, SecretValue
from kmsagent.refresher import STALE_SLACK, Refresher
from kmsagent.store import SecretStore


class Value:
    """A cached value whose live instances the tests count."""

    def __init__(self, key: str) -> None:
        self.key = key


def live(kind: type, where: Callable[[object], bool] = lambda value: True) -> int:
    gc.collect()
    return sum(1 for item in gc.get_objects() if type(item) is kind and where(item))


def cache_with_refresher(nursery: trio.Nursery, **options: object) -> tuple[SecretCache[str, Value], Refresher[str]]:
    settings: dict[str, object] = {"max_entries": 1000, "ttl": 300.0}
    settings.update(options)
    cache: SecretCache[str, Value] = SecretCache(loads=nursery, **settings)  # type: ignore[arg-type]
    refresher = Refresher(cache, max_in_flight=8)
    nursery.start_soon(refresher.run)
    return cache, refresher


def loader(key: str):  # noqa: ANN201 - returns a zero-argument coroutine function
    async def load() -> Value:
        return Value(key)

    return load


# --- the cache and its refresh schedule --------------------------------------------------------


async def test_refresh_now_in_a_loop_keeps_one_schedule_item_and_one_value(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Before: every replaced entry stayed in the schedule until its old due time (+15 MB/s)."""
    cache, refresher = cache_with_refresher(nursery)
    for _ in range(3000):
        await cache.get("a", loader("a"), refresh=True)
    assert len(refresher) == 1
    assert len(refresher._schedule) <= 2 * len(refresher) + STALE_SLACK
    assert live(Value) <= 2


async def test_evicted_entries_leave_nothing_behind(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """CacheSize=1 and 1000 distinct secrets read once: one value alive, not 1000 (+153 MB)."""
    cache, refresher = cache_with_refresher(nursery, max_entries=1)
    released: list[str] = []
    cache.released = lambda value: released.append(value.key)
    for i in range(1000):
        await cache.get(f"s{i}", loader(f"s{i}"))
        cache.mark_read(f"s{i}")
    assert len(cache) == 1 and len(refresher) == 1
    assert len(refresher._schedule) <= 2 + STALE_SLACK
    assert live(Value) <= 2
    assert released == [f"s{i}" for i in range(999)]  # each evicted value, once, in order


async def test_every_value_a_load_returns_is_released_once(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Replaced, evicted, dropped on a final error, cleared by a reload, or never kept (TTL 0)."""
    cache, _ = cache_with_refresher(nursery, max_entries=2, ttl=10.0)
    released: list[Value] = []
    cache.released = released.append
    loaded: list[Value] = []

    def counted(key: str):  # noqa: ANN202
        async def load() -> Value:
            loaded.append(Value(key))
            return loaded[-1]

        return load

    async def fail() -> Value:
        raise LookupError("deleted")

    await cache.get("a", counted("a"))
    await cache.get("a", counted("a"), refresh=True)  # replaced
    await cache.get("b", counted("b"))
    await cache.get("c", counted("c"))  # evicts a
    with pytest.raises(LookupError):
        await cache.get("b", fail, refresh=True)  # dropped
    cache.configure(ttl=0, serve_stale=True, max_stale=None)  # cleared
    await cache.get("d", counted("d"))  # never kept
    assert sorted(map(id, released)) == sorted(map(id, loaded)) and len(released) == 5


# --- the redaction guard ------------------------------------------------------------------------


def test_the_guard_holds_values_while_held_and_forgets_them_after(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redact, "RECENT_BYTES", 100)
    guard = redact.Guard()
    first, second = "first-secret-value-Xy2" * 2, "second-secret-value-Zq" * 2
    guard.hold_secret(first)
    guard.hold_secret(first)  # two entries hold the same text
    assert guard.scrub(f"a {first} b") == f"a {redact.MARK} b"
    guard.release_secret(first)
    assert guard.guarded_bytes() == len(first)
    guard.release_secret(first)  # the last holder: kept among the recent
    assert guard.scrub(first) == redact.MARK
    for i in range(5):  # 5 × 44 characters of other released values push it out
        guard.release_secret(f"{second}-{i}")
    assert guard.scrub(first) == first
    assert guard.guarded_bytes() <= 100


def test_the_guard_bounds_held_bytes_and_credential_length(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redact, "HELD_BYTES", 1000)
    guard = redact.Guard()
    for i in range(100):
        guard.hold_secret(f"{i:03d}" + "s" * 97)
    assert guard.guarded_bytes() <= 1000
    assert guard.scrub("000" + "s" * 97) == redact.MARK and guard.scrub("099" + "s" * 97) != redact.MARK
    guard.remember("t" * 5000, "credential-Kp4m2Lr8")  # a 5000-character "token" is no credential
    assert guard.scrub("credential-Kp4m2Lr8") == redact.MARK and guard.scrub("t" * 5000) == "t" * 5000


def test_the_guard_covers_the_strings_inside_a_json_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redact, "RECENT_BYTES", 100_000)
    guard = redact.Guard()
    data = json.dumps({"user": "svc-user-name", "nested": [{"password": "hunter2-but-longer"}]})
    guard.hold_secret(data)
    assert guard.scrub("pw=hunter2-but-longer user=svc-user-name") == f"pw={redact.MARK} user={redact.MARK}"
    guard.hold_secret("[" * 100_000)  # deeper than the JSON parser goes: guarded as text
    guard.release_secret(data)
    guard.release_secret("[" * 100_000)
    assert guard.scrub("hunter2-but-longer") == "hunter2-but-longer"  # pushed out of the recent set


# --- the store against the emulator, wired as agent.py wires it ---------------------------------


@pytest.fixture
async def store_factory(
    emulator: KmsEmulator, nursery: trio.Nursery
) -> AsyncIterator[Callable[..., SecretStore]]:
    config = agent_config(emulator.endpoint)
    async with (
        KmsClient.open(config.kms, StaticCredentials(Credentials(AK_ID, AK_SECRET), "test")) as kms,
        trio.open_nursery() as loads,
    ):

        def make(*, cache_size: int, ttl: float) -> SecretStore:
            cache: SecretCache = SecretCache(max_entries=cache_size, ttl=ttl, loads=loads, is_transient=is_transient)
            store = SecretStore(cache, kms, response_format(0, region="cn-hangzhou", lease_seconds=lambda: ttl))
            loads.start_soon(Refresher(cache, max_in_flight=8, rotation_due=store.rotation_due).run)
            return store

        yield make
        loads.cancel_scope.cancel()


def secret_text(i: int) -> str:
    return f"memory-test-{i:04d}-" + "v" * 16_000


def is_test_secret(value: object) -> bool:
    return isinstance(value, SecretValue) and value.name.startswith("mem/")


async def test_cache_size_1_and_60_distinct_secrets_keep_one_secret_alive_and_guarded(
    emulator: KmsEmulator, store_factory: Callable[..., SecretStore], autojump_clock: trio.testing.MockClock
) -> None:
    for i in range(60):
        emulator.put_secret(f"mem/{i:04d}", secret_text(i))
    guarded_before = redact.guarded_bytes()  # other tests' entries may still be held
    store = store_factory(cache_size=1, ttl=300)
    for i in range(60):
        cached, _ = await store.get(SecretQuery(f"mem/{i:04d}"))
        assert cached.secret.data == secret_text(i)
    del cached
    assert live(SecretValue, is_test_secret) <= 2
    assert redact.scrub(secret_text(59)) == redact.MARK  # the one the cache holds
    assert redact.scrub(secret_text(0)) == secret_text(0)  # evicted long ago: forgotten
    assert redact.guarded_bytes() <= guarded_before + redact.RECENT_BYTES + len(secret_text(0))


async def test_ttl_zero_keeps_no_secret_and_guards_only_a_few_recent_ones(
    emulator: KmsEmulator, store_factory: Callable[..., SecretStore]
) -> None:
    """Before: with TtlSeconds = 0 the guard still kept the last 4096 values, of any size."""
    for i in range(40):
        emulator.put_secret(f"mem/{i:04d}", secret_text(i))
    guarded_before = redact.guarded_bytes()  # other tests' entries may still be held
    store = store_factory(cache_size=1000, ttl=0)
    for i in range(40):
        cached, _ = await store.get(SecretQuery(f"mem/{i:04d}"))
    del cached
    assert len(store.cache) == 0 and live(SecretValue, is_test_secret) <= 1
    assert redact.scrub(secret_text(39)) == redact.MARK  # the latest values stay guarded a while
    assert redact.scrub(secret_text(0)) == secret_text(0)
    assert redact.guarded_bytes() <= guarded_before + redact.RECENT_BYTES
