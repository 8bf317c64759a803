"""The README's "Try it for real, locally" and "Client recipes", run as a user would run them.

`python -m kmsagent.emulator` and `python -m kmsagent` run as processes; each recipe is taken from
README.md by its `<!-- recipe: NAME -->` marker, so the test runs exactly what the README shows,
with only the address and token path of this run substituted (each substitution must match, so a
README edit cannot silently skip one). Secret names carry the characters that break clients
which paste the name into the URL: `+`, `&`, a space, non-ASCII and `/`.
"""

from __future__ import annotations

import ast
import json
import os
import re
import selectors
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import hvac
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BASE_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", tempfile.gettempdir())}
#: The names of issue 11: each broke the README's old Python client in its own way.
NAMES = ["a+b", "a&b", "with space", "ünïcode/名前"]
JSON_SECRET = "prod/db-password"
SECRETS = {
    **{name: f"value-{index}-of-a-name-that-needs-encoding" for index, name in enumerate(NAMES)},
    JSON_SECRET: '{"user": "app", "password": "pw-Xq3v"}',
}
WANTED = [SECRETS[name] for name in NAMES]
PYTHON_DRIVER = """

if __name__ == "__main__":
    import json, sys
    print(json.dumps([get_secret(name) for name in sys.argv[1:]]))
"""


def recipe(name: str) -> str:
    """The body of the fenced block right after `<!-- recipe: NAME -->` in README.md."""
    match = re.search(rf"^<!-- recipe: {re.escape(name)} -->\n```\w*\n(.*?)^```$", README, re.MULTILINE | re.DOTALL)
    assert match, f"README.md has no recipe {name!r}"
    return match[1]


