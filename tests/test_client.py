"""`kmsagent get` (SPEC §10) as a process against an agent serving in-process, or a fake agent."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from conftest import TOKEN, RunningAgent, StartAgent
from kmsagent import client
from kmsagent.emulator import KmsEmulator

ROOT = Path(__file__).resolve().parents[1]
ENV = {
    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    "HOME": os.environ.get("HOME", tempfile.gettempdir()),
    "KMS_TOKEN": TOKEN,
}
#: The `agent_of_type` fixture: an agent answering with ResponseType n, and the client arguments.
AgentOfType = Callable[[int], Awaitable[tuple[RunningAgent, list[str]]]]
NO_TOKEN_ENV = {key: value for key, value in ENV.items() if key != "KMS_TOKEN"}
TEXT = "line one\nünïcödé — 名前\n"  # a trailing newline that must come out as is, and no other
BINARY = b"\x00\xff\xfe binary\nsecret\r\n\x80"
DOCUMENT = {"user": "app", "port": 5432, "tls": {"ca": ["a", "b"]}, "pass": "p ä\n$x"}
ODD_NAMES = ["a+b", "a&b=c", "with space", "ünï/名", "100%25/x?y#z"]


async def kmsagent_get(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(30):
        return await trio.run_process(
            [sys.executable, "-m", "kmsagent", "get", *args],
            env=ENV if env is None else env,
            cwd=ROOT,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


def one_line(result: subprocess.CompletedProcess[bytes]) -> str:
    text = result.stderr.decode()
    assert len(text.splitlines()) == 1 and text.startswith("kmsagent get: "), text
    assert "Traceback" not in text
    return text


def server_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "kmsagent.toml"
    path.write_text(text)
    return str(path)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A folder whose socket paths fit sockaddr_un's 108 bytes whatever the test's name."""
    with tempfile.TemporaryDirectory(prefix="kmsc", dir="/tmp") as folder:
        yield Path(folder)


@pytest.fixture
async def secrets(emulator: KmsEmulator) -> KmsEmulator:
    emulator.put_secret("text", TEXT)
    emulator.put_secret("binary", BINARY)
    emulator.put_secret("document", json.dumps(DOCUMENT))
    for name in ODD_NAMES:
        emulator.put_secret(name, f"value of {name}")
    return emulator


@pytest.fixture
async def agent_of_type(secrets: KmsEmulator, start_agent: StartAgent, tmp_path: Path) -> AgentOfType:
    """An agent answering with ResponseType n, and the client arguments that reach it."""

    async def start(response_type: int) -> tuple[RunningAgent, list[str]]:
        agent = await start_agent(server={"response_type": response_type})
        config = server_config(tmp_path, f"[Server]\nResponseType = {response_type}\n")
        return agent, ["--config", config, "--port", str(agent.port)]

    return start


# --- values, exactly -------------------------------------------------------------------------------


@pytest.mark.parametrize("response_type", [0, 1, 2])
async def test_a_text_secret_is_printed_as_its_exact_bytes(agent_of_type: AgentOfType, response_type: int) -> None:
    _, where = await agent_of_type(response_type)
    result = await kmsagent_get("text", *where)
    assert (result.returncode, result.stdout, result.stderr) == (0, TEXT.encode(), b"")


@pytest.mark.parametrize("response_type", [0, 1])
async def test_a_binary_secret_is_decoded(agent_of_type: AgentOfType, response_type: int) -> None:
    _, where = await agent_of_type(response_type)
    result = await kmsagent_get("binary", *where)
    assert (result.returncode, result.stdout) == (0, BINARY)


async def test_a_binary_secret_under_vault_answers_is_its_base64(agent_of_type: AgentOfType) -> None:
    """Vault's `data` carries no type: the documented limit of ResponseType 2."""
    _, where = await agent_of_type(2)
    result = await kmsagent_get("binary", *where)
    assert (result.returncode, result.stdout) == (0, base64.b64encode(BINARY))


@pytest.mark.parametrize("response_type", [0, 1, 2])
async def test_json_key_prints_a_string_as_is_else_json(agent_of_type: AgentOfType, response_type: int) -> None:
    _, where = await agent_of_type(response_type)
    for key, printed in [("pass", DOCUMENT["pass"].encode()), ("port", b"5432"), ("tls", b'{"ca":["a","b"]}')]:
        result = await kmsagent_get("document", "--json-key", key, *where)
        assert (result.returncode, result.stdout) == (0, printed)


@pytest.mark.parametrize("secret", ["document", "text"])
async def test_a_missing_json_key_exits_3(agent_of_type: AgentOfType, secret: str) -> None:
    _, where = await agent_of_type(0)
    result = await kmsagent_get(secret, "--json-key", "nope", *where)
    assert (result.returncode, result.stdout) == (3, b"")
    assert "'nope'" in one_line(result)


