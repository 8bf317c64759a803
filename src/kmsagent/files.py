"""`[[Files]]` (SPEC §8): secrets rendered to files, kept in step with KMS, written atomically.

For programs that read a file rather than call HTTP (a web server's TLS key, a config file).
Each table's secret is pinned (always hot, see pinned.py); each new value is rendered (the whole
value, one JSON key, or a template) and compared with the file on disk, and written only when the
content, Mode, Owner or Group differ, so an unchanged secret never touches the file (its mtime
stays put, no reader sees a rewrite, OnChange does not run).

A write is atomic and never exposes more than Mode allows, at any moment:
1. a temporary file is created in the same folder with `O_CREAT|O_EXCL|O_NOFOLLOW`, mode 0600
   (a random name: nothing there to follow or to reuse);
2. Owner and Group, then Mode, are set through its descriptor (`fchown`, `fchmod`: never by path,
   so no symlink race; `fchmod` after the umask, so no umask surprise), before any byte is written;
3. the content is written and fsynced, the file renamed over Path (a symlink at Path is replaced,
   never followed), and the folder fsynced, so the new name survives a crash.
A reader opens the old inode or the new one, never a mix. Any failure removes the temporary file.
Filesystem work runs in a worker thread: a slow disk never stalls the trio loop.

OnChange runs after a file changed (not when the agent created it), one run at a time per file;
changes during a run lead to exactly one more run after it. Each run has 30 s, its process group
is killed then and at shutdown, and its exit status and first output lines are logged (escaped
and redacted by the log layer; a secret the file holds is guarded there).
"""

from __future__ import annotations

import base64
import contextlib
import math
import os
import secrets
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import trio
from loguru import logger

from kmsagent.checks import SecretQuery
from kmsagent.config import FileConfig
from kmsagent.errors import AgentError, is_transient
from kmsagent.kms import SecretValue
from kmsagent.pinned import PinnedSecret, Update
from kmsagent.processes import describe, run_bounded
from kmsagent.store import CachedSecret, SecretStore
from kmsagent.template import RenderError, Template, json_object, member, parse_template

#: OnChange's time limit, SPEC §8.
ON_CHANGE_LIMIT = 30.0
#: How a temporary file's name ends: `.<name>.<random>` + this, in Path's folder.
TEMP_SUFFIX = ".kmsagent-tmp"
#: A write that failed (disk full, folder gone) is tried again after this many seconds, doubling.
WRITE_RETRY, WRITE_RETRY_CAP = 1.0, 60.0
#: Failures that waiting would not cure: `--once` reports them at once.
FINAL_FAILURES = ("load-failed", "render-error")
#: Outcomes counted in `kmsagent_file_writes_total`.
WRITE_OUTCOMES = ("written", "unchanged", "failed")
#: Outcomes counted in `kmsagent_file_onchange_runs_total`.
RUN_OUTCOMES = ("success", "failure", "timeout", "error")

Observe = Callable[[str], None]


def render(file: FileConfig, template: Template | None, secret: SecretValue) -> bytes:
    """The file's content for `secret`: the whole value (a binary secret decoded), one top-level
    JSON key (a string as is, else JSON), or the template. RenderError when it does not fit."""
    if secret.is_binary and (file.json_key or template is not None):
        raise RenderError("the secret is binary; JsonKey and Template need a text secret")
    if secret.is_binary:
        return base64.b64decode(secret.data)
    if file.json_key:
        return member(json_object(secret.data), file.json_key).encode()
    if template is not None:
        return template.render(secret.data).encode()
    return secret.data.encode()


# --- On disk (these run in worker threads) ----------------------------------------------------------


def sync_file(path: str, content: bytes, mode: int, uid: int | None, gid: int | None) -> str:
    """Makes Path hold `content` with `mode` (and `uid`/`gid` when given).

    Returns "unchanged" when it already does (nothing is touched), "created" when nothing was
    at Path, else "changed". Raises OSError when it cannot.
    """
    state = _state_on_disk(path, content, mode, uid, gid)
    if state == "same":
        return "unchanged"
    write_atomic(path, content, mode, uid, gid)
    return "created" if state == "missing" else "changed"


def _state_on_disk(path: str, content: bytes, mode: int, uid: int | None, gid: int | None) -> str:
    """"missing", "same", or "different" (anything but a regular file counts as different)."""
    try:
        before = os.lstat(path)
    except FileNotFoundError:
        return "missing"
    if (
        not stat.S_ISREG(before.st_mode)
        or before.st_size != len(content)
        or not _attributes_match(before, mode, uid, gid)
    ):
        return "different"
    try:  # O_NONBLOCK: should a FIFO be swapped in after the lstat, the open does not hang
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return "different"
    try:
        info = os.fstat(fd)
        if (info.st_dev, info.st_ino) != (before.st_dev, before.st_ino) or not stat.S_ISREG(info.st_mode):
            return "different"
        chunks, left = [], len(content) + 1  # one byte more: a file that grew is different
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    return "same" if b"".join(chunks) == content else "different"


