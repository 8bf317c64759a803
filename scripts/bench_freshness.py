"""KMS calls per TTL window for 1,000 hot secrets, with and without BatchRefresh (virtual time).

The agent runs in-process against the KMS emulator on trio's autojump clock, so ten windows of a
60 s TTL take seconds of CPU, not ten minutes. 1,000 secrets are read over HTTP every 30 s each
(hot: refreshed ahead), KMS answers every call in 50 ms, MaxConcurrentRequests is 8. For each
window it prints the KMS calls (batched and single), the secrets they refreshed, the busiest
second, the most calls in flight at once (at the emulator) and the reads that waited for KMS (a
miss or stale answer, or any answer that took time). docs/fleet.md turns these per-agent figures
into an account's quota.

`--jitter off` (or `both`) runs the schedule without its random spread (every secret read first
at the same moment, refresh points at a fixed place in the window): what a fleet restarted at
once, with agents that did not spread their refreshes, would send.
"""

from __future__ import annotations

import argparse
import heapq
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial

import trio
import trio.testing
from loguru import logger

from kmsagent import refresher
from kmsagent.agent import run_agent
from kmsagent.config import CacheConfig, Config, KmsConfig, ServerConfig
from kmsagent.credentials import Credentials, StaticCredentials
from kmsagent.emulator import BATCH_GET_SECRET_VALUE, Fault, KmsEmulator
from kmsagent.token import TokenSource

HOT, TTL, WINDOWS = 1000, 60, 10
READ_EVERY = TTL / 2  # every secret read twice a window: hot, at the least CPU for the readers
KMS_SECONDS = 0.05
MAX_IN_FLIGHT = 8
CONNECTIONS = 50
TOKEN = "bench-token"


@dataclass
class Window:
    batch_calls: int = 0
    single_calls: int = 0
    refreshed: int = 0
    busiest_second: int = 0
    max_in_flight: int = 0
    reads: int = 0
    waited: int = 0


@dataclass
class Run:
    batch: bool
    jitter: bool
    windows: list[Window] = field(default_factory=lambda: [Window() for _ in range(WINDOWS)])


