"""`python -m kmsagent` as a process: exit codes, one-line errors, serving, signals, logs, --dev."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from conftest import AK_ID, AK_SECRET, SECRET_MATERIAL, SECRETS, TOKEN, eventually
from kmsagent import __version__
from kmsagent.config import Config, parse_config
from kmsagent.emulator import Fault, KmsEmulator, MetadataEmulator

ROOT = Path(__file__).resolve().parents[1]
BASE_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", tempfile.gettempdir())}
AGENT_ENV = {
    **BASE_ENV,
    "KMS_TOKEN": TOKEN,
    "ALIBABA_CLOUD_ACCESS_KEY_ID": AK_ID,
    "ALIBABA_CLOUD_ACCESS_KEY_SECRET": AK_SECRET,
}


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kmsagent", *args],
        env=env or BASE_ENV,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,  # the tests read the exit code
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


async def read_lines_until(process: trio.Process, marker: str, seconds: float = 20) -> list[str]:
    assert process.stdout is not None
    buffer, lines = b"", []
    with trio.fail_after(seconds):
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
            assert (await client.get(agent.url("/secretsmanager/get?secretId=db/password"))).headers[
                "x-kms-agent-cache"
            ] == "hit"
            missing = await client.get(agent.url("/secretsmanager/get?secretId=no-such-secret"))
            assert (missing.status_code, missing.json()["Code"]) == (404, "Forbidden.ResourceNotFound")
            assert (await client.get(agent.url("/ping"), headers={"X-KMS-Token": "wrong"})).status_code == 200
            assert (await client.get(agent.url("/v1/api-key"), headers={"X-KMS-Token": "wrong"})).status_code == 403
        assert await stop(agent) == 0
    log_files = list((tmp_path / "logs").iterdir())
    assert [path.name for path in log_files] == ["kmsagent.log"]
    outputs = {
        "stderr": agent.stderr_path.read_text(),
        "log": log_files[0].read_text(),
        "stdout": "\n".join(agent.stdout),
    }
    assert "no-such-secret" in outputs["log"] and '"level"' in outputs["log"]  # debug request lines, JSON
    for where, text in outputs.items():
        for material in SECRET_MATERIAL:
            assert material not in text, f"secret material in {where}"


async def test_the_ecs_ram_role_is_the_auto_source_without_keys(
    tmp_path: Path, emulator: KmsEmulator, nursery: trio.Nursery
) -> None:
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

            async def second_token_works() -> bool:
                return await status("second-file-token") == 200

            assert await status("first-file-token") == 200
            token_file.write_text("second-file-token\n")
            await eventually(second_token_works, seconds=5, interval=0.1)
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
            async with httpx.AsyncClient() as client:
                body = (await client.get(command[3], headers={"X-KMS-Token": token})).json()
        demo = tomllib.loads((ROOT / "conf" / "dev-secrets.toml").read_text())["secret"][0]
        assert (body["SecretName"], body["SecretData"]) == (demo["name"], demo["data"])
        assert await stop(agent, signal.SIGINT) == 0


# --- signals from the first line (SPEC §1) ---------------------------------------------------------


def proc_status(pid: int) -> dict[str, str]:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {key: value.strip() for key, value in (line.split(":", 1) for line in lines)}


def holds_signals(pid: int) -> bool:
    """Whether the process has its own SIGTERM handler: signals.hold(), on the package's first
    lines, installs it last of three."""
    caught = proc_status(pid).get("SigCgt", "0")
    return bool(int(caught, 16) & (1 << (signal.SIGTERM - 1)))


def importing(pid: int) -> bool:
    """Whether the process is into the heavy imports of start-up (trio, hypercorn, the SDKs):
    bare Python is about 10 MB resident, trio alone brings it past 20 MB (NOTES.md)."""
    resident = proc_status(pid).get("VmRSS", "0 kB").split()[0]
    return int(resident) >= 20 * 1024


@asynccontextmanager
async def spawned_agent(
    args: list[str], env: dict[str, str], tmp_path: Path, ready: Callable[[int], bool] = holds_signals
) -> AsyncIterator[trio.Process]:
    """The agent process, once `ready(pid)`: by default once its package's first line has held
    signals (a signal during the interpreter's own start-up is out of the package's reach)."""
    with (tmp_path / "stderr.txt").open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "kmsagent", *args], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=stderr
        )
    try:
        with trio.fail_after(20):
            while not ready(process.pid):
                assert process.poll() is None, "the agent exited before the moment under test"
                await trio.sleep(0.001)
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def stopped_within_5_s(process: trio.Process, signum: int) -> tuple[int, str]:
    """Sends `signum`; the exit status and everything the process printed on stdout."""
    process.send_signal(signum)
    with trio.fail_after(5):  # SPEC §1: exit within 5 s, from any state
        status = await process.wait()
    assert process.stdout is not None
    stdout = b""
    while chunk := await process.stdout.receive_some(65536):
        stdout += chunk
    return status, stdout.decode()


def assert_no_traceback(tmp_path: Path) -> None:
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("moment", ["first-line", 0.1, 0.3, 0.6])
async def test_a_stop_signal_at_any_moment_of_start_up_exits_0(
    tmp_path: Path, signum: int, moment: str | float
) -> None:
    """At the package's first line; then 0.1, 0.3 and 0.6 s after spawning but never before the
    heavy imports began (on a loaded machine the interpreter alone can take longer than that)."""
    config = write_config(tmp_path, "127.0.0.1:1")
    spawned = trio.current_time()
    ready = holds_signals if moment == "first-line" else importing
    async with spawned_agent(["--config", str(config)], AGENT_ENV, tmp_path, ready) as process:
        if isinstance(moment, float):
            await trio.sleep_until(spawned + moment)  # the moment under test, not a synchronisation
        status, _ = await stopped_within_5_s(process, signum)
    assert status == 0
    assert_no_traceback(tmp_path)


async def hanging_kms(nursery: trio.Nursery) -> tuple[str, trio.Event]:
    """An endpoint that accepts connections and never answers; the event fires on the first."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    accepted = trio.Event()

    async def hang() -> None:
        async with listener:
            streams = [await listener.accept()]
            accepted.set()
            await trio.sleep_forever()
            del streams

    nursery.start_soon(hang)
    return f"127.0.0.1:{listener.socket.getsockname()[1]}", accepted


