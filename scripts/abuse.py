"""Abuse patterns (issue 10, items 2, 3 and 8; not CI): memory and queue behaviour under misuse.

Each pattern runs the agent as its own process (`python -m kmsagent --config ...`) against the
KMS emulator in another process, both started fresh for it. After a 5 s warm-up (a few ordinary
requests, then idle) the agent's RSS is "before"; the pattern then runs for `--seconds`, twice,
and the table shows per pattern: RSS before, the peak of each run (VmHWM, reset through
/proc/PID/clear_refs when a run starts; else the highest of samples every 20 ms), RSS after,
KMS calls (from the agent's /metrics) and errors (answers the pattern did not expect).

A pattern passes when the agent stayed up, peak minus before stays within

    2 × (bytes of the CacheSize largest secrets involved; none with TtlSeconds = 0)
    + MaxConcurrentRequests × 4 × the largest secret
    + 128 KB × connections open (the pattern's clients, or more if /metrics counted more)
    + 8 MB

and the second run's peak is less than 10 MB above the first's (nothing accumulates).

Patterns:
  a  refreshNow=true looped on one 60 KB secret by 8 clients
  b  CacheSize = 1 and 1000 distinct 60 KB secrets, each read once per pass
  c  TtlSeconds = 0 and 1000 distinct 60 KB secrets
  d  8 connections that pipeline 1000 requests each (a cached 60 KB secret) and never read
  e  20 connections pipelining GET /metrics without a token, never reading
  f  bursts of 1400 misses whose clients hang up right after sending, then a fresh miss timed
     (KMS answering in 100 ms)
  g1 the token file a symlink to /dev/zero; 8 clients sending a wrong token
  g2 a 10 MB token file; 8 clients sending a wrong token

The agent runs with RLIMIT_AS = 1.5 GB and is killed if its RSS passes 1 GB (a pattern that
would eat the machine's memory fails instead). Exit status 1 if any pattern fails.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import resource
import secrets
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

AK_ID, AK_SECRET = "LTAIabuseAccessKey01", "abuse-AccessKeySecret-Hq5r"
MB = 2**20
BIG = 60 * 1024
SMALL = 1024
BIG_SECRETS = 1000
FRESH_SECRETS = 2000
MAX_CONCURRENT = 8
WARM_UP = 5.0
SETTLE = 2.0
#: Beyond this RSS the agent is killed: the pattern fails, the machine keeps its memory.
RSS_LIMIT = 1024 * MB
ADDRESS_SPACE_LIMIT = 1536 * MB
ROOT = Path(__file__).resolve().parents[1]


def big_name(i: int) -> str:
    return f"abuse/big-{i:04d}"


def big_text(i: int) -> str:
    seed = hashlib.sha256(str(i).encode()).hexdigest()
    return (seed * (BIG // len(seed) + 1))[:BIG]


# --- the emulator process ----------------------------------------------------------------------


def serve_emulator(latency: float) -> None:
    """`abuse.py --emulator`: the KMS emulator on loopback, seeded, its port on stdout."""
    from kmsagent.emulator import Fault, KmsEmulator

    emulator = KmsEmulator()
    emulator.add_credentials(AK_ID, AK_SECRET)
    for i in range(BIG_SECRETS):
        emulator.put_secret(big_name(i), big_text(i))
    for i in range(FRESH_SECRETS):
        emulator.put_secret(f"abuse/fresh-{i:04d}", f"fresh-{i:04d}-" + "f" * (SMALL - 11))
    emulator.put_secret("abuse/small", "small-secret-" + "s" * (SMALL - 13))
    if latency:
        emulator.inject(Fault(delay=latency))

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(emulator.serve)
            print(port, flush=True)
            emulator.calls = _Uncounted()  # a long run must not grow the emulator's call log

    trio.run(run)


class _Uncounted(list):  # type: ignore[type-arg]
    def append(self, item: object) -> None:
        pass


# --- processes -----------------------------------------------------------------------------------


def read_line(process: subprocess.Popen[str], timeout: float, until: str = "") -> str | None:
    """The first stdout line containing `until`, or None if the process ends or time runs out."""
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while (left := deadline - time.monotonic()) > 0:
            if not selector.select(left):
                continue
            line = process.stdout.readline()
            if not line:
                return None
            if until in line:
                return line
        return None
    finally:
        selector.close()


def limit_memory(pid: int) -> None:
    """Caps `pid`'s address space from outside: a preexec_fn could deadlock the fork (trio leaves
    idle worker threads behind), and the agent allocates nothing large before it listens."""
    resource.prlimit(pid, resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))


def start_emulator(latency: float) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen(
        [sys.executable, __file__, "--emulator", "--latency", str(latency)],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = read_line(process, 60)
    if line is None:
        process.kill()
        raise SystemExit("abuse: the KMS emulator did not start")
    return process, int(line)


@dataclass
class Agent:
    process: subprocess.Popen[str]
    port: int
    token: str
    watchdog: RssWatch

    def stop(self) -> None:
        self.watchdog.stop()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_agent(folder: Path, kms_port: int, pattern: Pattern) -> Agent | str:
    """The agent for `pattern`, listening; or why it did not start."""
    config = folder / "kmsagent.toml"
    config.write_text(
        f"""[Server]
