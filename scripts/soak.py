"""Soak test (not CI): the agent in-process on the real clock against the KMS and metadata emulators.

For N minutes: a few hundred secrets, K client tasks reading random secrets over keep-alive HTTP
and checking every value against what the emulator held, secrets rotating and new ones appearing
on a schedule, KMS faults (500, 503, throttling, dropped connections, answers slower than
ReadTimeoutMs, the primary endpoint down while a replica serves as FallbackEndpoints) and
metadata-service outages switched on and off in recorded windows, and STS credentials
short-lived enough to be renewed several times.

A 200's value is right when it is a version of the requested secret that was current at some
moment in [request start - TtlSeconds - margin, response end]; a `stale` answer may be any
earlier version (serving the last value during an outage is the point; MaxStaleSeconds = 0 means
no bound). A 5xx (or other non-200) is expected only while a fault window is open, or within the
grace after it that a KMS call already under way needs to finish (all tries plus back-off); never
in a "primary endpoint down" window, where the replica answers. Every answer must arrive within
RequestTimeoutMs + 0.5 s.

With `--files N` the agent also renders N secrets to files (`[[Files]]`: whole value, JSON key or
template, Mode 0640), rotated every `--file-rotate-every` seconds, while a thread reads every file
in a loop and checks each read: the exact content of some version (never a partial file), Mode
0640, and not older than TtlSeconds (+ margin) behind KMS. With `--exec` it supervises a child
whose Env holds one secret (two variables), rotated on the same schedule: the child must restart
once per rotation, with the new values. At the end (rotations stopped, one TTL to settle) every
file must hold the last value, no child of the process may be a zombie, and the open descriptors
must not have grown beyond the KMS connection pools. These runs turn the KMS fault windows off
(their refreshes would legitimately lag) unless `--faults` is given.

Exit status 1 on any wrong value, any unexpected non-200, a 5xx while only the primary is down, an
answer later than RequestTimeoutMs + 0.5 s, or a transport error; else 0.
Logs go to a file (--log), the summary to stdout.
"""

from __future__ import annotations

import argparse
import array
import json
import logging
import os
import random
import resource
import shutil
import stat
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial

import trio
from loguru import logger

from kmsagent.agent import run_agent
from kmsagent.config import CacheConfig, Config, CredentialsConfig, ExecConfig, FileConfig, KmsConfig, ServerConfig
from kmsagent.credentials import Credentials, StaticCredentials
from kmsagent.credentials.ecs_role import EcsRamRoleCredentials
from kmsagent.emulator import Fault, KmsEmulator, MetadataEmulator
from kmsagent.token import TokenSource

TOKEN = "soak-token-Vq3n8Rk2"
AK_ID, AK_SECRET = "LTAIsoakAccessKey01", "soak-AccessKeySecret-Wm4z"
TTL = 30
CONNECT_TIMEOUT_MS, READ_TIMEOUT_MS, MAX_RETRIES = 500, 1000, 2
REQUEST_TIMEOUT_MS = 3000
#: An answer may take RequestTimeoutMs plus this long (the agent's own work, the HTTP exchange).
ANSWER_SLACK = 0.5
#: Seconds a fresh (hit/miss) answer may lag a rotation beyond TtlSeconds: the load's own duration.
MARGIN = 2.0
#: STS credentials from the metadata emulator live this long and are renewed this long before expiry.
STS_LIFETIME, RENEW_BEFORE = 60, 40
KINDS = ("kms_500", "kms_503", "throttling", "dropped", "slow", "primary_down", "metadata_outage")
#: [[Files]] Mode, and the Env secret of the --exec child.
FILE_MODE = 0o640
ENV_SECRET = "soak/env"
#: The --exec child: one JSON line per start (its Env values), then it waits for SIGTERM.
CHILD = """
import json, os, signal, sys
with open(sys.argv[1], "a") as log:
    started = {"pid": os.getpid(), "password": os.environ["SOAK_PASSWORD"], "all": os.environ["SOAK_ALL"]}
    log.write(json.dumps(started) + "\\n")
signal.pause()
"""


class Closed(Exception):
    """The agent closed the connection before a whole response arrived."""