def with_prefetch(tmp_path: Path, endpoint: str) -> Path:
    text = write_config(tmp_path, endpoint).read_text()
    text = text.replace("MaxRetries = 0", "MaxRetries = 0\nReadTimeoutMs = 60000")
    (tmp_path / "prefetch.toml").write_text(text.replace("[Log]", '[Cache]\nPrefetch = ["db/password"]\n[Log]'))
    return tmp_path / "prefetch.toml"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_stop_signal_during_a_prefetch_against_a_hanging_kms(
    tmp_path: Path, nursery: trio.Nursery, signum: int
) -> None:
    endpoint, accepted = await hanging_kms(nursery)
    async with spawned_agent(["--config", str(with_prefetch(tmp_path, endpoint))], AGENT_ENV, tmp_path) as process:
        with trio.fail_after(20):
            await accepted.wait()
        status, stdout = await stopped_within_5_s(process, signum)
    assert status == 0
    assert "listening" not in stdout  # the port never opened
    assert_no_traceback(tmp_path)


async def wait_for_text(path: Path, marker: str, seconds: float = 10) -> None:
    """Until `marker` shows in `path` (an agent process's stderr or log)."""
    await eventually(lambda: marker in path.read_text(), seconds=seconds, interval=0.05)


async def test_sighup_during_start_up_is_held_and_applied(tmp_path: Path, emulator: KmsEmulator) -> None:
    config = write_config(tmp_path, emulator.endpoint)
    spawned = trio.current_time()
    async with spawned_agent(["--config", str(config)], AGENT_ENV, tmp_path) as process:
        await trio.sleep_until(spawned + 0.05)
        process.send_signal(signal.SIGHUP)
        lines = await read_lines_until(process, "listening on")
        port = int(lines[-1].rsplit(":", 1)[1])
        response = await trio.to_thread.run_sync(
            lambda: httpx.get(f"http://127.0.0.1:{port}/v1/api-key", headers={"X-KMS-Token": TOKEN})
        )
        assert response.status_code == 200
        await wait_for_text(tmp_path / "stderr.txt", f"SIGHUP: {config} unchanged")
        status, _ = await stopped_within_5_s(process, signal.SIGTERM)
    assert status == 0
    assert_no_traceback(tmp_path)