async def test_any_legal_name_reaches_the_agent_intact(agent_of_type: AgentOfType) -> None:
    _, where = await agent_of_type(0)
    for name in ODD_NAMES:
        result = await kmsagent_get(name, *where)
        assert (result.returncode, result.stdout) == (0, f"value of {name}".encode()), (name, result.stderr)


async def test_raw_response_is_the_agents_whole_body(agent_of_type: AgentOfType) -> None:
    agent, where = await agent_of_type(0)
    result = await kmsagent_get("document", "--raw-response", *where)
    assert result.returncode == 0
    assert result.stdout == (await agent.get("/secretsmanager/get?secretId=document")).content


async def test_version_stage_and_version_id_are_sent(agent_of_type: AgentOfType, secrets: KmsEmulator) -> None:
    _, where = await agent_of_type(0)
    first = secrets.put_secret("rotating", "first")
    secrets.put_secret("rotating", "second")
    assert (await kmsagent_get("rotating", *where)).stdout == b"second"
    assert (await kmsagent_get("rotating", "--version-stage", "ACSPrevious", *where)).stdout == b"first"
    assert (await kmsagent_get("rotating", "--version-id", first, *where)).stdout == b"first"


# --- the agent refuses ------------------------------------------------------------------------------


@pytest.mark.parametrize("response_type", [0, 1, 2])
async def test_an_unknown_secret_exits_3_with_the_agents_code(agent_of_type: AgentOfType, response_type: int) -> None:
    _, where = await agent_of_type(response_type)
    result = await kmsagent_get("no/such/secret", *where)
    assert (result.returncode, result.stdout) == (3, b"")
    assert "404 Forbidden.ResourceNotFound: " in one_line(result)


async def test_a_wrong_token_exits_3(agent_of_type: AgentOfType) -> None:
    _, where = await agent_of_type(0)
    result = await kmsagent_get("text", *where, env={**ENV, "KMS_TOKEN": "not-the-token-Qz7"})
    assert result.returncode == 3 and "BadToken" in one_line(result)
    assert TOKEN.encode() not in result.stderr and b"not-the-token-Qz7" not in result.stderr


# --- cannot reach ------------------------------------------------------------------------------------


async def test_no_agent_exits_1() -> None:
    with trio.socket.socket() as closed:  # a port that was free a moment ago
        await closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    result = await kmsagent_get("text", "--port", str(port))
    assert result.returncode == 1 and "cannot reach the agent at 127.0.0.1:" in one_line(result)


@dataclass
class FakeAgent:
    """Answers every request with `status` and `body`, and keeps the request heads it read."""

    status: int
    body: bytes
    heads: list[bytes] = field(default_factory=list)

    async def handle(self, stream: trio.abc.Stream) -> None:
        head = b""
        with trio.move_on_after(5):
            while b"\r\n\r\n" not in head:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                head += chunk
        self.heads.append(head)
        status_line = b"HTTP/1.1 %d Whatever\r\n" % self.status
        await stream.send_all(
            status_line + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(self.body) + self.body
        )
        await stream.aclose()


async def fake_on_tcp(nursery: trio.Nursery, fake: FakeAgent) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, fake.handle, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


async def fake_on_unix(nursery: trio.Nursery, fake: FakeAgent, path: Path) -> None:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen()
    await nursery.start(trio.serve_listeners, fake.handle, [trio.SocketListener(sock)])


KMS_ERROR = json.dumps({"Code": "Some.Code", "Message": "a message", "HttpStatus": 0}).encode()


@pytest.mark.parametrize(("status", "code"), [(429, 1), (500, 1), (502, 1), (504, 1), (400, 3), (403, 3), (404, 3)])
async def test_exit_status_follows_the_agents_status(nursery: trio.Nursery, status: int, code: int) -> None:
    port = await fake_on_tcp(nursery, FakeAgent(status, KMS_ERROR))
    result = await kmsagent_get("text", "--port", str(port))
    assert (result.returncode, result.stdout) == (code, b"")
    assert f"answered {status} Some.Code: a message" in one_line(result)


async def test_an_error_body_that_is_not_json_is_shown_escaped(nursery: trio.Nursery) -> None:
    port = await fake_on_tcp(nursery, FakeAgent(418, b"teapot\n\x1b[31mforged line"))
    result = await kmsagent_get("text", "--port", str(port))
    assert result.returncode == 3
    assert "teapot\\n\\x1b[31mforged line" in one_line(result)


async def test_an_answer_over_the_size_bound_exits_1(nursery: trio.Nursery) -> None:
    port = await fake_on_tcp(nursery, FakeAgent(200, b"x" * (2 * 1024 * 1024 + 1)))
    result = await kmsagent_get("text", "--port", str(port))
    assert (result.returncode, result.stdout) == (1, b"")
    assert "larger than" in one_line(result)