class RawClient:
    """One keep-alive HTTP/1.1 connection to the agent (httpx costs more CPU than the agent here)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def get(self, path: str) -> tuple[int, dict[bytes, bytes], bytes]:
        request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-KMS-Token: {TOKEN}\r\n\r\n".encode()
        try:
            await self.stream.send_all(request)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
            raise Closed(str(error)) from None
        while b"\r\n\r\n" not in self.buffer:
            await self._fill()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.split(b"\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get(b"content-length", b"0"))
        while len(self.buffer) < length:
            await self._fill()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(status_line.split()[1]), headers, body

    async def _fill(self) -> None:
        try:
            chunk = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
            raise Closed(str(error)) from None
        if not chunk:
            raise Closed("end of stream")
        self.buffer += chunk


@dataclass
class Version:
    value: str
    put_at: float  # trio.current_time() when it became current


@dataclass
class Window:
    kind: str
    start: float
    end: float
    requests: int = 0
    stale: int = 0
    errors: int = 0


@dataclass
class Stats:
    requests: int = 0
    by_cache: Counter[str] = field(default_factory=Counter)
    wrong: int = 0
    wrong_examples: list[str] = field(default_factory=list)
    errors_in: Counter[int] = field(default_factory=Counter)  # non-200 inside a window (+grace)
    errors_out: Counter[int] = field(default_factory=Counter)  # non-200 anywhere else: unexpected
    transport_errors: int = 0
    transport_examples: list[str] = field(default_factory=list)
    stale_in: int = 0
    stale_out: int = 0
    stale_older_than_ttl: int = 0
    too_slow: int = 0  # answers later than RequestTimeoutMs + ANSWER_SLACK
    rotations: int = 0
    created: int = 0
    latencies: array.array = field(default_factory=lambda: array.array("f"))


@dataclass
class FileStats:
    reads: int = 0
    partial: int = 0
    bad_mode: int = 0
    missing: int = 0
    late: int = 0
    late_in_windows: int = 0
    examples: list[str] = field(default_factory=list)


class FilesAndExec:
    """`--files N` and `--exec`: [[Files]] tables and an [Exec] child, and the checks on them."""

    def __init__(self, soak: Soak, count: int, supervise: bool) -> None:
        self.soak = soak
        self.folder = tempfile.mkdtemp(prefix="kmsagent-soak-")
        os.chmod(self.folder, 0o755)  # noqa: S103 - an app's folder as deployed: none but its owner writes
        self.supervise = supervise
        self.child_log = os.path.join(self.folder, ".child-starts")
        #: Per table: (secret, path, kind); kind 0 whole value, 1 JsonKey "v", 2 Template.
        self.tables = [(f"soak/f{i:03d}", os.path.join(self.folder, f"f{i:03d}"), i % 3) for i in range(count)]
        #: path -> content -> version position; filled before KMS holds the version.
        self.contents: dict[str, dict[bytes, int]] = {path: {} for _, path, _ in self.tables}
        self.latest: dict[str, bytes] = {}
        #: secret -> when each version became current (trio's clock).
        self.put_at: dict[str, list[float]] = {}
        self.env_values: list[str] = []
        self.rotations = 0
        self.last_rotation = 0.0
        self.stats = FileStats()
        self.done = threading.Event()
        self.offset = 0.0  # trio.current_time() - time.perf_counter(): the reader thread's clock

    def configs(self) -> tuple[tuple[FileConfig, ...], ExecConfig]:
        files = []
        for i, (name, path, kind) in enumerate(self.tables):
            extra: dict = {"json_key": "v"} if kind == 1 else {"template": "v=${v} pad=${pad}"} if kind == 2 else {}
            on_change = ("true",) if i % 10 == 0 else ()
            files.append(FileConfig(name, path, mode=FILE_MODE, on_change=on_change, **extra))
        exec_config = ExecConfig()
        if self.supervise:
            script = os.path.join(self.folder, ".child.py")
            with open(script, "w") as file:
                file.write(CHILD)
            exec_config = ExecConfig(
                command=(sys.executable, script, self.child_log),
                env=(("SOAK_PASSWORD", f"{ENV_SECRET}#password"), ("SOAK_ALL", ENV_SECRET)),
                stop_timeout_seconds=5,
            )
        return tuple(files), exec_config

    def put_all(self) -> None:
        for name, _, _ in self.tables:
            self._put_file(name)
        if self.supervise:
            self._put_env()

    def _put_file(self, name: str) -> None:
        versions = self.put_at.setdefault(name, [])
        token = f"{name}|v{len(versions)}|{random.getrandbits(48):012x}"
        pad = "x" * random.randrange(0, 12_000)
        data = json.dumps({"v": token, "pad": pad})
        for secret, path, kind in self.tables:
            if secret == name:
                content = (data if kind == 0 else token if kind == 1 else f"v={token} pad={pad}").encode()
                self.contents[path][content] = len(versions)
                self.latest[path] = content
        if versions:
            self.soak.kms.rotate(name, data)
        else:
            self.soak.kms.put_secret(name, data)
        versions.append(trio.current_time())

    def _put_env(self) -> None:
        password = f"env-password-{len(self.env_values)}-{random.getrandbits(48):012x}"
        data = json.dumps({"password": password})
        if self.env_values:
            self.soak.kms.rotate(ENV_SECRET, data)
        else:
            self.soak.kms.put_secret(ENV_SECRET, data)
        self.env_values.append(password)

    async def rotate_on_schedule(self, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            for name, _, _ in self.tables:
                self._put_file(name)
            if self.supervise:
                self._put_env()
            self.rotations += 1
            self.last_rotation = trio.current_time()

    def reader(self) -> None:
        """A thread: reads every file in turn, checks each read, until `done`."""
        stats, tables = self.stats, [(name, path) for name, path, _ in self.tables]
        while not self.done.is_set():
            for name, path in tables:
                started = time.perf_counter() + self.offset
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    stats.missing += 1
                    continue
                try:
                    mode = stat.S_IMODE(os.fstat(fd).st_mode)
                    chunks = []
                    while chunk := os.read(fd, 65536):
                        chunks.append(chunk)
                finally:
                    os.close(fd)
                ended = time.perf_counter() + self.offset
                stats.reads += 1
                if mode != FILE_MODE:
                    stats.bad_mode += 1
                    self._example(f"{path}: mode {mode:04o}")
                position = self.contents[path].get(b"".join(chunks))
                if position is None:
                    stats.partial += 1
                    self._example(f"{path}: {len(b''.join(chunks))} bytes that are no version")
                    continue
                versions = self.put_at[name]
                if position + 1 < len(versions) and versions[position + 1] < started - TTL - MARGIN:
                    if self.soak._window_of(versions[position + 1], ended) is not None:
                        stats.late_in_windows += 1
                    else:
                        stats.late += 1
                        self._example(
                            f"{path}: v{position}, superseded {started - versions[position + 1]:.1f}s before the read"
                        )
            time.sleep(0.05)

    def _example(self, text: str) -> None:
        if len(self.stats.examples) < 10:
            self.stats.examples.append(text)

    def final_checks(self) -> dict:
        """After the settling time: files at their last value, child starts, zombies."""
        at_last = sum(1 for _, path, _ in self.tables if _read(path) == self.latest[path])
        starts = []
        if self.supervise and os.path.exists(self.child_log):
            with open(self.child_log) as log:
                starts = [json.loads(line) for line in log]
        return {
            "at_last": at_last,
            "starts": starts,
            "child_current": bool(starts) and starts[-1]["password"] == self.env_values[-1],
            "child_values_known": all(start["password"] in self.env_values for start in starts),
        }


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError:
        return None


def zombie_children() -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as file:
                    fields = file.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] == "Z" and int(fields[1]) == os.getpid():
                found.append(int(entry))
    return found


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.duration = args.seconds if args.seconds is not None else args.minutes * 60
        self.kms = KmsEmulator(clock=time.time)
        self.kms.add_credentials(AK_ID, AK_SECRET)
        self.metadata = MetadataEmulator(self.kms, lifetime=STS_LIFETIME) if args.metadata else None
        self.history: dict[str, list[Version]] = {}
        self.index: dict[str, dict[str, int]] = {}  # secret -> value -> position in history
        self.names: list[str] = []
        self.new_names: list[str] = []  # created during the run, read now and then
        self.windows: list[Window] = []
        self.stats = Stats()
        attempt = (CONNECT_TIMEOUT_MS + READ_TIMEOUT_MS) / 1000
        backoff = sum(0.2 * 2**n for n in range(MAX_RETRIES))
        #: After a window closes, how long a KMS call begun inside it may still fail: every try,
        #: every back-off, one try at the fallback endpoint, and one more attempt's worth for the
        #: queue of MaxConcurrentRequests.
        self.grace = (MAX_RETRIES + 3) * attempt + backoff + 1.0
        self.credentials = None
        self.extra = FilesAndExec(self, args.files, args.exec) if args.files or args.exec else None
        self.faults = args.faults if args.faults is not None else self.extra is None

    # --- secrets ---------------------------------------------------------------------------

    def _put(self, name: str) -> None:
        versions = self.history.setdefault(name, [])
        value = f"{name}|v{len(versions)}|{random.getrandbits(48):012x}"
        if versions:
            self.kms.rotate(name, value)
        else:
            self.kms.put_secret(name, value)
        self.index.setdefault(name, {})[value] = len(versions)
        versions.append(Version(value, trio.current_time()))

    async def rotate_on_schedule(self, interval: float) -> None:
        while True:
            await trio.sleep(random.uniform(0.5, 1.5) * interval)
            self._put(random.choice(self.names))
            self.stats.rotations += 1

    async def create_on_schedule(self, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            name = f"soak/new-{len(self.new_names):04d}"
            self._put(name)
            self.new_names.append(name)
            self.stats.created += 1

    # --- faults ----------------------------------------------------------------------------

    def kinds(self) -> list[str]:
        return [kind for kind in KINDS if kind != "metadata_outage" or self.metadata is not None]

    async def _switch(self, kind: str, on: bool) -> None:
        if kind == "metadata_outage":
            assert self.metadata is not None
            self.metadata.outage = on
            return
        if kind == "primary_down":
            assert self.kms.endpoint is not None
            await (self.kms.take_down if on else self.kms.bring_up)(self.kms.endpoint)
            return
        if not on:
            self.kms.clear_faults()
            return
        fault = {
            "kms_500": Fault.server_error(),
            "kms_503": Fault.unavailable(),
            "throttling": Fault.throttling(),
            "dropped": Fault(drop=True),
            "slow": Fault(delay=READ_TIMEOUT_MS / 1000 + 0.5),
        }[kind]
        self.kms.inject(fault)

    async def faults_on_schedule(self, start: float, end: float) -> None:
        """Windows of `length` s separated by healthy gaps of 1.5 × length, kinds in turn."""
        kinds = self.kinds()
        # A run fits one window of each kind: a first gap, then (window + gap) per kind.
        length = min(20.0, max(3.0, self.duration / (2.5 * len(kinds) + 1.5)))
        gap = 1.5 * length
        at = start + gap
        turn = 0
        while at + length + gap / 2 <= end:
            await trio.sleep_until(at)
            kind = kinds[turn % len(kinds)]
            window = Window(kind, trio.current_time(), float("inf"))
            self.windows.append(window)
            await self._switch(kind, True)
            await trio.sleep(length)
            await self._switch(kind, False)
            window.end = trio.current_time()
            at += length + gap
            turn += 1

    def _window_of(self, started: float, ended: float) -> Window | None:
        for window in self.windows:
            if started <= window.end + self.grace and ended >= window.start:
                return window
        return None

    # --- readers ---------------------------------------------------------------------------

    def _pick(self) -> str:
        if self.new_names and random.random() < 0.02:
            return random.choice(self.new_names[-5:])
        return random.choice(self.names)

    async def reader(self, port: int, until: float) -> None:
        client: RawClient | None = None
        pause = self.args.pause_ms / 1000
        while trio.current_time() < until:
            name = self._pick()
            started = trio.current_time()
            try:
                if client is None:
                    client = RawClient(await trio.open_tcp_stream("127.0.0.1", port))
                with trio.fail_after(60):
                    status, headers, body = await client.get(f"/secretsmanager/get?secretId={name}")
            except (Closed, OSError, trio.TooSlowError) as error:
                self.stats.transport_errors += 1
                if len(self.stats.transport_examples) < 5:
                    self.stats.transport_examples.append(f"{name}: {type(error).__name__}: {error}")
                if client is not None:
                    await trio.aclose_forcefully(client.stream)
                client = None
                continue
            ended = trio.current_time()
            self._check(name, started, ended, status, headers, body)
            if headers.get(b"connection", b"").lower() == b"close":
                await trio.aclose_forcefully(client.stream)
                client = None
            await trio.sleep(random.uniform(0, 2 * pause))
        if client is not None:
            await trio.aclose_forcefully(client.stream)

    def _check(self, name: str, started: float, ended: float, status: int, headers: dict, body: bytes) -> None:
        stats = self.stats
        stats.requests += 1
        stats.latencies.append(ended - started)
        if ended - started > REQUEST_TIMEOUT_MS / 1000 + ANSWER_SLACK:
            stats.too_slow += 1
            if len(stats.wrong_examples) < 10:
                stats.wrong_examples.append(
                    f"{status} for {name} at {started - self.t0:.1f}s took {ended - started:.2f}s"
                )
        window = self._window_of(started, ended)
        if window is not None:
            window.requests += 1
        if status != 200:
            if window is not None:
                window.errors += 1
                stats.errors_in[status] += 1
            else:
                stats.errors_out[status] += 1
                if len(stats.wrong_examples) < 10:
                    stats.wrong_examples.append(
                        f"unexpected {status} for {name} at {started - self.t0:.1f}s: {body[:120]!r}"
                    )
            return
        cache = headers.get(b"x-kms-agent-cache", b"?").decode()
        stats.by_cache[cache] += 1
        problem = self._verify(name, started, ended, cache, body)
        if problem is not None:
            stats.wrong += 1
            if len(stats.wrong_examples) < 10:
                stats.wrong_examples.append(f"WRONG {name} at {started - self.t0:.1f}s ({cache}): {problem}")
        if cache == "stale":
            if window is not None:
                window.stale += 1
                stats.stale_in += 1
            else:
                stats.stale_out += 1

    def _verify(self, name: str, started: float, ended: float, cache: str, body: bytes) -> str | None:
        try:
            document = json.loads(body)
            returned_name, value = document["SecretName"], document["SecretData"]
        except (ValueError, KeyError, TypeError):
            return f"not a secret body: {body[:80]!r}"
        if returned_name != name:
            return f"SecretName {returned_name!r}"
        position = self.index[name].get(value)
        if position is None:
            return "a value that was never a version of this secret"
        versions = self.history[name]
        if versions[position].put_at > ended:
            return "a version from the future"
        if position + 1 < len(versions):
            superseded = versions[position + 1].put_at
            if superseded < started - TTL - MARGIN:
                if cache != "stale":
                    return f"v{position}, superseded {started - superseded:.1f}s before the request ({cache})"
                self.stats.stale_older_than_ttl += 1
        return None

    # --- run -------------------------------------------------------------------------------

    async def connections_open(self, port: int) -> int | None:
        """`kmsagent_connections_open` from /metrics (which counts its own connection)."""
        client = RawClient(await trio.open_tcp_stream("127.0.0.1", port))
        try:
            try:
                status, _, body = await client.get("/metrics")
            except Closed:
                return None
            if status != 200:
                return None
        finally:
            await trio.aclose_forcefully(client.stream)
        for line in body.decode().splitlines():
            if line.startswith("kmsagent_connections_open "):
                return int(float(line.split()[1]))
        return None

    async def progress(self, every: float) -> None:
        while True:
            await trio.sleep(every)
            s = self.stats
            errors = sum(s.errors_in.values()) + sum(s.errors_out.values())
            print(
                f"[{trio.current_time() - self.t0:5.0f}s] requests {s.requests} wrong {s.wrong} non-200 {errors} "
                f"stale {s.by_cache['stale']} KMS calls {self.kms.call_count()} rotations {s.rotations}",
                file=sys.stderr,
                flush=True,
            )

    async def run(self) -> int:
        self.t0 = trio.current_time()
        for i in range(self.args.secrets):
            self._put(f"soak/s{i:04d}")
        self.names = list(self.history)
        if self.extra is not None:
            self.extra.put_all()
        async with trio.open_nursery() as nursery:
            await nursery.start(self.kms.serve)
            await nursery.start(self.kms.serve)  # the replica: FallbackEndpoints
            if self.metadata is not None:
                await nursery.start(self.metadata.serve)
                credentials_config = CredentialsConfig(
                    type="ecs_ram_role", metadata_endpoint=self.metadata.endpoint, renew_before_seconds=RENEW_BEFORE
                )
                self.credentials = EcsRamRoleCredentials(credentials_config, clock=time.time)
            else:
                self.credentials = StaticCredentials(Credentials(AK_ID, AK_SECRET), "soak")
            config = Config(
                server=ServerConfig(http_port=0, request_timeout_ms=REQUEST_TIMEOUT_MS),
                cache=CacheConfig(ttl_seconds=TTL, max_stale_seconds=0),
                kms=KmsConfig(
                    endpoint=self.kms.endpoint,
                    protocol="http",
                    connect_timeout_ms=CONNECT_TIMEOUT_MS,
                    read_timeout_ms=READ_TIMEOUT_MS,
                    max_retries=MAX_RETRIES,
                    fallback_endpoints=(self.kms.endpoints[1],),
                ),
                credentials=CredentialsConfig(type="ecs_ram_role" if self.metadata else "access_key"),
            )
            if self.extra is not None:
                files, exec_config = self.extra.configs()
                config = Config(**{**vars(config), "files": files, "exec": exec_config})
            stop = trio.Event()
            port = await nursery.start(
                partial(
                    run_agent,
                    config,
                    token=TokenSource(TOKEN.encode()),
                    credentials=self.credentials,
                    shutdown=stop.wait,
                    clock=time.time,
                )
            )
            start = self.start = trio.current_time()
            end = start + self.duration
            self.fds_at_start = open_descriptors()
            extra = self.extra
            file_reader = None
            if extra is not None:
                extra.offset = trio.current_time() - time.perf_counter()
                file_reader = threading.Thread(target=extra.reader, name="soak-file-reader")
                file_reader.start()
            async with trio.open_nursery() as background:
                background.start_soon(self.rotate_on_schedule, self.args.rotate_every)
                background.start_soon(self.create_on_schedule, 3.0)
                if self.faults:
                    background.start_soon(self.faults_on_schedule, start, end)
                if extra is not None:
                    background.start_soon(extra.rotate_on_schedule, self.args.file_rotate_every)
                background.start_soon(self.progress, max(10.0, self.duration / 10))
                async with trio.open_nursery() as readers:
                    for _ in range(self.args.clients):
                        readers.start_soon(self.reader, port, end)
                background.cancel_scope.cancel()
            self.kms.clear_faults()
            self.elapsed = trio.current_time() - start
            self.extra_results = None
            if extra is not None:
                # Rotations have stopped: one TTL (and the restart's coalescing) to settle.
                settle = max(extra.last_rotation, self.windows[-1].end + self.grace if self.windows else 0.0)
                await trio.sleep_until(settle + TTL + MARGIN + 3)
                extra.done.set()
                await trio.to_thread.run_sync(file_reader.join)
                self.extra_results = extra.final_checks()
                self.extra_results["metrics"] = await self.metrics(port)
            open_at_end = None
            with trio.move_on_after(5):
                while (open_at_end := await self.connections_open(port)) != 1:  # noqa: ASYNC110 - seen in /metrics only
                    await trio.sleep(0.1)
            self.zombies = zombie_children()
            self.fds_at_end = open_descriptors()
            stop.set()
            nursery.cancel_scope.cancel()  # the emulators serve until cancelled
        if self.extra is not None:
            shutil.rmtree(self.extra.folder, ignore_errors=True)
        return self.summary(open_at_end)

    async def metrics(self, port: int) -> dict[str, float]:
        """The agent's [[Files]] and [Exec] counters from /metrics."""
        client = RawClient(await trio.open_tcp_stream("127.0.0.1", port))
        try:
            _, _, body = await client.get("/metrics")
        finally:
            await trio.aclose_forcefully(client.stream)
        wanted = ("kmsagent_file_writes_total", "kmsagent_file_onchange_runs_total", "kmsagent_exec_restarts_total")
        return {
            name: float(value)
            for line in body.decode().splitlines()
            if line.startswith(wanted)
            for name, value in [line.rsplit(" ", 1)]
        }

    def outside_seconds(self) -> float:
        """Seconds of the run not covered by any window plus its grace."""
        covered, reach = 0.0, self.start
        for window in self.windows:
            begin, finish = max(window.start, reach), min(window.end + self.grace, self.start + self.elapsed)
            if finish > begin:
                covered += finish - begin
                reach = finish
        return self.elapsed - covered

    def summary(self, open_at_end: int | None) -> int:
        s = self.stats
        latencies = sorted(s.latencies)

        def pct(p: float) -> str:
            return f"{latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000:.1f} ms" if latencies else "-"

        calls = self.kms.calls
        failed_calls = sum(1 for call in calls if call.status != 200)
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        unexpected = sum(s.errors_out.values())
        five_in = sum(n for status, n in s.errors_in.items() if status >= 500)
        five_out = sum(n for status, n in s.errors_out.items() if status >= 500)
        primary_down = [w for w in self.windows if w.kind == "primary_down"]
        down_errors = sum(w.errors for w in primary_down)
        replica = self.kms.endpoints[1]
        at_replica = sum(1 for call in calls if call.endpoint == replica)
        failed = (
            s.wrong > 0
            or unexpected > 0
            or s.transport_errors > 0
            or open_at_end != 1
            or s.too_slow > 0
            or down_errors > 0
        )
        renewals = "-"
        if self.metadata is not None:
            fetches = self.credentials.fetches
            renewals = f"{fetches - 1} (STS lifetime {STS_LIFETIME}s, renewed {RENEW_BEFORE}s before expiry)"
        lines = [
            (
                f"kmsagent soak {time.strftime('%Y-%m-%d %H:%M')}: {self.elapsed:.0f}s real clock, "
                f"{self.args.secrets} secrets (+{s.created} created), {self.args.clients} clients, "
                f"TTL {TTL}s, MaxStale 0, ReadTimeout {READ_TIMEOUT_MS}ms, MaxRetries {MAX_RETRIES}, "
                f"RequestTimeout {REQUEST_TIMEOUT_MS}ms, one FallbackEndpoint"
            ),
            (
                f"requests served      {s.requests} ({s.requests / self.elapsed:.0f}/s; p50 {pct(0.5)}, "
                f"p99 {pct(0.99)}, max {pct(1.0)}); hit {s.by_cache['hit']}, miss {s.by_cache['miss']}, "
                f"stale {s.by_cache['stale']}"
            ),
            f"wrong values         {s.wrong}",
            f"answers too slow     {s.too_slow} (later than RequestTimeoutMs + {ANSWER_SLACK}s)",
            (
                f"primary down         {len(primary_down)} windows: {sum(w.requests for w in primary_down)} requests, "
                f"{down_errors} non-200; {at_replica} KMS calls served by the replica in the whole run"
            ),
            (
                f"5xx outside windows  {five_out} (grace {self.grace:.1f}s after each window; "
                f"{self.outside_seconds():.0f}s of the run were outside)"
            ),
            f"5xx inside windows   {five_in}{by_status(s.errors_in, True)}",
            (
                f"other non-200        outside {unexpected - five_out}{by_status(s.errors_out, False)}, "
                f"inside {sum(s.errors_in.values()) - five_in}{by_status(s.errors_in, False)}"
            ),
            f"transport errors     {s.transport_errors}",
            (
                f"stale answers        {s.by_cache['stale']} (in windows+grace {s.stale_in}, after {s.stale_out}; "
                f"older than TTL {s.stale_older_than_ttl})"
            ),
            f"rotations            {s.rotations}",
            f"KMS calls            {len(calls)} ({failed_calls} faulted or refused)",
            f"credential renewals  {renewals}",
            f"connections at end   {open_at_end} (the /metrics request's own)",
            f"peak RSS             {peak_rss:.0f} MB",
            f"fault windows        {len(self.windows)} (requests / stale / non-200 counted to end + grace):",
        ]
        lines += [
            f"  {f'{w.start - self.t0:.0f}-{w.end - self.t0:.0f}s':>10} {w.kind:<16} "
            f"{w.requests:>7} / {w.stale:>5} / {w.errors:>4}"
            for w in self.windows
        ]
        lines += [f"  ! {example}" for example in s.wrong_examples + s.transport_examples]
        pool_slack = 2 * KmsConfig().max_concurrent_requests + 4  # both ends of the KMS pool, in-process
        growth = self.fds_at_end - self.fds_at_start
        failed = failed or bool(self.zombies) or growth > pool_slack
        if self.extra is not None and self.extra_results is not None:
            extra, results, f = self.extra, self.extra_results, self.extra.stats
            metrics = results["metrics"]
            written, unchanged, write_failed = (
                metrics.get(f'kmsagent_file_writes_total{{outcome="{outcome}"}}', 0.0)
                for outcome in ("written", "unchanged", "failed")
            )
            runs_ok = metrics.get('kmsagent_file_onchange_runs_total{outcome="success"}', 0.0)
            runs_not = sum(
                v
                for k, v in metrics.items()
                if k.startswith("kmsagent_file_onchange_runs_total") and "success" not in k
            )
            files_ok = f.partial == 0 and f.bad_mode == 0 and f.late == 0 and results["at_last"] == len(extra.tables)
            lines += [
                (
                    f"files                {len(extra.tables)} (Mode {FILE_MODE:04o}, "
                    f"rotated every {self.args.file_rotate_every:.0f}s: {extra.rotations} rotations), reads {f.reads}"
                ),
                f"  partial reads      {f.partial}",
                f"  wrong mode         {f.bad_mode}",
                f"  older than TTL     {f.late} (in fault windows: {f.late_in_windows}); missing {f.missing}",
                (
                    f"  at last value      {results['at_last']}/{len(extra.tables)} "
                    f"after {TTL + MARGIN + 3:.0f}s to settle"
                ),
                (
                    f"  writes             {written:.0f} written, {unchanged:.0f} unchanged, "
                    f"{write_failed:.0f} failed; OnChange {runs_ok:.0f} ok, {runs_not:.0f} not"
                ),
            ]
            failed = failed or not files_ok if extra.tables else failed
            if extra.supervise:
                starts = results["starts"]
                rotations = len(extra.env_values) - 1
                exec_ok = len(starts) - 1 == rotations and results["child_current"] and results["child_values_known"]
                lines.append(
                    f"exec                 Env rotations {rotations}, child starts {len(starts)} "
                    f"(restarts {len(starts) - 1}, metric {metrics.get('kmsagent_exec_restarts_total', 0):.0f}), "
                    f"last start has the last value: {'yes' if results['child_current'] else 'NO'}"
                )
                failed = failed or not exec_ok
            lines += [f"  ! {example}" for example in f.examples]
        lines.append(f"zombies              {len(self.zombies)}")
        lines.append(
            f"open descriptors     start {self.fds_at_start}, end {self.fds_at_end} "
            f"(growth {growth}; KMS pools allow {pool_slack})"
        )
        lines.append(f"RESULT               {'FAIL' if failed else 'PASS'}")
        print("\n".join(lines), flush=True)
        return 1 if failed else 0