HttpPort = 0
MaxConn = 1000
[Cache]
CacheSize = {pattern.cache_size}
TtlSeconds = {pattern.ttl}
[KMS]
Endpoint = "127.0.0.1:{kms_port}"
Protocol = "http"
MaxConcurrentRequests = {MAX_CONCURRENT}
[Credentials]
Type = "access_key"
[Log]
Level = "warn"
Path = "{folder / 'logs'}"
"""
    )
    token = secrets.token_urlsafe(24)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(folder),
        "ALIBABA_CLOUD_ACCESS_KEY_ID": AK_ID,
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": AK_SECRET,
        "KMS_TOKEN": pattern.token_file(folder) if pattern.token_file else token,
    }
    stderr = (folder / "stderr.txt").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "kmsagent", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=env,
        cwd=folder,
    )
    with contextlib.suppress(ProcessLookupError):  # it exited already: read_line reports why
        limit_memory(process.pid)
    watchdog = RssWatch(process)
    line = read_line(process, 30, "listening on http://127.0.0.1:")
    if line is None:
        watchdog.stop()
        if process.poll() is None:
            process.kill()
        process.wait()
        why = (folder / "stderr.txt").read_text(errors="replace").strip().splitlines()
        killed = " (killed: RSS over 1 GB)" if watchdog.killed else ""
        last = f": {why[-1][:100]}" if why else ""
        return f"did not start{killed}, exit {process.returncode}{last}"
    port = int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))  # type: ignore[union-attr]
    return Agent(process, port, token, watchdog)


class RssWatch:
    """Samples the agent's RSS every 20 ms: the fallback peak, and the kill switch."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self._process = process
        self.peak = 0
        self.killed = False
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(0.02):
            rss = status_kb(self._process.pid, "VmRSS")
            if rss is None:
                return
            self.peak = max(self.peak, rss * 1024)
            if rss * 1024 > RSS_LIMIT:
                self.killed = True
                self._process.kill()
                return

    def reset(self) -> None:
        self.peak = 0

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()


def status_kb(pid: int, field_name: str) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) if found else None


def reset_peak(agent: Agent) -> bool:
    """Resets VmHWM to the current RSS; False where the kernel does not allow it."""
    agent.watchdog.reset()
    try:
        Path(f"/proc/{agent.process.pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_bytes(agent: Agent, exact: bool) -> int:
    hwm = status_kb(agent.process.pid, "VmHWM") if exact else None
    return max(hwm * 1024 if hwm else 0, agent.watchdog.peak)


# --- clients -------------------------------------------------------------------------------------


class Closed(Exception):
    """The agent closed the connection, or did not answer in time."""


class Client:
    """One keep-alive HTTP/1.1 connection (httpx would cost more CPU than the agent)."""

    def __init__(self, stream: trio.SocketStream, token: str) -> None:
        self._stream = stream
        self._token = token
        self._buffer = b""

    @classmethod
    async def connect(cls, port: int, token: str) -> Client:
        return cls(await trio.open_tcp_stream("127.0.0.1", port), token)

    async def get(self, path: str) -> int:
        """The status of `GET path` (the body is read and dropped)."""
        request = f"GET {path} HTTP/1.1\r\nHost: localhost\r\nX-KMS-Token: {self._token}\r\n\r\n".encode()
        try:
            await self._stream.send_all(request)
            while b"\r\n\r\n" not in self._buffer:
                await self._fill()
            head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            remaining = int(length.group(1)) if length else 0
            while len(self._buffer) < remaining:
                remaining -= len(self._buffer)
                self._buffer = b""
                await self._fill()
            self._buffer = self._buffer[remaining:]
            return int(head.split(None, 2)[1])
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
            raise Closed(str(error)) from None

    async def _fill(self) -> None:
        chunk = await self._stream.receive_some(2**16)
        if not chunk:
            raise Closed("end of stream")
        self._buffer += chunk

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self._stream)


