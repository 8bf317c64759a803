"""The SSRF token source: which variable, literal or file, re-read on change, constant-time match,
and a token file that is missing, empty, oversized, odd or loosely owned fails closed (SPEC §2)."""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from conftest import TOKEN, eventually
from kmsagent import token as token_module
from kmsagent.emulator import KmsEmulator
from kmsagent.token import MAX_TOKEN_FILE, FileState, TokenError, TokenSource
from test_cli import AGENT_ENV, agent_process, stop, write_config

NAMES = ("KMS_TOKEN", "KMS_SESSION_TOKEN")
#: A FIFO or device must be judged at once; a blocking open would hang until this fails.
NO_BLOCKING = 2.0


def file_source(path: Path) -> TokenSource:
    return TokenSource.from_environment(NAMES, {"KMS_TOKEN": f"file://{path}"})


def write_token(path: Path, text: str, mode: int = 0o640) -> None:
    path.write_text(text)
    path.chmod(mode)


async def watch_for(source: TokenSource, looks: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs `source.watch` until it has looked at the file `looks` times after its start-up report.

    Counted, not timed: a thread call lets the autojump clock run ahead of the watcher.
    """
    seen = 0
    looked = trio.Event()
    real_read = token_module._read

    def counting_read(*args: object) -> object:  # runs in the watcher's worker thread
        nonlocal seen
        reading = real_read(*args)  # type: ignore[arg-type]
        seen += 1
        if seen == looks:
            trio.from_thread.run_sync(looked.set)
        return reading

    monkeypatch.setattr(token_module, "_read", counting_read)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(source.watch)
        await looked.wait()
        nursery.cancel_scope.cancel()
    monkeypatch.setattr(token_module, "_read", real_read)


# --- where the token comes from -------------------------------------------------------------------


def test_the_first_set_variable_wins() -> None:
    source = TokenSource.from_environment(NAMES, {"KMS_SESSION_TOKEN": "second", "KMS_TOKEN": "first"})
    assert source.matches([b"first"]) and not source.matches([b"second"])
    assert TokenSource.from_environment(NAMES, {"KMS_SESSION_TOKEN": "second"}).matches([b"second"])


def test_no_variable_set_names_them_all() -> None:
    with pytest.raises(TokenError, match="KMS_TOKEN, KMS_SESSION_TOKEN"):
        TokenSource.from_environment(NAMES, {})


@pytest.mark.parametrize("value", ["  ", "file://"])
def test_an_empty_token_or_file_name_is_refused(value: str) -> None:
    with pytest.raises(TokenError, match=r"empty|names no token file"):
        TokenSource.from_environment(NAMES, {"KMS_TOKEN": value})


def test_matches_any_candidate_and_nothing_else() -> None:
    source = TokenSource(b"tok")
    assert source.matches([b"x", b"tok"])
    assert not source.matches([])
    assert not source.matches([b"tok2", b"to", b""])


async def test_a_token_file_is_read_and_re_read_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "token"
    write_token(path, "first-token\n")
    source = file_source(path)
    assert source.matches([b"first-token"])
    assert not await source.reload_if_changed()
    write_token(path, "second-token-longer\n")
    assert await source.reload_if_changed()
    assert source.matches([b"second-token-longer"]) and not source.matches([b"first-token"])


# --- failing closed ---------------------------------------------------------------------------------


async def test_an_emptied_or_missing_file_refuses_every_token_until_fixed(tmp_path: Path) -> None:
    path = tmp_path / "token"
    write_token(path, "first-token")
    source = file_source(path)
    write_token(path, "")
    assert await source.reload_if_changed()
    assert source.state is FileState.EMPTY and not source.matches([b"first-token", b""])
    path.unlink()
    assert not await source.reload_if_changed()  # still nothing accepted
    assert source.state is FileState.MISSING and not source.matches([b"first-token"])
    write_token(path, "third")
    assert await source.reload_if_changed() and source.matches([b"third"])


async def test_a_file_missing_at_start_is_not_fatal_and_works_once_created(tmp_path: Path) -> None:
    path = tmp_path / "token"
    source = file_source(path)  # no TokenError
    assert source.state is FileState.MISSING
    assert not source.matches([b""]) and not source.matches([b"anything"])
    assert not await source.reload_if_changed()
    write_token(path, "late-token\n")
    assert await source.reload_if_changed()
    assert source.state is FileState.OK and source.matches([b"late-token"])


async def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "token"
    os.mkfifo(fifo, 0o600)
    with trio.fail_after(NO_BLOCKING):  # a blocking open of a FIFO with no writer never returns
        source = await trio.to_thread.run_sync(file_source, fifo, abandon_on_cancel=True)
    assert source.state is FileState.NOT_REGULAR and not source.matches([b""])
    # Swapped in for a good file while the agent runs.
    path = tmp_path / "good"
    write_token(path, "good-token")
    running = file_source(path)
    path.unlink()
    os.mkfifo(path, 0o600)
    with trio.fail_after(NO_BLOCKING):
        assert await running.reload_if_changed()
    assert running.state is FileState.NOT_REGULAR and not running.matches([b"good-token"])


async def test_a_fifo_swapped_in_after_the_stat_is_opened_without_blocking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race the stat cannot see: it said "regular file", the open finds a FIFO."""
    regular = tmp_path / "regular"
    write_token(regular, "x")
    fifo = tmp_path / "token"
    os.mkfifo(fifo, 0o600)
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda path, *a, **k: real_stat(regular if Path(path) == fifo else path, *a, **k))
    with trio.fail_after(NO_BLOCKING):
        reading = await trio.to_thread.run_sync(token_module._read, fifo, None, abandon_on_cancel=True)
    assert reading is not None and reading.state is FileState.NOT_REGULAR


