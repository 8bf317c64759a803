"""Logging per SPEC §2 `[Log]`: loguru to stderr and to `<Path>/kmsagent.log`, rotated.

`Format` applies to the file (the record a collector parses); stderr is always one text line per
record, for a person or the journal.

Sinks are enqueued: loguru writes from its own thread, so a slow disk or a full stderr pipe never
blocks the trio thread. `diagnose=False` keeps variable values (which may hold secrets) out of
tracebacks. The standard-library loggers of hypercorn and the SDKs are routed into loguru.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from loguru import logger

from kmsagent import redact
from kmsagent.config import LogConfig

LEVELS = {"debug": "DEBUG", "info": "INFO", "warn": "WARNING", "error": "ERROR"}
TEXT_FORMAT = "{time:YYYY-MM-DDTHH:mm:ss.SSSZZ} {level: <7} {message}"
LOG_FILE = "kmsagent.log"
QUIET_LIBRARIES = ("httpcore", "httpx", "hpack")


# Every record, from any sink configured now or later, passes the redaction guard first.
logger.configure(patcher=redact.patch_record)


class LogSetupError(Exception):
    """The log folder cannot be written (exit 1)."""


class _ToLoguru(logging.Handler):
    """Forwards standard-library records into loguru at the same level."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(exception=record.exc_info).log(level, "{}: {}", record.name, record.getMessage())


def configure_logging(config: LogConfig) -> None:
    """Replaces loguru's default sink with the configured stderr and file sinks."""
    level = LEVELS[config.level]
    folder = Path(config.path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise LogSetupError(f"cannot create log folder {folder}: {error.strerror}") from None
    logger.remove()
    common = dict(level=level, format=TEXT_FORMAT, backtrace=False, diagnose=False, enqueue=True)
    logger.add(sys.stderr, **common)  # type: ignore[arg-type]
    try:
        logger.add(
            folder / LOG_FILE,
            serialize=config.format == "json",
            rotation=config.max_file_size_mb * 1024 * 1024,
            retention=config.backups,
            **common,  # type: ignore[arg-type]
        )
    except OSError as error:
        raise LogSetupError(f"cannot write {folder / LOG_FILE}: {error.strerror}") from None
    logging.basicConfig(handlers=[_ToLoguru()], level=0, force=True)
    logging.getLogger("credentials").handlers.clear()  # the credentials SDK's own stderr handlers
    for chatty in QUIET_LIBRARIES:  # per-packet debug lines that drown the agent's own
        logging.getLogger(chatty).setLevel(logging.WARNING)


def close_logging() -> None:
    """Flushes the enqueued sinks; call before the process exits."""
    logger.remove()
