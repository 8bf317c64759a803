"""The agent's footprint (issue 17), side by side in one run with the libraries it is built on.

The agent runs as `python -m kmsagent` with an AccessKey in its environment against the KMS
emulator in another process (this script with `emulator N`: `python -m kmsagent.emulator` reads
at most 1 MB of secrets, and 1000 × 4 KB is 4 MB), so the RSS measured is the agent's alone:
- RSS idle with no secrets (after one /ping, then 2 s idle);
- RSS with 1000 × 4 KB secrets prefetched (Prefetch, CacheSize = 1000), each then read once;
- start to first 200 on a prefetched secret: from spawning the process to the first 200 of a
  client polling every 5 ms, the median of `STARTS`, with the agent's CPU time by then (on a
  shared machine the wall time moves with the load; the CPU time much less, the RSS not at all);
- miss CPU: the agent's CPU time (utime + stime in /proc/<pid>/stat) over `MISSES` sequential
  reads of distinct secrets, each a cache miss and one GetSecretValue call, divided by `MISSES`;
  then the same reads again, all hits: the hit CPU.
With BENCH_BASELINE=<git ref> (scripts/bench: `main`), the same for that ref's `src` in the same
run, on PYTHONPATH. Next to them, in fresh interpreters: bare Python and the libraries alone (what
any agent on this stack loads), and the floor under two targets: the design's libraries that the
agent imports before it can answer (`FLOOR_RUNS` fresh interpreters, median and fastest), and one
GetSecretValue through the agent's KMS client alone (no cache, no HTTP server; its CPU per call
over `MISSES` calls in a process of its own): a miss costs at least a hit plus that call. Prints a
Markdown section with the load average (scripts/bench appends it to docs/benchmarks.md).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STARTS = int(os.environ.get("BENCH_STARTS", "10"))
SECRETS = 1000
SECRET_4K = json.dumps({"key": "k" * 4000})[:4096]
TOKEN = "bench-footprint-token-0123456789"
ROUTE = "/secretsmanager/get?secretId="
#: The card's libraries, for reference. The agent loads httpx only for credentials fetched over
#: HTTP and never the SDK's models, so with static keys it measures below this row.
LIBRARIES = [
    "trio",
    "h11",
    "hypercorn.trio",
    "quart_trio",
    "httpx",
    "loguru",
    "prometheus_client",
    "alibabacloud_kms20160120.models",
]
#: The design's libraries (the card) that the agent imports before its first answer.
AGENT_LIBRARIES = ["trio", "hypercorn.trio", "quart_trio", "loguru", "prometheus_client"]
#: Fresh interpreters importing AGENT_LIBRARIES: their median is the floor of the start's.
FLOOR_RUNS = 10
#: Distinct secrets read once each (one keep-alive connection, one at a time) for the miss CPU.
MISSES = 600
TARGETS = {"idle": 58.0, "loaded": 65.0, "start": 0.5, "miss": 1.3}
#: A fresh interpreter's RSS (MB), wall and CPU seconds spent importing `{imports}`.
PROBE = """
import resource, time
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
wall, used = time.perf_counter(), cpu()
{imports}
wall, used = time.perf_counter() - wall, cpu() - used
rss = [line for line in open("/proc/self/status") if line.startswith("VmRSS")][0].split()[1]
print(int(rss) / 1024, wall, used)
"""


def names(count: int) -> list[str]:
    return ["bench/4k", *(f"bench/{i:04d}" for i in range(count))]


def serve_kms(secrets: Iterable[tuple[str, str]], access_key_id: str, secret: str, latency: float = 0.0) -> None:
    """The benches' `emulator` command: KMS with `secrets` (each call answered after `latency`
    seconds), until SIGTERM; prints its endpoint and AccessKey."""
    import trio

    from kmsagent.emulator import Fault, KmsEmulator

    emulator = KmsEmulator()
    for name, value in secrets:
        emulator.put_secret(name, value)
    emulator.add_credentials(access_key_id, secret)
    if latency > 0:
        emulator.inject(Fault(delay=latency))

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(emulator.serve)
                print(emulator.endpoint, access_key_id, secret, flush=True)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    trio.run(main)


def kms_call_cpu(endpoint: str, access_key_id: str, secret: str) -> None:
    """`kmscall ENDPOINT AK SECRET`: prints the CPU seconds of one GetSecretValue through the
    agent's KMS client alone, over `MISSES` calls of distinct secrets (after one to connect)."""
    import resource

    import trio

    from kmsagent.config import KmsConfig
    from kmsagent.credentials import Credentials, StaticCredentials
    from kmsagent.kms import KmsClient

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    async def main() -> None:
        config = KmsConfig(endpoint=endpoint, protocol="http")
        async with KmsClient.open(config, StaticCredentials(Credentials(access_key_id, secret), "bench")) as kms:
            await kms.get_secret_value("bench/4k")
            used = cpu()
            for name in names(MISSES)[1:]:
                await kms.get_secret_value(name)
            print((cpu() - used) / MISSES)

    trio.run(main)


