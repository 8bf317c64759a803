"""The command line of SPEC §1: exit 0 after a clean stop, 2 for bad input, 1 for other failures.

Every failure a user can cause ends in one line on stderr, never a traceback. A stop signal
(SIGTERM, SIGINT) at any moment ends the process with 0 within 5 s: during start-up it cancels
start-up (no port is opened, no "listening" line), after it the agent drains and stops, and
`STOP_DEADLINE` after the signal whatever still runs is cancelled.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from functools import partial
from typing import NoReturn

import trio
from loguru import logger

from kmsagent import __version__, signals
from kmsagent.agent import run_agent
from kmsagent.config import Config, ConfigError, ServerConfig, check_log_folder, check_unix_socket, dump_config, load_config
from kmsagent.credentials import CredentialsUnavailable, credential_source
from kmsagent.logs import LogSetupError, close_logging, configure_logging
from kmsagent.notify import Notifier
from kmsagent.server import ServeError, listening_addresses
from kmsagent.token import TokenError, TokenSource

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
Shutdown = Callable[[], Awaitable[object]]
#: Curl lines printed in --dev mode (stdout is a pipe nobody may read past the first lines).
DEV_CURL_LINES = 5
#: From the first stop signal to cancelling everything: the server drains for at most 3 s, and
#: signals.py's guard ends the process at 4.6 s (SPEC §1: exit within 5 s).
STOP_DEADLINE = 4.0
#: Errors that end the agent with one line and exit 1.
FATAL_ERRORS = (ServeError, TokenError, CredentialsUnavailable, LogSetupError)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"kmsagent: {message} (see --help)\n")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _Parser(prog="kmsagent", description="Local secret-caching agent for Alibaba Cloud KMS.")
    parser.add_argument("--config", metavar="PATH", help="TOML config file (default: $KMSAGENT_CONFIG, else built-in defaults)")
    parser.add_argument("--check-config", action="store_true", help="validate the config, print it, and exit")
    parser.add_argument("--dev", action="store_true", help="run against an embedded KMS emulator with demo secrets")
    parser.add_argument("--version", action="version", version=f"kmsagent {__version__}")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    if arguments[:1] == ["get"]:  # the client (SPEC §10); `python -m kmsagent get` skips this module
        from kmsagent.client import main as get

        return get(arguments[1:])
    args = _parse_args(arguments)
    config_path = args.config or os.environ.get("KMSAGENT_CONFIG") or None
    try:
        config = load_config(config_path)
    except ConfigError as error:
        return _fail(EXIT_USAGE, f"config error: {error}")
    if args.check_config:
        try:
            check_log_folder(config.log)
            _, notes = check_unix_socket(config.server, starting=False)
            credential_source(config.credentials, os.environ)  # static part: variables and files
        except ConfigError as error:
            return _fail(EXIT_USAGE, f"config error: {error}")
        except CredentialsUnavailable as error:
            return _fail(EXIT_USAGE, f"config error: [Credentials] Type = {config.credentials.type!r}: {error}")
        for note in notes:
            print(f"kmsagent: note: {note}", file=sys.stderr, flush=True)
        print(dump_config(config), end="")
        return EXIT_OK
    scrub_environment(os.environ)
    try:
        check_unix_socket(config.server, starting=True)  # exit 2 before anything starts; binding checks again
        if args.dev:
            return _run_dev(config, config_path)
        return _run(config, config_path)
    except ConfigError as error:
        return _fail(EXIT_USAGE, f"config error: {error}")
    except FATAL_ERRORS as error:
        return _fail(EXIT_FAILURE, str(error))
    finally:
        close_logging()


def scrub_environment(env: MutableMapping[str, str]) -> None:
    """Drops `DEBUG=sdk`: it makes darabonba log request headers, signatures and tokens included."""
    if env.get("DEBUG", "").strip().lower() == "sdk":
        del env["DEBUG"]


def _run(config: Config, config_path: str | None) -> int:
    configure_logging(config.log)  # first: the token and credential sources log through its sinks
    token = TokenSource.from_environment(config.server.ssrf_env_variables, os.environ)
    credentials = credential_source(config.credentials, os.environ)
    notifier = Notifier.from_environment(os.environ)  # systemd's NOTIFY_SOCKET (SPEC §11)

    async def start(nursery: trio.Nursery, shutdown: Shutdown) -> None:
        agent = partial(
            run_agent,
            config,
            token=token,
            credentials=credentials,
            shutdown=shutdown,
            config_path=config_path,
            notifier=notifier,
        )
        _announce(await nursery.start(agent), config.server)

    return _run_until_signal(start, reloads=config_path is not None)


def _run_dev(config: Config, config_path: str | None) -> int:
    from kmsagent.dev import dev_token, find_demo_secrets, load_demo_secrets, run_dev

    demo = load_demo_secrets(find_demo_secrets(config_path))
    configure_logging(config.log)
    token, token_header = dev_token(config.server.ssrf_headers[0], config.server.ssrf_env_variables, os.environ)

    async def start(nursery: trio.Nursery, shutdown: Shutdown) -> None:
        session = await nursery.start(partial(run_dev, config, demo, token=token, shutdown=shutdown))
        _announce(session.port, config.server)
        print("dev mode: embedded KMS emulator with demo secrets and keys. Try:", flush=True)
        for name in session.secret_names[:DEV_CURL_LINES]:
            print(
                f"  curl -H {token_header} "
                f"'http://127.0.0.1:{session.port}/secretsmanager/get?secretId={name}'",
                flush=True,
            )
        if len(session.secret_names) > DEV_CURL_LINES:
            print(f"  ... and {len(session.secret_names) - DEV_CURL_LINES} more demo secrets", flush=True)

    return _run_until_signal(start, reloads=False)


def _announce(port: int, server: ServerConfig) -> None:
    print(f"kmsagent {__version__} listening on {' '.join(listening_addresses(port, server))}", flush=True)
    gc.freeze()  # start-up's objects live as long as the process: keep them out of every collection


def _tune_gc() -> None:
    """Fewer, cheaper garbage collections: a request allocates a few hundred short-lived objects,
    and the default gen-0 threshold (700) made collections, with their pauses, the main source of
    tail latency (measured with wrk at 50 connections: p99 62 ms with the defaults, 23 ms with
    these settings and `gc.freeze()` after start-up, for 10% more requests per second)."""
    gc.set_threshold(50_000, 50, 100)


def _run_until_signal(start: Callable[[trio.Nursery, Shutdown], Awaitable[None]], *, reloads: bool) -> int:
    """Runs what `start` starts until SIGTERM or SIGINT asks for a graceful stop.

    The signal watcher runs before start-up begins: a stop signal during start-up (a Prefetch
    against a hanging KMS, say) cancels it, so no port opens and no "listening" line follows the
    signal. After start-up a first signal stops gracefully, and a second one, or STOP_DEADLINE,
    cancels everything. `reloads`: SIGHUP belongs to reload.py; else it is logged and ignored.
    """
    signals.defer_stops()  # the watcher takes from here (a no-op unless __main__ held signals)
    started = False

    async def main() -> None:
        nonlocal started
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(_watch_signals, stop, nursery.cancel_scope, lambda: started, reloads)
            async with trio.open_nursery() as service:
                await start(service, stop.wait)
                started = True
            nursery.cancel_scope.cancel()  # the service ended: stop watching for signals

    _tune_gc()
    try:
        trio.run(main)
    except KeyboardInterrupt:  # SIGINT when signals were not held (main() called in-process)
        pass
    except BaseExceptionGroup as group:
        fatal = group.subgroup((*FATAL_ERRORS, ConfigError))  # ConfigError: the socket's folder or group (exit 2)
        if fatal is None:
            raise
        raise _first_leaf(fatal) from None
    return EXIT_OK


async def _watch_signals(
    stop: trio.Event,
    everything: trio.CancelScope,
    started: Callable[[], bool],
    reloads: bool,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    watched = signals.STOP_SIGNALS if reloads else (*signals.STOP_SIGNALS, signal.SIGHUP)
    with trio.open_signal_receiver(*watched) as receiver:
        signals.guard_receivers(*signals.STOP_SIGNALS)
        task_status.started()
        # Opened first, then what signals.py held: a signal is in one place or the other.
        if not reloads and signals.take(signal.SIGHUP):
            _ignore_sighup()
        if signals.take(*signals.STOP_SIGNALS):
            logger.info("stop signal during start-up: stopping")
            everything.cancel()
            return
        async for signum in receiver:
            if signum == signal.SIGHUP:
                _ignore_sighup()
                continue
            signals.arm_guard()
            name = signal.Signals(signum).name
            if not started():
                logger.info("{} during start-up: stopping", name)
                everything.cancel()
                return
            logger.info("{}: stopping", name)
            stop.set()
            break
        with trio.move_on_after(STOP_DEADLINE) as deadline:
            async for signum in receiver:
                if signum == signal.SIGHUP:
                    _ignore_sighup()
                    continue
                logger.warning("second signal: stopping now")
                break
        if deadline.cancelled_caught:
            logger.warning("still stopping {:.0f} s after the signal: cancelling what is left", STOP_DEADLINE)
        everything.cancel()


def _ignore_sighup() -> None:
    logger.info("SIGHUP: no config file to re-read (it applies with --config, outside --dev)")


def _first_leaf(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def _fail(code: int, message: str) -> int:
    print(f"kmsagent: {message}", file=sys.stderr, flush=True)
    return code
