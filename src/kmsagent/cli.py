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
from dataclasses import replace
from functools import partial
from typing import NoReturn

import trio
from loguru import logger

from kmsagent import __version__, signals
from kmsagent.agent import run_agent, write_files_once
from kmsagent.config import (
    Config,
    ConfigError,
    ServerConfig,
    check_log_folder,
    check_unix_socket,
    dump_config,
    files_folder_notes,
    load_config,
    with_command,
)
from kmsagent.credentials import CredentialsUnavailable, check_credentials, credential_source
from kmsagent.logs import LogSetupError, close_logging, configure_logging
from kmsagent.notify import Notifier
from kmsagent.processes import make_non_dumpable
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
#: The end of `--help`: what the agent reads from its environment, and its exit statuses (SPEC §1).
EPILOG = """\
environment variables:
  KMSAGENT_CONFIG            the config file, when --config is not given
  KMS_TOKEN, KMS_SESSION_TOKEN, KMS_CONTAINER_AUTHORIZATION_TOKEN
                             the SSRF token, or file:///path of a file that holds it: the
                             first one set ([Server] SSRFEnvVariables; these are its default)
  ALIBABA_CLOUD_ACCESS_KEY_ID, ALIBABA_CLOUD_ACCESS_KEY_SECRET, ALIBABA_CLOUD_SECURITY_TOKEN
                             an AccessKey for KMS (with an STS token)
  ALIBABA_CLOUD_ROLE_ARN, ALIBABA_CLOUD_OIDC_PROVIDER_ARN, ALIBABA_CLOUD_OIDC_TOKEN_FILE
                             an OIDC role (RRSA on Kubernetes); ALIBABA_CLOUD_ROLE_SESSION_NAME
                             names its session
  ALIBABA_CLOUD_PROFILE      the aliyun CLI profile (cli_profile)
  ALIBABA_CLOUD_CLI_PROFILE_DISABLED
                             true: "auto" skips the aliyun CLI profile
  ALIBABA_CLOUD_CREDENTIALS_FILE
                             the credentials file (credentials_file)
  ALIBABA_CLOUD_ECS_METADATA_DISABLED
                             true: "auto" skips the ECS instance's RAM role
  ALIBABA_CLOUD_CREDENTIALS_URI
                             a URI that serves credentials (credentials_uri)
  ALIBABA_CLOUD_STS_REGION, ALIBABA_CLOUD_VPC_ENDPOINT_ENABLED
                             the STS endpoint that roles are assumed at
  NOTIFY_SOCKET, WATCHDOG_USEC
                             systemd's readiness and watchdog (Type=notify, WatchdogSec)
  DEBUG                      DEBUG=sdk is removed at start: it would log signatures and tokens

exit status:
  0  a clean stop, after SIGTERM or SIGINT
  1  a fatal error: the port is in use, no token variable set, no credentials
  2  a bad config file or command line
  with a supervised program (kmsagent [OPTIONS] -- CMD [ARGS...]): that program's exit status
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"kmsagent: {message} (see --help)\n")


def _port(text: str) -> int:
    """`--port`: what `[Server] HttpPort` allows, 0 (any free port) or an unprivileged port."""
    port = int(text) if text.isascii() and text.isdigit() else -1
    if port == 0 or 1024 <= port <= 65535:
        return port
    raise argparse.ArgumentTypeError(f"{text[:32]!r}: must be 0 or an integer in 1024..65535, as [Server] HttpPort")


def _split_command(args: list[str]) -> tuple[list[str], list[str] | None]:
    """`kmsagent [OPTIONS] -- CMD ARGS`: the agent's options, and the program to supervise (§9)."""
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
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", metavar="PATH", help="TOML config file (default: $KMSAGENT_CONFIG, else built-in defaults)"
    )
    parser.add_argument("--check-config", action="store_true", help="validate the config, print it, and exit")
    parser.add_argument("--dev", action="store_true", help="run against an embedded KMS emulator with demo secrets")
    parser.add_argument(
        "--port", metavar="N", type=_port, help="listen on port N, over [Server] HttpPort (--dev too); 0: any free port"
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="write every [[Files]] table once and exit (0, or 1 naming each file not written)",
    )
    parser.add_argument("--version", action="version", version=f"kmsagent {__version__}")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    if arguments[:1] == ["get"]:  # the client (SPEC §10); `python -m kmsagent get` skips this module
        from kmsagent.client import main as get

        return get(arguments[1:])
    options, command = _split_command(arguments)
    args = _parse_args(options)
    if command is not None and not command:
        return _fail(EXIT_USAGE, "-- must be followed by a command (see --help)")
    if args.once and (command or args.dev):
        return _fail(EXIT_USAGE, f"--once runs no {'program' if command else '--dev emulator'} (see --help)")
    config_path = args.config or os.environ.get("KMSAGENT_CONFIG") or None
    overrides = partial(_command_line, port=args.port, command=command)
    try:
        config = overrides(load_config(config_path))
        if args.once and not config.files:
            raise ConfigError("--once: the config has no [[Files]] tables to write")
    except ConfigError as error:
        return _fail(EXIT_USAGE, f"config error: {error}")
    if args.check_config:
        try:
            check_log_folder(config.log)
            _, notes = check_unix_socket(config.server, starting=False)
            notes += files_folder_notes(config)
            check_credentials(config.credentials, os.environ, region=config.kms.region)  # variables and files
        except ConfigError as error:
            return _fail(EXIT_USAGE, f"config error: {error}")
        except CredentialsUnavailable as error:
            return _fail(EXIT_USAGE, f"config error: [Credentials] Type = {config.credentials.type!r}: {error}")
        for note in notes:
            print(f"kmsagent: note: {note}", file=sys.stderr, flush=True)
        print(dump_config(config), end="")
        return EXIT_OK
    scrub_environment(os.environ)
    make_non_dumpable()  # SPEC §9: no core dump, /proc or ptrace reader of the agent's secrets
    try:
        check_unix_socket(config.server, starting=True)  # exit 2 before anything starts; binding checks again
        if args.once:
            return _run_once(config)
        if args.dev:
            return _run_dev(config, config_path)
        return _run(config, config_path, overrides)
    except ConfigError as error:
        return _fail(EXIT_USAGE, f"config error: {error}")
    except FATAL_ERRORS as error:
        return _fail(EXIT_FAILURE, str(error))
    finally:
        close_logging()


