"""`[Exec]` (SPEC §9): one supervised child program with secrets in its environment.

For twelve-factor programs that take secrets from their environment. The child starts once every
Env secret has loaded and the agent listens; its environment is the agent's without credentials,
SSRF token variables and systemd's notification variables (processes.py), plus Env. Env secrets
are pinned (always hot, pinned.py); when their rendered values change — changes within
`COALESCE` seconds count as one, so a rotation of three secrets is one restart — OnChange
`restart` stops the child (StopSignal, SIGKILL after StopTimeoutSeconds) and starts it again with
the new values, a signal name sends that signal, `none` does nothing.

Stopping: SIGTERM or SIGINT to the agent goes to the child (the same signal); the agent waits for
it (SIGKILL after StopTimeoutSeconds), then stops. The child exiting by itself stops the agent
too. Either way `exit_status` is the child's status (128 + N for a signal N), which the command
line returns. Everything runs in the agent's nursery with trio's process API: no blocking waits,
and the child (with its process group) is killed and reaped whatever cancels it.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable, Mapping
from functools import partial

import trio
from loguru import logger

from kmsagent.checks import SecretQuery
from kmsagent.config import ExecConfig
from kmsagent.errors import AgentError
from kmsagent.kms import SecretValue
from kmsagent.pinned import PinnedSecret, Update
from kmsagent.processes import Child, describe, exit_status
from kmsagent.store import SecretStore
from kmsagent.template import RenderError, json_object, member

#: Env changes this close together lead to one restart (or one signal).
COALESCE = 1.0
#: Exit statuses when the program cannot be started, as a shell reports them.
NOT_FOUND, NOT_EXECUTABLE = 127, 126


def env_value(secret: SecretValue, json_key: str | None) -> str:
    """An Env variable's value: the secret's text (a binary secret as KMS's base64), or one top-level
    JSON key (a string as is, else JSON). RenderError when it does not fit an environment."""
    if json_key is not None:
        if secret.is_binary:
            raise RenderError("the secret is binary; #jsonKey needs a text secret")
        value = member(json_object(secret.data), json_key)
    else:
        value = secret.data
    if "\0" in value:
        raise RenderError("the value holds a NUL character, which no environment variable can")
    return value


async def first(*waits: Callable[[], Awaitable[object]]) -> int:
    """Runs the waits side by side and returns the index of the first one to return (the others are cancelled)."""
    winner: list[int] = []
    async with trio.open_nursery() as nursery:

        async def one(index: int, wait: Callable[[], Awaitable[object]]) -> None:
            await wait()
            winner.append(index)
            nursery.cancel_scope.cancel()

        for index, wait in enumerate(waits):
            nursery.start_soon(one, index, wait)
    return winner[0]


class Supervisor:
    """Runs `[Exec] Command` as the agent's child; see the module docstring."""

    def __init__(self, config: ExecConfig, store: SecretStore, *, environment: Mapping[str, str]) -> None:
        self._config = config
        self._base_env = dict(environment)
        #: (variable, secret id, JSON key or None), in Env's order.
        self._references = [
            (name, secret_id, json_key if sep else None)
            for name, reference in config.env
            for secret_id, sep, json_key in [reference.partition("#")]
        ]
        self._pinned = {
            secret_id: PinnedSecret(store, SecretQuery(secret_id)) for secret_id in config.env_secrets
        }
        self._values: dict[str, SecretValue] = {}
        #: Env rendered from the latest values, once every variable has one.
        self._env: dict[str, str] | None = None
        self._env_changed = trio.Event()
        self._logged: dict[str, str] = {}
        self._stop_requested = trio.Event()
        self._stop_signal = signal.Signals[config.stop_signal]
        #: The child's status once it ended for good (0 when the agent stopped before starting it).
        self.exit_status = 0
        #: Set once the child ended for good: the agent stops serving then.
        self.finished = trio.Event()
        #: Restarts because Env changed, and whether a child runs now (for the metrics).
        self.restarts = 0
        self.running = False

    async def run(self, shutdown: Callable[[], Awaitable[object]], listening: trio.Event) -> None:
        """Supervises until the child ended for good; `shutdown()` returns when the agent is asked
        to stop (with the signal number it received, which the child gets too)."""
        try:
            async with trio.open_nursery() as nursery:
                for secret_id, pinned in self._pinned.items():
                    nursery.start_soon(pinned.follow, partial(self._receive, secret_id))
                nursery.start_soon(self._wait_for_stop, shutdown)
                self.exit_status = await self._supervise(listening)
                nursery.cancel_scope.cancel()
        finally:
            self.running = False
            self.finished.set()

    async def _wait_for_stop(self, shutdown: Callable[[], Awaitable[object]]) -> None:
        received = await shutdown()
        if isinstance(received, int) and received in (signal.SIGTERM, signal.SIGINT):
            self._stop_signal = signal.Signals(received)
        self._stop_requested.set()

    # --- Env ------------------------------------------------------------------------------------

    async def _receive(self, secret_id: str, update: Update) -> None:
        if isinstance(update, AgentError):
            self._log_once(
                secret_id, f"[Exec] Env secret {secret_id!r} cannot be loaded: {update.code}: {update.message}"
            )
            return
        self._values[secret_id] = update.secret
        rendered: dict[str, str] = {}
        for name, reference_id, json_key in self._references:
            secret = self._values.get(reference_id)
            if secret is None:
                return  # not every secret has loaded yet
            try:
                rendered[name] = env_value(secret, json_key)
            except RenderError as error:
                self._log_once(
                    name, f"[Exec] Env {name} (secret {reference_id!r}): {error}; keeping the previous values"
                )
                return
            self._logged.pop(name, None)
        self._logged.pop(secret_id, None)
        if rendered != self._env:
            self._env = rendered
            self._env_changed.set()
            self._env_changed = trio.Event()

    def _log_once(self, subject: str, message: str) -> None:
        if self._logged.get(subject) != message:
            logger.error("{}", message)
            self._logged[subject] = message

    async def _env_differs(self, env: dict[str, str] | None) -> None:
        """Returns once Env differs from `env` and then stayed put (or changed on) for COALESCE seconds."""
        while self._env == env or self._env is None:
            await self._env_changed.wait()
        await trio.sleep(COALESCE)

    # --- The child --------------------------------------------------------------------------------

    async def _supervise(self, listening: trio.Event) -> int:
        async def ready() -> None:
            while self._references and self._env is None:
                await self._env_changed.wait()
            await listening.wait()

        if self._references and self._env is None:
            logger.info("[Exec] waiting for {} Env secrets before starting the program", len(self._pinned))
        if await first(ready, self._stop_requested.wait) == 1:
            return 0
        while True:
            env = dict(self._env or {})
            try:
                child = await Child.start(self._config.command, {**self._base_env, **env})
            except OSError as error:
                logger.error("[Exec] {!r} cannot be started: {}", self._config.command[0], error.strerror or error)
                return NOT_FOUND if isinstance(error, FileNotFoundError) else NOT_EXECUTABLE
            self.running = True
            logger.info("[Exec] started {!r} (pid {})", self._config.command[0], child.pid)
            async with child:
                restart, status = await self._watch(child, env)
            self.running = False
            if not restart or self._stop_requested.is_set():  # a stop during the restart: no new child
                return status
            self.restarts += 1

    async def _watch(self, child: Child, env: dict[str, str]) -> tuple[bool, int]:
        """Until the child ends for good (False, its status) or was stopped to restart (True, its status)."""
        on_change = self._config.on_change
        while True:
            waits: list[Callable[[], Awaitable[object]]] = [child.exited, self._stop_requested.wait]
            if on_change != "none":
                waits.append(partial(self._env_differs, env))
            which = await first(*waits)
            if which == 0:
                returncode = await child.reap()
                logger.info("[Exec] the program ended ({}); the agent stops", describe(returncode))
                return False, exit_status(returncode)
            if which == 1:
                logger.info("[Exec] passing {} to the program", self._stop_signal.name)
                return False, exit_status(await self._stop(child, self._stop_signal))
            if self._env == env:
                continue  # changed back within COALESCE
            env = dict(self._env or env)
            if on_change == "restart":
                logger.info("[Exec] Env changed: restarting the program")
                return True, exit_status(await self._stop(child, signal.Signals[self._config.stop_signal]))
            logger.info("[Exec] Env changed: sending {} to the program", on_change)
            child.signal(signal.Signals[on_change])

    async def _stop(self, child: Child, signum: signal.Signals) -> int:
        """Asks the child to stop with `signum`; SIGKILL to its group after StopTimeoutSeconds."""
        child.signal(signum)
        with trio.move_on_after(self._config.stop_timeout_seconds) as waited:
            await child.exited()
        if waited.cancelled_caught:
            logger.warning(
                "[Exec] the program did not stop within {}s of {}: SIGKILL",
                self._config.stop_timeout_seconds,
                signum.name,
            )
            child.kill_group()
        return await child.reap()

