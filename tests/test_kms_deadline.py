"""RequestTimeoutMs (SPEC §5): no request waits longer for KMS — queueing behind
MaxConcurrentRequests, every try and every back-off included; then stale if allowed, else 504;
the load goes on and fills the cache for the next read.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from conftest import SECRETS, StartAgent
from kmsagent.cache import Outcome, SecretCache, WaitTimedOut, queued
from kmsagent.emulator import Fault, KmsEmulator

SLOW = Fault(delay=5.0)  # a KMS that answers, slowly (within ReadTimeoutMs below)
SLOW_KMS = {"read_timeout_ms": 10_000, "max_retries": 0}


async def test_a_slow_kms_gets_a_504_at_the_deadline_and_the_next_read_a_hit(
    start_agent: StartAgent, emulator: KmsEmulator, autojump_clock: trio.testing.MockClock
) -> None:
    agent = await start_agent(server={"request_timeout_ms": 1500}, kms=SLOW_KMS)
    emulator.inject(SLOW, times=1)
    started = trio.current_time()
    response = await agent.get("/v1/api-key")
    assert trio.current_time() - started == pytest.approx(1.5, abs=0.05)
    assert (response.status_code, response.json()["Code"]) == (504, "UpstreamTimeout")
    assert "RequestTimeoutMs (1500 ms)" in response.json()["Message"]
    await trio.sleep(6)  # the load went on (5 s)
    response = await agent.get("/v1/api-key")
    assert (response.status_code, response.headers["x-kms-agent-cache"]) == (200, "hit")
    assert response.json()["SecretData"] == SECRETS["api-key"]
    assert emulator.call_count("api-key") == 1


async def test_the_deadline_covers_queueing_behind_max_concurrent_requests(
    start_agent: StartAgent, emulator: KmsEmulator, autojump_clock: trio.testing.MockClock
) -> None:
    agent = await start_agent(server={"request_timeout_ms": 1000}, kms={**SLOW_KMS, "max_concurrent_requests": 1})
    emulator.inject(Fault(delay=0.8))
    results: dict[str, tuple[int, float]] = {}

    async def read(name: str) -> None:
        started = trio.current_time()
        response = await agent.get(f"/v1/{name}")
        results[name] = (response.status_code, trio.current_time() - started)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read, "api-key")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(read, "db/password")  # waits 0.8 s for the slot, then needs 0.8 s more
    assert results["api-key"][0] == 200
    assert results["db/password"] == (504, pytest.approx(1.0, abs=0.05))
    emulator.clear_faults()


async def test_the_deadline_covers_retries_and_back_off(
    start_agent: StartAgent, emulator: KmsEmulator, autojump_clock: trio.testing.MockClock
) -> None:
    agent = await start_agent(server={"request_timeout_ms": 1000}, kms={"max_retries": 10})
    emulator.inject(Fault.unavailable())  # 10 retries with back-off would take ≈ 60 s
    started = trio.current_time()
    response = await agent.get("/v1/api-key")
    assert (response.status_code, response.json()["Code"]) == (504, "UpstreamTimeout")
    assert trio.current_time() - started == pytest.approx(1.0, abs=0.05)
    emulator.clear_faults()


async def test_at_the_deadline_an_expired_value_is_served_stale(
    start_agent: StartAgent, emulator: KmsEmulator, autojump_clock: trio.testing.MockClock
) -> None:
    agent = await start_agent(server={"request_timeout_ms": 1000}, cache={"ttl_seconds": 10}, kms=SLOW_KMS)
    assert (await agent.get("/v1/api-key")).status_code == 200  # read once: not hot, it expires
    await trio.sleep(11)
    rotated = emulator.rotate("api-key", "value-of-api-key-rotated-Td4r")
    emulator.inject(SLOW, times=1)
    started = trio.current_time()
    response = await agent.get("/v1/api-key")
    assert trio.current_time() - started == pytest.approx(1.0, abs=0.05)
    assert (response.status_code, response.headers["x-kms-agent-cache"]) == (200, "stale")
    assert response.json()["SecretData"] == SECRETS["api-key"]
    await trio.sleep(6)
    response = await agent.get("/v1/api-key")
    assert (response.headers["x-kms-agent-cache"], response.json()["VersionId"]) == ("hit", rotated)


async def test_without_ignore_transient_errors_the_deadline_is_a_504(
    start_agent: StartAgent, emulator: KmsEmulator, autojump_clock: trio.testing.MockClock
) -> None:
    agent = await start_agent(
        server={"request_timeout_ms": 1000, "ignore_transient_errors": False}, cache={"ttl_seconds": 10}, kms=SLOW_KMS
    )
    await agent.get("/v1/api-key")
    await trio.sleep(11)
    emulator.inject(SLOW, times=1)
    assert (await agent.get("/v1/api-key")).status_code == 504


async def test_a_reader_that_leaves_at_its_deadline_leaves_a_queued_load_going(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Unlike a reader that hung up (its load leaves the queue), see cache.py's docstring."""
    cache: SecretCache[str, str] = SecretCache(max_entries=10, ttl=100.0, loads=nursery)
    loads = 0

    async def load() -> str:
        nonlocal loads
        loads += 1
        with queued():  # waits its turn for 3 s
            await trio.sleep(3)
        return "value"

    with pytest.raises(WaitTimedOut):
        await cache.get("a", load, deadline=trio.current_time() + 1)
    await trio.sleep(3)
    assert await cache.get("a", load) == ("value", Outcome.HIT) and loads == 1
