"""Shared fixtures: the KMS emulator on loopback, and the agent serving in-process against it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import httpx
import pytest
import trio

from kmsagent.agent import run_agent
from kmsagent.config import CacheConfig, Config, KmsConfig, ServerConfig
from kmsagent.credentials import Credentials, StaticCredentials
from kmsagent.emulator import KmsEmulator
from kmsagent.token import TokenSource

AK_ID = "LTAItestAccessKeyId01"
AK_SECRET = "test-AccessKeySecret-Zq9x7Vw3"
TOKEN = "test-ssrf-token-Kp4m2Lr8"
SECRETS = {
    "db/password": "value-of-db-password-Hn5t",
    "api-key": "value-of-api-key-Jc8w",
    "app/config": '{"user": "app", "pass": "value-of-app-config-Rb2e"}',
}
#: Strings that must never appear in a log, an error body or stderr.
SECRET_MATERIAL = (AK_SECRET, TOKEN, *SECRETS.values())


@pytest.fixture
async def emulator(nursery: trio.Nursery) -> KmsEmulator:
    kms = KmsEmulator()
    kms.add_credentials(AK_ID, AK_SECRET)
    for name, data in SECRETS.items():
        kms.put_secret(name, data)
    await nursery.start(kms.serve)
    return kms


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


@pytest.fixture
async def start_agent(nursery: trio.Nursery, emulator: KmsEmulator) -> AsyncIterator[StartAgent]:
    """Starts `run_agent` in the test's nursery; keyword arguments go to `agent_config`."""
    clients: list[httpx.AsyncClient] = []

    async def start(**sections: Any) -> RunningAgent:
        config = agent_config(emulator.endpoint, **sections)
        stop = trio.Event()
        port = await nursery.start(
            partial(
                run_agent,
                config,
                token=TokenSource(TOKEN.encode()),
                credentials=StaticCredentials(Credentials(AK_ID, AK_SECRET), "test"),
                shutdown=stop.wait,
            )
        )
        client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10)
        clients.append(client)
        return RunningAgent(port, client, stop)

    yield start
    for client in clients:
        await client.aclose()