def serve_emulator(count: int) -> None:
    """`emulator N`: KMS with bench/4k and N more 4 KB secrets."""
    serve_kms(((name, SECRET_4K) for name in names(count)), "LTAIbenchfootprint", "bench-footprint-secret")


@dataclass
class Emulator:
    """A bench's KMS emulator process: its endpoint and AccessKey, and the agents' environment."""

    folder: Path
    endpoint: str
    access_key_id: str
    secret: str
    env: dict[str, str]


@contextmanager
def run_emulator(script: str, args: list[str], token: str) -> Iterator[Emulator]:
    """A temporary folder, and `script emulator ARGS` (a bench's emulator command) in another
    process until the block ends. `env` is for the agents: the AccessKey, `token` in KMS_TOKEN,
    HOME in the folder, and this process's PYTHONPATH when set."""
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        process = subprocess.Popen([sys.executable, script, "emulator", *args], stdout=subprocess.PIPE, text=True)
        try:
            assert process.stdout is not None
            endpoint, access_key_id, secret = process.stdout.readline().split()
            env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "HOME": str(folder),
                "KMS_TOKEN": token,
                "ALIBABA_CLOUD_ACCESS_KEY_ID": access_key_id,
                "ALIBABA_CLOUD_ACCESS_KEY_SECRET": secret,
                **({"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}),
            }
            yield Emulator(folder, endpoint, access_key_id, secret, env)
        finally:
            process.terminate()
            process.wait(10)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def get(port: int, path: str, timeout: float = 5.0) -> int:
    return get_all(port, [path], timeout)[0]


def get_all(port: int, paths: list[str], timeout: float = 5.0) -> list[int]:
    """The statuses of GETs of `paths`, one after the other on one keep-alive connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    statuses = []
    try:
        for path in paths:
            connection.request("GET", path, headers={"X-KMS-Token": TOKEN})
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
        return statuses
    finally:
        connection.close()


class Agent:
    """One `python -m kmsagent` process with a config of its own: `cache` and `kms` are the keys of
    those sections (the footprint's by default)."""

    def __init__(
        self, folder: Path, endpoint: str, env: dict[str, str], prefetch: list[str], *, cache: str = "", kms: str = ""
    ) -> None:
        self.port = free_port()
        config = folder / f"agent-{self.port}.toml"
        config.write_text(
            f"[Server]\nHttpPort = {self.port}\n"
            f"[Cache]\n{cache or f'CacheSize = {SECRETS}'}\nPrefetch = {json.dumps(prefetch)}\n"
            f'[KMS]\nEndpoint = "{endpoint}"\nProtocol = "http"\n{kms}\n'
            f'[Credentials]\nType = "access_key"\n'
            f'[Log]\nLevel = "info"\nPath = "{folder}/logs-{self.port}"\n'
        )
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kmsagent", "--config", str(config)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def first_200(self, path: str, seconds: float = 60.0) -> tuple[float, float]:
        """Seconds from spawning to the first 200 on `path` (polling every 5 ms), and the agent's
        CPU seconds by then."""
        deadline = self.started + seconds
        while time.monotonic() < deadline:
            try:
                if get(self.port, path, timeout=seconds) == 200:
                    return time.monotonic() - self.started, cpu_seconds(self.process.pid)
            except OSError:
                if self.process.poll() is not None:
                    raise SystemExit(f"the agent exited with {self.process.returncode} before answering") from None
            time.sleep(0.005)
        raise SystemExit(f"no 200 on {path} within {seconds} s")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def interpreter(imports: list[str], pythonpath: str | None = None) -> tuple[float, float, float]:
    """RSS (MB), import wall and CPU seconds of a fresh interpreter importing `imports`: of 3 runs,
    the lowest RSS and the median times."""
    probe = PROBE.format(imports="\n".join(f"import {name}" for name in imports))
    env = {**os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {})}
    runs = [
        [
            float(value)
            for value in subprocess.run(
                [sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True
            ).stdout.split()
        ]
        for _ in range(3)
    ]
    return (
        min(run[0] for run in runs),
        statistics.median(run[1] for run in runs),
        statistics.median(run[2] for run in runs),
    )


def import_times(imports: list[str]) -> tuple[float, float]:
    """The least and the median wall time of `FLOOR_RUNS` fresh interpreters importing `imports`."""
    probe = PROBE.format(imports="\n".join(f"import {name}" for name in imports))
    runs = [
        subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
        for _ in range(FLOOR_RUNS)
    ]
    walls = [float(run[1]) for run in runs]
    return min(walls), statistics.median(walls)


@dataclass
class Footprint:
    idle: float
    loaded: float
    starts: list[tuple[float, float]]
    #: The agent's CPU seconds per miss, and per hit.
    miss: float
    hit: float
    imported: tuple[float, float, float]

    @property
    def start(self) -> float:
        return statistics.median(wall for wall, _ in self.starts)

    def start_text(self) -> str:
        walls = [wall for wall, _ in self.starts]
        cpu = statistics.median(used for _, used in self.starts)
        return f"{self.start:.2f} s ({min(walls):.2f}–{max(walls):.2f}; CPU {cpu:.2f} s)"


def measure(folder: Path, endpoint: str, env: dict[str, str]) -> Footprint:
    """The agent's three measures, and its `import kmsagent.cli`, with the code `env` finds."""
    spawn = partial(Agent, folder, endpoint, env)
    agent = spawn([])
    try:
        agent.first_200("/ping")
        time.sleep(2)
        idle = rss_mb(agent.process.pid)
    finally:
        agent.stop()
    agent = spawn(names(SECRETS)[1:])
    try:
        agent.first_200("/ping", seconds=120)
        for secret_name in names(SECRETS)[1:]:
            assert get(agent.port, ROUTE + secret_name) == 200
        time.sleep(2)
        loaded = rss_mb(agent.process.pid)
    finally:
        agent.stop()
    agent = spawn([])
    try:
        agent.first_200("/ping")
        assert get(agent.port, ROUTE + "bench/4k") == 200  # the first call's connection and imports
        before = cpu_seconds(agent.process.pid)
        statuses = get_all(agent.port, [ROUTE + name for name in names(MISSES)[1:]])
        miss = (cpu_seconds(agent.process.pid) - before) / MISSES
        assert statuses == [200] * MISSES, statuses
        before = cpu_seconds(agent.process.pid)
        statuses = get_all(agent.port, [ROUTE + name for name in names(MISSES)[1:]])
        hit = (cpu_seconds(agent.process.pid) - before) / MISSES
        assert statuses == [200] * MISSES, statuses
    finally:
        agent.stop()
    starts: list[tuple[float, float]] = []
    for _ in range(STARTS):
        agent = spawn(["bench/4k"])
        try:
            starts.append(agent.first_200(ROUTE + "bench/4k"))
        finally:
            agent.stop()
    return Footprint(idle, loaded, starts, miss, hit, interpreter(["kmsagent.cli"], env.get("PYTHONPATH")))


def baseline_source(folder: Path, ref: str) -> str | None:
    """`src` of git `ref` unpacked in `folder`, for PYTHONPATH; None when there is no such ref."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "src"], capture_output=True, check=False)
    if archive.returncode != 0:
        print(f"no baseline: git archive {ref} failed", file=sys.stderr)
        return None
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return str(folder / "src")


def main() -> None:
    load_before = load()
    rows: dict[str, Footprint] = {}
    with run_emulator(__file__, [str(SECRETS)], TOKEN) as kms:
        rows["this tree"] = measure(kms.folder, kms.endpoint, kms.env)
        kms_call = float(
            subprocess.run(
                [sys.executable, __file__, "kmscall", kms.endpoint, kms.access_key_id, kms.secret],
                capture_output=True, text=True, env=kms.env, check=True,
            ).stdout
        )
        baseline = os.environ.get("BENCH_BASELINE", "")
        source = baseline_source(kms.folder, baseline) if baseline else None
        if source:
            rows[f"`{baseline}`"] = measure(kms.folder, kms.endpoint, {**kms.env, "PYTHONPATH": source})
    bare = interpreter([])
    libraries = interpreter(LIBRARIES)
    floor = import_times(AGENT_LIBRARIES)
    report(rows, bare, libraries, load_before, load(), floor, kms_call)


def report(
    rows: dict[str, Footprint],
    bare: tuple[float, float, float],
    libraries: tuple[float, float, float],
    load_before: str,
    load_after: str,
    floor: tuple[float, float],
    kms_call: float,
) -> None:
    def met(ok: bool) -> str:
        return "yes" if ok else "**no**"

    ours = rows["this tree"]
    print(
        f'The agent process alone (`[Credentials] Type = "access_key"`), the KMS emulator in another process; '
        f"load average {load_before} before, {load_after} after ({os.cpu_count()} cores). "
        f"Start: median of {STARTS} (min–max; the agent's CPU time by then, which the load moves less).\n"
    )
    print(f"| measure | target | {' | '.join(rows)} | met |")
    print(f"|---|---:|{'---:|' * len(rows)}---|")

    def row(measure: str, target: str, cells: list[str], ok: bool) -> None:
        print(f"| {measure} | {target} | {' | '.join(cells)} | {met(ok)} |")

    row(
        "RSS idle, no secrets",
        f"≤ {TARGETS['idle']:.0f} MB",
        [f"{r.idle:.1f} MB" for r in rows.values()],
        ours.idle <= TARGETS["idle"],
    )
    row(
        f"RSS, {SECRETS} × 4 KB secrets prefetched and read once",
        f"≤ {TARGETS['loaded']:.0f} MB",
        [f"{r.loaded:.1f} MB" for r in rows.values()],
        ours.loaded <= TARGETS["loaded"],
    )
    row(
        "start to first 200 on a prefetched secret",
        f"≤ {TARGETS['start']} s",
        [r.start_text() for r in rows.values()],
        ours.start <= TARGETS["start"],
    )
    row(
        f"miss CPU: the agent's CPU time ÷ {MISSES} misses of distinct secrets",
        f"≤ {TARGETS['miss']} ms",
        [f"{r.miss * 1000:.2f} ms" for r in rows.values()],
        ours.miss * 1000 <= TARGETS["miss"],
    )
    blank = " | " * (len(rows) - 1)
    print(
        f"| (floor of the start) importing {', '.join(AGENT_LIBRARIES)} alone: median of {FLOOR_RUNS} "
        f"(fastest) | | {floor[1]:.2f} s ({floor[0]:.2f} s){blank} | |"
    )
    print(
        f"| (floor of a miss) a hit: the same {MISSES} secrets read again, the agent's CPU per read | | "
        + " | ".join(f"{r.hit * 1000:.2f} ms" for r in rows.values())
        + " | |"
    )
    print(
        f"| (floor of a miss) one GetSecretValue through the KMS client alone, CPU per call | | "
        f"{kms_call * 1000:.2f} ms{blank} | |"
    )
    print(
        "| `import kmsagent.cli` | | "
        + " | ".join(
            f"{r.imported[0]:.1f} MB; {r.imported[1]:.2f} s (CPU {r.imported[2]:.2f} s)" for r in rows.values()
        )
        + " | |"
    )
    print(f"| (reference) bare Python | | {bare[0]:.1f} MB{blank} | |")
    print(
        f"| (reference) the libraries alone: {', '.join(LIBRARIES)} | | {libraries[0]:.1f} MB; "
        f"{libraries[1]:.2f} s (CPU {libraries[2]:.2f} s){blank} | |"
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["emulator"]:
        serve_emulator(int(sys.argv[2]))
    elif sys.argv[1:2] == ["kmscall"]:
        kms_call_cpu(*sys.argv[2:5])
    else:
        main()
