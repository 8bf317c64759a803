"""The SSRF token: where it comes from (SPEC §2) and the constant-time check of request headers.

The first variable of `SSRFEnvVariables` that is set holds the token itself or `file:///path` to a
file that holds it. A file is watched (stat every second, off the trio thread) and read again when
it changes, so an operator can rotate the token without restarting the agent.

A token file is untrusted input with a size: a symlink to `/dev/zero` once grew the agent to 2 GB
before a MemoryError, a 10 MB file cost 15 ms per wrong-token request, and a FIFO blocked the
open (and the process's exit) for ever. So the file is opened without blocking, must be a regular
file that other users cannot write, and is never read past 4 KB; anything else (missing too, at
start included) fails closed: every token is refused until the file is fixed, and each change of
state is logged once, not every second.
"""

from __future__ import annotations

import errno
import hmac
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import trio
from loguru import logger

from kmsagent import redact

WATCH_INTERVAL = 1.0
#: The largest token file accepted (SPEC §2); a token is a few dozen bytes.
MAX_TOKEN_FILE = 4096
#: Not blocking on a FIFO or a device, not becoming a controlling terminal, not leaking to children.
OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
#: What tells a token file changed: (device, inode, mode, size, mtime, ctime), or (errno,) when
#: stat failed. ctime moves on a chmod, so a mode change is re-checked too.
Stamp = tuple[int, ...]


class TokenError(Exception):
    """No usable token: the agent cannot start (exit 1). The message never contains a token."""


class FileState(Enum):
    """Where a token file stands; every state but OK refuses every token."""

    OK = "usable"
    MISSING = "missing"
    EMPTY = "empty"
    TOO_LARGE = f"larger than {MAX_TOKEN_FILE} bytes"
    NOT_REGULAR = "not a regular file (a FIFO, a device or a folder)"
    WRITABLE_BY_OTHERS = "writable by every user"
    UNREADABLE = "unreadable"


@dataclass(frozen=True)
class _Reading:
    """One look at the token file: its stamp, its state, and the token when OK."""

    #: None makes the next look read again: an open or read that failed (EMFILE under load, EIO)
    #: says nothing lasting about the file, and a stamp would keep it refused until it changed.
    stamp: Stamp | None
    state: FileState
    token: bytes | None = None
    mode: int = 0
    detail: str = ""


class TokenSource:
    """Holds the current token; `matches` is the only way to use it."""

    def __init__(self, token: bytes | None, path: Path | None = None) -> None:
        """A literal `token`, or (with `path`) the token read from that file; None fails closed."""
        self._token: bytes | None = None
        self._path = path
        self._stamp: Stamp | None = None
        self._reading: _Reading | None = None
        self._reported = FileState.OK  # the state last logged; a source starts as if OK
        self._warned_readable = False
        self._set_token(token)

    @classmethod
    def from_environment(cls, names: Sequence[str], env: Mapping[str, str]) -> TokenSource:
        """Reads the token from the first of `names` that is set in `env` (a value or a file).

        A token file that is missing or unusable is not an error here: the source starts closed
        and `watch` logs why, then opens it when the file is fixed.
        """
        for name in names:
            value = env.get(name)
            if value is None:
                continue
            if value.startswith("file://"):
                path = value.removeprefix("file://")
                if not path:
                    raise TokenError(f"{name}: file:// names no token file")
                return cls.from_file(Path(path))
            if not value.strip():
                raise TokenError(f"{name} is set but empty")
            return cls(value.strip().encode())
        raise TokenError(f"no SSRF token: set one of {', '.join(names)} (a token, or file:///path)")

    @classmethod
    def from_file(cls, path: Path) -> TokenSource:
        """A source watching `path`, with whatever it holds now (read once, without blocking)."""
        source = cls(None, path)
        reading = _read(path, None)
        assert reading is not None  # with no previous stamp there is always a reading
        source._take(reading)
        return source

    @property
    def state(self) -> FileState:
        """OK for a literal token or a usable file; else why every token is refused."""
        return self._reading.state if self._reading is not None else FileState.OK

    def matches(self, candidates: Sequence[bytes]) -> bool:
        """True when any candidate header value equals the token, compared in constant time.

        With no usable token (a token file in a failure state) nothing matches.
        """
        token = self._token
        if token is None:
            return False
        found = False
        for candidate in candidates:
            found |= hmac.compare_digest(candidate, token)
        return found

    async def watch(self) -> None:
        """Logs the file's state, then re-reads it whenever it changes; runs until cancelled.

        A no-op for a literal token. The start-up state is logged here, not when the source is
        built, because the CLI builds it before the configured log sinks exist.
        """
        if self._path is None:
            return
        self._report()
        while True:
            await trio.sleep(WATCH_INTERVAL)
            await self.reload_if_changed()

    async def reload_if_changed(self) -> bool:
        """Reads the file again if its stamp changed; True when the token that matches changed.

        One thread call per look: stat (and, on a change, open, fstat and read) may wait on a
        slow filesystem, and none of them can block for ever since the open does not. The call
        is abandoned on cancellation, so shutdown never waits for it.
        """
        path = self._path
        if path is None:
            return False
        reading = await trio.to_thread.run_sync(_read, path, self._stamp, abandon_on_cancel=True)
        if reading is None:
            return False
        before = self._token
        self._take(reading)
        self._report()
        after = self._token
        changed = (before is None) != (after is None) or (
            before is not None and after is not None and not hmac.compare_digest(before, after)
        )
        if changed and before is not None and after is not None:
            logger.info("token file {} changed: new token in use", path)
        return changed

    def _take(self, reading: _Reading) -> None:
        self._reading = reading
        self._stamp = reading.stamp
        self._set_token(reading.token)

    def _set_token(self, token: bytes | None) -> None:
        if token is not None:
            redact.remember(token.decode(errors="replace"))
        self._token = token

    def _report(self) -> None:
        """Logs the state when it differs from the one last logged (once per change of state)."""
        reading = self._reading
        if reading is None:
            return
        if reading.state is not self._reported:
            self._reported = reading.state
            if reading.state is FileState.OK:
                logger.info("token file {} is usable again: tokens are checked against it", self._path)
            else:
                detail = f" ({reading.detail})" if reading.detail else ""
                logger.warning(
                    "token file {} is {}{}: every token is refused until it is fixed",
                    self._path,
                    reading.state.value,
                    detail,
                )
        if reading.state is FileState.OK:
            self._warn_if_readable(reading.mode)
        else:
            self._warned_readable = False  # a file put back later is warned about again

    def _warn_if_readable(self, mode: int) -> None:
        """Any local user who can read the token can read every secret through the agent."""
        readable = bool(mode & stat.S_IROTH)
        if readable and not self._warned_readable:
            logger.warning(
                "token file {} is readable by every user (mode {:o}): make it 0640 with a reader group",
                self._path,
                mode & 0o777,
            )
        self._warned_readable = readable