def _command_line(config: Config, *, port: int | None, command: Sequence[str] | None) -> Config:
    """`config` as the command line changes it (`--port`, `-- CMD`); SIGHUP's reloads are changed
    the same way, so they do not report those keys as changed."""
    config = with_command(config, command)
    if port is None:
        return config
    return replace(config, server=replace(config.server, http_port=port))


def scrub_environment(env: MutableMapping[str, str]) -> None:
    """Drops `DEBUG=sdk`: it makes darabonba log request headers, signatures and tokens included."""
    if env.get("DEBUG", "").strip().lower() == "sdk":
        del env["DEBUG"]


def _run(config: Config, config_path: str | None, overrides: Callable[[Config], Config]) -> int:
    configure_logging(config.log)  # first: the token and credential sources log through its sinks
    token = TokenSource.from_environment(config.server.ssrf_env_variables, os.environ)
    notifier = Notifier.from_environment(os.environ)  # systemd's NOTIFY_SOCKET (SPEC §11)

    child_status: list[int] = []

    async def start(nursery: trio.Nursery, shutdown: Shutdown) -> None:
        # In trio: `auto` probes the metadata service, and files are read off this thread.
        credentials = await credential_source(config.credentials, os.environ, region=config.kms.region)
        agent = partial(
            run_agent,
            config,
            token=token,
            credentials=credentials,
            shutdown=shutdown,
            config_path=config_path,
            notifier=notifier,
            overrides=overrides,
            on_exit_status=child_status.append,
        )
        await _announce(await nursery.start(agent), config.server)

    status = _run_until_signal(start, reloads=config_path is not None, stop_seconds=_stop_seconds(config))
    return child_status[-1] if child_status else status


