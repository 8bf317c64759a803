"""Logging (SPEC §2 `[Log]`): one physical line per record whatever it carries, sinks that never
block a log call, a flat JSON format, reloads that keep the running sinks on a bad Path."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from loguru import logger

from kmsagent import logs, redact
from kmsagent.config import LogConfig
from kmsagent.emulator import KmsEmulator
from kmsagent.log_sinks import Destination, QueuedWriter, RotatingFile, dropped_lines
from kmsagent.logs import LOG_FILE, LogSetupError, close_logging, configure_logging, escape
from test_cli import AGENT_ENV, agent_process, stop, write_config

FORGED_TIME = "2026-01-01T00:00:00.000+0000"
#: Every way a message could break a line: CR, LF, CRLF, NEL (C1), U+2028/9, VT, FF, FS, ESC.
BREAKERS = ("\r", "\n", "\r\n", "\x85", "\u2028", "\u2029", "\x0b", "\x0c", "\x1c", "\x1b[2K\r")
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d{4}$")

Configure = Callable[..., Path]


@pytest.fixture
def sinks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Configure]:
    """`configure(**LogConfig fields)` with stderr sent to `tmp_path/stderr.txt` (or to the
    stream given as `stderr=`); closed after."""
    root_handlers = logging.getLogger().handlers[:]
    root_level = logging.getLogger().level
    stderr_file = (tmp_path / "stderr.txt").open("w")

    def configure(stderr: Any = stderr_file, **fields: Any) -> Path:
        # Set during the test itself: pytest's capture puts its own sys.stderr back for each phase.
        monkeypatch.setattr(sys, "stderr", stderr)
        fields.setdefault("path", str(tmp_path / "logs"))
        configure_logging(LogConfig(**fields))
        return Path(fields["path"])

    yield configure
    close_logging()
    stderr_file.close()
    logging.getLogger().handlers[:] = root_handlers
    logging.getLogger().setLevel(root_level)


def physical_lines(path: Path) -> list[str]:
    """The file's lines as the strictest reader splits them (`str.splitlines` also breaks on
    NEL, U+2028, VT, FF and FS)."""
    return path.read_text(encoding="utf-8").splitlines()


def assert_not_forged(lines: list[str]) -> None:
    for line in lines:
        assert not line.startswith(FORGED_TIME) and not line.lstrip().startswith("FORGED"), line


def log_hostile_records() -> int:
    """Logs records carrying line breaks in every place a client's text can reach; returns how many."""
    hostile = "".join(f"{breaker}{FORGED_TIME} INFO FORGED" for breaker in BREAKERS)
    logger.info("GET /v1/x{} 404", hostile)
    try:
        raise ValueError(f"no secret named {hostile}")
    except ValueError:
        logger.exception("unexpected failure serving {}", "/v1/x\nFORGED")
    logger.bind(secret=f"x{hostile}", status=404).warning("request")
    logging.getLogger("hypercorn.error").error("bad request line %r\nFORGED", "x")
    return 4


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_forged_lines_stay_inside_one_line_in_every_sink(sinks: Configure, tmp_path: Path, log_format: str) -> None:
    folder = sinks(format=log_format, level="debug")
    count = log_hostile_records()
    close_logging()
    for where in (folder / LOG_FILE, tmp_path / "stderr.txt"):
        lines = physical_lines(where)
        assert len(lines) == count, (where, lines)
        assert_not_forged(lines)
        assert all(line.isprintable() for line in lines)
        if log_format == "json":
            records = [json.loads(line) for line in lines]
            assert all(list(record)[:3] == ["time", "level", "message"] for record in records)
            assert "ValueError: no secret named" in records[1]["error"] and "\n" not in records[1]["error"]
            shown = [record["message"] for record in records]
        else:
            assert " error=Traceback (most recent call last):\\n" in lines[1]
            shown = lines
        assert "\\r\\n" + FORGED_TIME in shown[0]  # escaped, visible, not dropped


