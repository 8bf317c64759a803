"""The trio-native KMS client against the emulator: signing, retries, back-off, bounds, cancellation."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
import trio
import trio.testing

from conftest import AK_ID, AK_SECRET, SECRETS, agent_config
from kmsagent.credentials import Credentials, StaticCredentials
from kmsagent.emulator import Fault, KmsEmulator
from kmsagent.errors import KmsError, UpstreamTimeout, UpstreamUnavailable, is_transient
from kmsagent.kms import MAX_ANSWER_BYTES, KmsClient
from kmsagent.kms.client import _backoff
from kmsagent.slots import ORDINARY, URGENT, Slots


@pytest.fixture
async def client(emulator: KmsEmulator) -> AsyncIterator[KmsClient]:
    config = replace(agent_config(emulator.endpoint).kms, max_retries=2, read_timeout_ms=1000)
    async with KmsClient.open(config, StaticCredentials(Credentials(AK_ID, AK_SECRET), "test")) as kms:
        yield kms


async def test_sts_credentials_are_signed_and_accepted(emulator: KmsEmulator) -> None:
    emulator.add_credentials("STS.testKey", "sts-secret-Lq7", security_token="sts-token-Vx2")
    config = agent_config(emulator.endpoint).kms
    source = StaticCredentials(Credentials("STS.testKey", "sts-secret-Lq7", "sts-token-Vx2"), "test")
    async with KmsClient.open(config, source) as kms:
        secret = await kms.get_secret_value("api-key")
    assert secret.data == SECRETS["api-key"] and emulator.calls[-1].access_key_id == "STS.testKey"


async def test_a_wrong_secret_key_is_a_signature_error_not_retried(emulator: KmsEmulator) -> None:
    config = replace(agent_config(emulator.endpoint).kms, max_retries=3)
    async with KmsClient.open(config, StaticCredentials(Credentials(AK_ID, "not-the-secret"), "test")) as kms:
        with pytest.raises(KmsError) as caught:
            await kms.get_secret_value("api-key")
    assert (caught.value.status, caught.value.code) == (400, "SignatureDoesNotMatch")
    assert emulator.call_count() == 1


async def test_retries_then_succeeds(
    client: KmsClient, emulator: KmsEmulator, autojump_clock: trio.testing.MockClock
) -> None:
    emulator.inject(Fault.server_error(), times=2)
    assert (await client.get_secret_value("api-key")).data == SECRETS["api-key"]
    assert emulator.call_count("api-key") == 3


async def test_retry_after_is_honoured(
    client: KmsClient, emulator: KmsEmulator, autojump_clock: trio.testing.MockClock
) -> None:
    emulator.inject(Fault.throttling(retry_after_ms=4000), times=1)
    started = trio.current_time()
    await client.get_secret_value("api-key")
    assert trio.current_time() - started >= 4.0
    assert emulator.call_count("api-key") == 2


async def test_throttling_after_all_retries_is_kms_429(
    client: KmsClient, emulator: KmsEmulator, autojump_clock: trio.testing.MockClock
) -> None:
    emulator.inject(Fault.throttling())
    with pytest.raises(KmsError) as caught:
        await client.get_secret_value("api-key")
    assert (caught.value.status, caught.value.code, caught.value.is_transient) == (429, "Rejected.Throttling", True)
    assert emulator.call_count("api-key") == 3


@pytest.mark.parametrize("status", [301, 302, 307])
async def test_a_redirect_is_a_transient_502_not_passed_on(
    client: KmsClient, emulator: KmsEmulator, autojump_clock: trio.testing.MockClock, status: int
) -> None:
    """SPEC §5: HTTP 3xx is transient (retried, served stale); the client sees 502, never a 3xx."""
    emulator.inject(Fault(status=status))
    with pytest.raises(UpstreamUnavailable) as caught:
        await client.get_secret_value("api-key")
    assert (caught.value.status, caught.value.code) == (502, "UpstreamUnavailable")
    assert is_transient(caught.value) and str(status) in caught.value.message
    assert emulator.call_count("api-key") == 3  # retried like a 5xx
    emulator.clear_faults()
    emulator.inject(Fault(status=302), times=1)
    assert (await client.get_secret_value("api-key")).data == SECRETS["api-key"]


async def test_a_call_leaves_no_reference_cycle_holding_the_answer(client: KmsClient) -> None:
    """httpx tied a response and its stream in a cycle; with the agent's sparse garbage
    collection (cli.py) those cycles, and the secrets in them, piled up for minutes. Nothing
    of a call may wait for the collector: no response, request or body of the HTTP client."""
    await client.get_secret_value("api-key")
    gc.collect()
    gc.disable()
    try:
        for _ in range(10):
            await client.get_secret_value("api-key")
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        responses = [item for item in gc.garbage if holds_answer(item)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert responses == []


async def test_an_answer_larger_than_kms_sends_is_refused_not_buffered(
    client: KmsClient, emulator: KmsEmulator, autojump_clock: trio.testing.MockClock
) -> None:
    emulator.put_secret("huge", "h" * MAX_ANSWER_BYTES)
    with pytest.raises(UpstreamUnavailable) as caught:
        await client.get_secret_value("huge")
    assert "more than" in caught.value.message and is_transient(caught.value)


def holds_answer(item: object) -> bool:
    """An object of the HTTP client's, or the answer's text."""
    if type(item).__module__.startswith(("httpx", "httpcore")):
        return True
    return isinstance(item, (bytes, bytearray, str)) and "SecretData" in str(item)


def test_backoff_grows_exponentially_with_jitter_and_honours_retry_after() -> None:
    for attempt in range(4):
        step = 0.2 * 2**attempt
        delays = [_backoff(attempt, None) for _ in range(200)]
        assert all(step / 2 <= delay <= step for delay in delays)  # type: ignore[operator]
        assert len(set(delays)) > 1
    assert _backoff(0, 2.5) == 2.5
    assert _backoff(0, 60.0) is None  # longer than MAX_RETRY_WAIT: give the error back instead


async def test_timeouts_after_retries_are_upstream_timeout(
    client: KmsClient, emulator: KmsEmulator, autojump_clock: trio.testing.MockClock
) -> None:
    emulator.inject(Fault(delay=30))
    with pytest.raises(UpstreamTimeout):
        await client.get_secret_value("api-key")
    assert emulator.call_count("api-key") == 3


async def test_a_call_is_cancellable(
    client: KmsClient, emulator: KmsEmulator, autojump_clock: trio.testing.MockClock
) -> None:
    emulator.inject(Fault(delay=2.0))
    started = trio.current_time()
    with trio.move_on_after(0.3):
        await client.get_secret_value("api-key")
    assert trio.current_time() - started == pytest.approx(0.3)


async def test_calls_in_flight_are_bounded(emulator: KmsEmulator, autojump_clock: trio.testing.MockClock) -> None:
    config = replace(agent_config(emulator.endpoint).kms, max_concurrent_requests=2, read_timeout_ms=5000)
    emulator.inject(Fault(delay=1.0))
    async with KmsClient.open(config, StaticCredentials(Credentials(AK_ID, AK_SECRET), "test")) as kms:
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(kms.get_secret_value, "api-key")
        # Six one-second calls, two at a time: three rounds.
        assert trio.current_time() - started == pytest.approx(3.0, abs=0.1)


async def test_a_freed_slot_goes_to_the_lowest_rank_then_to_the_first_come() -> None:
    slots = Slots(1)
    await slots.acquire()
    order: list[str] = []

    async def take(name: str, rank: int) -> None:
        await slots.acquire(rank)
        order.append(name)
        slots.release()

    async with trio.open_nursery() as nursery:
        for name, rank in [("miss 1", ORDINARY), ("miss 2", ORDINARY), ("refresh", URGENT)]:
            nursery.start_soon(take, name, rank)
            await trio.testing.wait_all_tasks_blocked()
        assert slots.waiting == 3
        slots.release()
    assert order == ["refresh", "miss 1", "miss 2"] and slots.held == 0


async def test_waiters_that_leave_while_every_slot_is_held_are_swept_out() -> None:
    """Misses whose clients hang up while KMS hangs leave the queue; 1000 of them, with the one
    slot held throughout, must not leave 1000 entries behind (nothing is released to pop them)."""
    slots = Slots(1)
    await slots.acquire()
    staying = trio.CancelScope()

    async def wait(scope: trio.CancelScope) -> None:
        with scope:
            await slots.acquire()
            slots.release()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait, staying)
        for _ in range(1000):
            leaving = trio.CancelScope()
            nursery.start_soon(wait, leaving)
            await trio.testing.wait_all_tasks_blocked()
            leaving.cancel()
            await trio.testing.wait_all_tasks_blocked()
        assert slots.waiting == 1 and len(slots._waiting) <= 2
        slots.release()  # to the one that stayed
    assert slots.held == 0 and slots.waiting == 0


async def test_a_waiter_cancelled_before_or_as_it_gets_a_slot_holds_none_and_loses_none() -> None:
    slots = Slots(1)
    await slots.acquire()
    got: list[str] = []

    async def take(name: str, scope: trio.CancelScope) -> None:
        with scope:
            await slots.acquire()
            got.append(name)
            slots.release()

    gone, handed, last = trio.CancelScope(), trio.CancelScope(), trio.CancelScope()
    with trio.fail_after(5):  # a lost slot would leave "last" waiting for ever
        async with trio.open_nursery() as nursery:
            for name, scope in [("gone", gone), ("handed", handed), ("last", last)]:
                nursery.start_soon(take, name, scope)
                await trio.testing.wait_all_tasks_blocked()
            gone.cancel()  # stops waiting before any slot is free
            await trio.testing.wait_all_tasks_blocked()
            handed.cancel()  # cancelled, but it has not run since...
            slots.release()  # ...so the slot is handed to it, and it passes the slot on to "last"
    assert got == ["last"] and slots.held == 0 and slots.waiting == 0
    await slots.acquire()  # free at once
    assert slots.held == 1
