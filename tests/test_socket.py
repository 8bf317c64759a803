"""The Unix socket listener (SPEC §2 UnixSocket, UnixSocketMode, UnixSocketGroup; §3; issue 16):
the same API and checks as TCP and one MaxConn for both, its mode and group from the first
instant, its folder's rules, a stale socket replaced but a live one or another file never, its
removal at exit. Also `[Log] Path = ""` (stderr only), which the container image uses."""

from __future__ import annotations

import grp
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from conftest import TOKEN, RunningAgent, StartAgent
from kmsagent import __version__
from kmsagent.config import ConfigError, LogConfig, ServerConfig, check_log_folder, check_unix_socket, parse_config
from kmsagent.emulator import KmsEmulator
from kmsagent.server import ServeError, bind_unix
from test_cli import AGENT_ENV, assert_one_line, read_lines_until, run_cli

SECRET_PATH = "/secretsmanager/get?secretId=db/password"
#: A group other than the agent's own (root's, as the tests run), to see UnixSocketGroup applied.
OTHER_GROUP = grp.getgrgid(1).gr_name if os.getegid() != 1 else grp.getgrgid(2).gr_name


@pytest.fixture
def folder() -> Iterator[Path]:
    """A private folder with a short name: socket paths must fit sockaddr_un's 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="kms", dir="/tmp") as name:
        yield Path(name)


def unix_client(path: Path) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(path)), base_url="http://localhost", timeout=10)


async def start_with_socket(start_agent: StartAgent, path: Path, **server: object) -> RunningAgent:
    return await start_agent(server={"unix_socket": str(path), **server})


def stale_socket(path: Path) -> None:
    """What an agent killed with SIGKILL leaves: a socket node nothing listens on."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))


# --- the same API over both ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        ("/ping", {}),
        (SECRET_PATH, {"X-KMS-Token": TOKEN}),
        ("/v1/api-key", {"X-KMS-Token": TOKEN}),
        (SECRET_PATH, {"X-KMS-Token": "wrong"}),
        ("/secretsmanager/get?secretId=no-such-secret", {"X-KMS-Token": TOKEN}),
        (SECRET_PATH, {"X-KMS-Token": TOKEN, "Host": "evil.example"}),
        (SECRET_PATH, {"X-KMS-Token": TOKEN, "X-Forwarded-For": "10.0.0.1"}),
        ("/secretsmanager/get?secretId=db/password&bogus=1", {"X-KMS-Token": TOKEN}),
    ],
    ids=["ping", "secret", "prefix", "bad-token", "not-found", "bad-host", "forwarded", "bad-parameter"],
)
async def test_the_socket_answers_as_tcp_does(
    start_agent: StartAgent, folder: Path, target: str, headers: dict[str, str]
) -> None:
    """`curl --unix-socket` sends `Host: localhost`, which the Host check accepts."""
    path = folder / "kmsagent.sock"
    agent = await start_with_socket(start_agent, path)
    await agent.client.get(target, headers=headers)  # a miss loads the cache: both answers then hit
    async with unix_client(path) as over_unix:
        answers = [await client.get(target, headers=headers) for client in (agent.client, over_unix)]
    tcp, unix = answers
    assert unix.status_code == tcp.status_code
    assert unix.content == tcp.content
    for name in ("content-type", "x-kms-agent-cache", "cache-control", "etag"):
        assert unix.headers.get(name) == tcp.headers.get(name), name


async def test_max_conn_counts_tcp_and_unix_connections_together(start_agent: StartAgent, folder: Path) -> None:
    path = folder / "kmsagent.sock"
    agent = await start_with_socket(start_agent, path, max_conn=2)
    async with unix_client(path) as held_unix, httpx.AsyncClient(base_url=f"http://127.0.0.1:{agent.port}") as held_tcp:
        assert (await held_unix.get("/ping")).status_code == 200  # one slot, kept by keep-alive
        assert (await held_tcp.get("/ping")).status_code == 200  # the other
        async with unix_client(path) as third_unix:
            over = await third_unix.get(SECRET_PATH, headers={"X-KMS-Token": TOKEN})
            assert over.status_code == 429 and over.json()["Code"] == "ConnectionLimitExceeded"
            assert (await third_unix.get("/ping")).status_code == 200  # the /ping reserve
        over = await agent.get(SECRET_PATH, headers={"Connection": "close"})
        assert over.status_code == 429
    await trio.testing.wait_all_tasks_blocked(cushion=0.05)
    async with unix_client(path) as again:
        assert (await again.get(SECRET_PATH, headers={"X-KMS-Token": TOKEN})).status_code == 200