async def test_sighup_during_a_prefetch_is_survived(tmp_path: Path, emulator: KmsEmulator) -> None:
    emulator.inject(Fault(delay=1.5), times=1)
    config = with_prefetch(tmp_path, emulator.endpoint)
    async with spawned_agent(["--config", str(config)], AGENT_ENV, tmp_path) as process:
        await eventually(lambda: emulator.call_count("db/password") > 0, seconds=20, interval=0.01)
        process.send_signal(signal.SIGHUP)
        lines = await read_lines_until(process, "listening on")
        port = int(lines[-1].rsplit(":", 1)[1])
        response = await trio.to_thread.run_sync(
            lambda: httpx.get(f"http://127.0.0.1:{port}/v1/db/password", headers={"X-KMS-Token": TOKEN})
        )
        assert (response.status_code, response.headers["x-kms-agent-cache"]) == (200, "hit")
        await wait_for_text(tmp_path / "stderr.txt", f"SIGHUP: {config} unchanged")
        status, _ = await stopped_within_5_s(process, signal.SIGTERM)
    assert status == 0
    assert_no_traceback(tmp_path)


async def test_a_stderr_nobody_reads_neither_stalls_nor_blocks_a_stop(tmp_path: Path) -> None:
    """Nobody reads the agent's stderr, so its pipe is full after a few lines: requests, each a
    debug line, are still answered (lines that do not fit are dropped, logs.py), and SIGTERM
    still ends the agent with 0 within 5 s."""
    unread, stderr = os.pipe()
    fcntl.fcntl(stderr, fcntl.F_SETPIPE_SZ, 4096)  # the smallest pipe: it fills after a few lines
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "kmsagent", "--config", str(write_config(tmp_path, "127.0.0.1:1"))],
        env=AGENT_ENV, cwd=tmp_path, stdout=subprocess.PIPE, stderr=stderr,
    )
    os.close(stderr)
    try:
        lines = await read_lines_until(process, "listening on")
        url = f"http://127.0.0.1:{int(lines[-1].rsplit(':', 1)[1])}/ping?" + "x" * 190
        async with httpx.AsyncClient(timeout=5) as client, trio.open_nursery() as nursery:

            async def debug_lines() -> None:  # one debug log line (about 300 bytes) per request
                for _ in range(25):
                    assert (await client.get(url)).status_code == 200

            for _ in range(8):  # 200 lines: fifty times what the pipe holds
                nursery.start_soon(debug_lines)
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(5):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        os.close(unread)


# --- logging and --dev's token ---------------------------------------------------------------------


async def test_the_token_file_warning_reaches_the_configured_sinks(tmp_path: Path, emulator: KmsEmulator) -> None:
    token_file = tmp_path / "kmstoken"
    token_file.write_text("a-token-in-a-loose-file\n")
    token_file.chmod(0o644)
    env = {**AGENT_ENV, "KMS_TOKEN": f"file://{token_file}"}
    async with agent_process(["--config", str(write_config(tmp_path, emulator.endpoint))], env, tmp_path) as agent:
        assert await stop(agent) == 0
    for sink in (tmp_path / "logs" / "kmsagent.log", agent.stderr_path):  # both in [Log] Format, json
        records = [json.loads(line) for line in sink.read_text().splitlines()]
        warning = next(record for record in records if "readable by every user" in record["message"])
        assert warning["level"] == "WARNING", sink


async def test_dev_mode_uses_the_token_set_in_the_environment(tmp_path: Path) -> None:
    own = "my-own-dev-token-Vq81"
    (tmp_path / "dev.toml").write_text(f'[Server]\nHttpPort = 0\n[Log]\nPath = "{tmp_path / "logs"}"\n')
    shutil.copy(ROOT / "conf" / "dev-secrets.toml", tmp_path / "dev-secrets.toml")
    env = {**BASE_ENV, "KMS_TOKEN": own}
    async with agent_process(["--dev", "--config", str(tmp_path / "dev.toml")], env, tmp_path, "curl ") as agent:
        curl_line = next(line for line in agent.stdout if "curl " in line).strip()
        assert own not in "\n".join(agent.stdout)  # a token from the environment is not printed
        async with httpx.AsyncClient(timeout=10) as client:
            demo = tomllib.loads((ROOT / "conf" / "dev-secrets.toml").read_text())["secret"][0]
            response = await client.get(agent.url(f"/v1/{demo['name']}"), headers={"X-KMS-Token": own})
            assert response.status_code == 200 and response.json()["SecretData"] == demo["data"]
        result = await trio.run_process(["sh", "-c", curl_line], env=env, capture_stdout=True)
        assert json.loads(result.stdout)["SecretData"] == demo["data"]
        assert await stop(agent, signal.SIGINT) == 0


