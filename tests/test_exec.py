"""SPEC §9 `[Exec]`: the supervised child's environment, restarts and signals on Env changes,
stopping, exit statuses, the agent's non-dumpability, and config errors (agent processes against
the emulator, real signals)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from conftest import AK_SECRET, TOKEN, eventually
from kmsagent.config import ConfigError, parse_config, with_command
from kmsagent.emulator import KmsEmulator
from kmsagent.processes import child_environment, exit_status
from test_cli import AGENT_ENV, AgentProcess, agent_process, assert_one_line, read_lines_until, run_cli, write_config

#: The child: notes its start (with its environment) and the signals it gets in a JSON-lines log.
CHILD = r"""
import json, os, signal, sys
log, mode = sys.argv[1], sys.argv[2]

def note(event, **fields):
    with open(log, "a") as file:
        file.write(json.dumps({"event": event, "pid": os.getpid(), **fields}) + "\n")

def on_signal(signum, frame):
    note("signal", name=signal.Signals(signum).name)
    if signum in (signal.SIGTERM, signal.SIGINT):
        sys.exit(0)

note("start", env=dict(os.environ))
for signum in (signal.SIGHUP, signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, on_signal)
if mode == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
elif mode.startswith("exit-"):
    sys.exit(int(mode[5:]))
elif mode.startswith("kill-"):
    signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    os.kill(os.getpid(), signal.Signals[mode[5:]])
while True:
    signal.pause()
