"""BatchRefresh (SPEC §5): refreshes that fall due together share one BatchGetSecretValue call.

From the wire up: the emulator against the official SDK (it implements the action as the service
documents it), the client's batch call (partial errors, the unknown action), the cache's batched
reload (single flights, whole-batch failures), the refresher's grouping (never later than a
refresh alone), and the agent as a whole against the emulator.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from functools import partial

import pytest
import trio
import trio.testing
from alibabacloud_kms20160120.client import Client
from alibabacloud_kms20160120.models import BatchGetSecretValueRequest, BatchGetSecretValueRequestSecretsList
from alibabacloud_tea_openapi.models import Config as SdkConfig
from darabonba.runtime import RuntimeOptions
from Tea.exceptions import TeaException

from conftest import AK_ID, AK_SECRET, SECRETS, StartAgent, agent_config
from kmsagent import refresher as refresher_module
from kmsagent.cache import Batch, Outcome, SecretCache, queued
from kmsagent.credentials import Credentials, StaticCredentials
from kmsagent.emulator import BATCH_GET_SECRET_VALUE, GET_SECRET_VALUE, Fault, KmsEmulator
from kmsagent.errors import KmsError, UpstreamUnavailable, is_transient
from kmsagent.kms import KmsClient, SecretValue
from kmsagent.refresher import Refresher
from kmsagent.slots import ORDINARY, URGENT

# --- the emulator, as the official SDK sees it ---------------------------------------------------


def sdk_batch(emulator: KmsEmulator, names: list[str]) -> Callable[[], object]:
    client = Client(
        SdkConfig(
            access_key_id=AK_ID,
            access_key_secret=AK_SECRET,
            endpoint=emulator.endpoint,
            protocol="http",
            region_id="cn-hangzhou",
        )
    )
    request = BatchGetSecretValueRequest(
        secrets_list=[BatchGetSecretValueRequestSecretsList(secret_name=name) for name in names]
    )
    return partial(client.batch_get_secret_value_with_options, request, RuntimeOptions())


async def test_the_sdk_reads_a_batch_with_per_secret_errors(emulator: KmsEmulator) -> None:
    arn = "acs:kms:cn-hangzhou:1234567890123456:secret/api-key"
    body = (await trio.to_thread.run_sync(sdk_batch(emulator, ["db/password", "missing", arn]))).body
    assert {value.secret_name: value.secret_data for value in body.secret_values} == {
        "db/password": SECRETS["db/password"],
        "api-key": SECRETS["api-key"],
    }
    assert [(e.secret_name, e.code, e.http_status) for e in body.errors] == [
        ("missing", "Forbidden.ResourceNotFound", 404)
    ]
    assert body.secret_values[0].version_stages.version_stage == ["ACSCurrent"]
    assert emulator.calls[-1].secret_names == ("db/password", "missing", arn)
    assert emulator.call_count("api-key") == 1  # a batch that names it by ARN counts for it


async def test_an_older_gateway_does_not_know_the_action_and_more_than_20_is_refused(emulator: KmsEmulator) -> None:
    with pytest.raises(TeaException) as caught:
        await trio.to_thread.run_sync(sdk_batch(emulator, [f"s{i}" for i in range(21)]))
    assert (caught.value.code, caught.value.status_code) == ("InvalidParameter", 400)
    emulator.batch_enabled = False
    with pytest.raises(TeaException) as caught:
        await trio.to_thread.run_sync(sdk_batch(emulator, ["api-key"]))
    assert (caught.value.code, caught.value.status_code) == ("InvalidAction.NotFound", 404)


# --- the client's batch call -----------------------------------------------------------------------


@pytest.fixture
async def client(emulator: KmsEmulator) -> AsyncIterator[KmsClient]:
    config = replace(agent_config(emulator.endpoint).kms, max_retries=2)
    async with KmsClient.open(config, StaticCredentials(Credentials(AK_ID, AK_SECRET), "test")) as kms:
        yield kms


async def test_a_batch_answers_each_name_with_its_value_or_its_own_error(
    client: KmsClient, emulator: KmsEmulator
) -> None:
    emulator.inject(Fault.server_error(), secret="app/config", action=BATCH_GET_SECRET_VALUE)
    arn = "acs:kms:cn-hangzhou:1234567890123456:secret/db/password"
    answers = await client.batch_get_secret_values(["api-key", arn, "missing", "app/config"])
    assert isinstance(answers["api-key"], SecretValue) and answers["api-key"].data == SECRETS["api-key"]
    assert isinstance(answers[arn], SecretValue) and answers[arn].data == SECRETS["db/password"]
    missing, failing = answers["missing"], answers["app/config"]
    assert isinstance(missing, KmsError) and (missing.status, missing.code) == (404, "Forbidden.ResourceNotFound")
    assert isinstance(failing, KmsError) and failing.code == "InternalFailure"
    assert not is_transient(missing) and is_transient(failing)
    assert emulator.call_count() == 1 and emulator.calls[0].action == BATCH_GET_SECRET_VALUE
    # The same body as a GetSecretValue answer: what clients receive does not depend on batching.
    assert answers["api-key"].fields == (await client.get_secret_value("api-key")).fields


@pytest.mark.parametrize(
    "fault",
    [
        Fault(status=404, code="InvalidAction.NotFound", message="Specified api is not found"),
        Fault(status=403, code="Forbidden.NoPermission", message="not allowed by the RAM policy"),
    ],
    ids=["unknown-action", "forbidden"],
)
async def test_kms_refusing_the_action_turns_batching_off_with_one_info_line(
    client: KmsClient, emulator: KmsEmulator, captured_logs: list[str], fault: Fault
) -> None:
    emulator.inject(fault, action=BATCH_GET_SECRET_VALUE)
    assert client.batching
    for _ in range(2):
        with pytest.raises(KmsError):
            await client.batch_get_secret_values(["api-key", "db/password"])
    assert not client.batching
    assert sum("batched refreshes are off" in line for line in captured_logs) == 1
    assert emulator.call_count(action=BATCH_GET_SECRET_VALUE) == 2  # no retries of a refused batch


async def test_a_whole_batch_transient_failure_is_not_retried_and_keeps_batching_on(
    client: KmsClient, emulator: KmsEmulator
) -> None:
    emulator.inject(Fault.unavailable(), action=BATCH_GET_SECRET_VALUE, times=1)
    with pytest.raises(KmsError):
        await client.batch_get_secret_values(["api-key", "db/password"])
    assert client.batching and emulator.call_count() == 1
    emulator.inject(Fault(malformed=True), action=BATCH_GET_SECRET_VALUE, times=1)
    with pytest.raises(UpstreamUnavailable):
        await client.batch_get_secret_values(["api-key", "db/password"])
    assert client.batching


async def test_a_batch_is_one_call_in_flight(emulator: KmsEmulator, autojump_clock: trio.testing.MockClock) -> None:
    config = replace(agent_config(emulator.endpoint).kms, max_concurrent_requests=1, read_timeout_ms=5000)
    emulator.inject(Fault(delay=1.0))
    async with KmsClient.open(config, StaticCredentials(Credentials(AK_ID, AK_SECRET), "test")) as kms:
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(kms.batch_get_secret_values, ["api-key", "db/password", "app/config"])
            nursery.start_soon(kms.get_secret_value, "api-key")
        assert trio.current_time() - started == pytest.approx(2.0, abs=0.05)
    assert emulator.max_in_flight == 1


# --- the cache's batched reload ----------------------------------------------------------------------


class Loads:
    """Single and batched loads of `<key>@<n>` values, slow and failing on demand."""

    def __init__(self) -> None:
        self.single: Counter[str] = Counter()
        self.batches: list[tuple[float, list[str]]] = []
        self.delay = 0.0
        self.answers: dict[str, Exception] = {}  # a key's own error in the next batches
        self.unanswered: set[str] = set()
        self.whole_failure: Exception | None = None

    def loader(self, key: str) -> Callable[[], object]:
        async def load() -> str:
            self.single[key] += 1
            await trio.sleep(self.delay)
            return f"{key}@single"

        return load

    async def load_batch(self, batch: Batch[str, str]) -> None:
        self.batches.append((trio.current_time(), list(batch.keys)))
        await trio.sleep(self.delay)
        if self.whole_failure is not None:
            raise self.whole_failure
        for key in batch.keys:
            if key in self.unanswered:
                continue
            if key in self.answers:
                batch.failed(key, self.answers[key])
            else:
                batch.loaded(key, f"{key}@batch{len(self.batches)}")


class Transient(Exception):
    pass


def make_cache(nursery: trio.Nursery, **options: object) -> SecretCache[str, str]:
    settings: dict[str, object] = {"max_entries": 100, "ttl": 100.0, "is_transient": lambda e: isinstance(e, Transient)}
    settings.update(options)
    return SecretCache(loads=nursery, **settings)  # type: ignore[arg-type]


async def fill(cache: SecretCache[str, str], loads: Loads, keys: str) -> list[tuple[str, object]]:
    for key in keys:
        await cache.get(key, loads.loader(key))
    return [(key, cache.peek(key)) for key in keys]


async def test_each_answer_lands_and_unanswered_keys_are_loaded_alone(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    cache, loads = make_cache(nursery), Loads()
    entries = await fill(cache, loads, "abcd")
    loads.answers = {"b": Transient(), "c": KmsError(404, "Forbidden.ResourceNotFound", "gone")}
    loads.unanswered = {"d"}
    done = cache.refresh_batch(entries, loads.load_batch)  # type: ignore[arg-type]
    assert done is not None
    await done.wait()
    assert cache.peek("a").value == "a@batch1"  # type: ignore[union-attr]
    assert cache.peek("b").value == "b@single" and cache.peek("b").failures == 1  # type: ignore[union-attr]
    assert "c" not in cache  # a final error drops the entry: the cache never hides it
    assert cache.peek("d").value == "d@single" and loads.single["d"] == 2  # type: ignore[union-attr]
    assert loads.single["a"] == loads.single["b"] == 1  # the first loads only


async def test_a_whole_batch_failure_loads_every_key_alone(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    cache, loads = make_cache(nursery), Loads()
    entries = await fill(cache, loads, "abc")
    loads.whole_failure = RuntimeError("the batch call failed")
    done = cache.refresh_batch(entries, loads.load_batch)  # type: ignore[arg-type]
    assert done is not None
    await done.wait()
    assert loads.single == {"a": 2, "b": 2, "c": 2}
    assert [cache.peek(key).reloaded for key in "abc"] == [True] * 3  # type: ignore[union-attr]


async def test_refreshes_wait_for_a_kms_slot_ahead_of_misses_a_batch_and_its_fallback_too(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The rank `queued()` yields is the call's place in the KMS client's queue (kmsagent.slots)."""
    cache, ranks = make_cache(nursery), list[int]()

    async def load() -> str:
        with queued() as rank:
            ranks.append(rank)
        return "value"

    async def load_batch(batch: Batch[str, str]) -> None:
        with queued() as rank:
            ranks.append(rank)
        raise RuntimeError("the batch call failed")  # its keys are then loaded alone

    await cache.get("a", load)
    await cache.get("b", load)
    entries = [(key, cache.peek(key)) for key in "ab"]
    refreshed = cache.refresh(*entries[0])  # type: ignore[arg-type]
    assert refreshed is not None
    await refreshed.wait()
    batched = cache.refresh_batch(entries[1:], load_batch)  # type: ignore[arg-type]
    assert batched is not None
    await batched.wait()
    assert ranks == [ORDINARY, ORDINARY, URGENT, URGENT, URGENT]  # misses, refresh, batch, its fallback


