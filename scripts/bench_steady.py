"""Steady latency of a hot secret while 1000 others refresh (issue 17), with and without that wave.

The agent runs as `python -m kmsagent` with an AccessKey in its environment (TtlSeconds = 10,
CacheSize = 1000, MaxConcurrentRequests = 8) against the KMS emulator in another process (this
script with `emulator N LATENCY`: every call answered after LATENCY seconds, 20 ms here). This
process is the clients, on trio with a minimal HTTP/1.1 client over keep-alive connections:
- the hot client asks for one secret 500 times a second, paced (each request leaves at its own
  time, on a free connection of a small pool, whatever the previous answers did), and records
  each answer's `X-KMS-Agent-Cache` and its latency from the moment the client set out to send
  it (a wait for a free connection included, so a miss that holds connections shows in the
  tail; how late the client itself set out, a measure of the machine's load, is shown apart);
- the wave client reads each of the 999 other secrets once per TTL, spread evenly over the TTL.
"With the wave" prefetches all 1000 secrets and runs both clients; "without" prefetches only the
hot secret and runs the hot client alone. Runs alternate (without, with, …), `RUNS` of each
(BENCH_RUNS=N, default 3), each `SECONDS` long (BENCH_SECONDS, default 30); the table shows the
median of the runs per cell (the misses: every run's), the KMS calls the agent made during the
measured seconds (its `kmsagent_kms_calls` counters), and the load average, which on a shared
2-core machine moves the tails more than anything the agent does.

`.venv/bin/python scripts/bench_steady.py` (or `scripts/bench steady`) prints a Markdown table.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import bench_footprint as footprint
import trio
from bench_footprint import load, serve_kms

TTL = 10
SLOTS = 8
LATENCY = 0.02
HOT_RATE = 500
OTHERS = 999  # with the hot secret, CacheSize's 1000
SECONDS = float(os.environ.get("BENCH_SECONDS", "30"))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
#: BENCH_BATCH_REFRESH=false: every refresh is its own GetSecretValue call (the agent's default: true).
BATCH_REFRESH = os.environ.get("BENCH_BATCH_REFRESH", "true").lower() != "false"
#: Keep-alive connections the hot client may open: a slow answer holds one, the next request
#: leaves on another (pacing, not a closed loop).
HOT_CONNECTIONS = 16
WAVE_CONNECTIONS = 8
TOKEN = "bench-steady-token-0123456789abcd"
ROUTE = "/secretsmanager/get?secretId="
HOT = "bench/hot"
VALUE = json.dumps({"user": "app", "password": "p" * 64})
TARGET_P99_RATIO = 1.3


def wave_names() -> list[str]:
    return [f"bench/{i:04d}" for i in range(OTHERS)]


def serve_emulator(count: int, latency: float) -> None:
    """`emulator N LATENCY`: KMS with the hot secret and N others, each call answered after
    LATENCY seconds."""
    secrets = ((name, VALUE) for name in [HOT, *wave_names()[:count]])
    serve_kms(secrets, "LTAIbenchsteady", "bench-steady-secret", latency)


# --- a minimal HTTP/1.1 client: the agent's answers have a Content-Length --------------------------


class Closed(Exception):
    """The agent closed the connection."""


class Connection:
    """One keep-alive connection; `get` sends a request and reads its answer."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def get(self, path: str, token: str | None = TOKEN) -> tuple[int, dict[str, str], bytes]:
        headers = f"X-KMS-Token: {token}\r\n" if token else ""
        await self.stream.send_all(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n".encode())
        while b"\r\n\r\n" not in self.buffer:
            await self._receive()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        length = int(fields.get("content-length", "0"))
        while len(self.buffer) < length:
            await self._receive()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        if fields.get("connection", "").lower() == "close":
            await self.stream.aclose()
            raise Closed
        return status, fields, body

    async def _receive(self) -> None:
        chunk = await self.stream.receive_some(65536)
        if not chunk:
            raise Closed
        self.buffer += chunk


class Pool:
    """Keep-alive connections to the agent, opened as needed up to `limit`."""

    def __init__(self, port: int, limit: int) -> None:
        self.port = port
        self.idle: list[Connection] = []
        self.slots = trio.Semaphore(limit)
        self.reconnects = 0

    async def get(self, path: str) -> tuple[int, dict[str, str]]:
        async with self.slots:
            reused = bool(self.idle)
            connection = self.idle.pop() if reused else await Connection.open(self.port)
            try:
                try:
                    status, fields, _ = await connection.get(path)
                except Closed:
                    if not reused:
                        raise
                    # The agent closed it while it sat idle (KeepAliveTimeout): again on a new one.
                    self.reconnects += 1
                    await trio.aclose_forcefully(connection.stream)
                    connection = await Connection.open(self.port)
                    status, fields, _ = await connection.get(path)
            except BaseException:
                await trio.aclose_forcefully(connection.stream)
                raise
            self.idle.append(connection)
            return status, fields

    async def aclose(self) -> None:
        for connection in self.idle:
            await trio.aclose_forcefully(connection.stream)
        self.idle.clear()


# --- one run ----------------------------------------------------------------------------------------


@dataclass
class Run:
    wave: bool
    #: Latency (seconds) of each hot answer that was a hit.
    hits: list[float] = field(default_factory=list)
    #: (seconds into the run, latency) of each hot answer, hit or not.
    timeline: list[tuple[float, float]] = field(default_factory=list)
    hot_misses: int = 0
    hot_other: int = 0  # stale, errors, refused
    #: How late the client set out to send each hot request (its own lag, not the agent's).
    lateness: list[float] = field(default_factory=list)
    wave_misses: int = 0
    wave_reads: int = 0
    kms_calls: float = 0.0
    refreshes: float = 0.0
    load: str = ""

    def percentile(self, share: float, values: list[float] | None = None) -> float:
        """The `share` percentile of `values` (default: the hot hits' latencies)."""
        ordered = sorted(self.hits if values is None else values)
        if not ordered:
            return math.nan
        return ordered[min(len(ordered) - 1, math.ceil(share * len(ordered)) - 1)]


def lag_p99(run: Run) -> float:
    """How late the client set out to send, p99: when high, the machine was busy."""
    return run.percentile(0.99, run.lateness)


def metrics_sum(body: str, name: str) -> float:
    """The sum of every sample of counter `name` in a Prometheus text body."""
    return sum(float(value) for value in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", body, re.MULTILINE))


async def measure_run(port: int, wave: bool, seconds: float) -> Run:
    """The hot client (and with `wave` the wave client) for `seconds`; the agent at `port` is up."""
    run = Run(wave)
    hot_pool, wave_pool = Pool(port, HOT_CONNECTIONS), Pool(port, WAVE_CONNECTIONS)

    async def counters() -> tuple[float, float]:
        scrape = await Connection.open(port)  # a fresh one: an idle one closes after 5 s
        try:
            _, _, body = await scrape.get("/metrics", token=None)
        finally:
            await trio.aclose_forcefully(scrape.stream)
        text = body.decode()
        return metrics_sum(text, "kmsagent_kms_calls_total"), metrics_sum(text, "kmsagent_refreshes_total")

    async def hot(scheduled: float) -> None:
        sent = trio.current_time()
        run.lateness.append(sent - scheduled)
        try:
            status, fields = await hot_pool.get(ROUTE + HOT)
        except (Closed, OSError):
            run.hot_other += 1
            return
        took = trio.current_time() - sent
        run.timeline.append((sent - started, took))
        outcome = fields.get("x-kms-agent-cache")
        if status == 200 and outcome == "hit":
            run.hits.append(took)
        elif status == 200 and outcome == "miss":
            run.hot_misses += 1
        else:
            run.hot_other += 1

    async def wave_read(name: str) -> None:
        try:
            _, fields = await wave_pool.get(ROUTE + name)
        except (Closed, OSError):
            return
        run.wave_reads += 1
        if fields.get("x-kms-agent-cache") == "miss":
            run.wave_misses += 1

    async def wave_client(started: float) -> None:
        names = wave_names()
        async with trio.open_nursery() as reads:
            for window in range(math.ceil(seconds / TTL)):
                for i, name in enumerate(names):
                    at = started + (window + i / len(names)) * TTL
                    if at - started >= seconds:
                        return
                    await trio.sleep_until(at)
                    reads.start_soon(wave_read, name)

    calls_before, refreshes_before = await counters()
    load_before = load()
    started = trio.current_time()
    with trio.move_on_at(started + seconds + 10):  # a wedged agent ends the run, not the bench
        async with trio.open_nursery() as clients:
            if wave:
                clients.start_soon(wave_client, started)
            for tick in range(int(seconds * HOT_RATE)):
                at = started + tick / HOT_RATE
                await trio.sleep_until(at)
                clients.start_soon(hot, at)
    calls_after, refreshes_after = await counters()
    run.kms_calls, run.refreshes = calls_after - calls_before, refreshes_after - refreshes_before
    run.load = f"{load_before} → {load()}"
    for pool in (hot_pool, wave_pool):
        await pool.aclose()
    return run


class Agent(footprint.Agent):
    """One `python -m kmsagent` process with the bench's config."""

    def __init__(self, folder: Path, endpoint: str, env: dict[str, str], prefetch: list[str]) -> None:
        super().__init__(
            folder,
            endpoint,
            env,
            prefetch,
            cache=f"CacheSize = {OTHERS + 1}\nTtlSeconds = {TTL}",
            kms=f"MaxConcurrentRequests = {SLOTS}\nBatchRefresh = {str(BATCH_REFRESH).lower()}",
        )

    async def ready(self, seconds: float = 120.0) -> None:
        """Returns once /ping answers (the port opens after Prefetch)."""
        deadline = trio.current_time() + seconds
        while trio.current_time() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the agent exited with {self.process.returncode} before answering")
            try:
                connection = await Connection.open(self.port)
            except OSError:
                await trio.sleep(0.05)
                continue
            try:
                status, _, _ = await connection.get("/ping", token=None)
            finally:
                await trio.aclose_forcefully(connection.stream)
            if status == 200:
                return
        raise SystemExit(f"the agent did not answer /ping within {seconds} s")



def measure_wave(runs: int = RUNS, seconds: float = SECONDS, latency: float = LATENCY) -> list[Run]:
    """`runs` runs without and `runs` with the wave, alternating (without first), against one
    emulator process; returns them in the order they ran."""
    results: list[Run] = []
    with footprint.run_emulator(__file__, [str(OTHERS), str(latency)], TOKEN) as kms:
        for _ in range(runs):
            for wave in (False, True):
                agent = Agent(kms.folder, kms.endpoint, kms.env, [HOT, *wave_names()] if wave else [HOT])
                try:

                    async def one(agent: Agent = agent, wave: bool = wave) -> Run:
                        await agent.ready()
                        return await measure_run(agent.port, wave, seconds)

                    results.append(trio.run(one))
                finally:
                    agent.stop()
                print(f"  {'with' if wave else 'without'} the wave: {summary(results[-1])}", file=sys.stderr)
    return results


def summary(run: Run) -> str:
    return (
        f"hot misses {run.hot_misses}, hits {len(run.hits)}, p50 {run.percentile(0.5) * 1000:.2f} ms, "
        f"p99 {run.percentile(0.99) * 1000:.2f} ms, p99.9 {run.percentile(0.999) * 1000:.2f} ms, "
        f"KMS calls {run.kms_calls:.0f}, wave misses {run.wave_misses}/{run.wave_reads}, load {run.load}"
    )


def report(results: list[Run]) -> None:
    """A Markdown table: per case, medians of the runs (misses: each run's)."""
    cases = {"without the wave": [r for r in results if not r.wave], "with the wave": [r for r in results if r.wave]}

    def ms(runs: list[Run], share: float) -> str:
        return f"{statistics.median(r.percentile(share) for r in runs) * 1000:.2f} ms"

    def each(runs: list[Run], read: object) -> str:
        return ", ".join(str(read(r)) for r in runs)  # type: ignore[operator]

    print(
        f"{HOT_RATE} req/s paced on one secret over keep-alive, {SECONDS:.0f} s per run; the wave: {OTHERS} other "
        f"secrets prefetched, each read once per TTL; TtlSeconds = {TTL}, MaxConcurrentRequests = {SLOTS}, KMS "
        f"emulator at {LATENCY * 1000:.0f} ms in its own process. Median of {RUNS} alternating runs (each run's "
        f"value where several are listed); {os.cpu_count()} cores.\n"
    )
    print(f"| measure | {' | '.join(cases)} |")
    print(f"|---|{'---:|' * len(cases)}")
    rows = [
        ("hot-secret misses", lambda runs: each(runs, lambda r: r.hot_misses)),
        ("hot answers not 200 hit/miss", lambda runs: each(runs, lambda r: r.hot_other)),
        ("hot hit p50", lambda runs: ms(runs, 0.5)),
        ("hot hit p99", lambda runs: ms(runs, 0.99)),
        ("hot hit p99.9", lambda runs: ms(runs, 0.999)),
        ("hot hit p99 (ms), each run", lambda runs: each(runs, lambda r: f"{r.percentile(0.99) * 1000:.1f}")),
        ("the client's own lag p99 (ms), each run", lambda runs: each(runs, lambda r: f"{lag_p99(r) * 1000:.1f}")),
        ("wave reads (misses)", lambda runs: each(runs, lambda r: f"{r.wave_reads} ({r.wave_misses})")),
        ("KMS calls (refreshes started)", lambda runs: each(runs, lambda r: f"{r.kms_calls:.0f} ({r.refreshes:.0f})")),
        ("load average (1, 5, 15 min) before → after", lambda runs: "; ".join(r.load for r in runs)),
    ]
    for label, cell in rows:
        print(f"| {label} | {' | '.join(cell(runs) for runs in cases.values())} |")
    without, with_wave = cases["without the wave"], cases["with the wave"]
    p99 = [statistics.median(r.percentile(0.99) for r in runs) for runs in (with_wave, without)]
    ratio, misses = p99[0] / p99[1], sum(r.hot_misses for r in with_wave)
    met = "met" if misses == 0 and ratio <= TARGET_P99_RATIO else "**not met**"
    target = f"0 hot misses, hit p99 ≤ {TARGET_P99_RATIO} × without"
    print(f"\nTarget ({target}): {misses} misses, p99 ratio {ratio:.2f}: {met}.")


def main() -> None:
    report(measure_wave())


if __name__ == "__main__":
    if sys.argv[1:2] == ["emulator"]:
        serve_emulator(int(sys.argv[2]), float(sys.argv[3]))
    else:
        main()
