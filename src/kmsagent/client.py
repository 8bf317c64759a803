"""`kmsagent get SECRET_ID`: asks the running agent for one secret and prints it (SPEC §10).

For shell scripts, health checks and init steps, so it must start fast and run as any user who
may read the config and the token: it imports only the standard library (importing the agent's
modules costs ≈1.5 s and ≈74 MB; this command ≈0.1 s and ≈20 MB), reads only the `[Server]` keys
it needs from the TOML (no check of the log folder, the credentials or any other section), and
speaks HTTP/1.1 with `http.client`, which never consults `http_proxy`.

The value goes to stdout as its exact bytes, with no newline added: `$(kmsagent get id)` and
`kmsagent get id > file` give the secret itself. Binary secrets are decoded from base64. With
ResponseType 2 (Vault) the agent's answer holds a JSON secret re-encoded and a binary one as
base64 text without a type, so those two are printed as the answer holds them.
Exit status: 0; 1 the agent cannot be reached, answered 429 or 5xx; 2 bad usage or config (no
token variable included); 3 the agent answered another 4xx (its code and message on stderr), or
the secret has no such JSON key.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import http.client
import json
import os
import socket
import stat
import sys
import time
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, NoReturn

EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, EXIT_REFUSED = 0, 1, 2, 3
#: A connect on loopback is immediate; one that takes this long means the agent is stuck.
CONNECT_TIMEOUT = 5.0
#: Beyond the agent's own bound on a KMS wait (RequestTimeoutMs), the slack for its answer.
ANSWER_SLACK = 5.0
#: The largest answer read: a KMS secret is at most 64 KB, and base64 plus JSON stay far below.
MAX_ANSWER = 2 * 1024 * 1024
#: The largest config file and token file read (the agent's own token limit is 4 KB).
MAX_CONFIG = 1024 * 1024
MAX_TOKEN = 4096
#: sockaddr_un's sun_path holds 108 bytes with the final NUL.
MAX_SOCKET_PATH = 107

DEFAULT_HEADERS = ("X-KMS-Token", "X-Vault-Token")
DEFAULT_VARIABLES = ("KMS_TOKEN", "KMS_SESSION_TOKEN", "KMS_CONTAINER_AUTHORIZATION_TOKEN")


class Failure(Exception):
    """Ends the command: `code` is the exit status, `str()` the one line printed on stderr."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Target:
    """What the client needs of the agent's `[Server]` section."""

    http_port: int = 2025
    ssrf_headers: tuple[str, ...] = DEFAULT_HEADERS
    ssrf_env_variables: tuple[str, ...] = DEFAULT_VARIABLES
    response_type: int = 0
    unix_socket: str = ""
    request_timeout_ms: int = 30_000


# --- The command line -----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"kmsagent get: {message} (see kmsagent get --help)\n")


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = _Parser(
        prog="kmsagent get",
        description="Ask the running kmsagent for one secret and print its value to stdout, as its exact "
        "bytes with no newline added (binary secrets decoded).",
        epilog="The agent is the one the config describes: its [Server] UnixSocket when set, else "
        "127.0.0.1:HttpPort. The token is read like the agent reads it: the first variable of "
        "SSRFEnvVariables that is set (KMS_TOKEN, ...), a token or file:///path. Exit status: 0 printed; "
        "1 the agent cannot be reached or answered 429 or 5xx; 2 bad usage or config, or no token "
        "variable set; 3 the agent refused (4xx: its code and message on stderr) or no such JSON key.",
    )
    parser.add_argument("secret_id", metavar="SECRET_ID", help="the secret's name or ARN")
    parser.add_argument("--version-id", metavar="V", help="a version of the secret")
    parser.add_argument("--version-stage", metavar="S", help="a stage of the secret (default: ACSCurrent)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json-key", metavar="K", help="print this top-level key of a JSON secret (a string as is)")
    output.add_argument("--raw-response", action="store_true", help="print the agent's whole answer body")
    parser.add_argument("--config", metavar="PATH", help="the agent's TOML config (default: $KMSAGENT_CONFIG)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH", help="the agent's Unix socket (overrides the config)")
    where.add_argument("--port", metavar="N", type=_port_argument, help="the agent's port on 127.0.0.1")
    return parser.parse_args(argv)