# --- --port, --help and the start line (issue 11) --------------------------------------------------


def free_port() -> int:
    """A port nothing listens on at this moment (the OS's pick for port 0)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def dev_config(tmp_path: Path, extra: str = "") -> Path:
    """A --dev config with HttpPort = 0, beside a copy of the demo secrets."""
    (tmp_path / "dev.toml").write_text(f'[Server]\nHttpPort = 0\n{extra}[Log]\nPath = "{tmp_path / "logs"}"\n')
    shutil.copy(ROOT / "conf" / "dev-secrets.toml", tmp_path / "dev-secrets.toml")
    return tmp_path / "dev.toml"


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`kmsagent ARGS` in this process (argparse exits by SystemExit): status, stdout, stderr."""
    from kmsagent.cli import main

    try:
        status = main(list(args))
    except SystemExit as stopped:
        status = int(stopped.code or 0)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("value", ["80", "1023", "65536", "x", "-1", "2025.0", "\u00b2", ""])
def test_a_port_that_http_port_would_refuse_is_a_usage_error(capsys: pytest.CaptureFixture[str], value: str) -> None:
    status, _, stderr = run_main(capsys, "--check-config", "--port", value)
    assert status == 2
    assert_one_line(stderr)
    assert "--port" in stderr and "1024..65535" in stderr


def test_port_80_exits_2_with_one_line() -> None:
    result = run_cli("--port", "80", env=AGENT_ENV)
    assert result.returncode == 2
    assert_one_line(result.stderr)
    assert "'80': must be 0 or an integer in 1024..65535" in result.stderr


def test_the_port_overrides_http_port_in_the_effective_config(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "c.toml").write_text("[Server]\nHttpPort = 2025\n")
    status, stdout, _ = run_main(capsys, "--check-config", "--config", str(tmp_path / "c.toml"), "--port", "3999")
    assert status == 0 and tomllib.loads(stdout)["Server"]["HttpPort"] == 3999


async def test_a_port_in_use_names_how_to_pick_another(tmp_path: Path) -> None:
    with trio.socket.socket() as taken:
        await taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path, "127.0.0.1:1")  # HttpPort = 0: the --port is what is in use
        result = await trio.to_thread.run_sync(
            lambda: run_cli("--config", str(config), "--port", str(port), env=AGENT_ENV)
        )
    assert result.returncode == 1
    last = result.stderr.splitlines()[-1]
    assert_one_line(last)
    assert f"cannot listen on 127.0.0.1:{port}: the port is in use" in last
    assert "--port N" in last and "[Server] HttpPort" in last


@pytest.mark.parametrize("dev", [False, True], ids=["agent", "dev"])
async def test_the_agent_serves_on_the_port_given(tmp_path: Path, emulator: KmsEmulator, dev: bool) -> None:
    port = free_port()
    if dev:
        args, env, until = ["--dev", "--config", str(dev_config(tmp_path))], BASE_ENV, "curl "
    else:
        args, env, until = ["--config", str(write_config(tmp_path, emulator.endpoint))], AGENT_ENV, "listening on"
    async with agent_process([*args, "--port", str(port)], env, tmp_path, until) as agent:
        assert agent.port == port
        assert f"kmsagent {__version__} listening on http://127.0.0.1:{port}" in agent.stdout
        if dev:
            assert any(f"'http://127.0.0.1:{port}/secretsmanager/get?secretId=" in line for line in agent.stdout)
        response = await trio.to_thread.run_sync(lambda: httpx.get(agent.url("/ping"), timeout=5))
        assert response.text == "healthy"
        if not dev:  # a reload reads the file's HttpPort = 0 and keeps the --port: nothing changed
            agent.process.send_signal(signal.SIGHUP)
            await wait_for_text(agent.stderr_path, f"SIGHUP: {args[1]} unchanged")
            assert "HttpPort" not in agent.stderr_path.read_text()
        assert await stop(agent) == 0