# --- made, replaced, removed ----------------------------------------------------------------------


async def test_a_stale_socket_is_replaced_and_the_socket_goes_at_exit(start_agent: StartAgent, folder: Path) -> None:
    path = folder / "kmsagent.sock"
    stale_socket(path)
    assert stat.S_IMODE(path.lstat().st_mode) != 0o600
    agent = await start_with_socket(start_agent, path, unix_socket_mode="0600")
    info = path.lstat()
    assert stat.S_ISSOCK(info.st_mode)
    assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o600, os.getegid())  # "": the agent's primary group
    async with unix_client(path) as client:  # the stale node answered nothing: this one is the agent's
        assert (await client.get("/ping")).text == "healthy"
    agent.stop.set()
    await trio.testing.wait_all_tasks_blocked(cushion=0.1)
    assert os.listdir(folder) == []


async def test_a_node_put_in_the_sockets_place_is_not_removed_at_exit(start_agent: StartAgent, folder: Path) -> None:
    path = folder / "kmsagent.sock"
    agent = await start_with_socket(start_agent, path)
    path.unlink()
    path.write_text("someone else's")
    agent.stop.set()
    await trio.testing.wait_all_tasks_blocked(cushion=0.1)
    assert path.read_text() == "someone else's"


@pytest.mark.parametrize("kind", ["regular file", "symbolic link", "folder"])
def test_a_path_that_is_not_a_socket_is_never_replaced(folder: Path, kind: str) -> None:
    path, target = folder / "kmsagent.sock", folder / "target"
    target.write_text("keep")
    if kind == "regular file":
        path.write_text("keep")
    elif kind == "symbolic link":
        path.symlink_to(target)
    else:
        path.mkdir()
    with pytest.raises(ServeError, match="is not a socket"):
        bind_unix(ServerConfig(unix_socket=str(path)))
    assert target.read_text() == "keep" and stat.S_IMODE(target.stat().st_mode) != 0o660
    assert path.is_dir() if kind == "folder" else path.read_text() == "keep"


async def test_a_live_socket_is_never_taken(folder: Path) -> None:
    path = folder / "kmsagent.sock"
    with trio.socket.socket(trio.socket.AF_UNIX) as live:
        await live.bind(str(path))
        live.listen()
        with pytest.raises(ServeError, match=r"another process .* is listening on it"):
            await trio.to_thread.run_sync(bind_unix, ServerConfig(unix_socket=str(path)))
        with trio.socket.socket(trio.socket.AF_UNIX) as client:
            await client.connect(str(path))  # still the live listener's


# --- the folder and the group ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "owner", "problem"),
    [
        (0o777, 0, "writable by others"),
        (0o1777, 0, "writable by others"),  # sticky or not (SPEC §3)
        (0o755, 65534, "must belong to root or the agent's user"),
    ],
    ids=["world-writable", "sticky", "another-users"],
)
def test_an_unsafe_folder_is_a_config_error(folder: Path, mode: int, owner: int, problem: str) -> None:
    unsafe = folder / "run"
    unsafe.mkdir()
    unsafe.chmod(mode)
    os.chown(unsafe, owner, -1)
    server = ServerConfig(unix_socket=str(unsafe / "kmsagent.sock"))
    for starting in (False, True):
        with pytest.raises(ConfigError, match=r"^\[Server\] UnixSocket = .*" + problem):
            check_unix_socket(server, starting=starting)
    with pytest.raises(ConfigError, match=problem):
        bind_unix(server)
    assert list(unsafe.iterdir()) == []


def test_a_safe_folder_passes(folder: Path) -> None:
    (folder / "group-writable").mkdir(mode=0o770)  # only others are refused (SPEC §3)
    for name in ("kmsagent.sock", "group-writable/kmsagent.sock"):
        assert check_unix_socket(ServerConfig(unix_socket=str(folder / name)), starting=True) == (os.getegid(), [])