def _read(path: Path, previous: Stamp | None) -> _Reading | None:
    """Looks at the token file; None when its stamp equals `previous` (nothing changed).

    Runs in a worker thread (or before trio starts). A path that is not a regular file is never
    opened; the open itself does not block (a FIFO swapped in after the stat), and fstat on the
    open descriptor decides, so the checks and the read concern the same file.
    """
    try:
        info = os.stat(path)
    except OSError as error:
        stamp: Stamp = (error.errno or 0,)
        if stamp == previous:
            return None
        return _failure(stamp, error)
    stamp = _stamp_of(info)
    if stamp == previous:
        return None
    if not stat.S_ISREG(info.st_mode):
        return _Reading(stamp, FileState.NOT_REGULAR)
    try:
        descriptor = os.open(path, OPEN_FLAGS)
    except OSError as error:
        return _failure(None, error)
    try:
        info = os.fstat(descriptor)
        stamp = _stamp_of(info)
        if not stat.S_ISREG(info.st_mode):
            return _Reading(stamp, FileState.NOT_REGULAR)
        if info.st_mode & stat.S_IWOTH:
            return _Reading(stamp, FileState.WRITABLE_BY_OTHERS, detail=f"mode {info.st_mode & 0o777:o}")
        if info.st_size > MAX_TOKEN_FILE:
            return _Reading(stamp, FileState.TOO_LARGE)
        data = _read_at_most(descriptor, MAX_TOKEN_FILE + 1)
    except OSError as error:
        return _failure(None, error)
    finally:
        os.close(descriptor)
    if len(data) > MAX_TOKEN_FILE:  # it grew between fstat and read
        return _Reading(stamp, FileState.TOO_LARGE)
    token = data.strip()
    if not token:
        return _Reading(stamp, FileState.EMPTY)
    return _Reading(stamp, FileState.OK, token, info.st_mode)


def _read_at_most(descriptor: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = os.read(descriptor, limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _failure(stamp: Stamp | None, error: OSError) -> _Reading:
    if error.errno in (errno.ENOENT, errno.ENOTDIR):
        return _Reading(stamp, FileState.MISSING)
    return _Reading(stamp, FileState.UNREADABLE, detail=error.strerror or type(error).__name__)


def _stamp_of(info: os.stat_result) -> Stamp:
    return (info.st_dev, info.st_ino, info.st_mode, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
