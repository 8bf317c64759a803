"""NotFoundTtlSeconds (SPEC §5): `Forbidden.ResourceNotFound` is remembered per key, so a program
looping on a missing or misspelled secret costs KMS one call per NotFoundTtlSeconds;
`refreshNow=true` asks KMS anyway.
"""

from __future__ import annotations

import trio
import trio.testing

from conftest import StartAgent
from kmsagent.emulator import Fault, KmsEmulator

MISSING = "/v1/no/such-secret"


async def test_a_missing_secret_costs_one_call_per_not_found_ttl(
    start_agent: StartAgent, emulator: KmsEmulator, autojump_clock: trio.testing.MockClock
) -> None:
    agent = await start_agent(cache={"not_found_ttl_seconds": 5})
    first = await agent.get(MISSING)
    assert (first.status_code, first.json()["Code"]) == (404, "Forbidden.ResourceNotFound")
    for _ in range(50):  # a program in a loop, 0.09 s apart: 4.5 s
        again = await agent.get(MISSING)
        assert (again.status_code, again.json()) == (404, first.json())
        await trio.sleep(0.09)
    assert emulator.call_count("no/such-secret") == 1
    await trio.sleep(0.6)  # 5 s after KMS's answer: asked again
    assert (await agent.get(MISSING)).status_code == 404
    assert emulator.call_count("no/such-secret") == 2
    # Per key: another version of the same name is another question.
    assert (await agent.get(MISSING + "?versionStage=ACSPrevious")).status_code == 404
    assert emulator.call_count("no/such-secret") == 3


async def test_refresh_now_asks_kms_anyway_and_finds_a_secret_created_meanwhile(
    start_agent: StartAgent, emulator: KmsEmulator, autojump_clock: trio.testing.MockClock
) -> None:
    agent = await start_agent(cache={"not_found_ttl_seconds": 300})
    assert (await agent.get(MISSING)).status_code == 404
    assert (await agent.get(MISSING + "?refreshNow=true")).status_code == 404
    assert emulator.call_count("no/such-secret") == 2
    emulator.put_secret("no/such-secret", "value-of-new-secret-Pn6v")
    assert (await agent.get(MISSING)).status_code == 404  # still remembered
    response = await agent.get(MISSING + "?refreshNow=true")
    assert (response.status_code, response.json()["SecretData"]) == (200, "value-of-new-secret-Pn6v")
    response = await agent.get(MISSING)
    assert (response.status_code, response.headers["x-kms-agent-cache"]) == (200, "hit")
    assert emulator.call_count("no/such-secret") == 3


async def test_zero_remembers_nothing_and_other_errors_are_never_remembered(
    start_agent: StartAgent, emulator: KmsEmulator
) -> None:
    agent = await start_agent(cache={"not_found_ttl_seconds": 0})
    for _ in range(3):
        assert (await agent.get(MISSING)).status_code == 404
    assert emulator.call_count("no/such-secret") == 3
    other = await start_agent(cache={"not_found_ttl_seconds": 60})
    emulator.inject(Fault(status=403, code="Forbidden.NoPermission", message="no"), times=2)
    for _ in range(2):
        assert (await other.get("/v1/api-key")).status_code == 403
    assert (await other.get("/v1/api-key")).status_code == 200
    assert emulator.call_count("api-key") == 3