@pytest.mark.parametrize("by", ["name", "gid"])
def test_the_group_by_name_or_gid(folder: Path, by: str) -> None:
    group = grp.getgrnam(OTHER_GROUP)
    named = OTHER_GROUP if by == "name" else str(group.gr_gid)
    server = ServerConfig(unix_socket=str(folder / "s"), unix_socket_group=named)
    assert check_unix_socket(server, starting=True) == (group.gr_gid, [])


def test_what_only_the_host_at_start_settles_is_a_note_for_check_config(folder: Path) -> None:
    """systemd's RuntimeDirectory= makes the folder as the service starts, install.sh the group."""
    server = ServerConfig(unix_socket=str(folder / "missing" / "s"), unix_socket_group="no-such-group-kms")
    gid, notes = check_unix_socket(server, starting=False)
    assert gid is None and len(notes) == 2
    assert "missing does not exist" in notes[0] and "UnixSocketGroup = 'no-such-group-kms': no such group" in notes[1]
    with pytest.raises(ConfigError, match="does not exist"):
        check_unix_socket(server, starting=True)
    with pytest.raises(ConfigError, match="no such group"):
        check_unix_socket(replace(server, unix_socket=str(folder / "s")), starting=True)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("UnixSocket", "relative/kmsagent.sock"),
        ("UnixSocket", "/run/kmsagent/"),
        ("UnixSocket", "/" + "x" * 107),
        ("UnixSocket", "/run/a\0b"),
        ("UnixSocketMode", "66"),
        ("UnixSocketMode", "0800"),
        ("UnixSocketMode", "1777"),
        ("UnixSocketMode", 0o660),
        ("UnixSocketGroup", "two words"),
        ("UnixSocketGroup", 0),
    ],
)
def test_bad_socket_keys_are_config_errors(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"^\[Server\] {key} = .*: must "):
        parse_config({"Server": {key: value}})


def test_socket_keys_accepted() -> None:
    server = parse_config(
        {"Server": {"UnixSocket": "/" + "x" * 106, "UnixSocketMode": "600", "UnixSocketGroup": "kmstokenreader"}}
    ).server
    keys = (server.unix_socket, server.unix_socket_mode, server.unix_socket_group)
    assert keys == ("/" + "x" * 106, "600", "kmstokenreader")
    assert parse_config({"Server": {"UnixSocketGroup": "4242"}}).server.unix_socket_group == "4242"


# --- the agent as a process -----------------------------------------------------------------------


def socket_config(tmp_path: Path, endpoint: str, path: Path, extra: str = "") -> Path:
    config = tmp_path / "kmsagent.toml"
    config.write_text(
        f'[Server]\nHttpPort = 0\nUnixSocket = "{path}"\n{extra}\n'
        f'[KMS]\nEndpoint = "{endpoint}"\nProtocol = "http"\nMaxRetries = 0\n'
        '[Credentials]\nMetadataEndpoint = "http://127.0.0.1:9"\n'
        '[Log]\nPath = ""\n'
    )
    return config


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("by", ["name", "gid"])
async def test_the_start_line_names_the_socket_made_with_its_mode_and_group(
    tmp_path: Path, folder: Path, emulator: KmsEmulator, by: str
) -> None:
    """SPEC §1's start line; the socket's mode and group from the first instant (stat right after
    the line); removed at exit. `[Log] Path = ""`: stderr only, no log folder anywhere."""
    path = folder / "kmsagent.sock"
    group = grp.getgrnam(OTHER_GROUP)
    ipv6 = ipv6_loopback() and by == "gid"
    extra = f'UnixSocketMode = "0640"\nUnixSocketGroup = "{OTHER_GROUP if by == "name" else group.gr_gid}"\n'
    extra += "BindIPv6 = true\n" if ipv6 else ""
    config = socket_config(tmp_path, emulator.endpoint, path, extra)
    stderr_path = tmp_path / "stderr.txt"
    with stderr_path.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "kmsagent", "--config", str(config)],
            env=AGENT_ENV,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    try:
        lines = await read_lines_until(process, "listening on")
        info = path.lstat()
        assert stat.S_ISSOCK(info.st_mode) and (stat.S_IMODE(info.st_mode), info.st_gid) == (0o640, group.gr_gid)
        started = rf"kmsagent {re.escape(__version__)} listening on http://127\.0\.0\.1:(\d+)(.*)"
        match = re.fullmatch(started, lines[-1])
        assert match, lines
        port = match[1]
        assert match[2] == (f" http://[::1]:{port}" if ipv6 else "") + f" unix:{path}"
        async with unix_client(path) as client:
            response = await client.get(SECRET_PATH, headers={"X-KMS-Token": TOKEN})
        assert response.status_code == 200 and response.json()["SecretName"] == "db/password"
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(5):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert not path.exists()
    assert sorted(os.listdir(tmp_path)) == ["kmsagent.toml", "stderr.txt"]  # no logs/ folder
    logged = [json.loads(line) for line in stderr_path.read_text().splitlines()]
    assert any(record["message"].startswith("credentials: ") for record in logged)


