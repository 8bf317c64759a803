"""Memory stays within CacheSize (issue 10, item 2; SPEC §2: CacheSize is the memory limit).

Nothing may keep a value the cache let go of: not the refresh schedule, not a flight, not the
redaction guard. Measured by counting live objects after `gc.collect()`, which is exact where
RSS is noisy.
"""

from __future__ import annotations

import gc
import json
import sys
import tracemalloc
from collections.abc import AsyncIterator, Callable
from typing import Any

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
from kmsagent.kms.wire import parse_secret
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
    held = guard.hold_secret(first)
    assert guard.hold_secret(first) is held  # two entries hold the same text
    assert guard.scrub(f"a {first} b") == f"a {redact.MARK} b"
    guard.release_secret(held)
    assert guard.guarded_bytes() == len(first)
    guard.release_secret(held)  # the last holder: kept among the recent
    assert guard.scrub(first) == redact.MARK
    for i in range(5):  # 5 × 44 characters of other released values push it out
        guard.remember_secret(f"{second}-{i}")
    assert guard.scrub(first) == first
    assert guard.guarded_bytes() <= 100


def test_the_guard_keeps_no_copy_of_a_value_and_still_finds_it() -> None:
    """Issue 17: one copy of a cached value (its body). The guard keeps prints, not the text."""
    guard = redact.Guard()
    secret = "".join(["prefix-A", "x" * 4000, "-the-end"])  # built at run time: no interned constant
    inner = "".join(["inner-", "p" * 3000])
    document = json.dumps({"password": inner, "user": "svc-user-name"})
    guard.hold_secret(secret)
    guard.hold_secret(document)
    referenced = [item for item in gc.get_referents(*gc.get_referents(guard)) if isinstance(item, str)]
    assert all(len(text) <= redact.MIN_LENGTH for text in referenced) and secret not in referenced
    assert sys.getrefcount(secret) == 2  # ours and getrefcount's: the guard holds none
    assert guard.scrub(f"<{secret}> {inner} {secret[:-1]}") == f"<{redact.MARK}> {redact.MARK} {secret[:-1]}"
    assert guard.scrub(document) == redact.MARK and guard.scrub("prefix-A" + "x" * 4000) == "prefix-A" + "x" * 4000


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
    held = guard.hold_secret(data)
    assert guard.scrub("pw=hunter2-but-longer user=svc-user-name") == f"pw={redact.MARK} user={redact.MARK}"
    deep = guard.hold_secret("[" * 100_000)  # deeper than the JSON parser goes: guarded as text
    guard.release_secret(held)
    guard.release_secret(deep)
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


# --- per cached secret, and at start-up (issue 17) ---------------------------------------------

SECRET_4K = json.dumps({"key": "k" * 4085})  # 4096 characters, a JSON object (its string is guarded too)


class QuickKms:
    """GetSecretValue of 4 KB secrets from `slots` calls of `seconds` at a time; counts the loads
    under way (waiting for a slot or not)."""

    batching = False

    def __init__(self, slots: int = 8, seconds: float = 0.01) -> None:
        self.max_in_flight = slots
        self._slots = trio.CapacityLimiter(slots)
        self._seconds = seconds
        self.under_way = self.most_under_way = 0

    async def get_secret_value(self, name: str, *, queued: Callable[[], Any], **_: object) -> SecretValue:
        self.under_way += 1
        self.most_under_way = max(self.most_under_way, self.under_way)
        try:
            with queued():
                await self._slots.acquire()
            try:
                await trio.sleep(self._seconds)
            finally:
                self._slots.release()
        finally:
            self.under_way -= 1
        answer = {
            "RequestId": "r" * 36,
            "SecretName": name,
            "SecretData": SECRET_4K,
            "SecretDataType": "text",
            "VersionId": f"v-{name}",
            "CreateTime": "2024-07-06T08:22:03Z",
            "VersionStages": {"VersionStage": ["ACSCurrent"]},
        }
        return parse_secret(json.dumps(answer).encode())  # a text of its own, as KMS's answers give


def quick_store(nursery: trio.Nursery, kms: QuickKms, response_type: int = 0) -> SecretStore:
    cache: SecretCache = SecretCache(max_entries=2000, ttl=300, loads=nursery, is_transient=is_transient)
    formatter = response_format(response_type, region="cn-hangzhou", lease_seconds=lambda: 300)
    store = SecretStore(cache, kms, formatter)  # type: ignore[arg-type]
    refresher = Refresher(cache, max_in_flight=8, rotation_due=store.rotation_due)
    nursery.start_soon(refresher.run)
    return store


@pytest.mark.parametrize("response_type", [0, 1, 2])
async def test_a_cached_4kb_secret_costs_its_body_and_about_2kb_more(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, response_type: int
) -> None:
    """One copy of the value per cached secret, its body: the answer's text, its fields, the
    redaction guard's copy are gone (≈ 10.8 KB per 4 KB secret before, ≈ 5.6 KB after)."""
    store = quick_store(nursery, QuickKms(), response_type)
    for i in range(100):  # the tables' first growth, the refresher's first items
        await store.get(SecretQuery(f"warm/{i:04d}"))
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(500):
            cached, _ = await store.get(SecretQuery(f"mem/{i:04d}"))
        gc.collect()
        per_entry = (tracemalloc.get_traced_memory()[0] - before) / 500
    finally:
        tracemalloc.stop()
    # ≈ 1.3 KB above the body for ResponseType 0, ≈ 2.1 KB for 1 and 2 (they keep KMS's other fields).
    assert len(cached.body) >= 4096 and per_entry <= len(cached.body) + 3000, per_entry


async def test_a_prefetch_loads_a_few_secrets_at_a_time_and_the_rest_after_the_wait(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A task and a queued load per name took ≈ 11 MB at once for 1000 names (RSS the process
    kept): now twice MaxConcurrentRequests at most; names not loaded within the wait still are,
    in the background, and are read (refreshed ahead) like the others."""
    kms = QuickKms(slots=4, seconds=1.0)
    store = quick_store(nursery, kms)
    names = [f"pre/{i:04d}" for i in range(200)]
    started = trio.current_time()
    await store.prefetch([*names, *names[:10]], wait=10)
    assert trio.current_time() - started == pytest.approx(10) and 36 <= len(store.cache) <= 44
    await trio.sleep(60)
    assert len(store.cache) == 200 and kms.most_under_way <= 2 * kms.max_in_flight
    entries = [store.cache.peek(SecretQuery(name).cache_key) for name in names]
    assert all(entry is not None and entry.read for entry in entries)