def test_json_is_one_flat_object_a_line(sinks: Configure) -> None:
    folder = sinks(format="json", level="info")
    logger.bind(secret="db/password", status=200, ms=1.5, message="a field named message").info("request")
    logger.bind(payload={"nested": [1, 2]}, ratio=float("nan")).info("odd fields")
    close_logging()
    first, second = (json.loads(line) for line in physical_lines(folder / LOG_FILE))
    assert list(first) == ["time", "level", "message", "secret", "status", "ms", "field_message"]
    assert (first["level"], first["message"], first["secret"], first["status"], first["ms"]) == (
        "INFO", "request", "db/password", 200, 1.5
    )
    assert TIME.match(first["time"]), first["time"]
    assert second["payload"] == "{'nested': [1, 2]}" and second["ratio"] == "nan"  # JSON-safe


def test_text_lines_keep_their_format(sinks: Configure) -> None:
    folder = sinks(format="text", level="info")
    logger.warning("hello {}", "world")
    close_logging()
    (line,) = physical_lines(folder / LOG_FILE)
    stamp, rest = line.split(" ", 1)
    assert TIME.match(stamp) and rest == "WARNING hello world"


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("a\r\nb", "a\\r\\nb"),
        ("tab\there", "tab\\there"),
        ("esc\x1b[31m", "esc\\x1b[31m"),
        ("nel\x85", "nel\\x85"),
        ("ls\u2028ps\u2029", "ls\\u2028ps\\u2029"),
        ("bidi\u202e", "bidi\\u202e"),
        ("surrogate\udcff", "surrogate\\udcff"),
        ("plain ascii and ünïcødé 名前", "plain ascii and ünïcødé 名前"),
    ],
)
def test_escape_makes_every_control_visible(raw: str, shown: str) -> None:
    assert escape(raw) == shown


# --- sinks that cannot keep up ---------------------------------------------------------------------


