"""`python -m kmsagent.emulator`: the `--dev` KMS emulator as its own process.

Why a separate process: `--dev` wires the emulator into the agent, so a config of one's own (a
ResponseType, SSRF headers, a token file, Prefetch) cannot be tried against it. This serves the
same fake KMS on 127.0.0.1 until SIGINT or SIGTERM, and prints what a real agent needs to reach
it: the endpoint, and the AccessKey it accepts as environment assignments to paste.

The AccessKey is generated per run, like `--dev`'s: the emulator checks signatures as KMS does,
and a fixed demo key would let any local user read whatever secrets it was given. The secrets come
from a TOML file of `[[secret]]` tables with `name` and `data` (conf/dev-secrets.toml's format).
Imports stay within the emulator package: the agent's modules would add ~0.8 s to every start.
"""

from __future__ import annotations

import argparse
import json
import secrets
import signal
import sys
import tomllib
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import NoReturn

import trio

from kmsagent.emulator.kms import KmsEmulator

HOST = "127.0.0.1"
SECRETS_FILE = Path("conf") / "dev-secrets.toml"
#: conf/dev-secrets.toml of the checkout this package runs from (an editable install).
CHECKOUT_SECRETS_FILE = Path(__file__).resolve().parents[3] / SECRETS_FILE
#: A secrets file is read whole; no demo needs more.
MAX_SECRETS_FILE_BYTES = 1024 * 1024
#: Secret names listed at start; the rest are counted.
SHOWN_NAMES = 5
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A bad command line or secrets file: one line on stderr, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"kmsagent.emulator: {message} (see --help)\n")


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"must be an integer in 0..65535, not {text[:20]!r}")
    return int(text)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _Parser(
        prog="python -m kmsagent.emulator",
        description=f"A fake KMS (GetSecretValue) on {HOST}, for trying a real agent config locally.",
        epilog="Stops on SIGINT or SIGTERM (exit 0). Exit 2: bad arguments or secrets file; 1: port in use.",
    )
    parser.add_argument("--port", type=_port, default=0, help="port to listen on (default 0: any free port)")
    parser.add_argument(
        "--secrets",
        metavar="FILE",
        type=Path,
        help=f"TOML file of [[secret]] tables with name and data (default: {SECRETS_FILE})",
    )
    return parser.parse_args(argv)


def find_secrets_file(given: Path | None) -> Path:
    """`given`, else conf/dev-secrets.toml in the working folder, else in the checkout."""
    if given is not None:
        return given
    for candidate in (SECRETS_FILE, CHECKOUT_SECRETS_FILE):
        if candidate.is_file():
            return candidate
    raise UsageError(f"no {SECRETS_FILE} here or in the checkout; pass --secrets FILE")


def load_secrets(path: Path) -> dict[str, str]:
    """Secret name → text, from `[[secret]]` tables with string `name` and `data`."""
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_SECRETS_FILE_BYTES + 1)
    except OSError as error:
        raise UsageError(f"{path}: cannot read: {error.strerror or error}") from None
    if len(raw) > MAX_SECRETS_FILE_BYTES:
        raise UsageError(f"{path}: larger than {MAX_SECRETS_FILE_BYTES} bytes")
    try:
        tables = tomllib.loads(raw.decode("utf-8"))["secret"]
        found = {item["name"]: item["data"] for item in tables}
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError) as error:
        # The parser's message may quote a line of the file, secret data included: name the kind only.
        raise UsageError(
            f"{path}: not a secrets file of [[secret]] tables with name and data ({type(error).__name__})"
        ) from None
    if not found:
        raise UsageError(f"{path}: no [[secret]] tables")
    if not all(isinstance(name, str) and name and isinstance(data, str) for name, data in found.items()):
        raise UsageError(f"{path}: every [[secret]] needs a non-empty string name and a string data")
    return found


async def serve(emulator: KmsEmulator, port: int, announce: list[str]) -> None:
    """Serves until SIGINT or SIGTERM; prints `announce` under the listening line once bound."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(partial(emulator.serve, host=HOST, port=port))
            print(f"kmsagent emulator listening on http://{HOST}:{bound}", *announce, sep="\n", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        path = find_secrets_file(args.secrets)
        demo = load_secrets(path)
    except UsageError as error:
        print(f"kmsagent.emulator: {error}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    emulator = KmsEmulator()
    for name, data in demo.items():
        emulator.put_secret(name, data)
    access_key_id, access_key_secret = f"LTAIdev{secrets.token_hex(8)}", secrets.token_urlsafe(24)
    emulator.add_credentials(access_key_id, access_key_secret)
    names = ", ".join(json.dumps(name, ensure_ascii=False) for name in list(demo)[:SHOWN_NAMES])
    more = f" and {len(demo) - SHOWN_NAMES} more" if len(demo) > SHOWN_NAMES else ""
    announce = [
        "it accepts this AccessKey (paste into the agent's shell):",
        f"export ALIBABA_CLOUD_ACCESS_KEY_ID={access_key_id} ALIBABA_CLOUD_ACCESS_KEY_SECRET={access_key_secret}",
        f"secrets from {path}: {names}{more}",
    ]
    try:
        trio.run(serve, emulator, args.port, announce)
    except KeyboardInterrupt:  # SIGINT before the signal receiver was open
        pass
    except (OSError, BaseExceptionGroup) as error:
        failed = _bind_error(error)
        if failed is None:
            raise
        reason = failed.strerror or type(failed).__name__
        print(f"kmsagent.emulator: cannot listen on {HOST}:{args.port}: {reason}", file=sys.stderr, flush=True)
        return EXIT_FAILURE
    return EXIT_OK


def _bind_error(error: BaseException) -> OSError | None:
    """The OSError that stopped the server from binding (port in use), through nurseries' groups."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error if isinstance(error, OSError) else None


if __name__ == "__main__":
    raise SystemExit(main())