def test_a_symlink_to_dev_zero_is_refused_at_once(tmp_path: Path) -> None:
    link = tmp_path / "token"
    link.symlink_to("/dev/zero")
    started = time.monotonic()
    source = file_source(link)
    assert time.monotonic() - started < 0.5  # it used to read until MemoryError (2 GB)
    assert source.state is FileState.NOT_REGULAR and not source.matches([b""])


def test_a_folder_is_refused_and_a_symlink_loop_is_unreadable(tmp_path: Path) -> None:
    assert file_source(tmp_path).state is FileState.NOT_REGULAR
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert file_source(loop).state is FileState.UNREADABLE


def test_a_file_over_4_kb_is_refused_and_never_read_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = tmp_path / "big"
    write_token(big, "t" * (10 * 1024 * 1024))
    reads: list[int] = []
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: reads.append(n) or real_read(fd, n))
    source = file_source(big)
    assert source.state is FileState.TOO_LARGE and not source.matches([b"t" * (10 * 1024 * 1024)])
    assert sum(reads) <= MAX_TOKEN_FILE + 1
    at_limit, over = tmp_path / "at-limit", tmp_path / "over"
    write_token(at_limit, "a" * MAX_TOKEN_FILE)
    write_token(over, "a" * (MAX_TOKEN_FILE + 1))
    assert file_source(at_limit).matches([b"a" * MAX_TOKEN_FILE])
    assert file_source(over).state is FileState.TOO_LARGE


@pytest.mark.parametrize("mode", [0o602, 0o666, 0o777])
def test_a_file_writable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "token"
    write_token(path, "loose-token", mode)
    source = file_source(path)
    assert source.state is FileState.WRITABLE_BY_OTHERS and not source.matches([b"loose-token"])


async def test_a_chmod_while_running_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "token"
    write_token(path, "chmod-token")
    source = file_source(path)
    assert source.matches([b"chmod-token"])
    path.chmod(0o646)
    assert await source.reload_if_changed()
    assert source.state is FileState.WRITABLE_BY_OTHERS and not source.matches([b"chmod-token"])
    path.chmod(0o640)
    assert await source.reload_if_changed() and source.matches([b"chmod-token"])


