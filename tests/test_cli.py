"""`python -m kmsagent` as a process: exit codes, one-line errors, serving, signals, logs, --dev."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from conftest import AK_ID, AK_SECRET, SECRET_MATERIAL, SECRETS, TOKEN
from kmsagent import __version__
from kmsagent.config import Config, parse_config
from kmsagent.emulator import KmsEmulator, MetadataEmulator

ROOT = Path(__file__).resolve().parents[1]
BASE_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
AGENT_ENV = {**BASE_ENV, "KMS_TOKEN": TOKEN, "ALIBABA_CLOUD_ACCESS_KEY_ID": AK_ID, "ALIBABA_CLOUD_ACCESS_KEY_SECRET": AK_SECRET}


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kmsagent", *args], env=env or BASE_ENV, cwd=cwd, capture_output=True, text=True, timeout=30
    )


def write_config(tmp_path: Path, endpoint: str, credentials: str = "") -> Path:
    """A config for the agent process; the metadata service is never the real 100.100.100.200."""
    path = tmp_path / "kmsagent.toml"
    path.write_text(
        f"""
[Server]
HttpPort = 0
[KMS]
Endpoint = "{endpoint}"
Protocol = "http"
MaxRetries = 0
[Credentials]
MetadataEndpoint = "http://127.0.0.1:9"
{credentials}
[Log]
Level = "debug"
Path = "{tmp_path / 'logs'}"
"""
    )
    return path


@dataclass
class AgentProcess:
    process: trio.Process
    port: int
    stdout: list[str]
    stderr_path: Path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@asynccontextmanager
async def agent_process(
    args: list[str], env: dict[str, str], tmp_path: Path, until: str = "listening on http://127.0.0.1:"
) -> AsyncIterator[AgentProcess]:
    """Starts the agent, reads stdout (bounded) up to a line with `until`, kills it at the end."""
    stderr_path = tmp_path / "stderr.txt"
    with stderr_path.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "kmsagent", *args], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=stderr
        )
    try:
        lines = await read_lines_until(process, until)
        listening = next(line for line in lines if "listening on" in line)
        port = int(listening.rsplit(":", 1)[1])
        yield AgentProcess(process, port, lines, stderr_path)
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def read_lines_until(process: trio.Process, marker: str, timeout: float = 20) -> list[str]:
    assert process.stdout is not None
    buffer, lines = b"", []
    with trio.fail_after(timeout):
        while not any(marker in line for line in lines):
            chunk = await process.stdout.receive_some(4096)
            assert chunk, f"agent exited before {marker!r}: {lines}"
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            lines += [line.decode() for line in complete]
    return lines


async def stop(agent: AgentProcess, signum: int = signal.SIGTERM) -> int:
    agent.process.send_signal(signum)
    with trio.fail_after(5):  # SPEC §1: exit within 5 s
        return await agent.process.wait()


def assert_one_line(text: str) -> None:
    assert text.strip() and len(text.strip().splitlines()) == 1, text
    assert "Traceback" not in text


@pytest.mark.parametrize(("value", "kept"), [("sdk", False), ("SDK ", False), ("app", True)])
def test_debug_sdk_is_removed_from_the_environment(value: str, kept: bool) -> None:
    from kmsagent.cli import scrub_environment

    env = {"DEBUG": value, "PATH": "/bin"}
    scrub_environment(env)
    assert ("DEBUG" in env) is kept and env["PATH"] == "/bin"


def test_version() -> None:
    result = run_cli("--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"kmsagent {__version__}")


def test_check_config_prints_the_effective_config() -> None:
    result = run_cli("--check-config", "--config", "conf/kmsagent.toml")
    assert result.returncode == 0
    assert parse_config(tomllib.loads(result.stdout)) == Config()


def test_check_config_reads_kmsagent_config_from_the_environment(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text("[Cache]\nTtlSeconds = 42\n")
    result = run_cli("--check-config", env={**BASE_ENV, "KMSAGENT_CONFIG": str(tmp_path / "c.toml")})
    assert result.returncode == 0 and "TtlSeconds = 42" in result.stdout


@pytest.mark.parametrize(
    ("text", "named"),
    [("[Server]\nHttpPort = 80\n", "HttpPort"), ("[Server]\nBogus = 1\n", "Bogus"), ("[Server\n", "invalid TOML")],
)
def test_a_bad_config_exits_2_with_one_line(tmp_path: Path, text: str, named: str) -> None:
    (tmp_path / "bad.toml").write_text(text)
    result = run_cli("--config", str(tmp_path / "bad.toml"), env=AGENT_ENV)
    assert result.returncode == 2
    assert_one_line(result.stderr)
    assert named in result.stderr


def test_a_bad_command_line_exits_2_with_one_line() -> None:
    result = run_cli("--bogus")
    assert result.returncode == 2
    assert_one_line(result.stderr)


def test_no_token_exits_1_naming_the_variables(tmp_path: Path) -> None:
    env = {key: value for key, value in AGENT_ENV.items() if key != "KMS_TOKEN"}
    result = run_cli("--config", str(write_config(tmp_path, "127.0.0.1:1")), env=env)
    assert result.returncode == 1
    assert_one_line(result.stderr)
    assert "KMS_TOKEN" in result.stderr


def test_access_key_credentials_missing_exits_1(tmp_path: Path) -> None:
    config = write_config(tmp_path, "127.0.0.1:1", 'Type = "access_key"')
    result = run_cli("--config", str(config), env={**BASE_ENV, "KMS_TOKEN": TOKEN})
    assert result.returncode == 1
    assert_one_line(result.stderr)
    assert "ALIBABA_CLOUD_ACCESS_KEY_ID" in result.stderr


async def test_a_port_in_use_exits_1(tmp_path: Path) -> None:
    with trio.socket.socket() as taken:
        await taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path, "127.0.0.1:1").read_text().replace("HttpPort = 0", f"HttpPort = {port}")
        (tmp_path / "port.toml").write_text(config)
        result = await trio.to_thread.run_sync(lambda: run_cli("--config", str(tmp_path / "port.toml"), env=AGENT_ENV))
    assert result.returncode == 1
    assert_one_line(result.stderr.splitlines()[-1])
    assert "in use" in result.stderr and "Traceback" not in result.stderr


async def test_serves_secrets_then_stops_on_sigterm_without_leaking(tmp_path: Path, emulator: KmsEmulator) -> None:
    config = write_config(tmp_path, emulator.endpoint)
    async with agent_process(["--config", str(config)], AGENT_ENV, tmp_path) as agent:
        assert agent.stdout == [f"kmsagent {__version__} listening on http://127.0.0.1:{agent.port}"]
        async with httpx.AsyncClient(headers={"X-KMS-Token": TOKEN}, timeout=10) as client:
            for name, value in SECRETS.items():
                response = await client.get(agent.url(f"/secretsmanager/get?secretId={name}"))
                assert response.status_code == 200 and response.json()["SecretData"] == value
            assert (await client.get(agent.url("/secretsmanager/get?secretId=db/password"))).headers["x-kms-agent-cache"] == "hit"
            missing = await client.get(agent.url("/secretsmanager/get?secretId=no-such-secret"))
            assert (missing.status_code, missing.json()["Code"]) == (404, "Forbidden.ResourceNotFound")
            assert (await client.get(agent.url("/ping"), headers={"X-KMS-Token": "wrong"})).status_code == 200
            assert (await client.get(agent.url("/v1/api-key"), headers={"X-KMS-Token": "wrong"})).status_code == 403
        assert await stop(agent) == 0
    log_files = list((tmp_path / "logs").iterdir())
    assert [path.name for path in log_files] == ["kmsagent.log"]
    outputs = {"stderr": agent.stderr_path.read_text(), "log": log_files[0].read_text(), "stdout": "\n".join(agent.stdout)}
    assert "no-such-secret" in outputs["log"] and '"level"' in outputs["log"]  # debug request lines, JSON
    for where, text in outputs.items():
        for material in SECRET_MATERIAL:
            assert material not in text, f"secret material in {where}"


async def test_the_ecs_ram_role_is_the_auto_source_without_keys(tmp_path: Path, emulator: KmsEmulator, nursery: trio.Nursery) -> None:
    metadata = MetadataEmulator(emulator)
    await nursery.start(metadata.serve)
    config = write_config(tmp_path, emulator.endpoint).read_text()
    config = config.replace('MetadataEndpoint = "http://127.0.0.1:9"', f'MetadataEndpoint = "{metadata.endpoint}"')
    (tmp_path / "ecs.toml").write_text(config)
    env = {**BASE_ENV, "KMS_TOKEN": TOKEN}
    async with agent_process(["--config", str(tmp_path / "ecs.toml")], env, tmp_path) as agent:
        async with httpx.AsyncClient(headers={"X-KMS-Token": TOKEN}, timeout=10) as client:
            response = await client.get(agent.url("/v1/api-key"))
        assert response.status_code == 200 and response.json()["SecretData"] == SECRETS["api-key"]
        assert emulator.calls[-1].access_key_id == metadata.issued[0].access_key_id
        assert await stop(agent) == 0
    stderr = agent.stderr_path.read_text()
    assert "ecs_ram_role" in stderr
    issued = metadata.issued[0]
    for value in (issued.access_key_id, issued.access_key_secret, issued.security_token):
        assert value not in stderr


async def test_a_rotated_token_file_is_picked_up_without_restart(tmp_path: Path, emulator: KmsEmulator) -> None:
    token_file = tmp_path / "kmstoken"
    token_file.write_text("first-file-token\n")
    env = {**AGENT_ENV, "KMS_TOKEN": f"file://{token_file}"}
    async with agent_process(["--config", str(write_config(tmp_path, emulator.endpoint))], env, tmp_path) as agent:
        async with httpx.AsyncClient(timeout=10) as client:

            async def status(token: str) -> int:
                response = await client.get(agent.url("/v1/api-key"), headers={"X-KMS-Token": token})
                return response.status_code

            assert await status("first-file-token") == 200
            token_file.write_text("second-file-token\n")
            with trio.fail_after(5):
                while await status("second-file-token") != 200:
                    await trio.sleep(0.1)
            assert await status("first-file-token") == 403
        assert await stop(agent, signal.SIGINT) == 0


@pytest.mark.parametrize("credentials", ["auto", "ecs_ram_role"])
async def test_dev_mode_prints_a_curl_line_that_works(tmp_path: Path, credentials: str) -> None:
    (tmp_path / "dev.toml").write_text(
        f'[Server]\nHttpPort = 0\n[Credentials]\nType = "{credentials}"\n[Log]\nPath = "{tmp_path / "logs"}"\n'
    )
    shutil.copy(ROOT / "conf" / "dev-secrets.toml", tmp_path / "dev-secrets.toml")
    async with agent_process(["--dev", "--config", str(tmp_path / "dev.toml")], BASE_ENV, tmp_path, "curl ") as agent:
        curl_line = next(line for line in agent.stdout if "curl " in line)
        command = shlex.split(curl_line.strip())
        assert command[0] == "curl"
        if shutil.which("curl"):
            result = await trio.run_process(command, capture_stdout=True)
            body = httpx.Response(200, content=result.stdout).json()
        else:  # the same request without curl
            token = command[2].split(": ", 1)[1]
            body = httpx.get(command[3], headers={"X-KMS-Token": token}).json()
        demo = tomllib.loads((ROOT / "conf" / "dev-secrets.toml").read_text())["secret"][0]
        assert (body["SecretName"], body["SecretData"]) == (demo["name"], demo["data"])
        assert await stop(agent, signal.SIGINT) == 0