async def test_a_batch_keeps_single_flights(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    cache, loads = make_cache(nursery), Loads()
    entries = await fill(cache, loads, "abc")
    loads.delay = 5.0
    nursery.start_soon(partial(cache.get, "a", loads.loader("a"), refresh=True))  # a reader's refreshNow
    await trio.testing.wait_all_tasks_blocked()
    done = cache.refresh_batch(entries, loads.load_batch)  # type: ignore[arg-type]
    assert done is not None
    await trio.testing.wait_all_tasks_blocked()
    assert loads.batches[0][1] == ["b", "c"]  # "a" is loading already: that load is its refresh
    value, outcome = await cache.get("b", loads.loader("b"), refresh=True)  # joins the batch's flight
    assert (value, outcome) == ("b@batch1", Outcome.MISS)
    await done.wait()
    assert loads.single == {"a": 2, "b": 1, "c": 1}


# --- the refresher's grouping --------------------------------------------------------------------------


async def test_batching_never_makes_a_refresh_later_than_alone_nor_past_expiry(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ten entries loaded one second apart fall due one second apart; batches gather the ones
    due in the next 5 s, so each refresh happens at or before its own refresh point."""
    monkeypatch.setattr(refresher_module, "FIRST_REFRESH", (0.5, 0.5))
    cache, loads = make_cache(nursery), Loads()
    refresher = Refresher(cache, max_in_flight=8, batch_group=lambda key: "agent", load_batch=loads.load_batch)
    nursery.start_soon(refresher.run)
    due: dict[str, float] = {}
    for key in "abcdefghij":
        await cache.get(key, loads.loader(key))
        cache.mark_read(key)
        entry = cache.peek(key)
        assert entry is not None
        due[key] = entry.loaded_at + 50.0
        await trio.sleep(1.0)
    expiry = {key: at + 50.0 for key, at in due.items()}
    await trio.sleep(80)
    refreshed = {key: at for at, keys in loads.batches for key in keys}
    assert set(refreshed) == set(due) and loads.single == Counter("abcdefghij")  # every one, batched
    assert all(refreshed[key] <= due[key] < expiry[key] for key in due)
    assert len(loads.batches) == 2  # 10 refreshes, 2 calls: [a..f] at a's point, [g..j] at g's


async def test_only_the_same_group_is_batched_and_unread_entries_are_not_refreshed(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(refresher_module, "FIRST_REFRESH", (0.5, 0.5))
    cache, loads = make_cache(nursery), Loads()
    groups = {"a": "role-1", "b": "role-1", "c": "role-2", "d": None, "e": "role-1"}
    refresher = Refresher(cache, max_in_flight=8, batch_group=groups.__getitem__, load_batch=loads.load_batch)
    nursery.start_soon(refresher.run)
    await fill(cache, loads, "abcde")
    for key in "abcd":
        cache.mark_read(key)  # "e" is never read: not refreshed
    await trio.sleep(60)
    assert [keys for _, keys in loads.batches] == [["a", "b"]]
    assert loads.single == {"a": 1, "b": 1, "c": 2, "d": 2, "e": 1}
    assert refresher.batches == 1 and refresher.started == 4


# --- the agent against the emulator ---------------------------------------------------------------


HOT = [f"hot/{i:02d}" for i in range(24)]


async def read_all(agent: object, names: list[str]) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    for name in names:
        response = await agent.get(f"/v1/{name}")  # type: ignore[attr-defined]
        outcomes[response.headers.get("x-kms-agent-cache") or str(response.status_code)] += 1
    return outcomes


@pytest.fixture
def hot_secrets(emulator: KmsEmulator) -> list[str]:
    for name in HOT:
        emulator.put_secret(name, f"value-of-{name}-Wb3k")
    return HOT


async def test_hot_secrets_are_refreshed_in_batches_and_readers_never_wait(
    start_agent: StartAgent, emulator: KmsEmulator, hot_secrets: list[str], autojump_clock: trio.testing.MockClock
) -> None:
    agent = await start_agent(cache={"ttl_seconds": 60})
    assert await read_all(agent, hot_secrets) == {"miss": 24}
    emulator.rotate("hot/07", "value-of-hot/07-rotated-Lm2x")
    for _ in range(6):  # three TTL windows, every secret read every 30 s
        await trio.sleep(30)
        assert await read_all(agent, hot_secrets) == {"hit": 24}
    assert (await agent.get("/v1/hot/07")).json()["SecretData"] == "value-of-hot/07-rotated-Lm2x"
    refreshes = emulator.calls[24:]  # after the first reads
    refreshed = Counter(name for call in refreshes for name in (call.secret_names or (call.secret_name,)))
    assert set(refreshed) == set(hot_secrets) and min(refreshed.values()) >= 3
    # 24 secrets due over ≈ 21 s of each window, with a 3 s batch window: ≈ 5 calls a window
    # (a secret due alone is refreshed with GetSecretValue), not 24.
    assert sum(call.action == BATCH_GET_SECRET_VALUE for call in refreshes) >= 3 * 2
    assert len(refreshes) <= 3 * 8


async def test_per_secret_errors_in_a_batch_are_those_secrets_answers(
    start_agent: StartAgent, emulator: KmsEmulator, hot_secrets: list[str], autojump_clock: trio.testing.MockClock
) -> None:
    agent = await start_agent(cache={"ttl_seconds": 60})
    await read_all(agent, hot_secrets)
    await trio.sleep(20)
    await read_all(agent, hot_secrets)  # hot
    emulator.inject(Fault.unavailable(), action=BATCH_GET_SECRET_VALUE, secret="hot/03")
    emulator.inject(Fault.unavailable(), action=GET_SECRET_VALUE, secret="hot/03")
    emulator.delete_secret("hot/05")
    await trio.sleep(45)  # every first refresh point (30..51 s) has passed; expiry (60 s) has
    assert (await agent.get("/v1/hot/03")).headers["x-kms-agent-cache"] == "stale"
    response = await agent.get("/v1/hot/05")
    assert (response.status_code, response.json()["Code"]) == (404, "Forbidden.ResourceNotFound")
    # Its first load and this read: its batch's answer was final (no single call after it).
    assert emulator.call_count("hot/05", action=GET_SECRET_VALUE) == 2
    assert await read_all(agent, [name for name in hot_secrets if name not in ("hot/03", "hot/05")]) == {"hit": 22}


async def test_a_kms_without_the_action_gets_single_refreshes_for_the_run(
    start_agent: StartAgent,
    emulator: KmsEmulator,
    hot_secrets: list[str],
    autojump_clock: trio.testing.MockClock,
    captured_logs: list[str],
) -> None:
    emulator.batch_enabled = False
    agent = await start_agent(cache={"ttl_seconds": 60})
    await read_all(agent, hot_secrets)
    for _ in range(4):
        await trio.sleep(30)
        assert await read_all(agent, hot_secrets) == {"hit": 24}
    assert emulator.call_count(action=BATCH_GET_SECRET_VALUE) == 1  # tried once, then never again
    assert emulator.call_count(action=GET_SECRET_VALUE) >= 24 + 24 + 24
    assert sum("batched refreshes are off" in line for line in captured_logs) == 1


async def test_after_a_whole_batch_failure_the_next_due_batch_is_tried_again(
    start_agent: StartAgent, emulator: KmsEmulator, hot_secrets: list[str], autojump_clock: trio.testing.MockClock
) -> None:
    agent = await start_agent(cache={"ttl_seconds": 60})
    await read_all(agent, hot_secrets)
    emulator.inject(Fault.server_error(), action=BATCH_GET_SECRET_VALUE, times=1)
    for _ in range(4):
        await trio.sleep(30)
        assert await read_all(agent, hot_secrets) == {"hit": 24}
    failed = [
        i for i, call in enumerate(emulator.calls) if call.action == BATCH_GET_SECRET_VALUE and call.status != 200
    ]
    assert len(failed) == 1
    names = emulator.calls[failed[0]].secret_names
    # The failed batch's secrets were refreshed with single calls at once, and batched again later.
    after = emulator.calls[failed[0] + 1 : failed[0] + 1 + len(names)]
    assert sorted(call.secret_name for call in after if call.action == GET_SECRET_VALUE) == sorted(names)  # type: ignore[type-var]
    later = [call for call in emulator.calls[failed[0] + 1 :] if call.action == BATCH_GET_SECRET_VALUE]
    assert len(later) >= 2 and all(call.status == 200 for call in later)
    assert set(names) <= {name for call in later for name in call.secret_names}


async def test_without_batch_refresh_each_refresh_is_its_own_call(
    start_agent: StartAgent, emulator: KmsEmulator, hot_secrets: list[str], autojump_clock: trio.testing.MockClock
) -> None:
    agent = await start_agent(cache={"ttl_seconds": 60}, kms={"batch_refresh": False})
    await read_all(agent, hot_secrets)
    for _ in range(4):
        await trio.sleep(30)
        assert await read_all(agent, hot_secrets) == {"hit": 24}
    assert emulator.call_count(action=BATCH_GET_SECRET_VALUE) == 0
    assert emulator.call_count(action=GET_SECRET_VALUE) >= 24 + 24 + 24