def by_status(counts: Counter[int], server_errors: bool) -> str:
    chosen = {status: n for status, n in sorted(counts.items()) if (status >= 500) == server_errors}
    return " (" + ", ".join(f"{status}: {n}" for status, n in chosen.items()) + ")" if chosen else ""


def main() -> int:
    global TTL  # noqa: PLW0603 - --ttl replaces the default the whole run reads
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--seconds", type=float, help="overrides --minutes (quick runs)")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--secrets", type=int, default=300)
    parser.add_argument("--pause-ms", type=float, default=50, help="mean pause between a client's requests")
    parser.add_argument("--rotate-every", type=float, default=0.25, help="mean seconds between rotations")
    parser.add_argument("--no-metadata", dest="metadata", action="store_false", help="static keys, no renewals")
    parser.add_argument("--ttl", type=int, default=30, help="TtlSeconds (default %(default)s)")
    parser.add_argument(
        "--files", type=int, default=0, metavar="N", help="also render N secrets to files and check every read"
    )
    parser.add_argument(
        "--exec", action="store_true", help="also supervise a child with Env secrets and count its restarts"
    )
    parser.add_argument(
        "--file-rotate-every", type=float, default=30.0, help="seconds between rotations of the file and Env secrets"
    )
    parser.add_argument(
        "--faults",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="KMS fault windows (default: on, off with --files/--exec)",
    )
    parser.add_argument(
        "--log", default=os.path.join(tempfile.gettempdir(), f"soak-{time.strftime('%Y%m%d-%H%M%S')}.log")
    )
    args = parser.parse_args()
    TTL = args.ttl
    logger.remove()
    logger.add(args.log, level="INFO", backtrace=False, diagnose=False)
    logging.basicConfig(filename=args.log, level=logging.WARNING, force=True)
    print(f"soak: logs in {args.log}", file=sys.stderr, flush=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return trio.run(Soak(args).run)


if __name__ == "__main__":
    sys.exit(main())
