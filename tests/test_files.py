"""SPEC §8 `[[Files]]`: templates, atomic writes, rewrites only on change, OnChange, config errors,
`--once`, and the agent process keeping files in step with KMS (emulator, real sockets)."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import threading
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from conftest import SECRET_MATERIAL, TOKEN, eventually
from kmsagent import files
from kmsagent.cache import Outcome, SecretCache
from kmsagent.checks import CacheKey, SecretQuery
from kmsagent.config import _FILE_KEYS, ConfigError, FileConfig, parse_config
from kmsagent.emulator import KmsEmulator
from kmsagent.files import OnChange, render, sync_file, write_atomic
from kmsagent.formats import response_format
from kmsagent.kms import SecretValue
from kmsagent.pinned import PinnedSecret
from kmsagent.processes import run_bounded
from kmsagent.refresher import Refresher
from kmsagent.store import CachedSecret, SecretStore
from kmsagent.template import RenderError, TemplateError, parse_template
from test_cli import AGENT_ENV, agent_process, assert_one_line, run_cli, stop, write_config

ROOT = Path(__file__).resolve().parents[1]
NOBODY, NOGROUP = 65534, 65534
DB = '{"user": "app", "password": "files-db-password-Qw3e", "port": 5432, "tls.crt": "CERT"}'


def secret(data: str, *, binary: bool = False) -> SecretValue:
    return SecretValue(
        {"SecretName": "s", "SecretData": data, "VersionId": "v1", "SecretDataType": "binary" if binary else "text"}
    )


# --- Templates and rendering --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("${user}:${password}", "app:files-db-password-Qw3e"),
        ("${tls.crt}", "CERT"),  # string.Template cannot name this key
        ("port=${port}", "port=5432"),  # not a string: JSON
        ("$$HOME $x $ {user} $", "$HOME $x $ {user} $"),
        ("$${user}", "${user}"),
        ("${SecretData}", DB),
        ("", ""),
    ],
)
def test_template_renders_names_dollars_and_literals(template: str, expected: str) -> None:
    assert parse_template(template).render(DB) == expected


def test_template_with_only_secret_data_needs_no_json() -> None:
    assert parse_template("value=${SecretData};").render("not json at all") == "value=not json at all;"


@pytest.mark.parametrize(("template", "where"), [("a ${user", "character 3"), ("${}", "names no key")])
def test_a_malformed_template_is_an_error(template: str, where: str) -> None:
    with pytest.raises(TemplateError, match=where):
        parse_template(template)


@pytest.mark.parametrize(
    ("data", "message"), [("plain text", "not JSON"), ("[1, 2]", "not an object"), ('{"a": 1}', 'no key "user"')]
)
def test_a_secret_that_does_not_fit_is_a_render_error_without_the_value(data: str, message: str) -> None:
    with pytest.raises(RenderError, match=message) as caught:
        parse_template("${user}").render(data)
    assert data not in str(caught.value)


def test_render_whole_value_json_key_template_and_binary() -> None:
    plain = FileConfig("s", "/x")
    assert render(plain, None, secret(DB)) == DB.encode()
    assert render(FileConfig("s", "/x", json_key="password"), None, secret(DB)) == b"files-db-password-Qw3e"
    assert render(FileConfig("s", "/x", json_key="port"), None, secret(DB)) == b"5432"
    assert render(plain, None, secret("AAEC/w==", binary=True)) == b"\x00\x01\x02\xff"
    with pytest.raises(RenderError, match="binary"):
        render(FileConfig("s", "/x", json_key="a"), None, secret("AAEC/w==", binary=True))
    with pytest.raises(RenderError, match='no key "nope"'):
        render(FileConfig("s", "/x", json_key="nope"), None, secret(DB))


# --- Pinned entries (SPEC §5) ------------------------------------------------------------------------


def counting_load(calls: list[float], value: str) -> Callable[[], Any]:
    async def load() -> str:
        calls.append(trio.current_time())
        return f"{value}#{len(calls)}"

    return load


async def test_pinned_entries_are_never_evicted_and_others_are_served_but_not_kept(nursery: trio.Nursery) -> None:
    cache: SecretCache[str, str] = SecretCache(max_entries=2, ttl=60, loads=nursery)
    cache.pin("a")
    cache.pin("b")
    for key in ("a", "b", "c"):
        value, outcome = await cache.get(key, counting_load([], key))
        assert (value, outcome) == (f"{key}#1", Outcome.MISS)  # "c" is served...
    assert ("a" in cache, "b" in cache, "c" in cache) == (True, True, False)  # ...but not kept
    cache.pinned.discard("b")
    await cache.get("d", counting_load([], "d"))
    assert ("a" in cache, "b" in cache, "d" in cache) == (True, False, True)  # unpinned: LRU as usual


async def test_a_pinned_entry_nobody_reads_is_refreshed_ahead_and_never_expires(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    cache: SecretCache[str, str] = SecretCache(max_entries=10, ttl=10, loads=nursery)
    refresher = Refresher(cache, max_in_flight=8)
    nursery.start_soon(refresher.run)
    calls: list[float] = []
    cache.pin("pinned")
    await cache.get("pinned", counting_load(calls, "pinned"))  # one load, never read again
    for _ in range(120):
        await trio.sleep(0.5)
        entry = cache.peek("pinned")
        assert entry is not None and entry.expires_at > trio.current_time()
    assert len(calls) >= 6  # about one refresh per TTL over 60 s


class SlowKms:
    """A KMS that takes one second per answer and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def get_secret_value(
        self, name: str, *, version_id: str, version_stage: str, queued: object = None, credentials: object = None
    ) -> SecretValue:
        self.calls += 1
        await trio.sleep(1.0)
        return SecretValue(
            {
                "SecretName": name,
                "SecretData": f"value-{self.calls}",
                "SecretDataType": "text",
                "VersionId": f"v{self.calls}",
                "VersionStages": {"VersionStage": ["ACSCurrent"]},
                "CreateTime": "2026-11-30T00:00:00Z",
            }
        )