async def test_a_stderr_nobody_reads_never_blocks_a_log_call(
    sinks: Configure, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 10 #7: with stderr a full pipe, the trio thread's log calls return at once and the
    lines that do not fit are dropped and counted; the file sink keeps writing."""
    read_end, write_end = os.pipe()
    monkeypatch.setattr(logs, "CLOSE_WAIT", 0.5)
    folder = sinks(stderr=os.fdopen(write_end, "w"), format="text", level="info")
    # On a regression the calls block; closing the pipe after 40 s ends the test with a failure.
    rescue = threading.Timer(40, os.close, [read_end])
    rescue.start()
    before = dropped_lines()
    try:
        started = time.monotonic()
        for index in range(50_000):
            logger.info("request {} {}", index, "x" * 100)
        elapsed = time.monotonic() - started
        assert elapsed < 30, f"50,000 log calls took {elapsed:.1f}s"  # ≈2 s on an idle core
        assert dropped_lines() - before >= 20_000
        started = time.monotonic()
        close_logging()  # stderr is still stuck: bounded wait
        assert time.monotonic() - started < 2
        assert len(physical_lines(folder / LOG_FILE)) > 1000  # the file was not held up by stderr
    finally:
        if rescue.is_alive():
            rescue.cancel()
            os.close(read_end)  # the stuck writer thread gets EPIPE and ends


class Stuck(Destination):
    """A destination whose write waits until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.batches: list[list[str]] = []

    def write(self, lines: list[str]) -> None:
        self.batches.append(lines)
        self.release.wait(10)


def test_a_stuck_writer_drops_and_counts_beyond_its_bound() -> None:
    destination = Stuck()
    writer = QueuedWriter(destination, name="test", max_lines=100, max_chars=10_000)
    writer.start()
    before = dropped_lines()
    started = time.monotonic()
    for index in range(50_000):
        writer.put(f"line {index}\n")
    assert time.monotonic() - started < 2
    in_flight = sum(len(batch) for batch in destination.batches)
    assert writer.dropped == 50_000 - 100 - in_flight and dropped_lines() - before == writer.dropped
    assert not writer.close(time.monotonic() + 0.1)  # still stuck: gives up, counts the queue
    assert dropped_lines() - before == 50_000 - in_flight
    destination.release.set()


def test_the_byte_budget_bounds_memory_too() -> None:
    destination = Stuck()
    writer = QueuedWriter(destination, name="test", max_lines=10_000, max_chars=1000)
    for _ in range(50):
        writer.put("y" * 99 + "\n")  # not started: everything queues, up to 1000 characters
    assert writer.dropped == 40
    destination.release.set()
    assert writer.close(time.monotonic() + 2)
    assert sum(len(batch) for batch in destination.batches) == 10


def test_close_writes_what_is_queued(sinks: Configure) -> None:
    folder = sinks(format="text", level="info")
    for index in range(3000):
        logger.info("line {}", index)
    close_logging()
    lines = physical_lines(folder / LOG_FILE)
    assert len(lines) == 3000 and lines[-1].endswith("line 2999")


# --- rotation --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backups", [0, 1, 3])
def test_rotation_keeps_backups_old_files_cut_at_line_boundaries(tmp_path: Path, backups: int) -> None:
    path = tmp_path / LOG_FILE
    (tmp_path / f"{LOG_FILE}.9").write_text("left by a run with more Backups\n")
    file = RotatingFile(path, max_bytes=100, backups=backups)
    for index in range(20):
        file.write([f"line {index:02d} {'z' * 20}\n"])  # 30 bytes: three a file
    file.close()
    names = sorted(child.name for child in tmp_path.iterdir())
    assert names == [LOG_FILE] + [f"{LOG_FILE}.{index}" for index in range(1, backups + 1)]
    assert path.read_text().splitlines()[-1].startswith("line 19")
    for name in names:
        text = (tmp_path / name).read_text()
        assert len(text) <= 100 and text.endswith("\n") and all(line.startswith("line ") for line in text.splitlines())


def test_a_fifo_in_place_of_the_log_file_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / LOG_FILE)
    outcome: list[BaseException] = []
    opener = threading.Thread(
        target=lambda: outcome.append(_raised(lambda: RotatingFile(tmp_path / LOG_FILE, max_bytes=100, backups=1))),
        daemon=True,
    )
    opener.start()
    opener.join(5)
    assert not opener.is_alive() and isinstance(outcome[0], OSError)


def _raised(call: Callable[[], object]) -> BaseException:
    try:
        call()
    except BaseException as error:  # noqa: BLE001
        return error
    raise AssertionError("did not raise")


# --- reload ----------------------------------------------------------------------------------------


def unusable_paths(tmp_path: Path) -> list[str]:
    (tmp_path / "plain-file").write_text("not a folder")
    (tmp_path / "log-is-a-folder" / LOG_FILE).mkdir(parents=True)
    (tmp_path / "log-is-a-fifo").mkdir()
    os.mkfifo(tmp_path / "log-is-a-fifo" / LOG_FILE)
    return [
        str(tmp_path / "plain-file"),  # a regular file where the folder should be
        str(tmp_path / "plain-file" / "sub"),  # a parent that cannot be created
        "/proc/nope/",
        str(tmp_path / "log-is-a-folder"),
        str(tmp_path / "log-is-a-fifo"),
    ]