async def test_the_unix_socket_of_the_config_is_used(nursery: trio.Nursery, short_dir: Path, tmp_path: Path) -> None:
    path = short_dir / "agent.sock"
    fake = FakeAgent(200, json.dumps({"SecretData": "via socket", "SecretDataType": "text"}).encode())
    await fake_on_unix(nursery, fake, path)
    config = server_config(
        tmp_path,
        f'[Server]\nHttpPort = 1024\nUnixSocket = "{path}"\n'
        'SSRFHeaders = ["X-Mine"]\nSSRFEnvVariables = ["MY_TOKEN", "KMS_TOKEN"]\n',
    )
    result = await kmsagent_get("ünï/a+b c", "--config", config, env={**ENV, "MY_TOKEN": "mine"})
    assert (result.returncode, result.stdout) == (0, b"via socket"), result.stderr
    request_line, *headers = fake.heads[0].decode().split("\r\n")
    assert request_line == "GET /secretsmanager/get?secretId=%C3%BCn%C3%AF%2Fa%2Bb%20c HTTP/1.1"
    assert "Host: localhost" in headers and "X-Mine: mine" in headers


async def test_socket_on_the_command_line_wins_over_the_port(
    nursery: trio.Nursery, short_dir: Path, tmp_path: Path
) -> None:
    path = short_dir / "a.sock"
    await fake_on_unix(nursery, FakeAgent(200, b'{"SecretData": "s", "SecretDataType": "text"}'), path)
    config = server_config(tmp_path, "[Server]\nHttpPort = 1024\n")
    result = await kmsagent_get("x", "--config", config, "--socket", str(path))
    assert (result.returncode, result.stdout) == (0, b"s")


async def test_a_configured_socket_that_is_gone_exits_1_without_trying_tcp(
    agent_of_type: AgentOfType, short_dir: Path, tmp_path: Path
) -> None:
    agent, _ = await agent_of_type(0)  # a live agent on HttpPort: no fallback to it
    config = server_config(tmp_path, f'[Server]\nHttpPort = {agent.port}\nUnixSocket = "{short_dir / "gone.sock"}"\n')
    result = await kmsagent_get("text", "--config", config)
    assert result.returncode == 1 and "unix:" in one_line(result)


class SlowAgent(FakeAgent):
    """Answers after `delay` seconds, then sends the body one byte every `drip` seconds."""

    def __init__(self, delay: float, drip: float = 0.0) -> None:
        super().__init__(200, b'{"SecretData": "slow", "SecretDataType": "text"}')
        self.delay, self.drip = delay, drip

    async def handle(self, stream: trio.abc.Stream) -> None:
        await stream.receive_some(65536)
        await trio.sleep(self.delay)
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(self.body))
            for byte in self.body:
                await trio.sleep(self.drip)
                await stream.send_all(bytes([byte]))
        await stream.aclose()


async def fetch_in_thread(port: int) -> bytes | client.Failure:
    target = client.Target(request_timeout_ms=0)
    path = client.request_path("s", None, None)

    def fetch() -> bytes | client.Failure:
        try:
            answer = client.fetch(target, "here", None, port, path, b"token")
        except client.Failure as failure:
            return failure
        return client.secret_value(0, answer.body)[0]

    return await trio.to_thread.run_sync(fetch)


@pytest.fixture
def short_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """0.2 s to connect and 0.6 s in all (with RequestTimeoutMs 0), instead of 5 s and 40 s."""
    monkeypatch.setattr(client, "CONNECT_TIMEOUT", 0.2)
    monkeypatch.setattr(client, "ANSWER_SLACK", 0.4)


async def test_an_answer_may_come_later_than_the_connect_timeout(nursery: trio.Nursery, short_bounds: None) -> None:
    """A cold read waits for KMS (up to RequestTimeoutMs): the connect bound must not cut it."""
    port = await fake_on_tcp(nursery, SlowAgent(delay=0.4))
    assert await fetch_in_thread(port) == b"slow"


@pytest.mark.parametrize(("delay", "drip"), [(5.0, 0.0), (0.0, 0.05)])
async def test_the_whole_exchange_is_bounded(
    nursery: trio.Nursery, short_bounds: None, delay: float, drip: float
) -> None:
    port = await fake_on_tcp(nursery, SlowAgent(delay, drip))  # never answers in time, or drip-feeds
    started = trio.current_time()
    outcome = await fetch_in_thread(port)
    assert isinstance(outcome, client.Failure) and outcome.code == 1 and "cannot reach" in str(outcome)
    assert trio.current_time() - started < 2


# --- usage and config ----------------------------------------------------------------------------------