def _stop_seconds(config: Config) -> float:
    """SPEC §1: a stop takes at most 5 s, or StopTimeoutSeconds + 2 s with a supervised child."""
    if config.exec.command:
        return config.exec.stop_timeout_seconds + 2 - (5 - STOP_DEADLINE)
    return STOP_DEADLINE


def _run_once(config: Config) -> int:
    """`--once`: every [[Files]] table written, or exit 1 with one line per file that was not."""
    configure_logging(config.log)

    async def write_once() -> list[str]:
        credentials = await credential_source(config.credentials, os.environ, region=config.kms.region)
        return await write_files_once(config, credentials=credentials)

    try:
        failures = trio.run(write_once)
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
    from kmsagent.dev import dev_token, find_demo_secrets, load_demo_secrets, run_dev

    demo = load_demo_secrets(find_demo_secrets(config_path))
    configure_logging(config.log)
    token, token_header = dev_token(config.server.ssrf_headers[0], config.server.ssrf_env_variables, os.environ)

    async def start(nursery: trio.Nursery, shutdown: Shutdown) -> None:
        session = await nursery.start(partial(run_dev, config, demo, token=token, shutdown=shutdown))
        await _announce(session.port, config.server)
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


async def _announce(port: int, server: ServerConfig) -> None:
    """SPEC §1's start line, naming every address listened on; none once a stop signal came."""
    await trio.lowlevel.checkpoint_if_cancelled()
    print(f"kmsagent {__version__} listening on {' '.join(listening_addresses(port, server))}", flush=True)
    gc.freeze()  # start-up's objects live as long as the process: keep them out of every collection


def _tune_gc() -> None:
    """Fewer, cheaper garbage collections: a request allocates a few hundred short-lived objects,
    and the default gen-0 threshold (700) made collections, with their pauses, the main source of
    tail latency (measured with wrk at 50 connections: p99 62 ms with the defaults, 23 ms with
    these settings and `gc.freeze()` after start-up, for 10% more requests per second)."""
    gc.set_threshold(50_000, 50, 100)


def _run_until_signal(
    start: Callable[[trio.Nursery, Shutdown], Awaitable[None]], *, reloads: bool, stop_seconds: float = STOP_DEADLINE
) -> int:
    """Runs what `start` starts until SIGTERM or SIGINT asks for a graceful stop.

    The signal watcher runs before start-up begins: a stop signal during start-up (a Prefetch
    against a hanging KMS, say) cancels it, so no port opens and no "listening" line follows the
    signal. After start-up a first signal stops gracefully, and a second one, or `stop_seconds`
    (STOP_DEADLINE; longer with a supervised child), cancels everything. `reloads`: SIGHUP
    belongs to reload.py; else it is logged and ignored.
    """
    signals.defer_stops()  # the watcher takes from here (a no-op unless __main__ held signals)
    signals.set_stop_deadline(stop_seconds)
    started = False

    async def main() -> None:
        nonlocal started
        stop = trio.Event()
        received: list[int] = []

        async def shutdown() -> int | None:
            """Returns once asked to stop, with the signal that asked (an [Exec] child gets it too)."""
            await stop.wait()
            return received[0] if received else None

        async with trio.open_nursery() as nursery:
            watch = partial(_watch_signals, note=received.append, stop_seconds=stop_seconds)
            await nursery.start(watch, stop, nursery.cancel_scope, lambda: started, reloads)
            async with trio.open_nursery() as service:
                await start(service, shutdown)
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
    note: Callable[[int], None] = lambda signum: None,
    stop_seconds: float = STOP_DEADLINE,
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
            note(signum)  # an [Exec] child is sent the same signal
            stop.set()
            break
        with trio.move_on_after(stop_seconds) as deadline:
            async for signum in receiver:
                if signum == signal.SIGHUP:
                    _ignore_sighup()
                    continue
                logger.warning("second signal: stopping now")
                break
        if deadline.cancelled_caught:
            logger.warning("still stopping {:.0f} s after the signal: cancelling what is left", stop_seconds)
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