async def test_scripts_dev_passes_the_port_on(tmp_path: Path) -> None:
    """scripts/dev in a copy of the checkout whose ./.venv is this test's Python (no install)."""
    (tmp_path / "scripts").mkdir()
    for name in ("dev", "_venv.sh"):
        shutil.copy(ROOT / "scripts" / name, tmp_path / "scripts" / name)
    for name in ("pyproject.toml", "requirements.lock"):
        shutil.copy(ROOT / name, tmp_path / name)
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    (venv_bin / "python").chmod(0o755)
    for stamp, name in ((".lock", "requirements.lock"), (".project", "pyproject.toml")):  # as _venv.sh names them
        digest = hashlib.sha256((ROOT / name).read_bytes()).hexdigest()[:16]
        (tmp_path / ".venv" / f"{stamp}-{digest}").touch()
    port = free_port()
    with (tmp_path / "stderr.txt").open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            [str(tmp_path / "scripts" / "dev"), "--port", str(port)],
            env={**BASE_ENV, "PYTHON": sys.executable}, cwd=tmp_path, stdout=subprocess.PIPE, stderr=stderr,
        )
    try:
        lines = await read_lines_until(process, "curl ")
        assert f"kmsagent {__version__} listening on http://127.0.0.1:{port}" in lines
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(5):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


def test_help_lists_the_environment_variables_and_the_exit_statuses(capsys: pytest.CaptureFixture[str]) -> None:
    status, stdout, _ = run_main(capsys, "--help")
    assert status == 0
    for variable in (
        "KMSAGENT_CONFIG",
        "KMS_TOKEN",
        "KMS_SESSION_TOKEN",
        "KMS_CONTAINER_AUTHORIZATION_TOKEN",
        "ALIBABA_CLOUD_ACCESS_KEY_ID",
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET",
        "ALIBABA_CLOUD_SECURITY_TOKEN",
        "ALIBABA_CLOUD_ROLE_ARN",
        "ALIBABA_CLOUD_OIDC_PROVIDER_ARN",
        "ALIBABA_CLOUD_OIDC_TOKEN_FILE",
        "ALIBABA_CLOUD_PROFILE",
        "ALIBABA_CLOUD_CREDENTIALS_FILE",
        "ALIBABA_CLOUD_CLI_PROFILE_DISABLED",
        "ALIBABA_CLOUD_ECS_METADATA_DISABLED",
        "ALIBABA_CLOUD_CREDENTIALS_URI",
        "ALIBABA_CLOUD_STS_REGION",
        "ALIBABA_CLOUD_VPC_ENDPOINT_ENABLED",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "DEBUG",
    ):
        assert re.search(rf"\b{variable}\b", stdout), variable
    statuses = stdout.split("exit status:", 1)[1]
    for status in ("0", "1", "2"):
        assert re.search(rf"^  {status}  \S", statuses, re.MULTILINE), status
    assert "-- CMD" in statuses  # a supervised program's own status
    assert "--port N" in stdout


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="no ::1 on this host")
@pytest.mark.parametrize("dev", [False, True], ids=["agent", "dev"])
async def test_the_start_line_names_the_ipv6_address_too(tmp_path: Path, emulator: KmsEmulator, dev: bool) -> None:
    if dev:
        args, env = ["--dev", "--config", str(dev_config(tmp_path, "BindIPv6 = true\n"))], BASE_ENV
    else:
        text = (
            write_config(tmp_path, emulator.endpoint)
            .read_text()
            .replace("HttpPort = 0", "HttpPort = 0\nBindIPv6 = true")
        )
        (tmp_path / "v6.toml").write_text(text)
        args, env = ["--config", str(tmp_path / "v6.toml")], AGENT_ENV
    async with agent_process(args, env, tmp_path) as agent:
        port = agent.port
        line = next(line for line in agent.stdout if "listening on" in line)
        assert line == f"kmsagent {__version__} listening on http://127.0.0.1:{port} http://[::1]:{port}"
        response = await trio.to_thread.run_sync(lambda: httpx.get(f"http://[::1]:{port}/ping", timeout=5))
        assert response.text == "healthy"
        assert await stop(agent) == 0
