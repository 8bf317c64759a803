"""Logging per SPEC §2 `[Log]`: every record to stderr and to `<Path>/kmsagent.log` (rotated), in
one format, `Format`: `json` is one flat object a line (`time`, `level`, `message`, then the
record's fields and `error`), `text` is `time level message field=value ... error=...`.

One physical line per record, whatever a message carries: request paths are percent-decoded
client text (`/v1/x%0D%0A2026-... INFO FORGED` once forged a whole line), and KMS messages,
exception text and child output may echo it. The patcher below escapes every character that
`str.isprintable()` rejects — CR, LF, tab, the other C0 and C1 controls, U+0085, U+2028/9, bidi
overrides, lone surrogates — as `\\r`, `\\n`, `\\t`, `\\x1b`, `\\u2028`, ... (a backslash itself is
left alone: a line can be ambiguous to read, never forged). A traceback is rendered into the
same line as the field `error`, escaped the same way. The redaction guard runs first, so a secret
that holds a newline is still recognised.

Sinks never block the caller (see log_sinks.py): a sink that cannot keep up drops lines, counted
in `kmsagent_log_lines_dropped_total`. `configure_logging` builds the new sinks before it touches
the running ones, so a SIGHUP with an unusable Path changes nothing. The standard-library loggers
of hypercorn and the SDKs are routed into loguru.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from loguru import logger

from kmsagent import redact
from kmsagent.config import LogConfig
from kmsagent.log_sinks import QueuedWriter, RotatingFile, StreamDestination, dropped_lines

__all__ = ["LOG_FILE", "LogSetupError", "close_logging", "configure_logging", "dropped_lines", "escape"]

LEVELS = {"debug": "DEBUG", "info": "INFO", "warn": "WARNING", "error": "ERROR"}
LOG_FILE = "kmsagent.log"
QUIET_LIBRARIES = ("httpcore", "httpx", "hpack")
#: How long `close_logging` (and a reload, for the previous file) waits for queued lines.
CLOSE_WAIT = 2.0
#: Keys every line has; a field of the same name is written as `field_<name>`.
RESERVED = frozenset({"time", "level", "message", "error"})

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_ZONES: dict[timedelta | None, str] = {}


class LogSetupError(Exception):
    """The log folder cannot be written (exit 1; on SIGHUP the running sinks are kept)."""


def escape(text: str) -> str:
    """`text` with every non-printable character written as a visible escape (one line, always)."""
    if text.isprintable():  # the usual case, at C speed
        return text
    return "".join(char if char.isprintable() else _escape_char(char) for char in text)


def _escape_char(char: str) -> str:
    code = ord(char)
    if char in _ESCAPES:
        return _ESCAPES[char]
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _patch(record: Any) -> None:
    """loguru patcher, for every record and every sink: redaction, then escaping."""
    redact.patch_record(record)
    record["message"] = escape(record["message"])


# Every record, for any sink configured now or later (tests' too), is redacted and escaped first.
logger.configure(patcher=_patch)


# --- formats ---------------------------------------------------------------------------------------


def _clean(value: object) -> str:
    try:
        text = value if isinstance(value, str) else str(value)
    except Exception:  # noqa: BLE001 - a broken __str__ must not lose the line
        text = f"<{type(value).__name__}>"
    return escape(redact.scrub(text))


def _fields(record: Any) -> dict[str, Any]:
    """The record's `extra` (from `logger.bind`), JSON-safe, then `error` for an exception."""
    fields: dict[str, Any] = {}
    for key, value in record["extra"].items():
        name = _clean(key)
        name = f"field_{name}" if name in RESERVED else name
        if value is None or isinstance(value, (bool, int)) or (isinstance(value, float) and math.isfinite(value)):
            fields[name] = value
        else:
            fields[name] = _clean(value)
    exception = record["exception"]
    if exception is not None and exception.type is not None:
        text = "".join(traceback.format_exception(exception.type, exception.value, exception.traceback))
        fields["error"] = _clean(text.rstrip("\n"))
    return fields


def _time(record: Any) -> str:
    """ISO 8601 with milliseconds and the offset: `2026-01-01T00:00:00.000+0000`."""
    moment = record["time"]
    offset = moment.utcoffset()
    zone = _ZONES.get(offset)
    if zone is None:  # strftime costs ≈8 µs a call here, two of them a tenth of a log call
        zone = _ZONES[offset] = datetime.strftime(moment, "%z")
    return (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T{moment.hour:02d}:{moment.minute:02d}:"
        f"{moment.second:02d}.{moment.microsecond // 1000:03d}{zone}"
    )