"""
ENV_A = '{"password": "exec-password-one-Tq7w", "port": 5432}'


def events(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def exec_config(tmp_path: Path, endpoint: str, exec_table: str, ttl: int = 1) -> Path:
    path = write_config(tmp_path, endpoint)
    path.write_text(path.read_text() + f"\n[Cache]\nTtlSeconds = {ttl}\n[Exec]\n{exec_table}\n")
    return path


def child_argv(tmp_path: Path, mode: str = "wait") -> list[str]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return [sys.executable, str(script), str(tmp_path / "events"), mode]


async def wait_exit(agent: AgentProcess, seconds: float) -> int:
    with trio.fail_after(seconds):
        return await agent.process.wait()


@pytest.fixture(autouse=True)
def no_child_left(tmp_path: Path) -> Iterator[None]:
    """A failing test kills its agent with SIGKILL, which cannot stop the child: this does."""
    yield
    for event in events(tmp_path / "events"):
        try:
            if str(tmp_path).encode() in Path(f"/proc/{event['pid']}/cmdline").read_bytes():
                os.kill(event["pid"], signal.SIGKILL)
        except OSError:
            pass


@pytest.fixture
def secrets(emulator: KmsEmulator) -> KmsEmulator:
    emulator.put_secret("exec/db", ENV_A)
    emulator.put_secret("exec/key", "exec-api-key-one-Mn4b")
    return emulator


ENV_TABLE = 'Env = {DB_PASSWORD = "exec/db#password", DB_PORT = "exec/db#port", API_KEY = "exec/key"}'


async def test_the_child_gets_env_secrets_and_no_credentials_token_or_notify_variables(
    tmp_path: Path, secrets: KmsEmulator
) -> None:
    config = exec_config(tmp_path, secrets.endpoint, ENV_TABLE)
    env = {
        **AGENT_ENV,
        "ALIBABA_CLOUD_ECS_METADATA_DISABLED": "true",
        "ALIBABA_CLOUD_ROLE_ARN": "acs:ram::1:role/x",
        "KMS_SESSION_TOKEN": "other-token",
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "WATCHDOG_USEC": "30000000",
        "WATCHDOG_PID": "1",
        "APP_SETTING": "kept",
    }
    log = tmp_path / "events"
    async with agent_process(["--config", str(config), "--", *child_argv(tmp_path)], env, tmp_path) as agent:
        await eventually(lambda: events(log))
        child_env = events(log)[0]["env"]
        assert (child_env["DB_PASSWORD"], child_env["DB_PORT"], child_env["API_KEY"]) == (
            "exec-password-one-Tq7w",
            "5432",
            "exec-api-key-one-Mn4b",
        )
        assert child_env["APP_SETTING"] == "kept" and child_env["PATH"] == AGENT_ENV["PATH"]
        leaked = [
            name
            for name in child_env
            if name.startswith("ALIBABA_CLOUD_") or "TOKEN" in name or (name in env and "NOTIFY" in name)
        ]
        assert leaked == [] and not {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"} & set(child_env)
        assert AK_SECRET not in json.dumps(child_env) and TOKEN not in json.dumps(child_env)
        async with httpx.AsyncClient(timeout=10) as client:
            metrics = (await client.get(agent.url("/metrics"))).text
        assert "kmsagent_exec_child_running 1.0" in metrics
        agent.process.send_signal(signal.SIGTERM)
        assert await wait_exit(agent, 5) == 0  # the child took SIGTERM and exited 0
    assert [e.get("name") for e in events(log) if e["event"] == "signal"] == ["SIGTERM"]
    stderr = agent.stderr_path.read_text()
    assert "exec-password-one-Tq7w" not in stderr and "exec-api-key-one-Mn4b" not in stderr


async def test_a_change_restarts_the_child_once_with_the_new_values(tmp_path: Path, secrets: KmsEmulator) -> None:
    command = json.dumps(child_argv(tmp_path))
    config = exec_config(tmp_path, secrets.endpoint, f"Command = {command}\n{ENV_TABLE}\nStopSignal = \"SIGINT\"")
    log = tmp_path / "events"
    async with agent_process(["--config", str(config)], AGENT_ENV, tmp_path) as agent:
        await eventually(lambda: events(log))
        # both secrets rotate together: changes within 1 s are one restart
        secrets.rotate("exec/db", ENV_A.replace("one", "two"))
        secrets.rotate("exec/key", "exec-api-key-two-Mn4b")
        await eventually(lambda: len([e for e in events(log) if e["event"] == "start"]) == 2)
        starts = [e for e in events(log) if e["event"] == "start"]
        assert (starts[1]["env"]["DB_PASSWORD"], starts[1]["env"]["API_KEY"]) == (
            "exec-password-two-Tq7w",
            "exec-api-key-two-Mn4b",
        )
        assert [e.get("name") for e in events(log) if e["event"] == "signal"] == ["SIGINT"]  # StopSignal
        calls = secrets.call_count()
        await eventually(lambda: secrets.call_count() >= calls + 4)  # refreshes with unchanged values
        assert len([e for e in events(log) if e["event"] == "start"]) == 2
        async with httpx.AsyncClient(timeout=10) as client:
            metrics = (await client.get(agent.url("/metrics"))).text
        assert "kmsagent_exec_restarts_total 1.0" in metrics
        assert zombies_of(agent.process.pid) == []
        agent.process.send_signal(signal.SIGINT)
        assert await wait_exit(agent, 5) == 0
    assert [e.get("name") for e in events(log) if e["event"] == "signal"] == ["SIGINT", "SIGINT"]  # forwarded as is


def zombies_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] == "Z" and int(fields[1]) == pid:
                found.append(int(entry))
    return found


async def test_a_signal_name_sends_that_signal_instead_of_restarting(tmp_path: Path, secrets: KmsEmulator) -> None:
    config = exec_config(tmp_path, secrets.endpoint, f'{ENV_TABLE}\nOnChange = "SIGHUP"')
    log = tmp_path / "events"
    async with agent_process(["--config", str(config), "--", *child_argv(tmp_path)], AGENT_ENV, tmp_path) as agent:
        await eventually(lambda: events(log))
        secrets.rotate("exec/key", "exec-api-key-two-Mn4b")
        await eventually(lambda: any(e["event"] == "signal" for e in events(log)))
        assert [(e["event"], e.get("name")) for e in events(log)] == [("start", None), ("signal", "SIGHUP")]
        agent.process.send_signal(signal.SIGTERM)
        assert await wait_exit(agent, 5) == 0


@pytest.mark.parametrize(("mode", "status"), [("exit-7", 7), ("kill-SIGUSR2", 128 + signal.SIGUSR2)])
async def test_the_childs_own_exit_stops_the_agent_with_its_status(
    tmp_path: Path, secrets: KmsEmulator, mode: str, status: int
) -> None:
    config = exec_config(tmp_path, secrets.endpoint, ENV_TABLE)
    async with agent_process(
        ["--config", str(config), "--", *child_argv(tmp_path, mode)], AGENT_ENV, tmp_path
    ) as agent:
        assert await wait_exit(agent, 10) == status
    assert "the agent stops" in agent.stderr_path.read_text()


async def test_a_child_that_ignores_sigterm_is_killed_after_stop_timeout(tmp_path: Path, secrets: KmsEmulator) -> None:
    config = exec_config(tmp_path, secrets.endpoint, f"{ENV_TABLE}\nStopTimeoutSeconds = 1")
    log = tmp_path / "events"
    async with agent_process(
        ["--config", str(config), "--", *child_argv(tmp_path, "ignore-term")], AGENT_ENV, tmp_path
    ) as agent:
        await eventually(lambda: events(log))
        child = events(log)[0]["pid"]
        started = trio.current_time()
        agent.process.send_signal(signal.SIGTERM)
        assert await wait_exit(agent, 1 + 2) == 128 + signal.SIGKILL  # SPEC: StopTimeoutSeconds + 2 s
        assert trio.current_time() - started >= 1
    assert not await trio.Path(f"/proc/{child}").exists()
    assert "did not stop within 1s of SIGTERM: SIGKILL" in agent.stderr_path.read_text()


async def test_sigterm_before_the_env_secrets_load_stops_without_a_child(tmp_path: Path, emulator: KmsEmulator) -> None:
    config = exec_config(tmp_path, emulator.endpoint, 'Env = {X = "exec/missing"}')
    async with agent_process(["--config", str(config), "--", *child_argv(tmp_path)], AGENT_ENV, tmp_path) as agent:
        await eventually(lambda: "exec/missing" in agent.stderr_path.read_text())
        agent.process.send_signal(signal.SIGTERM)
        assert await wait_exit(agent, 5) == 0
    assert not (tmp_path / "events").exists()
    assert "Forbidden.ResourceNotFound" in agent.stderr_path.read_text()


@asynccontextmanager
async def agent_process_through(prefix: list[str], args: list[str], tmp_path: Path) -> AsyncIterator[AgentProcess]:
    """`agent_process`, with `python -m kmsagent` started through `prefix` (e.g. setpriv)."""
    stderr_path = tmp_path / "stderr.txt"
    with stderr_path.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            [*prefix, sys.executable, "-m", "kmsagent", *args],
            env=AGENT_ENV,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    try:
        lines = await read_lines_until(process, "listening on http://127.0.0.1:")
        port = int(next(line for line in lines if "listening on" in line).rsplit(":", 1)[1])
        yield AgentProcess(process, port, lines, stderr_path)
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
async def test_the_child_cannot_read_the_agents_environment(tmp_path: Path, secrets: KmsEmulator) -> None:
    """PR_SET_DUMPABLE 0. Agent and child run as root without capabilities, so only dumpability
    decides, as between two processes of one ordinary user."""
    config = exec_config(tmp_path, secrets.endpoint, ENV_TABLE)
    result = tmp_path / "result"
    probe = f"cat /proc/$PPID/environ > /dev/null 2> {result}.err; echo $? > {result}; exec sleep 1000.31"
    no_capabilities = ["setpriv", "--inh-caps=-all", "--bounding-set=-all"]
    async with agent_process_through(
        no_capabilities, ["--config", str(config), "--", "sh", "-c", probe], tmp_path
    ) as agent:
        await eventually(lambda: result.exists() and result.read_text().strip() != "")
        agent.process.send_signal(signal.SIGTERM)
        assert await wait_exit(agent, 5) == 128 + signal.SIGTERM  # sleep does not catch it
    assert result.read_text().strip() == "1"
    assert "Permission denied" in await trio.Path(f"{result}.err").read_text()


# --- Command line and config ---------------------------------------------------------------------


def test_double_dash_needs_a_command_and_once_takes_none() -> None:
    for args, message in (
        (["--"], "-- must be followed by a command"),
        (["--once", "--", "true"], "--once runs no program"),
    ):
        result = run_cli(*args, env=AGENT_ENV)
        assert result.returncode == 2
        assert_one_line(result.stderr)
        assert message in result.stderr


def test_a_command_that_is_not_executable_exits_2(tmp_path: Path) -> None:
    result = run_cli("--", "no-such-program-x", env=AGENT_ENV)
    assert result.returncode == 2
    assert_one_line(result.stderr)
    assert (
        "[Exec] Command = ['no-such-program-x']: 'no-such-program-x' is not an executable file found in PATH"
        in result.stderr
    )


def exec_error(table: dict[str, Any], command: list[str] | None = None, **sections: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        with_command(parse_config({**sections, "Exec": table}), command)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({"Command": "app --serve"}, "[Exec] Command = 'app --serve': must be a list of strings"),
        ({"Command": [""]}, "[Exec] Command = ['']: must be a list of strings"),
        ({"Env": {"A": ""}}, "[Exec] Env = {'A': ''}: must be a table of NAME"),
        ({"Env": {"1A": "s"}}, "bad entry: 1A = 's'"),
        ({"Env": {"A": "s#"}}, "bad entry: A = 's#'"),
        ({"Env": {"A": "#k"}}, "bad entry: A = '#k'"),
        ({"Env": {"A": 5}}, "bad entry: A = 5"),
        ({"Env": ["A"]}, "must be a table"),
        ({"OnChange": "reload"}, '[Exec] OnChange = \'reload\': must be "restart", "none" or a signal name'),
        ({"OnChange": "SIGKILL"}, "must be \"restart\""),
        ({"StopSignal": "SIGKILL"}, "[Exec] StopSignal = 'SIGKILL': must be a signal name"),
        ({"StopSignal": "TERM"}, "must be a signal name"),
        ({"StopTimeoutSeconds": 0}, "[Exec] StopTimeoutSeconds = 0: must be an integer in 1..3600"),
        ({"Env": {"A": "s"}}, "[Exec] Env: there is no program to give it to"),
        ({"Command": ["/no/such/app"]}, "[Exec] Command = ['/no/such/app']: '/no/such/app' is not an executable file"),
    ],
)
def test_exec_config_errors(table: dict[str, Any], expected: str) -> None:
    assert expected in exec_error(table)


def test_exec_rules_that_depend_on_the_command_line() -> None:
    assert exec_error({}, ["true"], Cache={"TtlSeconds": 0}).startswith(
        "[Cache] TtlSeconds = 0: must be at least 1 with [Exec]"
    )
    assert "keep 2 secrets" in exec_error({"Env": {"A": "a", "B": "b#k"}}, ["true"], Cache={"CacheSize": 1})
    config = with_command(parse_config({"Exec": {"Command": ["false"], "Env": {"A": "a"}}}), ["true", "x"])
    assert config.exec.command == ("true", "x")  # `--` wins over Command
    assert with_command(parse_config({"Exec": {"Env": {"A": "a"}}}), ["true"]).exec.env == (("A", "a"),)


def test_the_child_environment_and_exit_statuses() -> None:
    environ = {
        "PATH": "/bin",
        "ALIBABA_CLOUD_ACCESS_KEY_ID": "x",
        "KMS_TOKEN": "t",
        "MY_TOKEN": "t",
        "NOTIFY_SOCKET": "s",
        "WATCHDOG_PID": "1",
    }
    assert child_environment(environ, ["KMS_TOKEN"]) == {"PATH": "/bin", "MY_TOKEN": "t"}
    assert (exit_status(0), exit_status(3), exit_status(-signal.SIGKILL), exit_status(-signal.SIGTERM)) == (
        0,
        3,
        137,
        143,
    )


def test_check_config_shows_the_command_line_command(tmp_path: Path) -> None:
    result = run_cli("--check-config", "--", "true", "a b", env=AGENT_ENV)
    assert result.returncode == 0
    assert re.search(r'^Command = \["true", "a b"\]$', result.stdout, re.MULTILINE)


def test_the_readme_exec_example_is_a_valid_config() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Secrets as files and environment", 1)[1].split("\n## ", 1)[0]
    block = next(body for body in re.findall(r"```toml\n(.*?)```", section, re.DOTALL) if "[Exec]" in body)
    config = parse_config(tomllib.loads(block))
    assert config.exec.env == (("DB_PASSWORD", "prod/db#password"), ("API_KEY", "prod/api-key"))