async def test_a_followed_secret_is_reloaded_before_expiry_even_when_the_refresher_is_behind(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """No refresher at all (the worst backlog): the follower's backstop reloads ahead of expiry,
    so the entry is never expired and every reload reaches the consumer, one KMS call per TTL."""
    cache: SecretCache[CacheKey, CachedSecret] = SecretCache(max_entries=10, ttl=10, loads=nursery)
    kms = SlowKms()
    store = SecretStore(cache, kms, response_format(0, region="cn-hangzhou", lease_seconds=lambda: 10))  # type: ignore[arg-type]
    seen: list[str] = []

    async def consume(update: Any) -> None:
        seen.append(update.secret.data)

    nursery.start_soon(PinnedSecret(store, SecretQuery("s")).follow, consume)
    await trio.sleep(1.5)  # the first load
    for _ in range(120):
        await trio.sleep(0.5)
        entry = cache.peek(SecretQuery("s").cache_key)
        assert entry is not None and entry.expires_at > trio.current_time()
    assert (
        6 <= kms.calls <= 8 and seen == [f"value-{n}" for n in range(1, len(seen) + 1)] and len(seen) >= kms.calls - 1
    )


# --- Writing ----------------------------------------------------------------------------------------


def test_sync_file_writes_only_what_differs(tmp_path: Path) -> None:
    path = str(tmp_path / "f")
    assert sync_file(path, b"one", 0o640, None, None) == "created"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640 and Path(path).read_bytes() == b"one"
    before = os.stat(path)
    assert sync_file(path, b"one", 0o640, None, None) == "unchanged"
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not touched
    assert sync_file(path, b"two", 0o640, None, None) == "changed"
    assert sync_file(path, b"two", 0o600, None, None) == "changed"  # Mode alone
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sync_file(path, b"two", 0o600, NOBODY, NOGROUP) == "changed"  # Owner/Group alone (root)
    info = os.stat(path)
    assert (info.st_uid, info.st_gid, Path(path).read_bytes()) == (NOBODY, NOGROUP, b"two")
    assert sync_file(path, b"two", 0o600, NOBODY, NOGROUP) == "unchanged"
    os.chmod(path, 0o644)  # someone widened it: put right
    assert sync_file(path, b"two", 0o600, NOBODY, NOGROUP) == "changed"
    assert sorted(os.listdir(tmp_path)) == ["f"]


def test_the_umask_does_not_change_mode(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        sync_file(str(tmp_path / "f"), b"x", 0o644, None, None)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "f").st_mode) == 0o644