def format_text(record: Any) -> str:
    fields = "".join(f" {key}={value}" for key, value in _fields(record).items())
    return f"{_time(record)} {record['level'].name: <7} {record['message']}{fields}\n"


def format_json(record: Any) -> str:
    line = {"time": _time(record), "level": record["level"].name, "message": record["message"], **_fields(record)}
    # Every string in it is escaped already; ensure_ascii=False keeps names in other scripts readable.
    return json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n"


FORMATS: dict[str, Callable[[Any], str]] = {"text": format_text, "json": format_json}


# --- sinks -----------------------------------------------------------------------------------------


class _Sink:
    """The one loguru handler: formats a record once and queues the line for every writer."""

    def __init__(self, render: Callable[[Any], str], writers: list[QueuedWriter]) -> None:
        self.render, self.writers = render, writers

    def __call__(self, message: Any) -> None:
        line = self.render(message.record)
        for writer in self.writers:
            writer.put(line)


@dataclass
class _Installed:
    handler_id: int
    writers: list[QueuedWriter]  # stderr's first


_lock = threading.Lock()  # configure and close run on the main thread or a reload's worker thread
_installed: _Installed | None = None
_default_removed = False


class _ToLoguru(logging.Handler):
    """Forwards standard-library records into loguru at the same level."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(exception=record.exc_info).log(level, "{}: {}", record.name, record.getMessage())


def _open_file(config: LogConfig) -> RotatingFile | None:
    """The log file, or None for stderr only (`Path = ""`); LogSetupError when unusable."""
    if not config.path:
        return None
    folder = Path(config.path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise LogSetupError(f"cannot create log folder {folder}: a file of that name is in the way") from None
    except OSError as error:
        raise LogSetupError(f"cannot create log folder {folder}: {error.strerror}") from None
    try:
        return RotatingFile(folder / LOG_FILE, max_bytes=config.max_file_size_mb * 1024 * 1024, backups=config.backups)
    except OSError as error:
        raise LogSetupError(f"cannot write {folder / LOG_FILE}: {error.strerror}") from None


def configure_logging(config: LogConfig) -> None:
    """Sends every record at `config.level` and above to stderr and the log file.

    Called again (SIGHUP), it opens the new file first: when that fails, LogSetupError leaves the
    running sinks as they were. Otherwise the new handler replaces the old one, the old file gets
    up to CLOSE_WAIT to write what it has queued, then the new file's writer starts (lines keep
    their order). stderr keeps its writer across reloads.
    """
    global _installed, _default_removed  # noqa: PLW0603 - loguru's handlers are process-wide too
    level = LEVELS[config.level]
    file = _open_file(config)
    with _lock:
        previous = _installed
        kept = previous.writers[0] if previous is not None else None
        if (
            kept is not None
            and isinstance(kept.destination, StreamDestination)
            and kept.destination.stream is sys.stderr
        ):
            stderr = kept
        else:
            stderr = QueuedWriter(StreamDestination(sys.stderr), name="stderr")
        file_writer = QueuedWriter(file, name="file") if file is not None else None
        writers = [stderr] if file_writer is None else [stderr, file_writer]
        handler_id = logger.add(
            _Sink(FORMATS[config.format], writers), level=level, format="{message}", backtrace=False, diagnose=False
        )
        _installed = _Installed(handler_id, writers)
        if previous is not None:
            logger.remove(previous.handler_id)
            deadline = time.monotonic() + CLOSE_WAIT
            for writer in previous.writers:
                if writer is not stderr:
                    writer.close(deadline)
        if not _default_removed:  # loguru's own stderr handler, in its own format
            _default_removed = True
            with contextlib.suppress(ValueError):  # someone removed it before us
                logger.remove(0)
        for writer in writers:
            writer.start()
    logging.basicConfig(handlers=[_ToLoguru()], level=level, force=True)
    logging.getLogger("credentials").handlers.clear()  # the credentials SDK's own stderr handlers
    for chatty in QUIET_LIBRARIES:  # per-packet debug lines that drown the agent's own
        logging.getLogger(chatty).setLevel(logging.WARNING)


def close_logging() -> None:
    """Stops the sinks and writes what they have queued, waiting at most CLOSE_WAIT; call before
    the process exits."""
    global _installed
    with _lock:
        installed, _installed = _installed, None
        if installed is None:
            return
        logger.remove(installed.handler_id)
        deadline = time.monotonic() + CLOSE_WAIT
        for writer in installed.writers:
            writer.close(deadline)
