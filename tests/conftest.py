"""Shared fixtures: the KMS emulator on loopback, and the agent serving in-process against it;
and `eventually`, the one way a test waits for state no trio.Event can announce."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import httpx
import pytest
import trio
from loguru import logger

from kmsagent.agent import run_agent
from kmsagent.config import CacheConfig, Config, KmsConfig, ServerConfig
from kmsagent.credentials import Credentials, CredentialSource, StaticCredentials
from kmsagent.emulator import KmsEmulator, StsEmulator
from kmsagent.token import TokenSource

AK_ID = "LTAItestAccessKeyId01"
AK_SECRET = "test-AccessKeySecret-Zq9x7Vw3"
#: The members of a Vault KV v1 read's body (ResponseType 2), as hvac and Vault clients read it.
VAULT_BODY_KEYS = frozenset(
    {"request_id", "lease_id", "renewable", "lease_duration", "data", "wrap_info", "warnings", "auth"}
)
TOKEN = "test-ssrf-token-Kp4m2Lr8"
SECRETS = {
    "db/password": "value-of-db-password-Hn5t",
    "api-key": "value-of-api-key-Jc8w",
    "app/config": '{"user": "app", "pass": "value-of-app-config-Rb2e"}',
}
#: Strings that must never appear in a log, an error body or stderr.
SECRET_MATERIAL = (AK_SECRET, TOKEN, *SECRETS.values())


async def eventually(condition: Callable[[], object], *, seconds: float = 10, interval: float = 0.02) -> None:
    """Polls `condition` (awaited when it returns an awaitable) every `interval` until it holds;
    trio.TooSlowError after `seconds`.

    For state another process or thread changes: a file or the /metrics of an agent process, the
    calls an agent process makes to an emulator, a fake server's or a watcher's bookkeeping. No
    trio.Event crosses those boundaries, so the test looks again until it sees the change.
    """

    async def holds() -> bool:
        result = condition()
        return bool(await result if inspect.isawaitable(result) else result)

    with trio.fail_after(seconds):
        while not await holds():  # noqa: ASYNC110 - no event reaches here from another process
            await trio.sleep(interval)


@pytest.fixture
def wall_clock() -> Callable[[], float]:
    """The wall clock of the emulators and the agent; modules that use autojump_clock override it."""
    return time.time


@pytest.fixture
def captured_logs() -> Iterator[list[str]]:
    """Every loguru and standard-library log line at DEBUG while the test runs."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect(level=0)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(0)
    sink = logger.add(lambda message: lines.append(str(message)), level="DEBUG", diagnose=False)
    yield lines
    logger.remove(sink)
    root.removeHandler(handler)
    root.setLevel(old_level)


@pytest.fixture
async def emulator(nursery: trio.Nursery, wall_clock: Callable[[], float]) -> KmsEmulator:
    kms = KmsEmulator(clock=wall_clock)
    kms.add_credentials(AK_ID, AK_SECRET)
    for name, data in SECRETS.items():
        kms.put_secret(name, data)
    await nursery.start(kms.serve)
    return kms


@pytest.fixture
async def sts(nursery: trio.Nursery, emulator: KmsEmulator) -> StsEmulator:
    """The STS emulator on loopback, for the KMS emulator's account and on its clock."""
    service = StsEmulator(emulator)
    await nursery.start(service.serve)
    return service


def agent_config(endpoint: str, **sections: Any) -> Config:
    """A config for tests: any free port, the emulator as KMS, quick retries, and overrides.

    `sections` maps a section name (server, cache, kms) to a dict of field overrides.
    """
    server = replace(ServerConfig(http_port=0), **sections.get("server", {}))
    cache = replace(CacheConfig(), **sections.get("cache", {}))
    kms = replace(
        KmsConfig(endpoint=endpoint, protocol="http", max_retries=1, connect_timeout_ms=500, read_timeout_ms=1000),
        **sections.get("kms", {}),
    )
    return Config(server=server, cache=cache, kms=kms)


@dataclass
class RunningAgent:
    port: int
    client: httpx.AsyncClient
    stop: trio.Event

    async def get(self, path: str, *, token: str | None = TOKEN, **kwargs: Any) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        if token is not None:
            headers.setdefault("X-KMS-Token", token)
        return await self.client.get(path, headers=headers, **kwargs)


StartAgent = Callable[..., Awaitable[RunningAgent]]


async def read_for(
    agent_get: Callable[[], Awaitable[httpx.Response]], seconds: float, every: float
) -> list[tuple[float, int]]:
    """(time since the start, status) of a read every `every` seconds for `seconds` (on trio's clock)."""
    statuses = []
    started = trio.current_time()
    while trio.current_time() - started < seconds:
        response = await agent_get()
        statuses.append((trio.current_time() - started, response.status_code))
        await trio.sleep(every)
    return statuses


@pytest.fixture
async def start_agent(
    nursery: trio.Nursery, emulator: KmsEmulator, wall_clock: Callable[[], float]
) -> AsyncIterator[StartAgent]:
    """Starts `run_agent` in the test's nursery; `credentials` replaces the static test key, other
    keyword arguments go to `agent_config`."""
    clients: list[httpx.AsyncClient] = []

    async def start(credentials: CredentialSource | None = None, **sections: Any) -> RunningAgent:
        config = agent_config(emulator.endpoint, **sections)
        stop = trio.Event()
        port = await nursery.start(
            partial(
                run_agent,
                config,
                token=TokenSource(TOKEN.encode()),
                credentials=credentials or StaticCredentials(Credentials(AK_ID, AK_SECRET), "test"),
                shutdown=stop.wait,
                clock=wall_clock,
            )
        )
        client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10)
        clients.append(client)
        return RunningAgent(port, client, stop)

    yield start
    for client in clients:
        await client.aclose()
