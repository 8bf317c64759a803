"""Abandoned work (issue 10, item 3): misses whose clients hung up leave the KMS queue.

The agent runs in-process against the emulator on trio's autojump clock; the clients are raw
sockets that send one request and close at once, as a crashed or impatient program does.
"""

from __future__ import annotations

import trio
import trio.testing

from conftest import SECRETS, TOKEN, StartAgent
from kmsagent.emulator import Fault, KmsEmulator

DEAD_CLIENTS = 200
KMS_SECONDS = 1.0


async def send_and_hang_up(port: int, path: str) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    request = f"GET {path} HTTP/1.1\r\nHost: localhost\r\nX-KMS-Token: {TOKEN}\r\n\r\n"
    await stream.send_all(request.encode())
    await stream.aclose()


async def test_misses_whose_clients_hung_up_do_not_delay_a_live_miss(
    start_agent: StartAgent, emulator: KmsEmulator, autojump_clock: trio.testing.MockClock
) -> None:
    agent = await start_agent(kms={"max_concurrent_requests": 8, "read_timeout_ms": 5000})
    emulator.inject(Fault(delay=KMS_SECONDS))  # each KMS call takes a second
    for i in range(DEAD_CLIENTS):
        await send_and_hang_up(agent.port, f"/v1/dead/{i:03d}")
    await trio.testing.wait_all_tasks_blocked()
    started = trio.current_time()
    response = await agent.get("/v1/api-key", timeout=120)
    waited = trio.current_time() - started
    assert response.status_code == 200 and response.json()["SecretData"] == SECRETS["api-key"]
    # Before: 200 dead loads ahead of it, 8 at a time: 25 s, and 200 KMS calls.
    assert waited <= 2.5 * KMS_SECONDS
    await trio.sleep(30)
    dead_calls = emulator.call_count() - emulator.call_count("api-key")
    assert dead_calls <= 8  # only loads that held a KMS slot before their client left
    emulator.clear_faults()