async def test_a_second_agent_on_a_live_socket_exits_1_and_leaves_it(
    start_agent: StartAgent, tmp_path: Path, folder: Path, emulator: KmsEmulator
) -> None:
    path = folder / "kmsagent.sock"
    await start_with_socket(start_agent, path)
    config = socket_config(tmp_path, emulator.endpoint, path)
    result = await trio.to_thread.run_sync(lambda: run_cli("--config", str(config), env=AGENT_ENV))
    assert result.returncode == 1, result.stderr
    assert_one_line(result.stderr.splitlines()[-1])
    assert "is listening on it" in result.stderr and "Traceback" not in result.stderr
    async with unix_client(path) as client:  # the first agent's socket still answers
        assert (await client.get("/ping")).status_code == 200


def test_a_regular_file_at_the_path_exits_1(tmp_path: Path, folder: Path) -> None:
    path = folder / "kmsagent.sock"
    path.write_text("not a socket")
    result = run_cli("--config", str(socket_config(tmp_path, "127.0.0.1:1", path)), env=AGENT_ENV)
    assert result.returncode == 1, result.stderr
    assert_one_line(result.stderr.splitlines()[-1])
    assert "is not a socket" in result.stderr and path.read_text() == "not a socket"


def test_a_folder_writable_by_others_exits_2_and_check_config_says_so(tmp_path: Path, folder: Path) -> None:
    folder.chmod(0o1777)
    config = socket_config(tmp_path, "127.0.0.1:1", folder / "kmsagent.sock")
    for args in (["--check-config"], []):
        result = run_cli(*args, "--config", str(config), env=AGENT_ENV)
        assert result.returncode == 2, (args, result.stderr)
        assert_one_line(result.stderr)
        assert "[Server] UnixSocket" in result.stderr and "writable by others" in result.stderr
    assert list(folder.iterdir()) == []


def test_check_config_notes_a_missing_folder_but_start_refuses_it(tmp_path: Path, folder: Path) -> None:
    config = socket_config(tmp_path, "127.0.0.1:1", folder / "missing" / "kmsagent.sock")
    checked = run_cli("--check-config", "--config", str(config), env=AGENT_ENV)
    assert checked.returncode == 0
    assert "note: [Server] UnixSocket" in checked.stderr and "does not exist" in checked.stderr
    started = run_cli("--config", str(config), env=AGENT_ENV)
    assert started.returncode == 2 and "does not exist" in started.stderr
    assert_one_line(started.stderr.splitlines()[-1])


# --- [Log] Path = "" ------------------------------------------------------------------------------


def test_an_empty_log_path_means_stderr_only(tmp_path: Path) -> None:
    assert parse_config({"Log": {"Path": ""}}).log.path == ""
    check_log_folder(LogConfig(path=""))  # nothing to create or write
    (tmp_path / "c.toml").write_text('[Log]\nPath = ""\n')
    result = run_cli("--check-config", "--config", str(tmp_path / "c.toml"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert 'Path = ""' in result.stdout and list(tmp_path.iterdir()) == [tmp_path / "c.toml"]
