"""Child processes of the agent (SPEC §8 OnChange, §9 [Exec]): their environment, their process
group, and a reaping discipline that never leaves a zombie and never signals a stranger.

Every child runs in its own process group, so that stopping it reaches whatever it started (a
shell's children, a reload helper's workers) and a Ctrl-C in a terminal reaches only the agent,
which decides what the child gets. The group is signalled only while its leader is not reaped
(alive, or a zombie we hold): a pid, and so a group id, cannot be reused before that, so a
`killpg` can never hit an unrelated process. That is why the leader's exit is awaited on a pidfd
of our own (which does not reap) and trio's `Process.wait()` (which does) comes last.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

import trio
from loguru import logger

#: Environment variables no child may inherit: the agent's own credentials and service-manager
#: hand-offs (a child that pinged the watchdog would keep a stuck agent alive).
DROPPED_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
DROPPED_PREFIX = "ALIBABA_CLOUD_"
#: How long a killed group may take to be reaped before we give up waiting (it was SIGKILLed).
REAP_WAIT = 2.0
PR_SET_DUMPABLE = 4


def child_environment(environ: Mapping[str, str], ssrf_variables: Sequence[str]) -> dict[str, str]:
    """The agent's environment without credentials, the SSRF token variables and systemd's
    notification variables (SPEC §9)."""
    dropped = {*ssrf_variables, *DROPPED_VARIABLES}
    return {
        name: value
        for name, value in environ.items()
        if name not in dropped and not name.startswith(DROPPED_PREFIX)
    }


def make_non_dumpable() -> bool:
    """`prctl(PR_SET_DUMPABLE, 0)`: no core dump holds a secret, and no process of the same user
    (the [Exec] child included) can read the agent's memory or environment through /proc or
    ptrace. False where the call is not available (not Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        result: int = libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # ctypes calls are untyped
        return result == 0
    except (OSError, AttributeError):
        return False


def exit_status(returncode: int) -> int:
    """A shell's convention: the exit code, or 128 + N when signal N ended the process."""
    return 128 - returncode if returncode < 0 else returncode


def describe(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


class Child:
    """One started process, leader of its own group; use `async with await Child.start(...)`.

    Leaving the block (normally, by an error or by cancellation) kills whatever is left of the
    group and reaps the leader, shielded and bounded, so no zombie and no stray remain.
    """

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.pid = process.pid
        self.returncode: int | None = None
        try:
            self._pidfd: int | None = os.pidfd_open(process.pid)
        except (OSError, AttributeError):  # kernels before 5.3: reaping is the only way to know
            self._pidfd = None
        self._exited = False
        self._waiting = trio.Lock()  # one task at a time may wait on the pidfd

    @classmethod
    async def start(cls, argv: Sequence[str], env: Mapping[str, str], **options: Any) -> Child:
        """Starts `argv` (no shell) in a new process group; OSError when it cannot be run."""
        process = await trio.lowlevel.open_process(list(argv), env=dict(env), process_group=0, **options)
        return cls(process)

    async def __aenter__(self) -> Child:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        with trio.CancelScope(shield=True):
            if not self._exited:
                self.kill_group()
            await self.reap()

    async def exited(self) -> None:
        """Returns once the leader has exited (not reaped: its group may still be signalled)."""
        async with self._waiting:
            if self._exited:
                return
            if self._pidfd is not None:
                await trio.lowlevel.wait_readable(self._pidfd)
            else:
                self.returncode = await self.process.wait()
            self._exited = True

    def signal(self, signum: int) -> None:
        """Sends `signum` to the leader (until it is reaped: never to a reused pid)."""
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def kill_group(self) -> None:
        """SIGKILL to the whole group: the leader and anything it started that stayed in it."""
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)

    async def reap(self) -> int:
        """Kills what is left of the group once the leader is gone, then reaps the leader."""
        if self.returncode is None:
            with trio.move_on_after(REAP_WAIT) as waited:
                await self.exited()
            self.kill_group()  # leftovers of an exited leader, or a leader that would not go
            if waited.cancelled_caught:
                logger.warning("child {} did not exit after SIGKILL within {}s", self.pid, REAP_WAIT)
            with trio.move_on_after(REAP_WAIT):
                self.returncode = await self.process.wait()
        self._close_pidfd()
        return self.returncode if self.returncode is not None else -signal.SIGKILL

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None


async def run_bounded(
    argv: Sequence[str], env: Mapping[str, str], *, limit: float, max_lines: int = 5, max_line: int = 200
) -> tuple[int | None, list[str]]:
    """Runs `argv` with stdin from /dev/null for at most `limit` seconds, and returns (its exit
    code, or None when the limit killed it; its first output lines).

    Output (stdout and stderr together) is read as it comes, so the program never blocks on a
    full pipe, but only the first `max_lines` lines of at most `max_line` characters are kept.
    Once the program exits, what it left running in its group is killed (so the pipe closes).
    Raises OSError when the program cannot be started.
    """
    kept: list[str] = []

    async def read(stream: trio.abc.ReceiveStream) -> None:
        pending = b""
        async with stream:
            while chunk := await stream.receive_some(4096):
                if len(kept) >= max_lines:
                    continue  # drained, not kept
                pending += chunk
                *lines, pending = pending.split(b"\n")
                kept.extend(line.decode(errors="replace")[:max_line] for line in lines)
                pending = pending[: max_line * 4]
        if pending and len(kept) < max_lines:
            kept.append(pending.decode(errors="replace")[:max_line])

    child = await Child.start(argv, env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    async with child:
        assert child.process.stdout is not None
        with trio.move_on_after(limit) as timer:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read, child.process.stdout)
                await child.exited()
                child.kill_group()
                # A process that left the group (setsid) may hold the pipe: do not wait for it.
                nursery.cancel_scope.deadline = min(nursery.cancel_scope.deadline, trio.current_time() + 1.0)
        if timer.cancelled_caught:
            child.kill_group()
        returncode = await child.reap()
    return (None if timer.cancelled_caught else returncode), kept[:max_lines]