def test_a_symlink_at_path_is_replaced_never_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (tmp_path / "f").symlink_to(victim)
    assert sync_file(str(tmp_path / "f"), b"secret", 0o600, None, None) == "changed"
    assert victim.read_text() == "keep me"
    assert not (tmp_path / "f").is_symlink() and (tmp_path / "f").read_bytes() == b"secret"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old")

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(str(path), b"new", 0o600, None, None)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f"]


def test_leftover_temporaries_of_a_killed_agent_are_removed(tmp_path: Path) -> None:
    (tmp_path / f".f.0123456789abcdef{files.TEMP_SUFFIX}").write_bytes(b"half")
    (tmp_path / ".other.x.kmsagent-tmp").write_bytes(b"not ours")
    assert files.remove_leftovers(str(tmp_path / "f")) == 1
    assert os.listdir(tmp_path) == [".other.x.kmsagent-tmp"]


# --- OnChange ---------------------------------------------------------------------------------------


async def test_on_change_runs_one_at_a_time_and_coalesces_changes_into_one_more_run(tmp_path: Path) -> None:
    gate, runs = tmp_path / "gate", tmp_path / "runs"
    os.mkfifo(gate)
    outcomes: list[str] = []
    on_change = OnChange(
        ["sh", "-c", f"echo run >> {runs}; read line < {gate}"], {"PATH": os.environ["PATH"]}, "t", outcomes.append
    )

    def count() -> int:
        return len(runs.read_text().splitlines()) if runs.exists() else 0

    def release() -> None:
        with open(gate, "w") as fifo:  # blocks until the run opens the gate for reading
            fifo.write("go\n")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(on_change.run)
        on_change.request()
        await eventually(lambda: count() == 1)
        for _ in range(3):  # three changes during the run
            on_change.request()
        await trio.to_thread.run_sync(release)
        await eventually(lambda: count() == 2)
        await trio.to_thread.run_sync(release)
        await eventually(lambda: len(outcomes) == 2)
        nursery.cancel_scope.cancel()
    assert (count(), on_change.runs, outcomes) == (2, 2, ["success", "success"])