async def test_a_failed_open_is_tried_again_though_the_file_did_not_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of descriptors under load is no fault of the file: it must not stay refused."""
    path = tmp_path / "token"
    write_token(path, "steady-token")
    real_open = os.open

    def out_of_descriptors(*args: object, **kwargs: object) -> int:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(os, "open", out_of_descriptors)
    source = file_source(path)
    assert source.state is FileState.UNREADABLE and not source.matches([b"steady-token"])
    monkeypatch.setattr(os, "open", real_open)
    assert await source.reload_if_changed() and source.matches([b"steady-token"])


# --- logged once per change of state --------------------------------------------------------------


async def test_a_missing_file_is_logged_once_not_every_second(
    tmp_path: Path, captured_logs: list[str], monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "token"
    source = file_source(path)
    started = trio.current_time()
    await watch_for(source, 60, monkeypatch)
    assert trio.current_time() - started >= 60
    warnings = [line for line in captured_logs if "WARNING" in line]
    assert len(warnings) == 1 and "missing" in warnings[0] and "refused" in warnings[0]
    # Created, then emptied, then fixed: one line per change, and no line while a state lasts.
    write_token(path, "now-there")
    await watch_for(source, 5, monkeypatch)
    write_token(path, "  \n")
    await watch_for(source, 5, monkeypatch)
    write_token(path, "back-again")
    await watch_for(source, 5, monkeypatch)
    lines = [line for line in captured_logs if "token file" in line]
    assert len(lines) == 4, lines
    for line, says in zip(lines, ["missing", "usable again", "empty", "usable again"], strict=True):
        assert says in line, lines
    assert source.matches([b"back-again"])
    assert not any(secret in "\n".join(captured_logs) for secret in ("now-there", "back-again"))


@pytest.mark.parametrize(("mode", "warned"), [(0o644, True), (0o604, True), (0o640, False), (0o600, False)])
async def test_a_world_readable_token_file_is_warned_about_once(
    tmp_path: Path, captured_logs: list[str], monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock,
    mode: int, warned: bool,
) -> None:
    path = tmp_path / "token"
    write_token(path, "file-token-value", mode)
    source = file_source(path)
    assert source.matches([b"file-token-value"])  # readable is allowed, with a warning
    await watch_for(source, 3, monkeypatch)
    write_token(path, "file-token-value-2", mode)  # a rotation keeps the same mode: no new warning
    await watch_for(source, 3, monkeypatch)
    assert source.matches([b"file-token-value-2"])
    assert sum("readable by every user" in line for line in captured_logs) == (1 if warned else 0)


# --- the agent process ----------------------------------------------------------------------------


async def test_the_agent_starts_closed_without_its_token_file_and_opens_when_it_appears(
    tmp_path: Path, emulator: KmsEmulator
) -> None:
    token_file = tmp_path / "kmstoken"
    env = {**AGENT_ENV, "KMS_TOKEN": f"file://{token_file}"}
    async with agent_process(["--config", str(write_config(tmp_path, emulator.endpoint))], env, tmp_path) as agent:
        async with httpx.AsyncClient(timeout=10) as client:

            async def get(path: str, token: str) -> httpx.Response:
                return await client.get(agent.url(path), headers={"X-KMS-Token": token})

            assert (await get("/ping", "")).status_code == 200
            for candidate in (TOKEN, "", "file-token"):
                response = await get("/v1/api-key", candidate)
                assert (response.status_code, response.json()["Code"]) == (403, "BadToken")
            async def accepted() -> bool:
                return (await get("/v1/api-key", TOKEN)).status_code == 200

            write_token(token_file, TOKEN + "\n", 0o600)
            await eventually(accepted, seconds=3, interval=0.05)  # re-read within a second of the change
            assert (await get("/v1/api-key", "file-token")).status_code == 403
        assert await stop(agent, signal.SIGTERM) == 0
    stderr = agent.stderr_path.read_text()
    assert "Traceback" not in stderr and TOKEN not in stderr
    assert sum("is missing" in line for line in stderr.splitlines()) == 1
    assert sum("usable again" in line for line in stderr.splitlines()) == 1