def _port_argument(text: str) -> int:
    if text.isdigit() and 1 <= int(text) <= 65535:
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r} is not a port in 1..65535")


# --- The config: only [Server] keys, validated one by one --------------------------------------------


def read_target(path: str | None) -> Target:
    """The `[Server]` keys of the config at `path` (None: the defaults); other sections are not read."""
    if path is None:
        return Target()
    try:
        document = tomllib.loads(read_bounded(path, MAX_CONFIG).decode())
    except OSError as error:
        raise Failure(EXIT_USAGE, f"config error: {path}: cannot read config file: {error.strerror or error}") from None
    except ValueError as error:  # TOMLDecodeError, UnicodeDecodeError, too large, not a regular file
        raise Failure(EXIT_USAGE, f"config error: {path}: {' '.join(str(error).split())}") from None
    server = document.get("Server", {})
    if not isinstance(server, dict):
        raise Failure(EXIT_USAGE, "config error: Server must be a [Server] table")
    values: dict[str, Any] = {}
    for row in _SERVER_KEYS:
        if row.key in server:
            value = server[row.key]
            if not row.ok(value):
                raise Failure(EXIT_USAGE, f"config error: [Server] {row.key} = {_show(value)}: {row.allowed}")
            values[row.field] = tuple(value) if isinstance(value, list) else value
    return Target(**values)


def _is_int(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_names(value: object, ok: Callable[[str], bool]) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, str) and ok(item) for item in value)


def _is_header_name(name: str) -> bool:
    return bool(name) and all(c.isascii() and (c.isalnum() or c in "!#$%&'*+.^_`|~-") for c in name)


def _is_env_name(name: str) -> bool:
    return bool(name) and not name[0].isdigit() and all(c.isascii() and (c.isalnum() or c == "_") for c in name)


class _Key(NamedTuple):
    key: str
    field: str
    ok: Callable[[Any], bool]
    allowed: str