def _attributes_match(info: os.stat_result, mode: int, uid: int | None, gid: int | None) -> bool:
    return (
        stat.S_IMODE(info.st_mode) == mode
        and (uid is None or info.st_uid == uid)
        and (gid is None or info.st_gid == gid)
    )


def write_atomic(path: str, content: bytes, mode: int, uid: int | None, gid: int | None) -> None:
    """The write of the module docstring: private temporary file, attributes through the
    descriptor, content, fsync, rename over `path`, fsync of the folder."""
    folder, name = os.path.split(path)
    temporary = os.path.join(folder, f".{name}.{secrets.token_hex(8)}{TEMP_SUFFIX}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            if uid is not None or gid is not None:
                os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
            os.fchmod(fd, mode)
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    folder_fd = os.open(folder or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(folder_fd)
    finally:
        os.close(folder_fd)


def remove_leftovers(path: str) -> int:
    """Removes temporary files of `path` that a killed agent left behind; returns how many."""
    folder, name = os.path.split(path)
    prefix, removed = f".{name}.", 0
    with contextlib.suppress(OSError), os.scandir(folder or ".") as entries:
        for entry in entries:
            if (
                entry.name.startswith(prefix)
                and entry.name.endswith(TEMP_SUFFIX)
                and entry.is_file(follow_symlinks=False)
            ):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed += 1
    return removed


# --- OnChange -----------------------------------------------------------------------------------------


class OnChange:
    """One file's OnChange command: at most one run at a time, changes during a run coalesced."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], label: str, observe: Observe) -> None:
        self._argv = tuple(argv)
        self._env = dict(env)
        self._label = label
        self._observe = observe
        self._pending = False
        self._wake = trio.Event()
        #: Runs started so far (tests and the soak count them).
        self.runs = 0

    def request(self) -> None:
        """Asks for a run: now if none is running, else exactly one more after the current one."""
        self._pending = True
        self._wake.set()

    async def run(self) -> None:
        """Serves requests until cancelled (a run in progress is killed with its group)."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._pending:
                self._pending = False
                await self.run_once()

    async def run_once(self) -> None:
        self.runs += 1
        program = self._argv[0]
        try:
            returncode, lines = await run_bounded(self._argv, self._env, limit=ON_CHANGE_LIMIT)
        except OSError as error:
            logger.error("{}: OnChange {!r} cannot be run: {}", self._label, program, error.strerror or error)
            self._observe("error")
            return
        output = " | ".join(lines) if lines else "no output"
        if returncode is None:
            logger.error(
                "{}: OnChange {!r} killed after {:.0f}s; output: {}", self._label, program, ON_CHANGE_LIMIT, output
            )
            self._observe("timeout")
        elif returncode == 0:
            logger.info("{}: OnChange {!r} succeeded; output: {}", self._label, program, output)
            self._observe("success")
        else:
            logger.error(
                "{}: OnChange {!r} failed ({}); output: {}", self._label, program, describe(returncode), output
            )
            self._observe("failure")


# --- One file -----------------------------------------------------------------------------------------


class SecretFile:
    """One `[[Files]]` table: follows its secret and keeps Path in step with it."""

    def __init__(
        self,
        number: int,
        config: FileConfig,
        store: SecretStore,
        *,
        env: Mapping[str, str],
        observe_write: Observe,
        observe_run: Observe,
    ) -> None:
        self.number = number
        self.config = config
        self.label = f"[[Files]] #{number} ({config.path})"
        self._pinned = PinnedSecret(store, SecretQuery(config.secret_id, "", config.version_stage))
        self._template = parse_template(config.template) if config.template else None
        self.on_change = OnChange(config.on_change, env, self.label, observe_run) if config.on_change else None
        self._observe = observe_write
        self._latest: Update | None = None
        self._new_value = trio.Event()
        #: Set after the first attempt, whatever its outcome (start-up waits for it).
        self.attempted = trio.Event()
        #: Set once Path holds a value of the secret (written now, or already right).
        self.written = trio.Event()
        #: Whether a write changed the file (rather than creating it): OnChange is due.
        self.changed = False
        #: Why the last attempt failed (None after a success), for `--once`.
        self.problem: str | None = None
        self._logged_problem: str | None = None

    async def run(self, *, once: bool = False) -> None:
        """Runs until cancelled. With `once` (`--once`), returns after the first write, or at the
        first failure that waiting would not cure (a KMS 4xx, a value that does not fit); OnChange
        is then the caller's (`changed` says whether it is due)."""
        await trio.to_thread.run_sync(remove_leftovers, self.config.path)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pinned.follow, self._receive)
            if self.on_change is not None and not once:
                nursery.start_soon(self.on_change.run)
            await self._write_loop(once)
            nursery.cancel_scope.cancel()

    async def _receive(self, update: Update) -> None:
        self._latest = update
        self._new_value.set()

    async def _write_loop(self, once: bool) -> None:
        """Writes each new value; a failed write is tried again with back-off until it succeeds
        or the next value comes."""
        retry = 0.0
        while True:
            with trio.move_on_after(retry or math.inf):
                await self._new_value.wait()
            self._new_value = trio.Event()
            latest = self._latest
            if latest is None:
                continue
            outcome = await self._attempt(latest)
            retry = min(WRITE_RETRY_CAP, max(WRITE_RETRY, retry * 2)) if outcome == "io-error" else 0.0
            if outcome == "changed":
                self.changed = True
                if self.on_change is not None and not once:
                    self.on_change.request()
            if once and (self.written.is_set() or outcome in FINAL_FAILURES):
                return

    async def _attempt(self, update: Update) -> str:
        """One try at making the file hold `update`; the outcome: created, changed, unchanged,
        or load-error (transient), load-failed (KMS 4xx), render-error, io-error."""
        try:
            if isinstance(update, AgentError):
                outcome = "load-error" if is_transient(update) else "load-failed"
                return self._failed(outcome, f"the secret cannot be loaded: {update.code}: {update.message}")
            content = render(self.config, self._template, update.secret)
            config = self.config
            outcome = await trio.to_thread.run_sync(
                sync_file, config.path, content, config.mode, config.uid, config.gid
            )
        except RenderError as error:
            return self._failed("render-error", f"the file was left as it was: {error}")
        except OSError as error:
            return self._failed("io-error", f"cannot be written: {error.strerror or error}")
        finally:
            self.attempted.set()
        self.problem = self._logged_problem = None
        self.written.set()
        self._observe("written" if outcome != "unchanged" else "unchanged")
        if outcome == "unchanged":
            logger.debug("{}: unchanged (version {})", self.label, _version(update))
        else:
            logger.info(
                "{}: {} (version {})", self.label, "written" if outcome == "created" else "rewritten", _version(update)
            )
        return outcome

    def _failed(self, outcome: str, problem: str) -> str:
        self.problem = problem
        self._observe("failed")
        if problem != self._logged_problem:  # once per change of state, not once per retry
            logger.error("{}: {}", self.label, problem)
            self._logged_problem = problem
        return outcome


def _version(update: CachedSecret) -> str:
    return update.secret.version_id


# --- All of them --------------------------------------------------------------------------------------


@dataclass
class FileSet:
    """Every `[[Files]]` table of the config."""

    files: list[SecretFile]

    @classmethod
    def build(
        cls,
        tables: Sequence[FileConfig],
        store: SecretStore,
        *,
        env: Mapping[str, str],
        observe_write: Observe = lambda outcome: None,
        observe_run: Observe = lambda outcome: None,
    ) -> FileSet:
        return cls(
            [
                SecretFile(number, table, store, env=env, observe_write=observe_write, observe_run=observe_run)
                for number, table in enumerate(tables, start=1)
            ]
        )

    async def run(self, *, wait: float, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keeps every file in step until cancelled. `started()` comes once each file has had a
        first attempt (written, or failed and now retrying), or after `wait` seconds."""
        async with trio.open_nursery() as nursery:
            for file in self.files:
                nursery.start_soon(file.run)
            with trio.move_on_after(wait):
                for file in self.files:
                    await file.attempted.wait()
            task_status.started()

    async def write_once(self, *, wait: float) -> list[str]:
        """`--once`: writes every file, trying for at most `wait` seconds (transient failures
        retried with back-off), then runs OnChange for the files that changed (each within its
        own limit), and returns one line per file not written."""
        deadline = trio.current_time() + wait

        async def write(file: SecretFile) -> None:
            with trio.move_on_at(deadline):
                await file.run(once=True)
            if file.changed and file.on_change is not None:
                await file.on_change.run_once()

        async with trio.open_nursery() as nursery:
            for file in self.files:
                nursery.start_soon(write, file)
        return [
            f"{file.label}: not written: {file.problem or 'no answer from KMS in time'}"
            for file in self.files
            if not file.written.is_set()
        ]
