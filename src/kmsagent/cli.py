"""The command line of SPEC §1: exit 0 after a clean stop, 2 for bad input, 1 for other failures.

Every failure a user can cause ends in one line on stderr, never a traceback.
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

from kmsagent import __version__
from kmsagent.agent import run_agent, write_files_once
from kmsagent.config import Config, ConfigError, check_log_folder, dump_config, load_config, with_command
from kmsagent.credentials import CredentialsUnavailable, credential_source
from kmsagent.logs import LogSetupError, close_logging, configure_logging
from kmsagent.processes import make_non_dumpable
from kmsagent.server import ServeError
from kmsagent.token import TokenError, TokenSource

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
Shutdown = Callable[[], Awaitable[object]]
#: Curl lines printed in --dev mode (stdout is a pipe nobody may read past the first lines).
DEV_CURL_LINES = 5
#: Errors that end the agent with one line and exit 1.
FATAL_ERRORS = (ServeError, TokenError, CredentialsUnavailable, LogSetupError)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"kmsagent: {message} (see --help)\n")


def _split_command(argv: Sequence[str] | None) -> tuple[list[str], list[str] | None]:
    """`kmsagent [OPTIONS] -- CMD ARGS`: the agent's options, and the program to supervise (§9)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--" not in args:
        return args, None
    at = args.index("--")
    return args[:at], args[at + 1 :]


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _Parser(
        prog="kmsagent",
        usage="%(prog)s [OPTIONS] [-- CMD [ARGS...]]",
        description="Local secret-caching agent for Alibaba Cloud KMS. "
        "With -- CMD ARGS, it also runs CMD as a supervised child with [Exec] Env secrets in its environment.",
    )
    parser.add_argument("--config", metavar="PATH", help="TOML config file (default: $KMSAGENT_CONFIG, else built-in defaults)")
    parser.add_argument("--check-config", action="store_true", help="validate the config, print it, and exit")
    parser.add_argument("--dev", action="store_true", help="run against an embedded KMS emulator with demo secrets")
    parser.add_argument("--once", action="store_true", help="write every [[Files]] table once and exit (0, or 1 naming each file not written)")
    parser.add_argument("--version", action="version", version=f"kmsagent {__version__}")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    options, command = _split_command(argv)
    args = _parse_args(options)
    if command is not None and not command:
        return _fail(EXIT_USAGE, "-- must be followed by a command (see --help)")
    if args.once and (command or args.dev):
        return _fail(EXIT_USAGE, f"--once runs no {'program' if command else '--dev emulator'} (see --help)")
    config_path = args.config or os.environ.get("KMSAGENT_CONFIG") or None
    try:
        config = with_command(load_config(config_path), command)
        if args.once and not config.files:
            raise ConfigError("--once: the config has no [[Files]] tables to write")
    except ConfigError as error:
        return _fail(EXIT_USAGE, f"config error: {error}")
    if args.check_config:
        try:
            check_log_folder(config.log)
            credential_source(config.credentials, os.environ)  # static part: variables and files
        except ConfigError as error:
            return _fail(EXIT_USAGE, f"config error: {error}")
        except CredentialsUnavailable as error:
            return _fail(EXIT_USAGE, f"config error: [Credentials] Type = {config.credentials.type!r}: {error}")
        print(dump_config(config), end="")
        return EXIT_OK
    scrub_environment(os.environ)
    make_non_dumpable()  # SPEC §9: no core dump, /proc or ptrace reader of the agent's secrets
    try:
        if args.once:
            return _run_once(config)
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
    token = TokenSource.from_environment(config.server.ssrf_env_variables, os.environ)
    credentials = credential_source(config.credentials, os.environ)
    configure_logging(config.log)

    child_status: list[int] = []

    async def start(nursery: trio.Nursery, shutdown: Shutdown) -> None:
        agent = partial(
            run_agent,
            config,
            token=token,
            credentials=credentials,
            shutdown=shutdown,
            config_path=config_path,
            on_exit_status=child_status.append,
        )
        _announce(await nursery.start(agent))

    status = _run_until_signal(start)
    return child_status[-1] if child_status else status