def substitute(text: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert old in text, f"the recipe no longer contains {old!r}"
        text = text.replace(old, new)
    return text


def private_file(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


@dataclass
class Process:
    popen: subprocess.Popen[bytes]
    lines: list[str]

    def stop(self, signum: int = signal.SIGTERM) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signum)
        return self.popen.wait(timeout=10)


def start(args: list[str], *, env: dict[str, str], cwd: Path, stderr: Path, marker: str, **popen: object) -> Process:
    """Starts a process and reads its stdout (bounded in time) up to a line holding `marker`."""
    with stderr.open("wb") as errors:
        process = subprocess.Popen(args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=errors, bufsize=0, **popen)  # type: ignore[call-overload]
    try:
        return Process(process, read_until(process, marker))
    except BaseException:
        process.kill()
        process.wait()
        raise


def read_until(process: subprocess.Popen[bytes], marker: str, timeout: float = 30) -> list[str]:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    buffer, lines = b"", []
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while not any(marker in line for line in lines):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {marker!r} within {timeout} s: {lines}"
            if not selector.select(remaining):
                continue
            chunk = os.read(process.stdout.fileno(), 4096)
            assert chunk, f"exited before printing {marker!r}: {lines}"
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            lines += [line.decode() for line in complete]
    return lines


def listening_port(lines: list[str]) -> int:
    return int(next(line for line in lines if "listening on http://127.0.0.1:" in line).rsplit(":", 1)[1])


def exported(line: str) -> dict[str, str]:
    """`export A=1 B=2` → {"A": "1", "B": "2"}."""
    words = shlex.split(line)
    assert words[0] == "export"
    return dict(word.split("=", 1) for word in words[1:])


@dataclass
class Emulator:
    port: int
    credentials: dict[str, str]
    process: Process


def start_emulator(args: list[str], folder: Path, cwd: Path = ROOT) -> Emulator:
    process = start(
        args, env=BASE_ENV, cwd=cwd, stderr=folder / "emulator.stderr", marker="export ALIBABA_CLOUD_ACCESS_KEY_ID="
    )
    export_line = next(line for line in process.lines if line.startswith("export "))
    return Emulator(listening_port(process.lines), exported(export_line), process)


@pytest.fixture(scope="module")
def kms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    """`python -m kmsagent.emulator` with the names of issue 11, for every agent of this module."""
    folder = tmp_path_factory.mktemp("emulator")
    tables = "".join(
        f"[[secret]]\nname = {json.dumps(name, ensure_ascii=False)}\ndata = {json.dumps(data, ensure_ascii=False)}\n\n"
        for name, data in SECRETS.items()
    )
    secrets_file = folder / "secrets.toml"
    secrets_file.write_text(tables, encoding="utf-8")
    emulator = start_emulator([sys.executable, "-m", "kmsagent.emulator", "--secrets", str(secrets_file)], folder)
    yield emulator
    assert emulator.process.stop() == 0


@dataclass
class Agent:
    port: int
    token_file: Path
    process: Process


def start_agent(kms: Emulator, folder: Path, server: str, token_variable: str = "KMS_TOKEN") -> Agent:
    """A real agent against the emulator; `server` is the config's [Server] table (HttpPort 0)."""
    config = folder / "kmsagent.toml"
    config.write_text(
        f'{server}\n[KMS]\nEndpoint = "127.0.0.1:{kms.port}"\nProtocol = "http"\nMaxRetries = 0\n'
        f'[Log]\nPath = "{folder / "logs"}"\n',
        encoding="utf-8",
    )
    token_file = private_file(folder / "token", "recipe-token-Vb7q2Kx9\n")
    env = {**BASE_ENV, **kms.credentials, token_variable: f"file://{token_file}"}
    process = start(
        [sys.executable, "-m", "kmsagent", "--config", str(config)],
        env=env,
        cwd=folder,
        stderr=folder / "agent.stderr",
        marker="listening on http://127.0.0.1:",
    )
    return Agent(listening_port(process.lines), token_file, process)


def agent_fixture(name: str, server: str, token_variable: str = "KMS_TOKEN") -> object:
    @pytest.fixture(scope="module", name=name)
    def fixture(kms: Emulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
        agent = start_agent(kms, tmp_path_factory.mktemp("agent"), server, token_variable)
        yield agent
        assert agent.process.stop() == 0

    return fixture


def server_table(config_recipe: str, port_line: str | None = None) -> str:
    """A README config recipe's [Server] table, on any free port."""
    assert config_recipe.startswith("[Server]\n") and "\n[" not in config_recipe
    if port_line is None:
        return config_recipe.replace("[Server]\n", "[Server]\nHttpPort = 0\n", 1)
    return substitute(config_recipe, {port_line: "HttpPort = 0"})


kms_agent = agent_fixture("kms_agent", "[Server]\nHttpPort = 0\n")
vault_agent = agent_fixture("vault_agent", server_table(recipe("hvac-config")))
aws_agent = agent_fixture(
    "aws_agent", server_table(recipe("aws-config"), "HttpPort = 2773"), token_variable="AWS_TOKEN"
)


def run(args: list[str], *, env: dict[str, str], cwd: Path = ROOT, timeout: float = 30) -> str:
    result = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, result.stderr  # not check=True: the failure shows stderr
    return result.stdout


def kms_token_env(agent: Agent) -> dict[str, str]:
    return {**BASE_ENV, "KMS_TOKEN": f"file://{agent.token_file}"}


# --- Try it for real, locally -----------------------------------------------------------------


def test_try_it_for_real_locally_runs_as_the_readme_shows(tmp_path: Path) -> None:
    emulator_command = recipe("try-emulator").strip()
    assert emulator_command == ".venv/bin/python -m kmsagent.emulator --port 18025 --secrets conf/dev-secrets.toml"
    args = shlex.split(substitute(emulator_command, {".venv/bin/python": sys.executable, "--port 18025": "--port 0"}))
    emulator = start_emulator(args, tmp_path)
    assert emulator.process.lines[0] == f"kmsagent emulator listening on http://127.0.0.1:{emulator.port}"
    agent = None
    try:
        script = recipe("try-agent")
        pasted = next(line for line in script.splitlines() if line.startswith("export ALIBABA_CLOUD_ACCESS_KEY_ID="))
        printed = next(line for line in emulator.process.lines if line.startswith("export "))
        script = substitute(
            script,
            {
                pasted: printed,
                "127.0.0.1:18025": f"127.0.0.1:{emulator.port}",
                "HttpPort = 2025": "HttpPort = 0",
                ".venv/bin/kmsagent": shlex.quote(sys.executable) + " -m kmsagent",
            },
        )
        # The agent runs in the background of this shell, which waits for it; the test reads $dir.
        script += 'echo "dir=$dir"\nwait\n'
        agent = start(
            ["bash", "-c", script],
            env={**BASE_ENV, "TMPDIR": str(tmp_path)},
            cwd=ROOT,
            stderr=tmp_path / "agent.stderr",
            marker="listening on http://127.0.0.1:",
            start_new_session=True,
        )
        lines = (
            agent.lines
            if any(line.startswith("dir=") for line in agent.lines)
            else agent.lines + read_until(agent.popen, "dir=")
        )
        folder = Path(next(line for line in lines if line.startswith("dir="))[4:])
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert stat.S_IMODE((folder / "token").stat().st_mode) == 0o600
        assert len((folder / "token").read_text()) == 64

        read = substitute(recipe("try-read"), {"localhost:2025": f"localhost:{listening_port(lines)}"})
        answer = json.loads(run(["bash", "-c", read], env={**BASE_ENV, "dir": str(folder)}))
        demo = tomllib.loads((ROOT / "conf" / "dev-secrets.toml").read_text())["secret"]
        assert answer["SecretData"] == next(item["data"] for item in demo if item["name"] == "demo/db-password")
    finally:
        if agent is not None:
            os.killpg(agent.popen.pid, signal.SIGTERM)  # the shell's group: the shell and the agent
            agent.popen.wait(timeout=10)
        assert emulator.process.stop() == 0


# --- Client recipes ---------------------------------------------------------------------------


def test_python_recipe_reads_any_legal_name(kms_agent: Agent, tmp_path: Path) -> None:
    script = tmp_path / "recipe.py"
    script.write_text(substitute(recipe("python"), {"localhost:2025": f"localhost:{kms_agent.port}"}) + PYTHON_DRIVER)
    assert json.loads(run([sys.executable, str(script), *NAMES], env=kms_token_env(kms_agent))) == WANTED


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_shell_recipe_reads_any_legal_name(kms_agent: Agent) -> None:
    script = substitute(recipe("shell"), {"localhost:2025": f"localhost:{kms_agent.port}"})
    script += 'for name in "$@"; do get_secret "$name"; echo; done\n'
    answers = run(["bash", "-c", script, "bash", *NAMES], env=kms_token_env(kms_agent)).splitlines()
    assert [json.loads(answer)["SecretData"] for answer in answers] == WANTED


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_shell_recipe_fails_with_the_agents_error(kms_agent: Agent) -> None:
    """`--fail-with-body`: a script sees a non-zero status, and the agent's Code says why."""
    script = substitute(recipe("shell"), {"localhost:2025": f"localhost:{kms_agent.port}"}) + 'get_secret "$1"\n'
    result = subprocess.run(
        ["bash", "-c", script, "bash", "no/such+secret"],
        env=kms_token_env(kms_agent),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,  # it must fail
    )
    assert result.returncode != 0
    assert json.loads(result.stdout)["Code"] == "Forbidden.ResourceNotFound"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("name", NAMES)
def test_curl_recipe_reads_any_legal_name(kms_agent: Agent, name: str) -> None:
    assert "'" not in name  # the recipe quotes the name with single quotes
    command = substitute(
        recipe("curl"),
        {
            "/var/run/kmstoken": str(kms_agent.token_file),
            "localhost:2025": f"localhost:{kms_agent.port}",
            "secretId=my-secret": f"secretId={name}",
        },
    )
    assert json.loads(run(["bash", "-c", command], env=BASE_ENV))["SecretData"] == SECRETS[name]


@pytest.mark.skipif(shutil.which("go") is None, reason="go is not installed")
def test_go_recipe_reads_any_legal_name(kms_agent: Agent, tmp_path: Path) -> None:
    program = tmp_path / "getsecret.go"
    program.write_text(substitute(recipe("go"), {"localhost:2025": f"localhost:{kms_agent.port}"}))
    env = kms_token_env(kms_agent)
    for name in ("GOCACHE", "GOPATH", "GOROOT", "GOPROXY", "GOFLAGS"):
        if name in os.environ:
            env[name] = os.environ[name]
    assert run(["go", "run", str(program), *NAMES], env=env, cwd=tmp_path, timeout=180).splitlines() == WANTED


def test_hvac_recipe_reads_mount_and_path(vault_agent: Agent, tmp_path: Path) -> None:
    script = tmp_path / "recipe.py"
    script.write_text(
        substitute(
            recipe("hvac"),
            {"localhost:2025": f"localhost:{vault_agent.port}", "/var/run/kmstoken": str(vault_agent.token_file)},
        )
    )
    assert ast.literal_eval(run([sys.executable, str(script)], env=BASE_ENV)) == json.loads(SECRETS[JSON_SECRET])


def test_hvac_reads_every_name_as_the_readme_explains(vault_agent: Agent) -> None:
    """Mount and path split at the first "/"; names without one through the adapter."""
    client = hvac.Client(url=f"http://localhost:{vault_agent.port}", token=vault_agent.token_file.read_text().strip())
    for name in NAMES:
        if "/" in name:
            mount, path = name.split("/", 1)
            answer = client.secrets.kv.v1.read_secret(path=path, mount_point=mount)
        else:
            answer = client.adapter.get("/v1/" + urllib.parse.quote(name, safe=""))
        assert answer["data"] == {"value": SECRETS[name]}
        assert answer["lease_duration"] == 300


def test_aws_style_recipe_reads_any_legal_name(aws_agent: Agent, tmp_path: Path) -> None:
    script = tmp_path / "recipe.py"
    script.write_text(
        substitute(
            recipe("aws"),
            {"/var/run/awssmatoken": str(aws_agent.token_file), "localhost:2773": f"localhost:{aws_agent.port}"},
        )
        + PYTHON_DRIVER
    )
    assert json.loads(run([sys.executable, str(script), *NAMES], env=BASE_ENV)) == WANTED


# --- The emulator as its own process ------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_emulator_stops_on_a_signal_with_exit_0_and_no_traceback(tmp_path: Path, signum: int) -> None:
    emulator = start_emulator([sys.executable, "-m", "kmsagent.emulator"], tmp_path)
    assert re.fullmatch(
        r"export ALIBABA_CLOUD_ACCESS_KEY_ID=LTAIdev[0-9a-f]{16} ALIBABA_CLOUD_ACCESS_KEY_SECRET=[\w-]{32}",
        emulator.process.lines[2],
    )
    assert "demo/db-password" in emulator.process.lines[3]  # conf/dev-secrets.toml by default
    assert emulator.process.stop(signum) == 0
    assert (tmp_path / "emulator.stderr").read_text() == ""


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--port", "70000"], "--port"),
        (["--bogus"], "--bogus"),
        (["--secrets", "/nonexistent/secrets.toml"], "/nonexistent/secrets.toml"),
        (["--secrets", str(ROOT / "README.md")], "README.md"),
    ],
)
def test_emulator_usage_errors_exit_2_with_one_line(
    args: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, stderr = run_emulator_main(args, capsys)
    assert status == 2
    assert len(stderr.strip().splitlines()) == 1 and named in stderr


def test_emulator_on_a_port_in_use_exits_1_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, stderr = run_emulator_main(["--port", str(port)], capsys)
    assert status == 1
    assert stderr.strip() == f"kmsagent.emulator: cannot listen on 127.0.0.1:{port}: Address already in use"


def run_emulator_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[object, str]:
    """`python -m kmsagent.emulator ARGS` in this process (argparse exits by SystemExit)."""
    from kmsagent.emulator.__main__ import main

    try:
        status: object = main(args)
    except SystemExit as stopped:
        status = stopped.code
    return status, capsys.readouterr().err
