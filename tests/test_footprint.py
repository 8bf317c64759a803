"""Issue 17, footprint and steady latency: what the agent loads, and how long it keeps a connection.

The OpenAPI SDK's signer module and the credentials package pull in aiohttp, apscheduler,
requests, urllib3 and cryptography: 48 MB and ≈0.7 s of start-up (74 MB idle before, ≈53 MB
after; docs/benchmarks.md). The agent with static keys or an ECS role must load none of them,
when importing or when running; the OIDC role loads the credentials package when it is built.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import h11
import httpx
import pytest
import trio

from conftest import AK_ID, AK_SECRET, SECRETS, TOKEN, StartAgent
from kmsagent.emulator import KmsEmulator, MetadataEmulator
from test_cli import read_lines_until, write_config

HEAVY = (
    "aiohttp",
    "apscheduler",
    "requests",
    "urllib3",
    "cryptography",
    "alibabacloud_tea_openapi",
    "alibabacloud_credentials",
    # All ≈280 model modules at once (wire.py reads the two answers it needs without them).
    "alibabacloud_kms20160120",
    "darabonba",
    "Tea",
)
#: Loaded only by what uses them: the credentials that fetch over HTTP (an ECS role, STS, a URI);
#: KMS calls go over kms/transport.py.
ON_USE = ("httpx", "httpcore")
#: Runs the agent as `python -m kmsagent` does, and writes the heavy packages it loaded at exit.
AGENT_REPORTING_MODULES = f"""
import atexit, json, os, sys
def report():
    with open(os.environ["KMSAGENT_TEST_MODULES"], "w") as file:
        json.dump(sorted({{name.split(".")[0] for name in sys.modules}} & set({HEAVY + ON_USE!r})), file)
atexit.register(report)
from kmsagent.__main__ import main
sys.exit(main())
"""
def heavy_modules_after(code: str) -> list[str]:
    loaded = "{n.split('.')[0] for n in sys.modules}"
    probe = f"import json, sys\n{code}\nprint(json.dumps(sorted({loaded} & set({HEAVY + ON_USE!r}))))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    return list(json.loads(result.stdout.splitlines()[-1]))


def test_importing_the_agent_loads_no_heavy_sdk_module() -> None:
    assert heavy_modules_after("import kmsagent.cli") == []


def test_an_oidc_role_loads_the_credentials_package_only_when_built() -> None:
    """And the SDK's own stderr handlers, attached at its import, are gone (logs.py routes the logger)."""
    probe = """
import json, logging, sys
from kmsagent.credentials.oidc import OidcRoleCredentials
def loaded():
    return sorted({name.split(".")[0] for name in sys.modules} & {"alibabacloud_credentials"})
print(json.dumps(loaded()))
OidcRoleCredentials.from_profile(
    role_arn="acs:ram::1:role/r", provider_arn="acs:ram::1:oidc-provider/p", token_file="/nonexistent", session_name="s"
)
print(json.dumps(loaded()))
print(json.dumps(logging.getLogger("credentials").handlers))
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.splitlines() == ["[]", '["alibabacloud_credentials"]', "[]"]


@asynccontextmanager
async def reporting_agent(config: Path, env: dict[str, str], tmp_path: Path) -> AsyncIterator[tuple[int, Path]]:
    """The agent process with `config`; yields its port and the file its heavy modules go to at exit."""
    modules = tmp_path / "modules.json"
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", AGENT_REPORTING_MODULES, "--config", str(config)],
        env={**env, "KMSAGENT_TEST_MODULES": str(modules)},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        lines = await read_lines_until(process, "listening on http://127.0.0.1:")
        yield int(lines[-1].rsplit(":", 1)[1]), modules
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(5):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


@pytest.mark.parametrize(
    "source", ["access_key", "auto, keys in the environment", "ecs_ram_role", "auto, the ECS role"]
)
async def test_the_running_agent_loads_no_heavy_sdk_module(
    source: str, tmp_path: Path, emulator: KmsEmulator, nursery: trio.Nursery
) -> None:
    """Started, signing a GetSecretValue and parsing the answer, stopped: none of them loaded, nor
    httpx with static keys."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "KMS_TOKEN": TOKEN}
    credentials = (
        'Type = "access_key"' if source == "access_key" else 'Type = "ecs_ram_role"' if source == "ecs_ram_role" else ""
    )
    config = write_config(tmp_path, emulator.endpoint, credentials)
    if "ecs" in source.lower():
        metadata = MetadataEmulator(emulator)
        await nursery.start(metadata.serve)
        config.write_text(config.read_text().replace("http://127.0.0.1:9", metadata.endpoint))
    else:
        env |= {"ALIBABA_CLOUD_ACCESS_KEY_ID": AK_ID, "ALIBABA_CLOUD_ACCESS_KEY_SECRET": AK_SECRET}
    async with reporting_agent(config, env, tmp_path) as (port, modules):
        async with httpx.AsyncClient(headers={"X-KMS-Token": TOKEN}, timeout=10) as client:
            response = await client.get(f"http://127.0.0.1:{port}/secretsmanager/get?secretId=db/password")
        assert response.status_code == 200 and response.json()["SecretData"] == SECRETS["db/password"]
    on_use = ["httpcore", "httpx"] if "ecs" in source.lower() else []  # the metadata service's client
    assert json.loads(modules.read_text()) == on_use


async def test_one_keep_alive_connection_serves_1500_requests_and_stays_open(start_agent: StartAgent) -> None:
    """Hypercorn closes a connection after 1,000 requests by default; a local client is never made
    to reconnect (the idle timeout still applies). Pipelined in batches, so it takes a second."""
    agent = await start_agent()
    request = b"GET /ping HTTP/1.1\r\nHost: localhost\r\n\r\n"
    parser = h11.Connection(h11.CLIENT)  # parses the answers; the requests go out as raw bytes
    answered = 0
    stream = await trio.open_tcp_stream("127.0.0.1", agent.port)
    async with stream:
        with trio.fail_after(60):
            while answered < 1501:
                batch = min(100, 1501 - answered)
                await stream.send_all(request * batch)
                for _ in range(batch):
                    parser.send(h11.Request(method="GET", target="/ping", headers=[("Host", "localhost")]))
                    parser.send(h11.EndOfMessage())
                    response = None
                    while True:
                        event = parser.next_event()
                        if event is h11.NEED_DATA:
                            data = await stream.receive_some(65536)
                            assert data, f"the agent closed the connection after {answered} requests"
                            parser.receive_data(data)
                        elif isinstance(event, h11.Response):
                            response = event
                        elif isinstance(event, h11.EndOfMessage):
                            break
                    assert response is not None and response.status_code == 200
                    assert (b"connection", b"close") not in response.headers, f"closed after {answered + 1} requests"
                    answered += 1
                    parser.start_next_cycle()
