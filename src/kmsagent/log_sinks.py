"""Where formatted log lines go: a bounded hand-off to one writer thread per destination.

A log call must never wait for its destination. loguru's `enqueue=True` did: its queue is a
multiprocessing pipe guarded by a lock, so once stderr's reader stopped reading, the writer thread
blocked on stderr, the queue's pipe filled (64 KB) and the next `logger.info` on the trio thread
blocked with it — the whole agent froze, `/ping` included. Here a log call only appends to a
deque under a lock that no I/O ever holds; past `MAX_LINES` lines or `MAX_CHARS` characters
queued (about 4 MB of text), the line is dropped and counted (`dropped_lines()`, exported as
`kmsagent_log_lines_dropped_total`). Measured with stderr a pipe nobody reads: the old sinks
froze the caller after 495 calls; these take 50,000 calls at ≈52 µs of CPU each (loguru's own
share ≈30 µs; both writer threads included), dropping the ≈39,500 lines that do not fit.

The writer thread takes everything queued at once and writes it in one system call, so a burst
costs one write, not one per line. This module knows nothing of loguru or of the line format.
"""

from __future__ import annotations

import contextlib
import os
import select
import stat
import threading
import time
from collections import deque
from pathlib import Path
from typing import TextIO

#: Lines queued per destination before new ones are dropped (a burst of request lines at debug).
MAX_LINES = 10_000
#: Characters queued per destination before new lines are dropped: the memory bound.
MAX_CHARS = 4 * 1024 * 1024

_dropped_lock = threading.Lock()
_dropped_by_closed = 0  # lines dropped by writers that are gone
_live: set[QueuedWriter] = set()


def dropped_lines() -> int:
    """Lines dropped since start, over every writer (read at each metrics scrape)."""
    with _dropped_lock:
        return _dropped_by_closed + sum(writer.dropped for writer in _live)


class Destination:
    """Something a writer thread writes batches of lines to (blocking is allowed here)."""

    def write(self, lines: list[str]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class StreamDestination(Destination):
    """stderr (or any stream): straight to its file descriptor when it has one.

    `os.write` holds no Python lock, so a write stuck on a full pipe cannot deadlock the
    interpreter's own flush of `sys.stderr` at exit, as a stuck `sys.stderr.write` would.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        try:
            self._fd: int | None = stream.fileno()
        except (AttributeError, OSError, ValueError):  # a test's StringIO, pytest's capture
            self._fd = None

    def write(self, lines: list[str]) -> None:
        text = "".join(lines)
        if self._fd is None:
            self.stream.write(text)
            self.stream.flush()
            return
        _write_all(self._fd, text.encode("utf-8", "backslashreplace"))


class RotatingFile(Destination):
    """`path`, appended to; past `max_bytes` it becomes `path.1` (`.1` becomes `.2`, ...), and
    only `backups` old files are kept. Opening validates: a FIFO, a folder or anything else that
    is not a regular file raises OSError without blocking."""

    def __init__(self, path: Path, *, max_bytes: int, backups: int) -> None:
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        self._fd: int | None = None
        self._size = 0
        self._open()

    def _open(self) -> None:
        # O_NONBLOCK: opening a FIFO for writing would otherwise wait for a reader forever.
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)
        fd = os.open(self.path, flags, 0o644)
        try:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                raise OSError(0, "not a regular file")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._size = fd, status.st_size

    def write(self, lines: list[str]) -> None:
        if self._fd is None:
            self._open()  # a rotation failed to reopen: try again now
        chunk: list[bytes] = []
        size = self._size
        for text in lines:
            line = text.encode("utf-8", "backslashreplace")
            if size and size + len(line) > self.max_bytes:
                self._append(chunk)
                chunk = []
                self._rotate()
                size = self._size
            chunk.append(line)
            size += len(line)
        self._append(chunk)

    def _append(self, chunk: list[bytes]) -> None:
        if chunk:
            assert self._fd is not None
            data = b"".join(chunk)
            _write_all(self._fd, data)
            self._size += len(data)

    def _rotate(self) -> None:
        assert self._fd is not None
        try:
            if self.backups == 0:
                os.ftruncate(self._fd, 0)
                self._size = 0
                self._prune()
                return
            for index in range(self.backups - 1, 0, -1):
                older = self._backup(index)
                if older.exists():
                    os.replace(older, self._backup(index + 1))
            os.replace(self.path, self._backup(1))
        except FileNotFoundError:
            pass  # removed by someone else: start a new one
        except OSError:
            return  # keep appending to the current file rather than lose lines; retried next time
        os.close(self._fd)
        self._fd = None
        self._prune()
        self._open()

    def _prune(self) -> None:
        """Removes old files beyond `backups` (left by a run with more Backups)."""
        prefix = f"{self.path.name}."
        for child in self.path.parent.iterdir():
            suffix = child.name[len(prefix) :]
            if child.name.startswith(prefix) and suffix.isdigit() and int(suffix) > self.backups:
                child.unlink(missing_ok=True)

    def _backup(self, index: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{index}")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class QueuedWriter:
    """A bounded queue of lines and the daemon thread that writes them to `destination`.

    `put` never blocks on I/O: it takes a lock that only ever guards a deque append or swap.
    The thread starts with `start()` (a reload queues lines before the previous file is
    flushed, so they keep their order).
    """

    def __init__(
        self, destination: Destination, *, name: str, max_lines: int = MAX_LINES, max_chars: int = MAX_CHARS
    ) -> None:
        self.destination = destination
        self.dropped = 0
        self._max_lines, self._max_chars = max_lines, max_chars
        self._lines: deque[str] = deque()
        self._chars = 0
        self._closing = False
        self._ready = threading.Condition(threading.Lock())
        self._thread = threading.Thread(target=self._run, name=f"log-writer-{name}", daemon=True)
        with _dropped_lock:
            _live.add(self)

    def put(self, line: str) -> None:
        with self._ready:
            if self._closing or len(self._lines) >= self._max_lines or self._chars + len(line) > self._max_chars:
                self.dropped += 1
                return
            if not self._lines:
                self._ready.notify()  # the writer waits only on an empty queue
            self._lines.append(line)
            self._chars += len(line)

    def start(self) -> None:
        if self._thread.ident is None:
            self._thread.start()

    def close(self, deadline: float) -> bool:
        """Stops accepting lines, lets the thread write what is queued until `deadline`
        (`time.monotonic()`), and says whether it finished. A thread stuck on its destination is
        left behind (a daemon: it does not keep the process alive)."""
        with self._ready:
            self._closing = True
            self._ready.notify()
        self.start()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        finished = not self._thread.is_alive()
        if not finished:
            with self._ready:  # what it could not write counts as dropped
                self.dropped += len(self._lines)
                self._lines.clear()
                self._chars = 0
        global _dropped_by_closed  # noqa: PLW0603 - the process's total, kept under _dropped_lock
        with _dropped_lock:
            if self in _live:
                _live.discard(self)
                _dropped_by_closed += self.dropped
        return finished

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._lines and not self._closing:
                    self._ready.wait()
                batch, self._lines, self._chars = self._lines, deque(), 0
                last = self._closing and not batch
            if last:
                break
            try:
                self.destination.write(list(batch))
            except Exception:  # noqa: BLE001 - a full disk or a closed pipe loses these lines, not the agent
                with self._ready:
                    self.dropped += len(batch)
        with contextlib.suppress(OSError):
            self.destination.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:  # a descriptor shared with a process that made it non-blocking
            select.select([], [fd], [], 1.0)