def alive_with(marker: str) -> list[int]:
    """Live processes whose command line holds `marker` (a zombie's command line is empty)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                pass
    return found


async def test_run_bounded_kills_the_whole_group_at_its_limit_and_keeps_the_first_lines() -> None:
    script = "for i in 1 2 3 4 5 6 7; do echo line $i; done; sleep 1000.25 & exec sleep 1000.26"
    started = trio.current_time()
    returncode, lines = await run_bounded(["sh", "-c", script], {"PATH": os.environ["PATH"]}, limit=0.5)
    assert returncode is None and trio.current_time() - started < 3
    assert lines == [f"line {i}" for i in range(1, 6)]
    assert alive_with("1000.25") == [] and alive_with("1000.26") == []


async def test_on_change_logs_status_and_escaped_first_lines(
    monkeypatch: pytest.MonkeyPatch, captured_logs: list[str]
) -> None:
    outcomes: list[str] = []
    env = {"PATH": os.environ["PATH"]}
    await OnChange(
        ["sh", "-c", r"printf 'bad\r\nFORGED 2026 ERROR x\n'; exit 3"], env, "[[Files]] #1", outcomes.append
    ).run_once()
    await OnChange(["/no/such/program"], env, "[[Files]] #1", outcomes.append).run_once()
    monkeypatch.setattr(files, "ON_CHANGE_LIMIT", 0.3)
    await OnChange(["sleep", "1000.27"], env, "[[Files]] #1", outcomes.append).run_once()
    assert outcomes == ["failure", "error", "timeout"]
    failed = next(line for line in captured_logs if "exit status 3" in line)
    assert "bad" in failed and "FORGED 2026 ERROR x" in failed
    assert any("cannot be run" in line and "No such file" in line for line in captured_logs)
    assert any("killed after" in line for line in captured_logs)
    assert alive_with("1000.27") == []


# --- Config errors ------------------------------------------------------------------------------------


def files_error(tables: list[dict[str, Any]], **sections: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config({**sections, "Files": tables})
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "out"
    path.mkdir(mode=0o755)
    return path


def test_a_valid_table_and_its_defaults(folder: Path) -> None:
    config = parse_config(
        {"Files": [{"SecretId": "db", "Path": str(folder / "db"), "Owner": "nobody", "Group": "65534"}]}
    )
    (file,) = config.files
    assert (file.version_stage, file.mode, file.uid, file.gid, file.on_change) == (
        "ACSCurrent",
        0o600,
        NOBODY,
        NOGROUP,
        (),
    )


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({"Path": "{f}/a"}, "[[Files]] #2: SecretId is required"),
        ({"SecretId": "s"}, "[[Files]] #2: Path is required"),
        ({"SecretId": "s", "Path": "relative/a"}, "[[Files]] #2 Path = 'relative/a': must be an absolute path"),
        (
            {"SecretId": "s", "Path": "{f}/missing/a"},
            "its folder {f}/missing cannot be used (No such file or directory)",
        ),
        ({"SecretId": "s", "Path": "{f}"}, "is a folder"),
        (
            {"SecretId": "s", "Path": "{f}/a", "Mode": "1777"},
            "[[Files]] #2 Mode = '1777': must be octal permission bits within 0777",
        ),
        ({"SecretId": "s", "Path": "{f}/a", "Mode": "0800"}, "Mode = '0800': must be octal"),
        ({"SecretId": "s", "Path": "{f}/a", "Mode": 600}, "Mode = 600: must be octal"),
        (
            {"SecretId": "s", "Path": "{f}/a", "JsonKey": "k", "Template": "${k}"},
            "JsonKey = 'k': set JsonKey or Template, not both",
        ),
        (
            {"SecretId": "s", "Path": "{f}/a", "Template": "${k"},
            "Template = '${k': \"${\" at character 1 has no closing",
        ),
        (
            {"SecretId": "s", "Path": "{f}/a", "Owner": "no-such-user-x"},
            "Owner = 'no-such-user-x': must be an existing user",
        ),
        ({"SecretId": "s", "Path": "{f}/a", "Group": "no-such-group-x"}, "must be an existing group"),
        (
            {"SecretId": "s", "Path": "{f}/a", "OnChange": "nginx -s reload"},
            "OnChange = 'nginx -s reload': must be a list",
        ),
        ({"SecretId": "s", "Path": "{f}/a", "OnChange": [""]}, "must be a list of strings"),
        ({"SecretId": "s", "Path": "{f}/a", "Bogus": 1}, "[[Files]] #2 Bogus: unknown key (allowed: SecretId, Path,"),
        ({"SecretId": "s", "Path": "{f}/first"}, "[[Files]] #2 Path = '{f}/first': the same Path as [[Files]] #1"),
    ],
)
def test_config_errors_name_the_table_the_key_and_what_is_allowed(
    folder: Path, table: dict[str, Any], expected: str
) -> None:
    table = {
        key: value.replace("{f}", str(folder)) if isinstance(value, str) else value for key, value in table.items()
    }
    message = files_error([{"SecretId": "first", "Path": str(folder / "first")}, table])
    assert expected.replace("{f}", str(folder)) in message


@pytest.mark.parametrize(("mode", "group"), [(0o777, 0), (0o1777, 0), (0o775, NOGROUP), (0o757, 0)])
def test_a_folder_writable_by_others_is_refused(folder: Path, mode: int, group: int) -> None:
    os.chown(folder, 0, group)
    folder.chmod(mode)
    message = files_error([{"SecretId": "s", "Path": str(folder / "a")}])
    assert "is writable by others" in message and f"{mode:04o}" in message


def test_a_folder_of_another_user_is_refused_and_root_group_write_is_allowed(folder: Path) -> None:
    folder.chmod(0o775)  # group root: only root writes
    parse_config({"Files": [{"SecretId": "s", "Path": str(folder / "a")}]})
    os.chown(folder, NOBODY, 0)
    assert "must belong to root or the agent's user" in files_error([{"SecretId": "s", "Path": str(folder / "a")}])


def test_owner_and_group_need_root(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kmsagent.config.os.geteuid", lambda: 1000)
    os.chown(folder, 1000, 1000)
    message = files_error([{"SecretId": "s", "Path": str(folder / "a"), "Group": "nogroup"}])
    assert message.startswith("[[Files]] #1 Group = 'nogroup': is allowed only when the agent runs as root")


def test_ttl_zero_and_more_pinned_secrets_than_the_cache_are_refused(folder: Path) -> None:
    table = {"SecretId": "s", "Path": str(folder / "a")}
    assert files_error([table], Cache={"TtlSeconds": 0}).startswith(
        "[Cache] TtlSeconds = 0: must be at least 1 with [[Files]]"
    )
    tables = [table, {"SecretId": "t", "Path": str(folder / "b")}, {"SecretId": "t", "Path": str(folder / "c")}]
    parse_config({"Cache": {"CacheSize": 2}, "Files": tables})  # two distinct secrets fit two entries
    message = files_error(tables, Cache={"CacheSize": 1})
    assert message.startswith("[Cache] CacheSize = 1: [[Files]] and [Exec] Env keep 2 secrets always cached")
    env = {"Command": ["true"], "Env": {"A": "u", "B": "u#k"}}
    assert "keep 3 secrets" in files_error(tables, Cache={"CacheSize": 2}, Exec=env)


def test_a_bad_files_table_exits_2_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[[Files]]\nSecretId = "s"\nPath = "{tmp_path}/nope/a"\n')
    for args in (["--config", str(config)], ["--once", "--config", str(config)]):
        result = run_cli(*args, env=AGENT_ENV)
        assert result.returncode == 2
        assert_one_line(result.stderr)
        assert result.stderr.startswith("kmsagent: config error: [[Files]] #1 Path = ")


def test_check_config_prints_the_tables(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[[Files]]\nSecretId = "s"\nPath = "{tmp_path}/a"\nMode = "640"\nOnChange = ["true"]\n')
    result = run_cli("--check-config", "--config", str(config), env=AGENT_ENV)
    assert result.returncode == 0
    assert f'[[Files]]\nSecretId = "s"\nPath = "{tmp_path}/a"\n' in result.stdout
    assert 'Mode = "0640"' in result.stdout and 'OnChange = ["true"]' in result.stdout


def test_the_docs_list_every_files_key() -> None:
    section = (ROOT / "docs" / "configuration.md").read_text().split("## [[Files]]", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"^\| `(\w+)` \|", section, re.MULTILINE) == list(_FILE_KEYS)


# --- The agent process ------------------------------------------------------------------------------


def files_config(tmp_path: Path, endpoint: str, tables: str, ttl: int = 1) -> Path:
    path = write_config(tmp_path, endpoint)
    path.write_text(path.read_text() + f"\n[Cache]\nTtlSeconds = {ttl}\n" + tables)
    return path


def table(secret_id: str, path: Path, **keys: Any) -> str:
    lines = [f'SecretId = "{secret_id}"', f'Path = "{path}"'] + [
        f"{key} = {json.dumps(value)}" for key, value in keys.items()
    ]
    return "\n[[Files]]\n" + "\n".join(lines) + "\n"


async def test_files_are_written_before_the_port_opens_and_follow_rotations_within_the_ttl(
    tmp_path: Path, emulator: KmsEmulator
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    emulator.put_secret("files/db", DB)
    log = tmp_path / "changes"
    tables = table(
        "files/db", out / "password", JsonKey="password", Mode="0640", OnChange=["sh", "-c", f"echo changed >> {log}"]
    )
    tables += table("files/db", out / "dsn", Template="postgres://${user}:${password}@db:${port}/app")
    config = files_config(tmp_path, emulator.endpoint, tables)
    async with agent_process(["--config", str(config)], AGENT_ENV, tmp_path) as agent:
        # written before the port opened; not read over HTTP at all: pinned entries stay hot
        assert (out / "password").read_text() == "files-db-password-Qw3e"
        assert (out / "dsn").read_text() == "postgres://app:files-db-password-Qw3e@db:5432/app"
        assert stat.S_IMODE((out / "password").stat().st_mode) == 0o640
        assert not log.exists()  # created, not changed: no OnChange
        before = (out / "password").stat()
        calls = emulator.call_count("files/db")
        await eventually(lambda: emulator.call_count("files/db") >= calls + 2)  # two refreshes, same value
        after = (out / "password").stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        emulator.rotate("files/db", DB.replace("files-db-password-Qw3e", "files-db-rotated-Zx8c"))
        rotated = trio.current_time()
        await eventually(lambda: (out / "password").read_text() == "files-db-rotated-Zx8c", seconds=5)
        assert trio.current_time() - rotated < 1 + 0.5  # TtlSeconds = 1, plus the load
        await eventually(lambda: "rotated" in (out / "dsn").read_text())
        await eventually(lambda: log.exists() and log.read_text() == "changed\n")
        async with httpx.AsyncClient(timeout=10) as client:
            metrics = (await client.get(agent.url("/metrics"))).text
        assert re.search(r'kmsagent_file_writes_total\{outcome="written"\} 4\.0', metrics)
        assert re.search(r'kmsagent_file_onchange_runs_total\{outcome="success"\} 1\.0', metrics)
        assert await stop(agent) == 0
    stderr = agent.stderr_path.read_text()
    for material in (*SECRET_MATERIAL, "files-db-password-Qw3e", "files-db-rotated-Zx8c"):
        assert material not in stderr


async def test_a_reader_never_sees_a_partial_file_or_an_inode_beyond_mode(
    tmp_path: Path, emulator: KmsEmulator
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    versions = [f"<v{i}>" + chr(ord("a") + i % 26) * (1000 + 30000 * (i % 3)) + f"</v{i}>" for i in range(60)]
    emulator.put_secret("files/big", versions[0])
    config = files_config(
        tmp_path,
        emulator.endpoint,
        table("files/big", out / "big", Mode="0640", Owner="nobody", Group="nogroup"),
        ttl=60,
    )
    seen: list[tuple[bytes, int, int, int]] = []
    entries: list[tuple[str, int, int, int, int]] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            with open(out / "big", "rb") as file:
                info = os.fstat(file.fileno())
                seen.append((file.read(), stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid))
            for entry in os.scandir(out):  # the temporary files too
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                entries.append((entry.name, stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid, info.st_size))

    async with agent_process(["--config", str(config)], AGENT_ENV, tmp_path) as agent:
        thread = threading.Thread(target=reader)
        thread.start()
        try:
            async with httpx.AsyncClient(headers={"X-KMS-Token": TOKEN}, timeout=10) as client:
                for value in versions[1:]:
                    emulator.rotate("files/big", value)
                    response = await client.get(agent.url("/secretsmanager/get?secretId=files/big&refreshNow=true"))
                    assert response.status_code == 200
            await eventually(lambda: (out / "big").read_text() == versions[-1])
        finally:
            done.set()
            await trio.to_thread.run_sync(thread.join)
        assert await stop(agent) == 0
    allowed = {value.encode() for value in versions}
    assert len(seen) > 50 and {content for content, *_ in seen} <= allowed  # never a mix
    assert len({content for content, *_ in seen}) > 5  # the reader saw many rewrites
    assert {(mode, uid, gid) for _, mode, uid, gid in seen} == {(0o640, NOBODY, NOGROUP)}
    for name, mode, uid, gid, size in entries:
        assert mode & 0o077 & ~0o640 == 0, (name, oct(mode))  # nothing beyond Mode for group and others, ever
        if size:
            assert (mode, uid, gid) == (0o640, NOBODY, NOGROUP), (name, oct(mode), uid, gid)
    assert os.listdir(out) == ["big"]


async def test_a_later_kms_4xx_or_a_value_that_does_not_fit_leaves_the_file_as_it_was(
    tmp_path: Path, emulator: KmsEmulator
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    emulator.put_secret("files/db", DB)
    emulator.put_secret("files/gone", "gone-value-Lk9m")
    tables = table("files/db", out / "password", JsonKey="password") + table("files/gone", out / "gone")
    tables += table("files/plain", out / "never", JsonKey="password")
    emulator.put_secret("files/plain", "not json")
    config = files_config(tmp_path, emulator.endpoint, tables)
    async with agent_process(["--config", str(config)], AGENT_ENV, tmp_path) as agent:
        assert not (out / "never").exists()  # not JSON: nothing written
        emulator.rotate("files/db", '{"user": "app"}')  # the key went missing
        emulator.delete_secret("files/gone")
        calls = emulator.call_count()
        await eventually(lambda: emulator.call_count() >= calls + 4)
        await eventually(lambda: "JSON has no key" in agent.stderr_path.read_text())
        await eventually(lambda: "Forbidden.ResourceNotFound" in agent.stderr_path.read_text())
        assert (out / "password").read_text() == "files-db-password-Qw3e"
        assert (out / "gone").read_text() == "gone-value-Lk9m"
        assert await stop(agent) == 0
    stderr = agent.stderr_path.read_text()
    assert "[[Files]] #3" in stderr and "the secret value is not JSON" in stderr
    assert "gone-value-Lk9m" not in stderr and "files-db-password-Qw3e" not in stderr


async def test_a_rotation_while_the_agent_was_down_runs_on_change_at_start(
    tmp_path: Path, emulator: KmsEmulator
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "key").write_text("the value before the rotation")
    (out / "key").chmod(0o600)
    log = tmp_path / "changes"
    emulator.put_secret("files/key", "after-the-rotation-Hd5s")
    config = files_config(
        tmp_path, emulator.endpoint, table("files/key", out / "key", OnChange=["sh", "-c", f"echo ran >> {log}"])
    )
    async with agent_process(["--config", str(config)], AGENT_ENV, tmp_path) as agent:
        assert (out / "key").read_text() == "after-the-rotation-Hd5s"
        await eventually(lambda: log.exists() and log.read_text() == "ran\n")
        assert await stop(agent) == 0


async def test_once_writes_every_file_and_exits_0_or_1_naming_the_failures(
    tmp_path: Path, emulator: KmsEmulator
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    emulator.put_secret("files/db", DB)
    tables = table("files/db", out / "user", JsonKey="user") + table("files/db", out / "all")
    env = {key: value for key, value in AGENT_ENV.items() if key != "KMS_TOKEN"}  # no port, no token needed

    def once() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "kmsagent", "--once", "--config", str(config)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    config = files_config(tmp_path, emulator.endpoint, tables)
    result = await trio.to_thread.run_sync(once)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and (out / "user").read_text() == "app" and (out / "all").read_text() == DB
    config = files_config(tmp_path, emulator.endpoint, tables + table("files/missing", out / "missing"))
    started = trio.current_time()
    result = await trio.to_thread.run_sync(once)
    assert result.returncode == 1
    assert trio.current_time() - started < 10  # a KMS 4xx is final: no waiting out the 15 s
    failures = [line for line in result.stderr.splitlines() if line.startswith("kmsagent: ")]
    assert len(failures) == 1, result.stderr
    assert failures[0].startswith(
        f"kmsagent: [[Files]] #3 ({out / 'missing'}): not written: "
        "the secret cannot be loaded: Forbidden.ResourceNotFound"
    )


def test_the_readme_files_example_is_a_valid_config(folder: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Secrets as files and environment", 1)[1].split("\n## ", 1)[0]
    block = next(body for body in re.findall(r"```toml\n(.*?)```", section, re.DOTALL) if "[[Files]]" in body)
    config = parse_config(tomllib.loads(block.replace("/etc/nginx/tls", str(folder))))
    assert [(file.json_key, file.mode, file.gid is not None) for file in config.files] == [
        ("key", 0o640, True),
        ("crt", 0o644, False),
    ]


async def test_an_on_change_run_is_killed_with_its_group_at_shutdown(tmp_path: Path, emulator: KmsEmulator) -> None:
    out = tmp_path / "out"
    out.mkdir()
    emulator.put_secret("files/key", "first-value-Po0q")
    on_change = ["sh", "-c", "sleep 1000.41 & exec sleep 1000.42"]
    config = files_config(tmp_path, emulator.endpoint, table("files/key", out / "key", OnChange=on_change))
    async with agent_process(["--config", str(config)], AGENT_ENV, tmp_path) as agent:
        emulator.rotate("files/key", "second-value-Po0q")
        await eventually(lambda: len(alive_with("1000.41")) == 1 and len(alive_with("1000.42")) == 1)
        assert await stop(agent) == 0  # within 5 s, OnChange's 30 s limit notwithstanding
    assert alive_with("1000.41") == [] and alive_with("1000.42") == []