class Connection:
    """A keep-alive connection to the agent, opened again when the agent closed it (idle timeout)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stream: trio.SocketStream | None = None
        self.buffer = b""

    async def get(self, path: str) -> bytes:
        """The head of the answer (lower-case); the body is read and dropped."""
        while True:
            if self.stream is None:
                self.stream, self.buffer = await trio.open_tcp_stream("127.0.0.1", self.port), b""
            try:
                request = f"GET {path} HTTP/1.1\r\nHost: localhost\r\nX-KMS-Token: {TOKEN}\r\n\r\n"
                await self.stream.send_all(request.encode())
                while b"\r\n\r\n" not in self.buffer:
                    await self._fill()
                head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
                head = head.lower()
                length = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
                while len(self.buffer) < length:
                    await self._fill()
                self.buffer = self.buffer[length:]
                return head
            except (EOFError, trio.BrokenResourceError):
                await self.stream.aclose()
                self.stream = None

    async def _fill(self) -> None:
        assert self.stream is not None
        chunk = await self.stream.receive_some(65536)
        if not chunk:
            raise EOFError
        self.buffer += chunk

    async def aclose(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()


async def read_loop(port: int, names: list[str], start: float, jitter: bool, run: Run) -> None:
    """One keep-alive connection reading its share of the secrets, each every READ_EVERY seconds."""
    connection = Connection(port)
    schedule = [(start + (random.uniform(0, READ_EVERY) if jitter else 0.0), name) for name in names]
    heapq.heapify(schedule)
    end = start + WINDOWS * TTL
    try:
        while schedule[0][0] < end:
            at, name = heapq.heappop(schedule)
            await trio.sleep_until(at)
            began = trio.current_time()
            head = await connection.get(f"/v1/{name}")
            window = run.windows[min(WINDOWS - 1, int((began - start) // TTL))]
            window.reads += 1
            if b"x-kms-agent-cache: hit" not in head or trio.current_time() > began:
                window.waited += 1
            heapq.heappush(schedule, (at + READ_EVERY, name))
    finally:
        await connection.aclose()


async def one_run(batch: bool, jitter: bool) -> Run:
    run = Run(batch, jitter)
    offset = time.time() - trio.current_time()
    clock = lambda: offset + trio.current_time()  # noqa: E731 - wall time on the virtual clock
    kms = KmsEmulator(clock=clock)
    kms.add_credentials("LTAIbench", "bench-secret")
    names = [f"hot/{i:04d}" for i in range(HOT)]
    for name in names:
        kms.put_secret(name, "x" * 64)
    kms.inject(Fault(delay=KMS_SECONDS))
    async with trio.open_nursery() as nursery:
        await nursery.start(kms.serve)
        config = Config(
            server=ServerConfig(http_port=0),
            cache=CacheConfig(ttl_seconds=TTL),
            kms=KmsConfig(
                endpoint=str(kms.endpoint), protocol="http", max_concurrent_requests=MAX_IN_FLIGHT, batch_refresh=batch
            ),
        )
        stop = trio.Event()
        agent = partial(
            run_agent, config, token=TokenSource(TOKEN.encode()), shutdown=stop.wait, clock=clock,
            credentials=StaticCredentials(Credentials("LTAIbench", "bench-secret"), "bench"),
        )
        port = await nursery.start(agent)
        start = trio.current_time()

        async def sample_in_flight() -> None:
            for number, window in enumerate(run.windows):
                kms.max_in_flight = kms.in_flight
                await trio.sleep_until(start + TTL * (number + 1))
                window.max_in_flight = kms.max_in_flight

        async with trio.open_nursery() as readers:
            readers.start_soon(sample_in_flight)
            for i in range(CONNECTIONS):
                readers.start_soon(read_loop, port, names[i::CONNECTIONS], start, jitter, run)
        stop.set()
        nursery.cancel_scope.cancel()
    seconds: Counter[int] = Counter()
    for call in kms.calls:
        at = call.at - offset - start
        window = run.windows[min(WINDOWS - 1, int(at // TTL))]
        seconds[int(at)] += 1
        if call.action == BATCH_GET_SECRET_VALUE:
            window.batch_calls += 1
            window.refreshed += len(call.secret_names)
        else:
            window.single_calls += 1
            window.refreshed += 1
    for second, calls in seconds.items():
        window = run.windows[min(WINDOWS - 1, second // TTL)]
        window.busiest_second = max(window.busiest_second, calls)
    return run


def report(run: Run) -> None:
    print(
        f"\nBatchRefresh {'on' if run.batch else 'off'}, jitter {'on' if run.jitter else 'off'}: {HOT} hot secrets "
        f"read every {READ_EVERY:.0f}s, TtlSeconds {TTL}, KMS answering in {KMS_SECONDS * 1000:.0f} ms, "
        f"MaxConcurrentRequests {MAX_IN_FLIGHT}"
    )
    print("window  KMS calls (batch + single)  secrets loaded  busiest second  max in flight  reads  waited")
    for number, w in enumerate(run.windows):
        calls = f"{w.batch_calls + w.single_calls} ({w.batch_calls} + {w.single_calls})"
        print(
            f"{number:>6}  {calls:>26}  {w.refreshed:>14}  {w.busiest_second:>14}  {w.max_in_flight:>13}  "
            f"{w.reads:>5}  {w.waited:>6}"
        )
    later = run.windows[1:]
    calls = [w.batch_calls + w.single_calls for w in later]
    print(
        f"windows 1-{WINDOWS - 1}: KMS calls per window max {max(calls)}, mean {sum(calls) / len(calls):.1f} "
        f"({sum(calls) / len(calls) / TTL:.2f}/s); busiest second {max(w.busiest_second for w in later)}; "
        f"max in flight {max(w.max_in_flight for w in run.windows)} (of {MAX_IN_FLIGHT}); "
        f"reads that waited {sum(w.waited for w in later)} of {sum(w.reads for w in later)}"
    )


async def main(jitters: list[bool]) -> None:
    spread = (refresher.FIRST_REFRESH, refresher.LATER_REFRESH_LEAD)
    for jitter in jitters:
        # Without jitter: refresh points at one fixed place of the window.
        refresher.FIRST_REFRESH, refresher.LATER_REFRESH_LEAD = spread if jitter else ((0.85, 0.85), (0.02, 0.02))
        for batch in (True, False):
            report(await one_run(batch, jitter))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--jitter", choices=("on", "off", "both"), default="on", help="off: what a synchronised fleet would send"
    )
    parser.add_argument("--secrets", type=int, default=HOT, help=f"hot secrets (default {HOT})")
    arguments = parser.parse_args()
    HOT = arguments.secrets
    random.seed(15)
    logger.remove()
    logger.add(sys.stderr, level="WARNING")  # a debug line per read would cost more than the agent
    jitters = {"on": [True], "off": [False], "both": [True, False]}[arguments.jitter]
    trio.run(main, jitters, clock=trio.testing.MockClock(autojump_threshold=0))