@dataclass
class Run:
    """What one run of a pattern counted."""

    requests: int = 0
    #: Connections open at once: the pattern's own, or more if /metrics counted more.
    connections: int = 0
    notes: list[str] = field(default_factory=list)
    #: Unexpected answers and failures, by kind ("status 502", "Closed", ...).
    error_kinds: Counter[str] = field(default_factory=Counter)
    #: Bytes of the secrets the run read, by name (for the bound).
    secrets: dict[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        return sum(self.error_kinds.values())

    def error(self, kind: str) -> None:
        self.error_kinds[kind] += 1


async def loop_clients(
    agent: Agent, seconds: float, clients: int, next_path: Callable[[], str], expect: int, run: Run, token: str = ""
) -> None:
    """`clients` keep-alive connections asking `next_path()` until `seconds` pass."""
    end = trio.current_time() + seconds
    run.connections = max(run.connections, clients)

    async def client() -> None:
        connection: Client | None = None
        while trio.current_time() < end:
            try:
                if connection is None:
                    connection = await Client.connect(agent.port, token or agent.token)
                with trio.fail_after(30):
                    status = await connection.get(next_path())
            except (Closed, OSError, trio.TooSlowError) as error:
                run.error(type(error).__name__)
                if connection is not None:
                    await connection.aclose()
                connection = None
                await trio.sleep(0.05)
                continue
            run.requests += 1
            if status != expect:
                run.error(f"status {status}")
        if connection is not None:
            await connection.aclose()

    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(client)


async def pipeline_never_read(agent: Agent, seconds: float, connections: int, path: str, token: str, run: Run) -> None:
    """`connections` sockets each send 1000 pipelined requests, never read, and close at the end."""
    end = trio.current_time() + seconds
    run.connections = max(run.connections, connections)
    request = f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{token}\r\n".encode() * 1000
    streams: list[trio.SocketStream] = []

    async def flood() -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", agent.port)
        streams.append(stream)
        with trio.move_on_at(end):
            try:
                await stream.send_all(request)  # blocks once the agent stops reading
                run.requests += 1000
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                run.notes.append("agent closed a pipelining connection")
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        for _ in range(connections):
            nursery.start_soon(flood)
    for stream in streams:
        await trio.aclose_forcefully(stream)


# --- patterns ------------------------------------------------------------------------------------


@dataclass
class Pattern:
    name: str
    title: str
    exercise: Callable[[Agent, float, Run], Awaitable[None]]
    cache_size: int = 1000
    ttl: int = 300
    latency: float = 0.0
    token_file: Callable[[Path], str] | None = None
    warm: bool = True


def cycle(names: list[str]) -> Callable[[], str]:
    position = 0

    def next_path() -> str:
        nonlocal position
        position += 1
        return names[(position - 1) % len(names)]

    return next_path


async def refresh_now_loop(agent: Agent, seconds: float, run: Run) -> None:
    run.secrets[big_name(0)] = BIG
    path = f"/v1/{big_name(0)}?refreshNow=true"
    await loop_clients(agent, seconds, 8, lambda: path, 200, run)


async def distinct_big_secrets(agent: Agent, seconds: float, run: Run) -> None:
    run.secrets.update({big_name(i): BIG for i in range(BIG_SECRETS)})
    await loop_clients(agent, seconds, 8, cycle([f"/v1/{big_name(i)}" for i in range(BIG_SECRETS)]), 200, run)


async def pipelined_secret(agent: Agent, seconds: float, run: Run) -> None:
    run.secrets[big_name(0)] = BIG
    client = await Client.connect(agent.port, agent.token)
    await client.get(f"/v1/{big_name(0)}")  # cached: the flood is of hits
    await client.aclose()
    await pipeline_never_read(agent, seconds, 8, f"/v1/{big_name(0)}", f"X-KMS-Token: {agent.token}\r\n", run)


async def pipelined_metrics(agent: Agent, seconds: float, run: Run) -> None:
    await pipeline_never_read(agent, seconds, 20, "/metrics", "", run)


class Bursts:
    """Pattern f's counters across both runs: every burst and fresh miss uses new names."""

    burst = 0


async def hung_up_misses(agent: Agent, seconds: float, run: Run) -> None:
    end = trio.current_time() + seconds
    waits: list[float] = []
    request = "GET /v1/abuse/gone-{}-{} HTTP/1.1\r\nHost: localhost\r\nX-KMS-Token: {}\r\n\r\n"
    while trio.current_time() < end and Bursts.burst < FRESH_SECRETS:
        burst = Bursts.burst = Bursts.burst + 1
        for i in range(1400):
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", agent.port)
                await stream.send_all(request.format(burst, i, agent.token).encode())
            except OSError as error:
                run.error(f"hang-up client: {type(error).__name__}")
                continue
            await trio.aclose_forcefully(stream)  # hangs up right after sending
            run.requests += 1
        fresh = f"abuse/fresh-{burst:04d}"
        run.secrets[fresh] = SMALL
        started = trio.current_time()
        try:
            client = await Client.connect(agent.port, agent.token)
            with trio.fail_after(120):
                status = await client.get(f"/v1/{fresh}")
            await client.aclose()
        except (Closed, OSError, trio.TooSlowError) as error:
            status = 0
            run.error(f"fresh miss: {type(error).__name__}")
        waits.append(trio.current_time() - started)
        run.requests += 1
        if status not in (0, 200):
            run.error(f"fresh miss: status {status}")
    run.connections = max(run.connections, 1)
    if waits:
        run.notes.append(f"{len(waits)} bursts; fresh miss waited max {max(waits):.2f}s")


def dev_zero(folder: Path) -> str:
    link = folder / "token"
    link.symlink_to("/dev/zero")
    return f"file://{link}"


def ten_megabytes(folder: Path) -> str:
    path = folder / "token"
    path.write_bytes(b"t" * (10 * MB))
    path.chmod(0o600)
    return f"file://{path}"


async def wrong_token(agent: Agent, seconds: float, run: Run) -> None:
    await loop_clients(agent, seconds, 8, lambda: "/v1/abuse/small", 403, run, token="wrong-token-" + "w" * 20)


PATTERNS = [
    Pattern("a", "refreshNow loop, one 60 KB secret, 8 clients", refresh_now_loop),
    Pattern("b", "CacheSize=1, 1000 distinct 60 KB secrets", distinct_big_secrets, cache_size=1),
    Pattern("c", "TtlSeconds=0, 1000 distinct 60 KB secrets", distinct_big_secrets, ttl=0),
    Pattern("d", "8 conns pipeline 1000 x 60 KB, never read", pipelined_secret),
    Pattern("e", "20 conns pipeline /metrics, never read", pipelined_metrics),
    Pattern("f", "1400 hung-up misses, then a fresh miss", hung_up_misses, latency=0.1),
    Pattern("g1", "token file -> /dev/zero, wrong tokens", wrong_token, token_file=dev_zero, warm=False),
    Pattern("g2", "10 MB token file, wrong tokens", wrong_token, token_file=ten_megabytes, warm=False),
]


# --- measuring -----------------------------------------------------------------------------------


@dataclass
class Row:
    pattern: Pattern
    before: int = 0
    peaks: list[int] = field(default_factory=list)
    after: int = 0
    kms_calls: list[int] = field(default_factory=list)
    errors: int = 0
    bound: int = 0
    failure: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failure


async def scrape(agent: Agent) -> bytes | None:
    """The body of GET /metrics on a connection of its own, or None."""
    try:
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream("127.0.0.1", agent.port)
            try:
                await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                answer = b""
                while chunk := await stream.receive_some(2**16):
                    answer += chunk
            finally:
                await trio.aclose_forcefully(stream)
    except (OSError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
        return None
    return answer


def metric(body: bytes | None, pattern: bytes) -> float | None:
    if body is None:
        return None
    return sum(float(n) for n in re.findall(rb"^" + pattern + rb" (\S+)", body, re.MULTILINE))


async def kms_calls(agent: Agent) -> int:
    """`kmsagent_kms_requests_total`, all outcomes (-1 when /metrics cannot be read)."""
    calls = metric(await scrape(agent), rb'kmsagent_kms_requests_total\{outcome="\w+"\}')
    return -1 if calls is None else int(calls)


async def watch_connections(agent: Agent, run: Run) -> None:
    """The most connections the agent had open (`kmsagent_connections_open`, less the scrape's own)."""
    while True:
        open_now = metric(await scrape(agent), rb"kmsagent_connections_open")
        if open_now is not None:
            run.connections = max(run.connections, int(open_now) - 1)
        await trio.sleep(0.5)


async def warm_up(agent: Agent, pattern: Pattern) -> None:
    """A few ordinary requests, then idle until WARM_UP seconds have passed."""
    end = trio.current_time() + WARM_UP
    client = await Client.connect(agent.port, agent.token)
    paths = ["/ping", "/metrics"] + (["/v1/abuse/small"] * 2 if pattern.warm else [])
    for path in paths:
        with trio.move_on_after(10):
            await client.get(path)
    await client.aclose()
    await trio.sleep_until(end)


async def measure(pattern: Pattern, agent: Agent, seconds: float, row: Row) -> None:
    await warm_up(agent, pattern)
    row.before = (status_kb(agent.process.pid, "VmRSS") or 0) * 1024
    connections = 0
    involved: dict[str, int] = {}
    for _ in range(2):
        calls_before = await kms_calls(agent)
        exact = reset_peak(agent)
        run = Run()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_connections, agent, run)
            await pattern.exercise(agent, seconds, run)
            nursery.cancel_scope.cancel()
        await trio.sleep(SETTLE)
        if agent.process.poll() is not None:
            row.failure = "agent exited" + (" (killed: RSS over 1 GB)" if agent.watchdog.killed else "")
            row.peaks.append(agent.watchdog.peak)
            return
        row.peaks.append(peak_bytes(agent, exact))
        row.kms_calls.append(await kms_calls(agent) - calls_before)
        row.errors += run.errors
        if run.error_kinds:
            row.notes.append("errors: " + ", ".join(f"{n} x {kind}" for kind, n in run.error_kinds.most_common()))
        connections = max(connections, run.connections)
        involved.update(run.secrets)
        row.notes += run.notes
    row.after = (status_kb(agent.process.pid, "VmRSS") or 0) * 1024
    sizes = sorted(involved.values(), reverse=True)
    largest = sizes[0] if sizes else 0
    cached = 2 * sum(sizes[: pattern.cache_size]) if pattern.ttl > 0 else 0
    row.bound = cached + MAX_CONCURRENT * 4 * largest + 128 * 1024 * connections + 8 * MB
    if max(row.peaks) - row.before > row.bound:
        row.failure = "peak over bound"
    elif row.peaks[1] - row.peaks[0] >= 10 * MB:
        row.failure = "second run +10 MB"


def run_pattern(pattern: Pattern, seconds: float) -> Row:
    row = Row(pattern)
    print(f"abuse: pattern {pattern.name}: {pattern.title}", file=sys.stderr, flush=True)
    emulator, kms_port = start_emulator(pattern.latency)
    try:
        with tempfile.TemporaryDirectory(prefix="kmsagent-abuse-") as name:
            folder = Path(name)
            agent = start_agent(folder, kms_port, pattern)
            if isinstance(agent, str):
                row.failure = agent
                return row
            try:
                trio.run(measure, pattern, agent, seconds, row)
            finally:
                agent.stop()
    finally:
        emulator.terminate()
        emulator.wait(10)
    return row


def report(rows: list[Row], seconds: float) -> None:
    def mb(value: int) -> str:
        return f"{value / MB:.1f}"

    print(
        f"kmsagent abuse {time.strftime('%Y-%m-%d %H:%M')}: {seconds:g}s per run, 2 runs per pattern, "
        f"{WARM_UP:g}s warm-up, MaxConcurrentRequests {MAX_CONCURRENT}; RSS in MB"
    )
    header = (
        "pattern",
        "RSS before",
        "peak run 1",
        "peak run 2",
        "RSS after",
        "KMS calls",
        "errors",
        "bound (+)",
        "result",
    )
    lines = [header]
    for row in rows:
        p = row.pattern
        if not row.peaks:
            lines.append((f"{p.name} {p.title}", "-", "-", "-", "-", "-", "-", "-", f"FAIL: {row.failure}"))
            continue
        peaks = [*map(mb, row.peaks), "-"][:2]
        lines.append(
            (
                f"{p.name} {p.title}",
                mb(row.before),
                *peaks,
                mb(row.after) if row.after else "-",
                " / ".join(map(str, row.kms_calls)) or "-",
                str(row.errors),
                mb(row.bound) if row.bound else "-",
                "PASS" if row.passed else f"FAIL: {row.failure}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
    for row in rows:
        for note in dict.fromkeys(row.notes):
            print(f"  {row.pattern.name}: {note}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60, help="length of each run (default 60)")
    parser.add_argument("--only", help="comma-separated pattern names, e.g. a,f,g1")
    parser.add_argument("--emulator", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--latency", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.emulator:
        serve_emulator(args.latency)
        return 0
    chosen = set(args.only.split(",")) if args.only else None
    patterns = [p for p in PATTERNS if chosen is None or p.name in chosen]
    if not patterns:
        parser.error(f"--only: no such pattern (have {', '.join(p.name for p in PATTERNS)})")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    rows = [run_pattern(pattern, args.seconds) for pattern in patterns]
    report(rows, args.seconds)
    return 0 if all(row.passed for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
