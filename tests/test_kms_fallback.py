"""FallbackEndpoints (SPEC §5): a transient failure moves a call to the next endpoint; an endpoint
that failed is avoided for 30 s; a final 4xx never moves.

The primary and the replica are two endpoints of one emulator (the same secrets, as a KMS
instance that replicates them); faults and outages are aimed at one endpoint.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from conftest import AK_ID, AK_SECRET, SECRETS, StartAgent, agent_config
from kmsagent.credentials import Credentials, StaticCredentials
from kmsagent.emulator import Fault, KmsEmulator
from kmsagent.errors import KmsError
from kmsagent.kms import KmsClient
from kmsagent.kms.endpoints import AVOID_SECONDS

Tries = list[tuple[str, str, str]]


@pytest.fixture
async def replica(emulator: KmsEmulator, nursery: trio.Nursery) -> str:
    """A second endpoint serving the emulator's secrets."""
    await nursery.start(emulator.serve)
    return emulator.endpoints[1]


@pytest.fixture
async def tries() -> Tries:
    return []


@pytest.fixture
async def client(emulator: KmsEmulator, replica: str, tries: Tries) -> AsyncIterator[KmsClient]:
    config = replace(agent_config(emulator.endpoint).kms, fallback_endpoints=(replica,), max_retries=1)
    source = StaticCredentials(Credentials(AK_ID, AK_SECRET), "test")
    observe = lambda endpoint, action, outcome, seconds: tries.append((endpoint, action, outcome))  # noqa: E731
    async with KmsClient.open(config, source, observe=observe) as kms:
        yield kms


async def test_a_primary_that_refuses_connections_is_avoided_for_30s_then_tried_first_again(
    client: KmsClient, emulator: KmsEmulator, replica: str, tries: Tries, autojump_clock: trio.testing.MockClock
) -> None:
    primary = emulator.endpoint
    assert primary is not None
    await emulator.take_down(primary)
    secret = await client.get_secret_value("api-key")
    assert secret.data == SECRETS["api-key"]
    assert [(endpoint, outcome) for endpoint, _, outcome in tries] == [(primary, "unreachable"), (replica, "success")]
    failed_at = trio.current_time()
    await emulator.bring_up(primary)
    await trio.sleep_until(failed_at + AVOID_SECONDS - 1)
    tries.clear()
    await client.get_secret_value("api-key")
    assert tries == [(replica, "GetSecretValue", "success")]  # still avoided: not even tried
    await trio.sleep_until(failed_at + AVOID_SECONDS + 0.1)
    tries.clear()
    await client.get_secret_value("api-key")
    assert tries == [(primary, "GetSecretValue", "success")]  # back to the primary


@pytest.mark.parametrize(
    ("fault", "outcome"),
    [
        (Fault(delay=30), "timeout"),
        (Fault.server_error(), "server_error"),
        (Fault.unavailable(), "server_error"),
        (Fault.throttling(), "throttled"),
        (Fault(drop=True), "unreachable"),
        (Fault(status=302), "unreachable"),
        (Fault(malformed=True), "unreachable"),
    ],
    ids=["timeout", "500", "503", "throttling", "reset", "redirect", "malformed"],
)
async def test_a_transient_failure_of_the_primary_moves_the_call_to_the_replica_at_once(
    client: KmsClient,
    emulator: KmsEmulator,
    replica: str,
    tries: Tries,
    autojump_clock: trio.testing.MockClock,
    fault: Fault,
    outcome: str,
) -> None:
    primary = emulator.endpoint
    emulator.inject(fault, endpoint=primary)
    started = trio.current_time()
    assert (await client.get_secret_value("api-key")).data == SECRETS["api-key"]
    assert [(endpoint, result) for endpoint, _, result in tries] == [(primary, outcome), (replica, "success")]
    # No back-off before the replica: only the failed try's own time (a timeout's 1.5 s).
    assert trio.current_time() - started <= (1.5 if outcome == "timeout" else 0.01)
    assert client.endpoints.avoided(primary)


@pytest.mark.parametrize(
    "fault",
    [
        Fault(status=404, code="Forbidden.ResourceNotFound", message="The resource not exists."),
        Fault(status=403, code="Forbidden.NoPermission", message="no permission"),
        Fault(status=400, code="InvalidParameter", message="bad"),
    ],
    ids=["not-found", "no-permission", "bad-parameter"],
)
async def test_a_final_4xx_from_the_primary_never_moves(
    client: KmsClient, emulator: KmsEmulator, replica: str, tries: Tries, fault: Fault
) -> None:
    emulator.inject(fault, endpoint=emulator.endpoint, times=1)
    with pytest.raises(KmsError) as caught:
        await client.get_secret_value("api-key")
    assert (caught.value.status, caught.value.code) == (fault.status, fault.code)
    assert emulator.call_count(endpoint=replica) == 0 and len(tries) == 1
    assert not client.endpoints.avoided(emulator.endpoint)  # it answered: the answer is the secret's


async def test_when_every_endpoint_fails_the_retries_go_round_them_with_back_off(
    client: KmsClient, emulator: KmsEmulator, replica: str, tries: Tries, autojump_clock: trio.testing.MockClock
) -> None:
    emulator.inject(Fault.unavailable())
    with pytest.raises(KmsError) as caught:
        await client.get_secret_value("api-key")
    assert caught.value.code == "ServiceUnavailableTemporary"
    # One try per endpoint, then MaxRetries (1) more, on the endpoint that failed longest ago.
    assert [endpoint for endpoint, _, _ in tries] == [emulator.endpoint, replica, emulator.endpoint]


async def test_the_agent_serves_from_the_replica_while_the_primary_is_down_and_counts_calls_per_endpoint(
    start_agent: StartAgent, emulator: KmsEmulator, replica: str, autojump_clock: trio.testing.MockClock
) -> None:
    agent = await start_agent(kms={"fallback_endpoints": (replica,)})
    primary = emulator.endpoint
    assert primary is not None
    await emulator.take_down(primary)
    for name in ("api-key", "db/password"):
        response = await agent.get(f"/v1/{name}")
        assert (response.status_code, response.json()["SecretData"]) == (200, SECRETS[name])
    await emulator.bring_up(primary)
    await trio.sleep(AVOID_SECONDS + 1)
    assert (await agent.get("/v1/app/config")).status_code == 200
    metrics = (await agent.get("/metrics", token=None)).text
    calls = {
        (sample.labels["endpoint"], sample.labels["outcome"]): sample.value
        for family in text_string_to_metric_families(metrics)
        if family.name == "kmsagent_kms_calls"
        for sample in family.samples
        if sample.name == "kmsagent_kms_calls_total"
    }
    assert calls == {(primary, "unreachable"): 1, (replica, "success"): 2, (primary, "success"): 1}


async def test_a_4xx_on_the_primary_reaches_the_client(
    start_agent: StartAgent, emulator: KmsEmulator, replica: str
) -> None:
    agent = await start_agent(kms={"fallback_endpoints": (replica,)})
    emulator.inject(Fault(status=403, code="Forbidden.NoPermission", message="not allowed"), endpoint=emulator.endpoint)
    response = await agent.get("/v1/api-key")
    assert (response.status_code, response.json()["Code"]) == (403, "Forbidden.NoPermission")
    assert emulator.call_count(endpoint=replica) == 0