def test_a_reload_with_an_unusable_path_keeps_the_running_sinks(sinks: Configure, tmp_path: Path) -> None:
    folder = sinks(format="json", level="info")
    logger.info("before")
    paths = unusable_paths(tmp_path)
    for path in paths:
        result: list[BaseException] = []

        def reload(path: str = path, result: list[BaseException] = result) -> None:
            result.append(_raised(lambda: sinks(path=path, format="text", level="debug")))

        attempt = threading.Thread(target=reload, daemon=True)
        attempt.start()
        attempt.join(5)  # a FIFO must not block a reload
        assert not attempt.is_alive() and isinstance(result[0], LogSetupError), (path, result)
        assert "Traceback" not in str(result[0])
        logger.debug("debug after {}", path)  # still at info: not written
        logger.info("still here after {}", path)
    close_logging()
    for where in (folder / LOG_FILE, tmp_path / "stderr.txt"):
        records = [json.loads(line) for line in physical_lines(where)]  # still json
        messages = [record["message"] for record in records]
        assert messages == ["before", *(f"still here after {path}" for path in paths)]


def test_a_reload_to_a_new_path_and_format_moves_every_line_in_order(sinks: Configure, tmp_path: Path) -> None:
    first = sinks(format="json", level="info")
    for index in range(2000):
        logger.info("first {}", index)
    second = sinks(path=str(tmp_path / "other"), format="text", level="debug")
    logger.debug("second")
    close_logging()
    assert [json.loads(line)["message"] for line in physical_lines(first / LOG_FILE)] == [
        f"first {i}" for i in range(2000)
    ]
    assert [line.split(" ", 2)[2].strip() for line in physical_lines(second / LOG_FILE)] == ["second"]
    stderr = physical_lines(tmp_path / "stderr.txt")
    assert len(stderr) == 2001 and stderr[-1].endswith("DEBUG   second")


# --- redaction -------------------------------------------------------------------------------------


def test_the_redaction_guard_masks_secrets_in_messages_fields_and_errors(sinks: Configure) -> None:
    pem = "-----BEGIN KEY-----\nMIIBOgIBAAJBAKj34GkxFhD9\n-----END KEY-----"
    redact.remember_secret(pem)
    redact.remember_secret('{"user": "svc", "password": "hunter2-but-longer"}')
    folder = sinks(format="json", level="info")
    logger.info("oops: {}", pem)
    logger.bind(leaked="hunter2-but-longer").info("field")
    try:
        raise RuntimeError(f"parser quoted {pem}")
    except RuntimeError:
        logger.exception("error text")
    close_logging()
    text = (folder / LOG_FILE).read_text()
    assert "MIIBOgIBAAJBAKj34GkxFhD9" not in text and "hunter2" not in text
    assert text.count(redact.MARK) == 3 and len(physical_lines(folder / LOG_FILE)) == 3


# --- the agent process -----------------------------------------------------------------------------


async def test_client_paths_cannot_forge_a_line_in_the_agents_logs(tmp_path: Path, emulator: KmsEmulator) -> None:
    config = write_config(tmp_path, emulator.endpoint)
    config.write_text(config.read_text() + 'Format = "text"\n')
    paths = [
        f"/v1/x%0D%0A{FORGED_TIME}%20INFO%20FORGED",
        "/ping%0AFORGED",
        "/metrics%0AFORGED",
        "/nowhere%0D%0AFORGED",
        "/v1/y%E2%80%A8FORGED%C2%85FORGED",
    ]
    async with agent_process(["--config", str(config)], AGENT_ENV, tmp_path) as agent:
        async with httpx.AsyncClient(headers={"X-KMS-Token": "not-the-token\tFORGED"}, timeout=10) as client:
            for path in paths:
                await client.get(agent.url(path))
                await client.get(agent.url(path), headers={"X-KMS-Token": AGENT_ENV["KMS_TOKEN"]})
            metrics = (await client.get(agent.url("/metrics"))).text
        assert await stop(agent) == 0
    assert "kmsagent_log_lines_dropped_total 0.0" in metrics
    for where in (tmp_path / "logs" / LOG_FILE, agent.stderr_path):
        lines = physical_lines(where)
        assert_not_forged(lines)
        assert sum("FORGED" in line for line in lines) >= len(paths), lines  # logged, escaped