#: The `[Server]` keys the client reads, checked as the agent checks them (SPEC §2).
_SERVER_KEYS = (
    _Key("HttpPort", "http_port", lambda v: _is_int(v, 0, 65535) and (v == 0 or v >= 1024),
         "must be 0 or an integer in 1024..65535"),
    _Key("SSRFHeaders", "ssrf_headers", lambda v: _is_names(v, _is_header_name),
         "must be a non-empty list of HTTP header names"),
    _Key("SSRFEnvVariables", "ssrf_env_variables", lambda v: _is_names(v, _is_env_name),
         "must be a non-empty list of environment variable names"),
    _Key("ResponseType", "response_type", lambda v: _is_int(v, 0, 2), "must be an integer in 0..2"),
    _Key("UnixSocket", "unix_socket", lambda v: isinstance(v, str) and "\0" not in v, 'must be "" or a socket path'),
    _Key("RequestTimeoutMs", "request_timeout_ms", lambda v: _is_int(v, 1000, 120_000),
         "must be an integer in 1000..120000"),
)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_bounded(path: str, limit: int) -> bytes:
    """A regular file's first `limit` bytes, opened without blocking (a FIFO or device at the path
    would hang a plain open); ValueError when it is not a regular file or holds more."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        data = b""
        while len(data) <= limit:
            chunk = os.read(fd, limit + 1 - len(data))
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ValueError(f"larger than {limit} bytes")
    return data


def read_token(names: Sequence[str], env: Mapping[str, str]) -> bytes:
    """The token the agent checks: the first of `names` set in `env`, a value or `file:///path`."""
    for name in names:
        value = env.get(name)
        if value is None:
            continue
        if value.startswith("file://"):
            path = value.removeprefix("file://")
            try:
                token = read_bounded(path, MAX_TOKEN).strip()
            except OSError as error:
                raise Failure(EXIT_USAGE, f"{name}: cannot read token file {path}: {error.strerror or error}") from None
            except ValueError as error:
                raise Failure(EXIT_USAGE, f"{name}: token file {path}: {error}") from None
            where = f"token file {path}"
        else:
            token, where = value.strip().encode(errors="surrogateescape"), name
        if not token:
            raise Failure(EXIT_USAGE, f"{where} is empty")
        if any(byte in b"\r\n\0" for byte in token):
            raise Failure(EXIT_USAGE, f"{where}: a token cannot hold line breaks or NUL")
        return token
    raise Failure(EXIT_USAGE, f"no SSRF token: set one of {', '.join(names)} (a token, or file:///path)")


# --- The request -------------------------------------------------------------------------------------


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a Unix stream socket; the Host header is `localhost`, which the agent accepts."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes


def request_path(secret_id: str, version_id: str | None, version_stage: str | None) -> str:
    """`/secretsmanager/get?secretId=...`, every parameter percent-encoded as UTF-8 (`+`, `&`,
    `/`, spaces and any other character survive as themselves)."""
    query = [("secretId", secret_id)]
    if version_id is not None:
        query.append(("versionId", version_id))
    if version_stage is not None:
        query.append(("versionStage", version_stage))
    try:
        return "/secretsmanager/get?" + "&".join(f"{key}={urllib.parse.quote(value, safe='')}" for key, value in query)
    except UnicodeEncodeError:  # an argument that was not valid UTF-8 (surrogate escapes)
        raise Failure(EXIT_USAGE, "SECRET_ID and versions must be valid UTF-8") from None


def ask(connection: http.client.HTTPConnection, path: str, header: str, token: bytes, deadline: float) -> Answer:
    """One GET on a connected `connection`, its answer read whole by `deadline` (time.monotonic)
    and within MAX_ANSWER bytes: a slow agent or a drip-fed answer cannot hold the caller longer."""
    sock = connection.sock  # kept: http.client drops its reference once a closing answer starts

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no whole answer in time")
        sock.settimeout(left)
        return left

    connection.putrequest("GET", path, skip_accept_encoding=True)
    connection.putheader(header, token)
    connection.putheader("Connection", "close")
    remaining()
    connection.endheaders()
    remaining()
    with connection.getresponse() as response:
        body = b""
        while True:
            remaining()
            chunk = response.read1(65536)
            if not chunk:
                return Answer(response.status, body)
            body += chunk
            if len(body) > MAX_ANSWER:
                raise Failure(EXIT_UNREACHABLE, f"the agent's answer is larger than {MAX_ANSWER} bytes")


def fetch(target: Target, where: str, socket_path: str | None, port: int | None, path: str, token: bytes) -> Answer:
    """Connects (within CONNECT_TIMEOUT) and asks; the whole exchange ends within the agent's own
    bound on a KMS wait (RequestTimeoutMs) plus ANSWER_SLACK."""
    deadline = time.monotonic() + CONNECT_TIMEOUT + target.request_timeout_ms / 1000 + ANSWER_SLACK
    connection: http.client.HTTPConnection
    if socket_path is not None:
        connection = UnixHTTPConnection(socket_path, CONNECT_TIMEOUT)
    else:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=CONNECT_TIMEOUT)
    try:
        connection.connect()
        return ask(connection, path, target.ssrf_headers[0], token, deadline)
    except (OSError, http.client.HTTPException) as error:  # TimeoutError is an OSError
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
        raise Failure(EXIT_UNREACHABLE, f"cannot reach the agent at {where}: {reason}") from None
    finally:
        connection.close()


# --- The answer --------------------------------------------------------------------------------------


def error_text(response_type: int, body: bytes) -> str:
    """`Code: message` from an error body of ResponseType 0, 1 or 2 (SPEC §4), escaped for one line."""
    try:
        document = json.loads(body)
        if response_type == 0:
            text = f"{document['Code']}: {document['Message']}"
        elif response_type == 1:
            text = f"{document['__type']}: {document['message']}"
        else:
            text = str(document["errors"][0])
    except (ValueError, LookupError, TypeError):
        text = body[:200].decode(errors="replace")
    return text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text


def secret_value(response_type: int, body: bytes) -> tuple[bytes, Any]:
    """The value's exact bytes, and the JSON object when the answer already holds one parsed
    (ResponseType 2's `data`), from a 200 answer's body."""
    try:
        document = json.loads(body)
        if response_type == 0:
            data = document["SecretData"]
            return (_decoded(data) if document.get("SecretDataType") == "binary" else data.encode()), None
        if response_type == 1:
            if "SecretBinary" in document:
                return _decoded(document["SecretBinary"]), None
            return document["SecretString"].encode(), None
        data = document["data"]
        if isinstance(data, dict) and set(data) == {"value"} and isinstance(data["value"], str):
            return data["value"].encode(), None
        return _json(data), data
    except (ValueError, LookupError, TypeError, AttributeError, binascii.Error):
        raise Failure(EXIT_UNREACHABLE, f"the agent's answer is not a ResponseType {response_type} secret") from None


def _decoded(data: str) -> bytes:
    return base64.b64decode(data, validate=True)


def _json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def json_key(value: bytes, parsed: Any, key: str) -> bytes:
    """One top-level key of a JSON-object secret: a string as its text, anything else as JSON."""
    document = parsed
    if document is None:
        try:
            document = json.loads(value)
        except ValueError:
            raise Failure(EXIT_REFUSED, f"the secret is not JSON: no key {_show(key)}") from None
    if not isinstance(document, dict) or key not in document:
        raise Failure(EXIT_REFUSED, f"the secret has no JSON key {_show(key)}")
    item = document[key]
    return item.encode() if isinstance(item, str) else _json(item)


# --- main ---------------------------------------------------------------------------------------------


def run(argv: Sequence[str], env: Mapping[str, str]) -> bytes:
    """What to print on success; raises Failure otherwise."""
    args = _parse_args(argv)
    if not args.secret_id:
        raise Failure(EXIT_USAGE, "SECRET_ID is empty")
    target = read_target(args.config or env.get("KMSAGENT_CONFIG") or None)
    socket_path, port = args.socket, args.port
    if socket_path is None and port is None:
        if target.unix_socket:
            socket_path = target.unix_socket
        elif target.http_port == 0:
            raise Failure(EXIT_USAGE, "[Server] HttpPort = 0: the agent picks its port at start; pass --port N")
        else:
            port = target.http_port
    if socket_path is not None and len(os.fsencode(socket_path)) > MAX_SOCKET_PATH:
        raise Failure(EXIT_USAGE, f"socket path longer than {MAX_SOCKET_PATH} bytes: {_show(socket_path)}")
    where = f"unix:{socket_path}" if socket_path is not None else f"127.0.0.1:{port}"
    path = request_path(args.secret_id, args.version_id, args.version_stage)
    token = read_token(target.ssrf_env_variables, env)
    answer = fetch(target, where, socket_path, port, path, token)
    if answer.status == 200:
        if args.raw_response:
            return answer.body
        value, parsed = secret_value(target.response_type, answer.body)
        return json_key(value, parsed, args.json_key) if args.json_key is not None else value
    message = f"the agent answered {answer.status} {error_text(target.response_type, answer.body)}"
    refused = 400 <= answer.status < 500 and answer.status != 429
    raise Failure(EXIT_REFUSED if refused else EXIT_UNREACHABLE, message)


def main(argv: Sequence[str]) -> int:
    """Runs `kmsagent get` with `argv`, the arguments after `get`; returns the exit status."""
    try:
        output = run(argv, os.environ)
    except Failure as failure:
        print(f"kmsagent get: {failure}", file=sys.stderr, flush=True)
        return failure.code
    try:
        sys.stdout.flush()
        sys.stdout.buffer.write(output)
        sys.stdout.buffer.flush()
    except BrokenPipeError:  # `kmsagent get x | head -c 1`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return EXIT_UNREACHABLE
    return EXIT_OK
