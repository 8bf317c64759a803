"""Faults combined, recovery without a restart, and one sweep of every output for secret material.

The agent runs on ECS RAM-role credentials (renewed every few seconds) against the KMS emulator
on trio's autojump clock, through hot reads and cold misses while KMS and the metadata service
fail alone and together. Every log line, response body and header, metrics scrape and error
message is collected, then searched for every secret value, AccessKeySecret, security token and
the SSRF token the run used.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest
import trio
import trio.testing

from conftest import AK_SECRET, SECRETS, TOKEN, StartAgent
from kmsagent.config import CredentialsConfig
from kmsagent.credentials.ecs_role import EcsRamRoleCredentials
from kmsagent.emulator import Fault, KmsEmulator, MetadataEmulator


@pytest.fixture
async def wall_clock(autojump_clock: trio.testing.MockClock) -> Callable[[], float]:
    offset = time.time() - trio.current_time()
    return lambda: offset + trio.current_time()


async def test_combined_faults_recover_and_no_output_carries_secret_material(
    start_agent: StartAgent,
    emulator: KmsEmulator,
    nursery: trio.Nursery,
    wall_clock: Callable[[], float],
    autojump_clock: trio.testing.MockClock,
    captured_logs: list[str],
) -> None:
    metadata = MetadataEmulator(emulator, lifetime=20, clock=wall_clock)
    await nursery.start(metadata.serve)
    credentials = EcsRamRoleCredentials(
        CredentialsConfig(metadata_endpoint=str(metadata.endpoint), renew_before_seconds=15), clock=wall_clock
    )
    agent = await start_agent(credentials=credentials, cache={"ttl_seconds": 10}, kms={"max_retries": 1})
    outputs: list[str] = []
    statuses: dict[str, list[int]] = {}

    async def read_all(phase: str, token: str = TOKEN) -> None:
        for name in (*SECRETS, "missing", f"cold-{phase}"):
            try:
                response = await agent.get(f"/v1/{name}", token=token)
            except httpx.HTTPError as error:  # never expected; its text is swept too
                outputs.append(repr(error))
                continue
            if not (response.status_code == 200 and name in SECRETS):  # a secret's own body holds it
                outputs.append(response.text)
            outputs.append(repr(dict(response.headers)))
            statuses.setdefault(phase, []).append(response.status_code)
        outputs.append((await agent.get("/metrics", token=None)).text)

    async def phase(name: str, seconds: float) -> None:
        started = trio.current_time()
        while trio.current_time() - started < seconds:
            await read_all(name)
            await trio.sleep(1)

    await phase("healthy", 5)
    emulator.inject(Fault.unavailable())
    await phase("kms-down", 8)
    metadata.outage = True
    await phase("both-down", 25)  # credentials expire meanwhile
    emulator.clear_faults()
    await phase("kms-back", 5)
    metadata.outage = False
    emulator.inject(Fault(drop=True), times=3)
    await phase("recovering", 40)  # metadata back-off can take up to 30 s
    await read_all("bad-token", token="not-the-token-Yx7")

    assert set(statuses["healthy"]) == {200, 404}
    assert 200 in statuses["kms-down"]  # hot secrets keep being served (fresh, then stale)
    assert {502} <= set(statuses["both-down"])  # cold secrets cannot be, nor anything once keys expire
    assert statuses["recovering"][-len(SECRETS) - 2 :] == [200] * len(SECRETS) + [404, 404]  # no restart
    assert set(statuses["bad-token"]) == {403}
    assert len(metadata.issued) >= 3
    swept = "\n".join([*captured_logs, *outputs])
    assert "renewed" in swept and "UpstreamUnavailable" in swept and "stale" in swept
    material = [AK_SECRET, TOKEN, *SECRETS.values()]
    for issued in metadata.issued:
        material += [issued.access_key_secret, issued.security_token]
    assert [value for value in material if value in swept] == []