def _run_once(config: Config) -> int:
    """`--once`: every [[Files]] table written, or exit 1 with one line per file that was not."""
    credentials = credential_source(config.credentials, os.environ)
    configure_logging(config.log)
    try:
        failures = trio.run(partial(write_files_once, config, credentials=credentials))
    except KeyboardInterrupt:
        return _fail(EXIT_FAILURE, "--once: interrupted")
    except BaseExceptionGroup as group:
        fatal = group.subgroup(FATAL_ERRORS)
        if fatal is None:
            raise
        raise _first_leaf(fatal) from None
    for line in failures:
        _fail(EXIT_FAILURE, line)
    return EXIT_FAILURE if failures else EXIT_OK


def _run_dev(config: Config, config_path: str | None) -> int:
    from kmsagent.dev import find_demo_secrets, load_demo_secrets, run_dev

    demo = load_demo_secrets(find_demo_secrets(config_path))
    configure_logging(config.log)

    async def start(nursery: trio.Nursery, shutdown: Shutdown) -> None:
        session = await nursery.start(partial(run_dev, config, demo, shutdown=shutdown))
        _announce(session.port)
        print("dev mode: embedded KMS emulator, demo keys and a fresh token. Try:", flush=True)
        for name in session.secret_names[:DEV_CURL_LINES]:
            print(
                f"  curl -H 'X-KMS-Token: {session.token}' "
                f"'http://127.0.0.1:{session.port}/secretsmanager/get?secretId={name}'",
                flush=True,
            )
        if len(session.secret_names) > DEV_CURL_LINES:
            print(f"  ... and {len(session.secret_names) - DEV_CURL_LINES} more demo secrets", flush=True)

    return _run_until_signal(start)


def _announce(port: int) -> None:
    print(f"kmsagent {__version__} listening on http://127.0.0.1:{port}", flush=True)
    gc.freeze()  # start-up's objects live as long as the process: keep them out of every collection


def _tune_gc() -> None:
    """Fewer, cheaper garbage collections: a request allocates a few hundred short-lived objects,
    and the default gen-0 threshold (700) made collections, with their pauses, the main source of
    tail latency (measured with wrk at 50 connections: p99 62 ms with the defaults, 23 ms with
    these settings and `gc.freeze()` after start-up, for 10% more requests per second)."""
    gc.set_threshold(50_000, 50, 100)


def _run_until_signal(start: Callable[[trio.Nursery, Shutdown], Awaitable[None]]) -> int:
    """Runs what `start` starts until SIGTERM or SIGINT asks for a graceful stop.

    A second signal cancels everything at once.
    """

    async def main() -> None:
        stop = trio.Event()
        received: list[int] = []

        async def shutdown() -> int | None:
            """Returns once asked to stop, with the signal that asked (an [Exec] child gets it too)."""
            await stop.wait()
            return received[0] if received else None

        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, stop, nursery.cancel_scope, received.append)
            async with trio.open_nursery() as service:
                await start(service, shutdown)
            nursery.cancel_scope.cancel()  # the service ended: stop watching for signals

    _tune_gc()
    try:
        trio.run(main)
    except KeyboardInterrupt:  # SIGINT before the signal receiver was open
        pass
    except BaseExceptionGroup as group:
        fatal = group.subgroup(FATAL_ERRORS)
        if fatal is None:
            raise
        raise _first_leaf(fatal) from None
    return EXIT_OK


async def _watch_signals(
    stop: trio.Event, everything: trio.CancelScope, note: Callable[[int], None] = lambda signum: None
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            if stop.is_set():
                logger.warning("second signal: stopping now")
                everything.cancel()
                return
            logger.info("{}: stopping", signal.Signals(signum).name)
            note(signum)
            stop.set()


def _first_leaf(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def _fail(code: int, message: str) -> int:
    print(f"kmsagent: {message}", file=sys.stderr, flush=True)
    return code
