"""KMS calls per TTL window for 100 hot and 900 cold secrets over 10 windows (virtual time).

The agent runs in-process against the KMS emulator on trio's autojump clock, so ten windows of a
60 s TTL take seconds. Hot secrets are read every tenth of the TTL; each cold secret is read once,
at a random moment. The bound per window is: hot secrets (one refresh each) + misses (first reads).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import replace
from functools import partial

import httpx
import trio
import trio.testing

from kmsagent.agent import run_agent
from kmsagent.config import CacheConfig, Config, KmsConfig, ServerConfig
from kmsagent.credentials import Credentials, StaticCredentials
from kmsagent.emulator import KmsEmulator
from kmsagent.token import TokenSource

TTL, WINDOWS, HOT, COLD = 60.0, 10, 100, 900


async def main() -> None:
    offset = time.time() - trio.current_time()
    clock = lambda: offset + trio.current_time()  # noqa: E731 - wall time on the virtual clock
    kms = KmsEmulator(clock=clock)
    kms.add_credentials("LTAIbench", "bench-secret")
    names = [f"s{i:04d}" for i in range(HOT + COLD)]
    for name in names:
        kms.put_secret(name, "x" * 64)
    async with trio.open_nursery() as nursery:
        await nursery.start(kms.serve)
        config = Config(
            server=ServerConfig(http_port=0),
            cache=CacheConfig(ttl_seconds=int(TTL)),
            kms=replace(KmsConfig(), endpoint=kms.endpoint, protocol="http"),
        )
        stop = trio.Event()
        agent = partial(
            run_agent, config, token=TokenSource(b"bench"), shutdown=stop.wait, clock=clock,
            credentials=StaticCredentials(Credentials("LTAIbench", "bench-secret"), "bench"),
        )
        port = await nursery.start(agent)
        start = trio.current_time()
        misses: Counter[int] = Counter()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers={"X-KMS-Token": "bench"}) as client:

            async def read(name: str) -> None:
                response = await client.get(f"/v1/{name}")
                if response.headers.get("x-kms-agent-cache") == "miss":
                    misses[int((trio.current_time() - start) // TTL)] += 1

            async def hot_reader(name: str) -> None:
                await trio.sleep(random.uniform(0, TTL / 10))
                while trio.current_time() - start < WINDOWS * TTL:
                    await read(name)
                    await trio.sleep(TTL / 10)

            async def cold_reader(name: str) -> None:
                await trio.sleep(random.uniform(0, WINDOWS * TTL))
                await read(name)

            async with trio.open_nursery() as readers:
                for name in names[:HOT]:
                    readers.start_soon(hot_reader, name)
                for name in names[HOT:]:
                    readers.start_soon(cold_reader, name)
        stop.set()
        nursery.cancel_scope.cancel()
    calls = Counter(int((call.at - offset - start) // TTL) for call in kms.calls)
    print(f"{HOT} hot secrets (read every {TTL / 10:.0f}s) + {COLD} cold (read once), TTL {TTL:.0f}s, {WINDOWS} windows")
    print("window  KMS calls  misses  bound (hot + misses)")
    for window in range(WINDOWS):
        bound = HOT + misses[window]
        print(f"{window:>6}  {calls[window]:>9}  {misses[window]:>6}  {bound:>5}")
    total = sum(calls[w] for w in range(WINDOWS))
    print(f"total   {total:>9}  {sum(misses.values()):>6}  {HOT * WINDOWS + sum(misses.values()):>5}")


if __name__ == "__main__":
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