async def test_no_token_variable_exits_2_naming_them() -> None:
    result = await kmsagent_get("text", "--port", "2025", env=NO_TOKEN_ENV)
    assert result.returncode == 2 and "KMS_TOKEN, KMS_SESSION_TOKEN" in one_line(result)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('[Server]\nHttpPort = "2025"\n', "HttpPort = '2025'"),
        ("[Server]\nResponseType = 3\n", "ResponseType = 3"),
        ("[Server]\nSSRFHeaders = []\n", "SSRFHeaders = []"),
        ('[Server]\nSSRFEnvVariables = ["1X"]\n', "SSRFEnvVariables"),
        ("[Server]\nUnixSocket = 1\n", "UnixSocket = 1"),
        ("[Server]\nHttpPort = 0\n", "pass --port"),
        ("Server = 1\n", "[Server] table"),
        ("[Server\n", "kmsagent.toml"),
    ],
)
async def test_a_bad_server_key_exits_2_with_one_line(tmp_path: Path, text: str, named: str) -> None:
    result = await kmsagent_get("text", "--config", server_config(tmp_path, text))
    assert result.returncode == 2 and named in one_line(result)


async def test_other_sections_are_not_checked(agent_of_type: AgentOfType, tmp_path: Path) -> None:
    """An application user runs the client with the agent's config: its log folder, credentials
    and keys from a newer version are none of the client's business."""
    agent, _ = await agent_of_type(0)
    config = server_config(
        tmp_path, f'[Server]\nHttpPort = {agent.port}\nFutureKey = 1\n[Log]\nPath = "/proc/nope/"\n[Bogus]\nX = 1\n'
    )
    result = await kmsagent_get("text", env={**ENV, "KMSAGENT_CONFIG": config})
    assert (result.returncode, result.stdout) == (0, TEXT.encode())


async def test_the_token_is_read_from_a_file(agent_of_type: AgentOfType, tmp_path: Path) -> None:
    _, where = await agent_of_type(0)
    (tmp_path / "token").write_text(f"{TOKEN}\n")
    result = await kmsagent_get("text", *where, env={**ENV, "KMS_TOKEN": f"file://{tmp_path / 'token'}"})
    assert (result.returncode, result.stdout) == (0, TEXT.encode())


@pytest.mark.parametrize("kind", ["fifo", "large", "missing", "empty"])
async def test_a_bad_token_file_exits_2_without_blocking(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "token"
    if kind == "fifo":
        os.mkfifo(path)  # a plain open() would wait for a writer forever
    elif kind == "large":
        path.write_bytes(b"t" * 4097)
    elif kind == "empty":
        path.write_bytes(b"\n")
    result = await kmsagent_get("text", "--port", "2025", env={**ENV, "KMS_TOKEN": f"file://{path}"})
    assert result.returncode == 2 and str(path) in one_line(result)


@pytest.mark.parametrize(
    "args",
    [[], ["x", "--port", "0"], ["x", "--port", "1", "--socket", "/s"], ["x", "--json-key", "k", "--raw-response"]],
)
async def test_bad_usage_exits_2(args: list[str]) -> None:
    result = await kmsagent_get(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr.decode()


async def test_help_names_the_exit_statuses_and_the_newline_rule() -> None:
    result = await kmsagent_get("--help")
    assert result.returncode == 0 and b"no newline added" in result.stdout and b"Exit status" in result.stdout


async def test_it_imports_none_of_the_agents_heavy_modules() -> None:
    """A health check runs it every few seconds: the agent's imports cost seconds and 50 MB."""
    probe = (
        "import sys; from kmsagent.__main__ import main; sys.argv = ['kmsagent', 'get', 'x', '--port', '1']; "
        "code = main(); "
        "heavy = {'trio', 'httpx', 'hypercorn', 'quart', 'quart_trio', 'loguru', 'alibabacloud_tea_openapi'}; "
        "print(code, sorted(name for name in sys.modules if name.split('.')[0] in heavy))"
    )
    with trio.fail_after(30):
        result = await trio.run_process(
            [sys.executable, "-c", probe], env=ENV, capture_stdout=True, capture_stderr=True
        )
    assert result.stdout.decode().strip() == "1 []"


def test_cli_main_hands_get_to_the_client(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from kmsagent.cli import main

    monkeypatch.delenv("KMS_TOKEN", raising=False)
    monkeypatch.delenv("KMS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("KMS_CONTAINER_AUTHORIZATION_TOKEN", raising=False)
    assert main(["get", "x", "--port", "2025"]) == 2
    assert "no SSRF token" in capsys.readouterr().err


def test_httpx_sees_the_same_percent_encoding() -> None:
    """The path the client builds is what a URL library would send (a check of the test's own
    expectation in test_the_unix_socket_of_the_config_is_used)."""
    from kmsagent.client import request_path

    url = httpx.URL("http://localhost" + request_path("ünï/a+b c", None, None))
    assert url.params["secretId"] == "ünï/a+b c"
