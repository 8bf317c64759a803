"""Process signals from the package's first line to the process's end (SPEC §1).

Start-up is mostly imports (≈0.8 s, NOTES.md), and until trio's signal receivers open Python's
defaults apply: SIGINT raises KeyboardInterrupt wherever the main thread is (a traceback), SIGTERM
and SIGHUP end the process. `hold()` is the first thing `python -m kmsagent` and the console
script do, before any heavy import, and from then on no signal is fatal:

- a stop (SIGTERM, SIGINT) before `defer_stops()` ends the process at once with status 0: until
  then it only imports and reads its config, and has nothing to finish or clean up;
- after `defer_stops()` (the agent is about to start) a stop is recorded, and the signal watcher
  (cli.py) `take`s it when its receiver opens; SIGHUP is always recorded, for reload.py to take.

trio's receivers put this handler back when they close, so a signal in the last moments of a
shutdown is recorded too, never fatal.

A stop also arms a guard: the process ends with status 0 at most `GUARD_SECONDS` after the first
one, whatever still runs. Some waits cannot be cancelled from trio (a blocking open or read in a
worker thread, a log sink writing to a full pipe), and SPEC §1 bounds every stop at 5 s. The
agent's own deadline (cli.py) cancels everything well before the guard fires; the guard is for
what cancellation cannot reach.

This module imports only the standard library: it runs before everything else.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: From the first stop signal to the forced exit; leaves 0.4 s of SPEC §1's 5 s for the kernel.
GUARD_SECONDS = 4.6
#: How long after the agent's own stop deadline the guard fires.
GUARD_MARGIN = 0.6

#: Signal number → how many arrived while only this module's handler listened.
_held: dict[int, int] = {}
#: The write end of the guard's pipe: one byte arms it (a write is safe in a signal handler).
_guard_fd: int | None = None
#: True from `hold()` to `defer_stops()`: a stop exits at once.
_exit_at_once = False


def hold() -> None:
    """Takes over SIGHUP, SIGINT and SIGTERM for the rest of the process (main thread only).

    For the program's entry point only: a process that merely imports kmsagent (tests, an
    embedding program) keeps its own signal handling.
    """
    global _guard_fd, _exit_at_once  # noqa: PLW0603 - signal dispositions belong to the process
    _exit_at_once = True
    if _guard_fd is None:
        read_fd, _guard_fd = os.pipe()
        os.set_blocking(_guard_fd, False)
        threading.Thread(target=_guard, args=(read_fd,), name="kmsagent-stop-guard", daemon=True).start()
    # SIGTERM last: whoever sees it caught (SigCgt in /proc/<pid>/status) knows all three are.
    for signum in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _record)


def defer_stops() -> None:
    """From now on a stop signal is recorded for the agent to act on, not an immediate exit."""
    global _exit_at_once  # noqa: PLW0603 - read by the signal handler, which takes no arguments
    _exit_at_once = False


def set_stop_deadline(seconds: float) -> None:
    """The agent cancels what is left `seconds` after the first stop (longer with a supervised
    child, SPEC §1); the guard fires GUARD_MARGIN later."""
    global GUARD_SECONDS  # noqa: PLW0603 - read by the guard thread, one per process
    GUARD_SECONDS = seconds + GUARD_MARGIN


def take(*signums: int) -> int:
    """How many of `signums` arrived while held; they are forgotten (counted once)."""
    # dict.pop is one step the handler (which runs between the main thread's steps) cannot split.
    return sum(_held.pop(signum, 0) for signum in signums)


def arm_guard() -> None:
    """Starts the guard's countdown; later calls change nothing. A no-op before `hold()`."""
    if _guard_fd is not None:
        with contextlib.suppress(OSError):  # the pipe is full: it was armed long ago
            os.write(_guard_fd, b"!")


def guard_receivers(*signums: int) -> None:
    """Makes the handlers now installed for `signums` (a trio receiver's) arm the guard first.

    The guard then starts with the signal itself, not when trio's loop gets to it: a loop stuck in
    a blocking call (a log write to a full pipe) still exits in time. trio puts back the handler
    it replaced when its receiver closes, which drops this wrapper with it.
    """
    if _guard_fd is None:  # signals not held: not the program's entry point
        return
    for signum in signums:
        inner = signal.getsignal(signum)
        if callable(inner):

            def armed(signum: int, frame: FrameType | None, inner: Callable[..., object] = inner) -> None:
                arm_guard()
                inner(signum, frame)

            signal.signal(signum, armed)


def _record(signum: int, frame: FrameType | None) -> None:
    if signum in STOP_SIGNALS:
        if _exit_at_once:
            os._exit(0)
        arm_guard()
    _held[signum] = _held.get(signum, 0) + 1


def _guard(read_fd: int) -> None:
    os.read(read_fd, 1)
    time.sleep(GUARD_SECONDS)
    # Only when stderr can take the line without blocking: a full pipe must not hold the exit.
    if select.select([], [2], [], 0)[1]:
        with contextlib.suppress(OSError):
            os.write(2, b"kmsagent: still stopping after %.1f s; exiting now\n" % GUARD_SECONDS)
    os._exit(0)  # no flush of Python's buffers: a stuck writer may hold their locks
