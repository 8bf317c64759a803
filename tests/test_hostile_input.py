"""Hostile input (issue 6): every answer is a well-formed 4xx (or a 200 for a valid request, or a
close), never a 5xx or a crash, and the token check is never bypassed.

Three layers:

1. `check_request` on its own, property-based (hypothesis): any path, query, header set and token
   either yields a route or raises a 4xx `AgentError`, in SPEC §3's order, and a `SecretQuery`
   is only ever returned when an SSRF header carried exactly the token.
2. The real agent over raw sockets (httpx would normalise what we send): the same generated
   requests, then hand-written malformed ones (oversized, control bytes, pipelining, half-close,
   slowloris, HTTP/1.0, absolute-form, body framing, Host tricks, obs-fold, long methods).
3. Token-bypass attempts: path tricks and SSRF header variants; only exact-token requests for a
   secret route ever see a secret.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, TypeVar
from urllib.parse import quote, unquote_to_bytes

import h11
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conftest import SECRET_MATERIAL, SECRETS, TOKEN, RunningAgent, StartAgent
from kmsagent.checks import MAX_ID_BYTES, Route, SecretQuery, check_request
from kmsagent.config import ServerConfig
from kmsagent.emulator import Fault, KmsEmulator
from kmsagent.errors import AgentError
from kmsagent.token import TokenSource

T = TypeVar("T")

TOKEN_B = TOKEN.encode()
SECRET_PATH = b"/secretsmanager/get?secretId=db/password"
#: The agent's keep-alive (idle) timeout, server.KEEP_ALIVE_TIMEOUT.
KEEP_ALIVE = 5.0
#: How long a raw exchange may take before it counts as a hang.
ANSWER_TIMEOUT = 5.0


def _marker(value: str) -> bytes:
    """A distinctive piece of a secret value that survives JSON escaping in a response body."""
    runs = re.findall(rb"[A-Za-z0-9_-]{8,}", value.encode())
    return max(runs, key=len) if runs else value.encode()


#: Secret values as they appear in any response format (SecretData is JSON-escaped).
SECRET_MARKERS = tuple(_marker(value) for value in SECRETS.values())
LOOPBACK_HOST = re.compile(rb"(?i:localhost|127\.0\.0\.1|\[::1\])(?::[0-9]+)?")
FORWARDED = (b"x-forwarded-for", b"forwarded")
PARAMETER_CODES = {"UnknownParameter", "MissingParameter", "InvalidParameter"}
#: Header names with transport meaning; the fuzzers leave them to the hand-written tests.
TRANSPORT_HEADERS = {
    b"connection", b"content-length", b"transfer-encoding", b"upgrade", b"expect", b"te",
    b"http2-settings", b"keep-alive", b"trailer",
}


def leaks(data: bytes) -> list[bytes]:
    return [marker for marker in SECRET_MARKERS if marker in data]


def draw_examples(strategy: st.SearchStrategy[T], count: int) -> list[T]:
    """`count` deterministic examples of `strategy` (for async tests, where @given cannot go)."""
    drawn: list[T] = []

    @settings(
        max_examples=count,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(example: T) -> None:
        drawn.append(example)

    collect()
    return drawn


# --- Strategies ---------------------------------------------------------------------------------

SAFE_TEXT = st.text(alphabet=string.ascii_letters + string.digits + "-._~", max_size=8).map(str.encode)
ESCAPES = st.sampled_from(
    [b"%2F", b"%2f", b"%25", b"%00", b"%0A", b"%0d", b"%09", b"%20", b"%2e", b"%2E%2E", b"%ff", b"%FE",
     b"%C3%A9", b"%c0%80", b"%ED%A0%80", b"%F0%9F%94%91", b"%", b"%z", b"%zz", b"%4", b"%%", b"%7F",
     b"%3D", b"%26", b"%3F", b"%23", b"%2B", b"%70ing"]
)
SPECIALS = st.sampled_from(
    [b"/", b"//", b"..", b".", b"+", b"=", b"&", b"&&", b"?", b"#", b";", b"\x00", b"\r", b"\n",
     b"\r\n", b" ", b"\t", b"\xff", b"\xc3\xa9", b"\x7f", b"\\", b"@", b":", b"*"]
)
WORDS = st.sampled_from(
    [b"db", b"password", b"db/password", b"api-key", b"app/config", b"ping", b"metrics",
     b"secretsmanager", b"get", b"v1", b"PING", b"x", b"secretId"]
)
PIECE = st.one_of(WORDS, SAFE_TEXT, ESCAPES, SPECIALS, st.binary(max_size=3))
# (unit, count, tail): values at and just over the 1024-byte limit once decoded, and one far over.
LONG = st.sampled_from(
    [(b"a", MAX_ID_BYTES, b""), (b"a", MAX_ID_BYTES + 1, b""), (b"%C3%A9", MAX_ID_BYTES // 2, b""),
     (b"%C3%A9", MAX_ID_BYTES // 2, b"a"), (b"%41", MAX_ID_BYTES + 1, b""), (b"x", 6000, b"")]
).map(lambda spec: spec[0] * spec[1] + spec[2])


def joined(max_pieces: int) -> st.SearchStrategy[bytes]:
    return st.lists(PIECE, max_size=max_pieces).map(b"".join)


KNOWN_PATHS = [
    b"/ping", b"/metrics", b"/secretsmanager/get", b"/secretsmanager/get", b"/v1/db/password",
    b"/v1/api-key", b"/v1/app%2Fconfig", b"/v1/", b"/", b"*", b"/PING", b"/ping/", b"//ping",
    b"/%70ing", b"/v1/../ping", b"/v1/%2e%2e/ping", b"//secretsmanager/get", b"/secretsmanager/get/",
    b"/secretsmanager/GET", b"http://localhost/ping", b"http://localhost/secretsmanager/get",
    b"/v1", b"/v1//db/password", b"/v2/db/password", b"/secrets/v1/db/password", b"/ping;x", b"",
]
PATHS = st.one_of(
    st.sampled_from(KNOWN_PATHS),
    st.tuples(st.sampled_from([b"/", b"/v1/", b"/secretsmanager/get", b"/ping", b"/secrets/v1/"]), joined(5)).map(
        b"".join
    ),
    joined(6),
    LONG.map(lambda long: b"/v1/" + long),
)
NAMES = st.sampled_from(
    [b"secretId", b"secretId", b"versionId", b"versionStage", b"refreshNow", b"secretid", b"SecretId",
     b"secret%49d", b"secret%49%64", b"secretId%00", b"secret+Id", b"+secretId", b"secretId+", b"%73ecretId",
     b"x", b"", b"%ff", b"secretId[]", b"refreshnow", b"X-KMS-Token"]
)
VALUES = st.one_of(
    st.sampled_from(
        [b"db/password", b"db%2Fpassword", b"api-key", b"app/config", b"app%2fconfig", b"true", b"false", b"1",
         b"0", b"TRUE", b"yes", b"", b"ACSCurrent", b"ACSPrevious", b"v1", b"db/password%00", b"+", b"%2B",
         b"a+b", b"=", b"a=b", b"%20db/password"]
    ),
    joined(4),
    LONG,
)
PARAMS = st.one_of(
    st.tuples(NAMES, VALUES).map(lambda pair: pair[0] + b"=" + pair[1]),
    st.tuples(NAMES, VALUES).map(lambda pair: pair[0] + b"=" + pair[1]),
    NAMES,
    st.tuples(NAMES, VALUES, VALUES).map(b"=".join),
)
QUERIES = st.one_of(
    st.none(),
    st.sampled_from(
        [b"secretId=db/password", b"secretId=api-key", b"secretId=app%2Fconfig&versionStage=ACSCurrent",
         b"secretId=db/password&refreshNow=false", b"x", b"", b"&&", b"=", b"==", b"&=&"]
    ),
    st.tuples(st.lists(PARAMS, max_size=5), st.sampled_from([b"&", b"&&", b"&amp;"])).map(
        lambda parts: parts[1].join(parts[0])
    ),
    joined(6),
)
HOST_NAMES = st.sampled_from([b"Host", b"Host", b"host", b"HOST", b"hOsT"])
HOSTS = st.sampled_from(
    [b"localhost", b"localhost", b"127.0.0.1", b"[::1]", b"localhost:2025", b"127.0.0.1:80", b"[::1]:2025",
     b"LOCALHOST", b"LocalHost:1", b"localhost.", b"localhost:", b"localhost:abc", b"user@localhost",
     b"localhost@evil.example", b"evil.example", b"127.0.0.2", b"[0:0:0:0:0:0:0:1]", b"[::1", b"::1", b"127.1",
     b"2130706433", b"localhost:2025:1", b"", b"localhost\x00", b"l\xf6calhost", b"localhost, evil.example",
     b"[::1]:", b"[::1]]", b"[::ffff:127.0.0.1]", b"localhost:99999999999999999999", b"localhost:\xd9\xa3"]
)
SSRF_NAMES = st.sampled_from(
    [b"X-KMS-Token", b"X-KMS-Token", b"x-kms-token", b"X-KMS-TOKEN", b"x-Kms-Token", b"X-Vault-Token",
     b"x-vault-token", b"X-Custom-Auth", b"X_KMS_Token", b"X-KMS-Tokens", b"KMS-Token", b"Authorization",
     b"X-KMS-Token ", b"X-KMS-Token\t"]
)
TOKENS = st.one_of(
    st.sampled_from(
        [TOKEN_B, TOKEN_B, TOKEN_B, TOKEN_B.upper(), b" " + TOKEN_B, TOKEN_B + b" ", b"\t" + TOKEN_B,
         TOKEN_B[:-1], TOKEN_B + b"x", b"x" + TOKEN_B, b"", b"Bearer " + TOKEN_B, TOKEN_B + b"," + TOKEN_B,
         TOKEN_B + b"\x00", TOKEN_B + b"\r\n", TOKEN_B.replace(b"-", b"_"), TOKEN_B + b"\xff"]
    ),
    st.binary(max_size=30),
)
HEADER_TOKEN_CHARS = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
OTHER_NAMES = st.one_of(
    st.sampled_from(
        [b"Forwarded", b"X-Forwarded-For", b"x-forwarded-for", b"FORWARDED", b"X-Forwarded-Host", b"X-Real-IP",
         b"Accept", b"User-Agent", b"Cookie", b"X-Vault-Namespace", b"Bad Name", b"Bad\x00Name", b"",
         b"X-\xff", b"Host:"]
    ),
    st.text(alphabet=HEADER_TOKEN_CHARS, min_size=1, max_size=12).map(str.encode),
)
OTHER_VALUES = st.one_of(
    st.sampled_from(
        [b"for=127.0.0.1", b"127.0.0.1", b"*/*", b"", b"\x00", b"a\rb", b"a\nb", b"a\r\nb", b"\xff\xfe",
         b"caf\xc3\xa9", b"X-KMS-Token=" + TOKEN_B]
    ),
    st.binary(max_size=20),
    LONG,
)
METHODS = st.sampled_from(
    [b"GET", b"GET", b"GET", b"GET", b"GET", b"GET", b"get", b"Get", b"POST", b"PUT", b"DELETE", b"OPTIONS",
     b"PATCH", b"TRACE", b"G-E-T", b"A" * 3]
).map(lambda method: method * 400 if method == b"AAA" else method)


@st.composite
def header_sets(draw: st.DrawFn) -> tuple[tuple[bytes, bytes], ...]:
    headers = [(draw(HOST_NAMES), draw(HOSTS)) for _ in range(draw(st.sampled_from([1, 1, 1, 1, 0, 2])))]
    headers += [(draw(SSRF_NAMES), draw(TOKENS)) for _ in range(draw(st.sampled_from([1, 1, 1, 0, 2])))]
    headers += [(draw(OTHER_NAMES), draw(OTHER_VALUES)) for _ in range(draw(st.integers(0, 2)))]
    return tuple(draw(st.permutations(headers)))


@dataclass(frozen=True)
class Case:
    """One request: `query` None means no `?` in the target."""

    method: bytes
    path: bytes
    query: bytes | None
    headers: tuple[tuple[bytes, bytes], ...]

    @property
    def target(self) -> bytes:
        return self.path if self.query is None else self.path + b"?" + self.query

    def request(self) -> bytes:
        """The raw bytes; `Connection: close` first so that one request gets one answer."""
        lines = [self.method + b" " + self.target + b" HTTP/1.1", b"Connection: close"]
        lines += [name + b": " + value for name, value in self.headers]
        return b"\r\n".join(lines) + b"\r\n\r\n"


HOSTILE_CASES = st.builds(Case, METHODS, PATHS, QUERIES, header_sets())
GOOD_HOSTS = st.sampled_from([b"localhost", b"127.0.0.1", b"[::1]", b"localhost:2025", b"LOCALHOST", b"[::1]:1"])
GOOD_SSRF_NAMES = st.sampled_from([b"X-KMS-Token", b"x-kms-token", b"X-Vault-Token"])
GOOD_TARGETS = st.sampled_from(
    [(b"/secretsmanager/get", b"secretId=db/password"),
     (b"/secretsmanager/get", b"secretId=api-key&versionStage=ACSCurrent"),
     (b"/secretsmanager/get", b"refreshNow=0&secretId=app%2Fconfig"),
     (b"/v1/db/password", None), (b"/v1/app%2Fconfig", None), (b"/v1/api-key", b"refreshNow=false"), (b"/ping", None)]
)


@st.composite
def plausible_cases(draw: st.DrawFn) -> Case:
    """A valid request, or one with a single hostile change: most of the checks get exercised."""
    path, query = draw(GOOD_TARGETS)
    headers = [(b"Host", draw(GOOD_HOSTS)), (draw(GOOD_SSRF_NAMES), TOKEN_B)]
    mutation = draw(st.sampled_from(["none", "none", "none", "header", "token", "host", "query", "path", "method"]))
    method = b"GET"
    if mutation == "header":
        headers.append((draw(OTHER_NAMES), draw(OTHER_VALUES)))
    elif mutation == "token":
        headers[1] = (draw(SSRF_NAMES), draw(TOKENS))
    elif mutation == "host":
        headers[0] = (draw(HOST_NAMES), draw(HOSTS))
    elif mutation == "query":
        query = (query or b"") + draw(st.sampled_from([b"&", b"&&", b""])) + draw(PARAMS)
    elif mutation == "path":
        path += draw(joined(2))
    elif mutation == "method":
        method = draw(METHODS)
    return Case(method, path, query, tuple(draw(st.permutations(headers))))


CASES = st.one_of(HOSTILE_CASES, plausible_cases())
CONFIGS = [ServerConfig(), ServerConfig(ssrf_headers=("X-Custom-Auth",), path_prefix="/secrets/v1/")]
TOKEN_SOURCE = TokenSource(TOKEN_B)


# --- 1. check_request, property-based --------------------------------------------------------------


def _form_decode(raw: bytes, *, plus: bool) -> str | None:
    """Percent-decoded UTF-8 without control characters, or None (the client's 400)."""
    if plus:
        raw = raw.replace(b"+", b" ")
    try:
        text = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return None
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in text):
        return None
    return text


def _expected_query(path_id: bytes | None, query: bytes) -> SecretQuery | None:
    """SPEC §3's parameter rules; None when the request is a 400."""
    allowed = ("versionId", "versionStage", "refreshNow") + (("secretId",) if path_id is None else ())
    params: dict[str, str] = {}
    for part in query.split(b"&"):
        if not part:
            continue
        raw_name, _, raw_value = part.partition(b"=")
        name = _form_decode(raw_name, plus=True)
        value = _form_decode(raw_value, plus=True)
        if name is None or name not in allowed or name in params or value is None:
            return None
        params[name] = value
    secret_id = params.pop("secretId", "") if path_id is None else _form_decode(path_id, plus=False)
    if not secret_id:
        return None
    if any(len(value.encode()) > MAX_ID_BYTES for value in (secret_id, *params.values())):
        return None
    if params.get("versionId") == "" or params.get("versionStage") == "":
        return None
    refresh = {"true": True, "1": True, "false": False, "0": False}.get(params.get("refreshNow", "false"))
    if refresh is None:
        return None
    version_id = params.get("versionId", "")
    stage = params.get("versionStage", "" if version_id else "ACSCurrent")
    return SecretQuery(secret_id, version_id, stage, refresh)


Headers = Sequence[tuple[bytes, bytes]]


def _expected(
    method: str, path: bytes, query: bytes, headers: Headers, over_limit: bool, config: ServerConfig
) -> Route | SecretQuery | tuple[int, str | None]:
    """SPEC §3's table, written from the spec: a route, a query, or (status, code); code None = any 400
    parameter code."""
    route = {b"/ping": Route.PING, b"/metrics": Route.METRICS}.get(path)
    if over_limit and route is not Route.PING:
        return (429, "ConnectionLimitExceeded")
    if any(name in FORWARDED for name, _ in headers):
        return (400, "Forwarded")
    hosts = [value for name, value in headers if name == b"host"]
    if len(hosts) != 1 or not LOOPBACK_HOST.fullmatch(hosts[0]):
        return (403, "BadHost")
    ssrf = {name.lower().encode() for name in config.ssrf_headers}
    if route is None and not any(name in ssrf and value == TOKEN_B for name, value in headers):
        return (403, "BadToken")
    if method != "GET":
        return (405, "MethodNotAllowed")
    if route is not None:
        return route
    prefix = config.path_prefix.encode()
    if path == b"/secretsmanager/get":
        found = _expected_query(None, query)
    elif path.startswith(prefix):
        found = _expected_query(path[len(prefix) :], query)
    else:
        return (404, "NotFound")
    return found if found is not None else (400, None)


def _run_check(
    method: str, path: bytes, query: bytes, headers: Headers, over_limit: bool, config: ServerConfig
) -> Route | SecretQuery | AgentError:
    try:
        return check_request(
            method=method,
            path=path,
            query_string=query,
            headers=headers,
            over_limit=over_limit,
            config=config,
            token_matches=TOKEN_SOURCE.matches,
        )
    except AgentError as error:  # anything else escapes and fails the test: that would be a 500
        refused = error
    assert 400 <= refused.status < 500, f"{refused.status} {refused.code}: {refused.message}"
    return refused


def _assert_token_was_given(result: object, headers: Headers, config: ServerConfig) -> None:
    if isinstance(result, SecretQuery):
        ssrf = {name.lower().encode() for name in config.ssrf_headers}
        assert any(name in ssrf and value == TOKEN_B for name, value in headers), "a secret query without the token"


PROPERTY = {"deadline": None, "derandomize": True, "database": None, "suppress_health_check": [HealthCheck.too_slow]}


@settings(max_examples=1200, **PROPERTY)
@given(case=CASES, config=st.sampled_from(CONFIGS), over_limit=st.sampled_from([False] * 7 + [True]))
def test_check_request_follows_spec_3_and_only_the_token_opens_a_secret(
    case: Case, config: ServerConfig, over_limit: bool
) -> None:
    headers = [(name.lower(), value) for name, value in case.headers]  # as h11 hands them to the app
    method = case.method.decode("latin-1").upper()  # as hypercorn does
    query = case.query or b""
    result = _run_check(method, case.path, query, headers, over_limit, config)
    _assert_token_was_given(result, headers, config)
    ssrf = {name.lower().encode() for name in config.ssrf_headers}
    if case.path not in (b"/ping", b"/metrics") and not any(n in ssrf and v == TOKEN_B for n, v in headers):
        # No token: refused by the token check or by one before it, whatever else the request holds.
        assert isinstance(result, AgentError) and result.status in (429, 400, 403), result
    expected = _expected(method, case.path, query, headers, over_limit, config)
    if isinstance(expected, tuple):
        assert isinstance(result, AgentError), f"expected {expected}, got {result!r}"
        status, code = expected
        assert result.status == status, (result.code, result.message)
        assert result.code == code if code else result.code in PARAMETER_CODES, (result.code, result.message)
    else:
        assert result == expected


@settings(max_examples=400, **PROPERTY)
@given(
    method=st.sampled_from(["GET", "POST", "HEAD"]),
    path=st.one_of(st.binary(max_size=40), st.sampled_from(KNOWN_PATHS)),
    query=st.binary(max_size=60),
    headers=st.lists(
        st.tuples(
            st.one_of(
                st.binary(max_size=16), st.sampled_from([b"host", b"x-kms-token", b"x-vault-token", b"forwarded"])
            ),
            st.one_of(st.binary(max_size=30), st.sampled_from([TOKEN_B, b"localhost", b"127.0.0.1:1"])),
        ),
        max_size=6,
    ),
    over_limit=st.booleans(),
)
def test_check_request_on_arbitrary_bytes_is_a_route_or_a_4xx(
    method: str, path: bytes, query: bytes, headers: list[tuple[bytes, bytes]], over_limit: bool
) -> None:
    config = ServerConfig()
    result = _run_check(method, path, query, headers, over_limit, config)
    _assert_token_was_given(result, headers, config)
    if isinstance(result, (Route, SecretQuery)):
        assert method == "GET" and (path == b"/ping" or not over_limit)


# --- Raw HTTP/1.1 over sockets -------------------------------------------------------------------


class Malformed(AssertionError):
    """The agent sent bytes that are not a well-formed HTTP/1.1 response."""


@dataclass
class Reply:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        values = [value for key, value in self.headers if key == name]
        return values[-1] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: [^\r\n]*)?")
_HEADER_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*(.*?)[ \t]*")


class RawConn:
    """One client connection that sends bytes as given and parses what comes back."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""
        self.received = b""
        self.eof = False

    @classmethod
    async def open(cls, port: int) -> RawConn:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def __aenter__(self) -> RawConn:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await trio.aclose_forcefully(self.stream)

    async def send(self, data: bytes) -> bool:
        """False when the agent has already closed (or reset) the connection."""
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            chunk = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:  # a reset counts as a close
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buffer += chunk
        self.received += chunk
        return True

    async def reply(self, *, head: bool = False) -> Reply | None:
        """The next final response (1xx skipped), or None if the agent closed before one began."""
        while True:
            while b"\r\n\r\n" not in self.buffer:
                if not await self._fill():
                    if self.buffer:
                        raise Malformed(f"connection closed inside a response head: {self.buffer[:200]!r}")
                    return None
            head_bytes, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            status_line, *lines = head_bytes.split(b"\r\n")
            match = _STATUS_LINE.fullmatch(status_line)
            if not match:
                raise Malformed(f"bad status line {status_line[:200]!r}")
            headers = []
            for line in lines:
                header = _HEADER_LINE.fullmatch(line)
                if not header:
                    raise Malformed(f"bad header line {line[:200]!r}")
                headers.append((header[1].lower(), header[2]))
            status = int(match[1])
            if 100 <= status < 200:
                continue
            lengths = {value for name, value in headers if name == b"content-length"}
            if len(lengths) != 1 or not next(iter(lengths)).isdigit():
                raise Malformed(f"{status} without one valid content-length: {headers}")
            length = 0 if head else int(next(iter(lengths)))
            while len(self.buffer) < length:
                if not await self._fill():
                    raise Malformed(f"{status}: body truncated at {len(self.buffer)} of {length} bytes")
            body, self.buffer = self.buffer[:length], self.buffer[length:]
            return Reply(status, headers, body)

    async def closed(self) -> bool:
        """Reads (and keeps) whatever comes until the agent closes; True once it has."""
        while await self._fill():
            pass
        return True


def http_request(
    target: bytes,
    *,
    token: bytes | None = TOKEN_B,
    host: bytes | None = b"localhost",
    method: bytes = b"GET",
    version: bytes = b"HTTP/1.1",
    headers: Sequence[tuple[bytes, bytes]] = (),
    close: bool = True,
    body: bytes = b"",
) -> bytes:
    lines = [method + b" " + target + b" " + version]
    if host is not None:
        lines.append(b"Host: " + host)
    if token is not None:
        lines.append(b"X-KMS-Token: " + token)
    lines += [name + b": " + value for name, value in headers]
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@dataclass
class Exchange:
    reply: Reply | None
    received: bytes
    closed: bool


async def exchange(port: int, request: bytes, *, head: bool = False, wait_close: bool = True) -> Exchange:
    """Sends `request` on a fresh connection; the first answer, and whether the agent then closed."""
    async with await RawConn.open(port) as conn:
        with trio.fail_after(ANSWER_TIMEOUT):
            sent = await conn.send(request)
            reply = await conn.reply(head=head)
            closed = await conn.closed() if (wait_close or reply is None or not sent) else conn.eof
        return Exchange(reply, conn.received, closed)


def assert_4xx(reply: Reply | None, *statuses: int) -> Reply:
    """A well-formed client error: a 4xx (one of `statuses` if given); an app error has §4's body."""
    assert reply is not None, "expected a 4xx answer, the agent closed without one"
    assert 400 <= reply.status < 500 and (not statuses or reply.status in statuses), (reply.status, reply.body[:300])
    if reply.body:
        assert reply.header(b"content-type") == b"application/json", reply.headers
        body = reply.json()
        assert body["HttpStatus"] == reply.status and body["Code"], body
    return reply


def assert_4xx_or_closed(result: Exchange) -> None:
    if result.reply is None:
        assert result.closed
    else:
        assert_4xx(result.reply)


def assert_no_secret(data: bytes) -> None:
    assert not leaks(data), f"secret material in an answer: {data[:400]!r}"
    assert TOKEN_B not in data, "the token echoed in an answer"


def assert_secret(reply: Reply | None, name: str = "db/password") -> None:
    assert reply is not None and reply.status == 200, reply
    assert reply.header(b"content-type") == b"application/json"
    assert reply.json()["SecretData"] == SECRETS[name]


async def assert_still_serving(agent: RunningAgent) -> None:
    response = await agent.get(SECRET_PATH.decode())
    assert response.status_code == 200 and response.json()["SecretData"] == SECRETS["db/password"]
    assert (await agent.get("/ping", token=None)).text == "healthy"


def h11_view(request: bytes) -> h11.Request | None:
    """The request as the agent's parser (h11, same version and limits) sees it, or None if refused."""
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(request)
    try:
        event = connection.next_event()
    except h11.RemoteProtocolError:
        return None
    return event if isinstance(event, h11.Request) else None


def authorised(request: bytes, config: ServerConfig = ServerConfig()) -> bool:
    """Whether SPEC §3 lets `request` read a secret: loopback Host, not forwarded, the token."""
    event = h11_view(request)
    if event is None:
        return False
    headers = [(name.lower(), value) for name, value in event.headers]
    hosts = [value for name, value in headers if name == b"host"]
    ssrf = {name.lower().encode() for name in config.ssrf_headers}
    return (
        not any(name in FORWARDED for name, _ in headers)
        and len(hosts) == 1
        and LOOPBACK_HOST.fullmatch(hosts[0]) is not None
        and any(name in ssrf and value == TOKEN_B for name, value in headers)
    )


# --- 1b. The same strategies against the real agent ---------------------------------------------

SOCKET_CASES = CASES.filter(
    lambda case: not any(name.strip().lower() in TRANSPORT_HEADERS for name, _ in case.headers)
)
FUZZ_CASES = 200
FUZZ_CASE_TIMEOUT = 3.0
FUZZ_MAX_FAILURES = 5


async def _fuzz_one(port: int, case: Case) -> tuple[str | None, Reply | None]:
    request = case.request()
    async with await RawConn.open(port) as conn:
        with trio.move_on_after(FUZZ_CASE_TIMEOUT) as timer:
            await conn.send(request)
            try:
                reply = await conn.reply()
            except Malformed as error:
                return f"malformed answer: {error}", None
            await conn.closed()  # `Connection: close` was asked for
        if timer.cancelled_caught:
            return f"no answer or no close within {FUZZ_CASE_TIMEOUT} s (got {conn.received[:120]!r})", None
    if reply is not None and reply.status >= 500:
        return f"{reply.status}: {reply.body[:200]!r}", reply
    if leaks(conn.received) and not authorised(request):
        return "a secret without a valid token, Host or without Forwarded", reply
    if TOKEN_B in conn.received:
        return "the token echoed in an answer", reply
    return None, reply


async def test_generated_requests_over_sockets_never_get_a_5xx_or_a_secret_without_the_token(
    start_agent: StartAgent, captured_logs: list[str]
) -> None:
    agent = await start_agent()
    cases = draw_examples(SOCKET_CASES, FUZZ_CASES)
    assert len(cases) >= FUZZ_CASES // 2
    failures: list[str] = []
    statuses: Counter[int | None] = Counter()
    secrets_served = 0
    for case in cases:
        problem, reply = await _fuzz_one(agent.port, case)
        statuses[reply.status if reply else None] += 1
        if problem:
            failures.append(f"{problem}\n    request: {case.request()[:300]!r}")
            if len(failures) >= FUZZ_MAX_FAILURES:
                break
        elif reply is not None and reply.status == 200 and leaks(reply.body):
            secrets_served += 1
    assert not failures, "\n".join(failures)
    # The generator does reach the secret routes with valid requests, so "no leak" means something.
    assert secrets_served >= 5, statuses
    assert sum(count for status, count in statuses.items() if status and 400 <= status < 500) >= 50, statuses
    await assert_still_serving(agent)
    logged = "\n".join(captured_logs)
    assert not [material for material in SECRET_MATERIAL if material in logged], "secret material in the logs"


# --- 2. Hand-written hostile requests over raw sockets -------------------------------------------


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(http_request(b"/" + b"a" * 100_000), id="100KB-target"),
        pytest.param(http_request(b"/secretsmanager/get?secretId=" + b"a" * 100_000), id="100KB-query"),
        pytest.param(http_request(SECRET_PATH, headers=[(b"X-Big", b"b" * 100_000)]), id="100KB-header"),
        pytest.param(
            http_request(SECRET_PATH, headers=[(b"X-H%d" % i, b"v" * 100) for i in range(1000)]), id="1000-headers"
        ),
    ],
)
async def test_oversized_requests_are_refused_with_a_4xx_or_a_close(
    start_agent: StartAgent, request_bytes: bytes
) -> None:
    agent = await start_agent()
    result = await exchange(agent.port, request_bytes)
    assert_4xx_or_closed(result)
    assert_no_secret(result.received)
    await assert_still_serving(agent)


async def test_headers_trickled_past_the_parser_limit_are_refused(start_agent: StartAgent) -> None:
    agent = await start_agent()
    async with await RawConn.open(agent.port) as conn:
        with trio.fail_after(ANSWER_TIMEOUT):
            await conn.send(b"GET /ping HTTP/1.1\r\nHost: localhost\r\n")
            for index in range(40):  # 40 KB of headers, 1 KB per write, never finished
                if not await conn.send(b"X-Pad-%02d: %s\r\n" % (index, b"p" * 1000)):
                    break
                await trio.testing.wait_all_tasks_blocked()
            reply = await conn.reply()
            await conn.closed()
    assert_4xx_or_closed(Exchange(reply, conn.received, True))
    await assert_still_serving(agent)


@pytest.mark.parametrize(
    ("target", "status"),
    [
        (b"/secretsmanager/get?secretId=%zz", 404),  # not an escape: the id is literally "%zz"
        (b"/secretsmanager/get?secretId=%", 404),
        (b"/secretsmanager/get?secretId=%f", 404),
        (b"/secretsmanager/get?secretId=%ff", 400),
        (b"/secretsmanager/get?secretId=%C0%80", 400),  # overlong NUL
        (b"/secretsmanager/get?secretId=%ED%A0%80", 400),  # a surrogate
        (b"/secretsmanager/get?secretId=db%2Fpassword%00", 400),
        (b"/secretsmanager/get?secretId=db/password&refreshNow=%74rue%0a", 400),
        (b"/secretsmanager/get?%ff=1", 400),
        (b"/secretsmanager/get?secret%zzId=db/password", 400),
        (b"/v1/%ff", 400),
        (b"/v1/%zz", 404),
        (b"/v1/db%2Fpassword%0D%0AX-Injected:%201", 400),
        (b"/%ff", 404),
        (b"/%", 404),
    ],
)
async def test_invalid_percent_encoding_is_a_4xx(start_agent: StartAgent, target: bytes, status: int) -> None:
    agent = await start_agent()
    result = await exchange(agent.port, http_request(target))
    assert_4xx(result.reply, status)
    assert_no_secret(result.received)
    await assert_still_serving(agent)


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(http_request(b"/secretsmanager/get?secretId=db/\x00password"), id="NUL-in-target"),
        pytest.param(http_request(b"/secretsmanager/get?secretId=db/\rpassword"), id="CR-in-target"),
        pytest.param(http_request(b"/secretsmanager/get?secretId=db/\npassword"), id="LF-in-target"),
        pytest.param(http_request(b"/secretsmanager/get?secretId=db/ password"), id="SP-in-target"),
        pytest.param(http_request(b"/secretsmanager/get?secretId=db/\x7fpassword"), id="DEL-in-target"),
        pytest.param(http_request(SECRET_PATH, token=TOKEN_B + b"\x00"), id="NUL-in-token"),
        pytest.param(http_request(SECRET_PATH, token=b"\x00" + TOKEN_B), id="NUL-before-token"),
        pytest.param(http_request(SECRET_PATH, token=TOKEN_B[:4] + b"\r" + TOKEN_B[4:]), id="CR-in-token"),
        pytest.param(http_request(SECRET_PATH, token=TOKEN_B[:4] + b"\n" + TOKEN_B[4:]), id="LF-in-token"),
        pytest.param(http_request(SECRET_PATH, host=b"local\x00host"), id="NUL-in-host"),
        pytest.param(http_request(SECRET_PATH, host=b"localhost\rX"), id="CR-in-host"),
        pytest.param(http_request(SECRET_PATH, headers=[(b"X-Other", b"a\x00b")]), id="NUL-in-other-header"),
        pytest.param(http_request(SECRET_PATH, headers=[(b"X-Other", b"a\rb")]), id="CR-in-other-header"),
        pytest.param(http_request(SECRET_PATH, headers=[(b"X-Ot\x00her", b"a")]), id="NUL-in-header-name"),
    ],
)
async def test_control_bytes_in_the_target_or_headers_are_refused(
    start_agent: StartAgent, request_bytes: bytes
) -> None:
    agent = await start_agent()
    result = await exchange(agent.port, request_bytes)
    assert_4xx(result.reply, 400, 403)
    assert_no_secret(result.received)
    await assert_still_serving(agent)


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        pytest.param(http_request(b"/secretsmanager/get?secretId=caf\xc3\xa9"), 400, id="UTF-8-in-target"),
        pytest.param(http_request(b"/secretsmanager/get?secretId=\xff\xfe"), 400, id="latin-1-in-target"),
        pytest.param(http_request(b"/v1/\xff"), 400, id="0xff-in-path"),
        pytest.param(http_request(SECRET_PATH, token=TOKEN_B + b"\xff"), 403, id="0xff-after-token"),
        pytest.param(http_request(SECRET_PATH, token=TOKEN_B.replace(b"-", b"\xad")), 403, id="soft-hyphens"),
        pytest.param(http_request(SECRET_PATH, host=b"l\xf6calhost"), 403, id="0xf6-in-host"),
        pytest.param(http_request(SECRET_PATH, host=b"localhost:\xd9\xa3"), 403, id="arabic-digit-port"),
        pytest.param(
            http_request(SECRET_PATH, token=None, headers=[(b"X-KMS-T\xf6ken", TOKEN_B)]), 400, id="0xf6-in-name"
        ),
        pytest.param(
            http_request(SECRET_PATH, headers=[(b"X-Other", b"\xff\xfe\xfd")]), 200, id="0xff-in-other-header"
        ),
    ],
)
async def test_non_utf8_bytes_in_the_target_or_headers(
    start_agent: StartAgent, request_bytes: bytes, status: int
) -> None:
    agent = await start_agent()
    result = await exchange(agent.port, request_bytes)
    if status == 200:
        assert_secret(result.reply)
    else:
        assert_4xx(result.reply, status)
        assert_no_secret(result.received)
    await assert_still_serving(agent)


async def test_pipelined_requests_are_answered_in_order(start_agent: StartAgent) -> None:
    agent = await start_agent()
    names = ["db/password", "api-key", "app/config"]
    requests = b"".join(
        http_request(b"/secretsmanager/get?secretId=" + name.encode(), close=False) for name in names
    )
    async with await RawConn.open(agent.port) as conn:
        with trio.fail_after(ANSWER_TIMEOUT):
            await conn.send(requests)
            for name in names:
                assert_secret(await conn.reply(), name)
            # The connection is still usable afterwards, and pipelining mixes with checks in order.
            await conn.send(
                http_request(SECRET_PATH, token=None, close=False) + http_request(b"/ping", close=False)
                + http_request(SECRET_PATH)
            )
            assert_4xx(await conn.reply(), 403)
            ping = await conn.reply()
            assert ping is not None and (ping.status, ping.body) == (200, b"healthy")
            assert_secret(await conn.reply())
            assert await conn.closed()


async def test_a_request_pipelined_after_connection_close_does_not_cost_the_first_answer(
    start_agent: StartAgent, captured_logs: list[str]
) -> None:
    """RFC 9112 §9.6: nothing may follow `Connection: close`. A client that sends more anyway gets an
    answer to the first request (a 200, or hypercorn's 400 when h11 sees the extra bytes before the app
    has answered) and a close; never nothing. (Hypercorn's keep_alive_max_requests=1000 makes the
    1000th pipelined request the same case.) The race goes either way, so 40 tries."""
    agent = await start_agent()
    lost = 0
    for _ in range(40):
        async with await RawConn.open(agent.port) as conn:
            await conn.send(http_request(b"/ping") + http_request(b"/ping", close=False))
            with trio.fail_after(ANSWER_TIMEOUT):
                reply = await conn.reply()
                await conn.closed()
        if reply is None:
            lost += 1
        elif reply.status != 200:
            assert_4xx(reply, 400)
    failures = [line for line in captured_logs if "connection handler failed" in line or "Error in ASGI" in line]
    assert (lost, failures) == (0, []), f"{lost} of 40 answers lost; {len(failures)} failures logged"


@pytest.mark.parametrize(
    ("target", "secret"),
    [
        (b"/ping", None),
        (b"/metrics", None),
        (SECRET_PATH, "db/password"),  # cached: answered at once
    ],
    ids=["ping", "metrics", "cached-secret"],
)
async def test_a_half_closed_client_still_gets_its_answer(
    start_agent: StartAgent, target: bytes, secret: str | None
) -> None:
    agent = await start_agent()
    await assert_still_serving(agent)  # warms the cache for db/password
    async with await RawConn.open(agent.port) as conn:
        with trio.fail_after(ANSWER_TIMEOUT):
            await conn.send(http_request(target, close=False))
            await conn.send_eof()
            reply = await conn.reply()
            if secret:
                assert_secret(reply, secret)
            else:
                assert reply is not None and reply.status == 200
            assert await conn.closed()


async def test_a_half_close_during_a_kms_call_is_a_close_and_frees_the_slot(
    start_agent: StartAgent, emulator: KmsEmulator
) -> None:
    """TCP cannot tell a half-close from a client that left, and a client that left must not hold
    its slot while KMS is slow: the request is dropped (a close, never a 5xx), the load goes on."""
    agent = await start_agent(server={"max_conn": 1})
    emulator.inject(Fault(delay=0.5), times=1)
    async with await RawConn.open(agent.port) as conn:
        with trio.fail_after(ANSWER_TIMEOUT):
            await conn.send(http_request(b"/secretsmanager/get?secretId=api-key", close=False))
            await conn.send_eof()
            assert await conn.reply() is None and await conn.closed()
    await assert_still_serving(agent)


async def test_a_slowloris_is_closed_by_the_idle_timeout_and_holds_one_slot(
    start_agent: StartAgent, autojump_clock: trio.testing.MockClock
) -> None:
    agent = await start_agent(server={"max_conn": 2})  # no httpx here: its pool would hold a slot
    request = http_request(SECRET_PATH)
    async with await RawConn.open(agent.port) as slow, trio.open_nursery() as nursery:
        started = trio.current_time()

        async def trickle() -> None:
            for byte in request[:-2]:  # never completes the head
                if not await slow.send(bytes([byte])):
                    return
                await trio.sleep(0.25)

        nursery.start_soon(trickle)
        await trio.sleep(1)
        async with await RawConn.open(agent.port) as other:
            # The slowloris holds one slot of two: another client is served meanwhile...
            await other.send(http_request(SECRET_PATH, close=False))
            assert_secret(await other.reply())
            # ...and a third connection is the one beyond MaxConn.
            beyond = await exchange(agent.port, http_request(SECRET_PATH))
            assert_4xx(beyond.reply, 429)
            with trio.fail_after(KEEP_ALIVE + 5):
                assert await slow.closed()
            closed_after = trio.current_time() - started
            nursery.cancel_scope.cancel()
            assert closed_after <= KEEP_ALIVE + 1, closed_after
            assert_4xx_or_closed(Exchange(await slow.reply(), slow.received, True))  # a 408/400, or just a close
            # Its slot is back while `other` still holds the second one.
            await trio.testing.wait_all_tasks_blocked()
            assert_secret((await exchange(agent.port, http_request(SECRET_PATH))).reply)


async def test_an_http2_preface_does_not_hold_a_slot_past_the_idle_timeout(
    start_agent: StartAgent, autojump_clock: trio.testing.MockClock
) -> None:
    agent = await start_agent(server={"max_conn": 1})
    async with await RawConn.open(agent.port) as conn:
        await conn.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        with trio.move_on_after(KEEP_ALIVE + 3):
            await conn.closed()
        assert_no_secret(conn.received)
        assert conn.eof, "the agent still holds the HTTP/2 connection (and its slot) after the idle timeout"
    await trio.testing.wait_all_tasks_blocked()
    await assert_still_serving(agent)


H2_EMPTY_SETTINGS = bytes.fromhex("000000040000000000")  # length 0, type 4, flags 0, stream 0


@pytest.mark.parametrize(
    ("request_bytes", "version"),
    [
        # An HTTP/2 client with prior knowledge: the preface, then an (empty) SETTINGS frame.
        pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + H2_EMPTY_SETTINGS, b"2.0", id="h2-preface"),
        pytest.param(http_request(b"/ping", version=b"HTTP/2.0", close=False), b"2.0", id="HTTP/2.0-line"),
        pytest.param(http_request(b"/ping", version=b"HTTP/3.0", close=False), b"3.0", id="HTTP/3.0-line"),
    ],
)
async def test_another_http_version_gets_one_readable_400_then_a_close(
    start_agent: StartAgent, request_bytes: bytes, version: bytes
) -> None:
    """Issue 11: the HTTP/2 preface got a 403 (as a request without Host), then a 400 without a body
    for "SM"; SPEC §3 serves HTTP/1.1, and says so in one answer."""
    agent = await start_agent()
    async with await RawConn.open(agent.port) as conn:
        with trio.fail_after(ANSWER_TIMEOUT):
            await conn.send(request_bytes)
            reply = await conn.reply()
            assert await conn.closed()
    assert conn.received.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert conn.received.count(b"HTTP/1.1 ") == 1
    body = assert_4xx(reply, 400).json()
    message = f"HTTP/{version.decode()} is not supported; use HTTP/1.1"
    assert (body["Code"], body["Message"]) == ("UnsupportedProtocol", message)
    assert reply is not None and reply.header(b"connection") == b"close"
    await assert_still_serving(agent)


async def test_an_h2c_upgrade_never_yields_a_secret_without_the_token(
    start_agent: StartAgent, autojump_clock: trio.testing.MockClock
) -> None:
    """Hypercorn honours `Upgrade: h2c` (SPEC §3 says HTTP/1.1): the upgraded request still goes
    through the checks, and the connection still idles out."""
    agent = await start_agent()
    upgrade = [(b"Upgrade", b"h2c"), (b"HTTP2-Settings", b"AAMAAABkAARAAAAAAAIAAAAA")]
    request = http_request(
        SECRET_PATH, token=None, headers=[(b"Connection", b"Upgrade, HTTP2-Settings"), *upgrade], close=False
    )
    async with await RawConn.open(agent.port) as conn:
        await conn.send(request)
        with trio.fail_after(KEEP_ALIVE + 5):
            await conn.closed()
        assert_no_secret(conn.received)
        assert not re.match(rb"HTTP/1\.[01] 5", conn.received)
    await assert_still_serving(agent)


async def test_http10_may_omit_host_but_not_send_a_bad_one(start_agent: StartAgent) -> None:
    """SPEC §3: "an HTTP/1.0 request may omit it" (HTTP/1.0 predates Host); the token is still needed."""
    agent = await start_agent()
    ping = await exchange(agent.port, http_request(b"/ping", host=None, version=b"HTTP/1.0", close=False))
    assert ping.reply is not None and (ping.reply.status, ping.reply.body) == (200, b"healthy")
    assert ping.closed  # HTTP/1.0 without keep-alive
    assert_secret((await exchange(agent.port, http_request(SECRET_PATH, host=None, version=b"HTTP/1.0"))).reply)
    no_token = await exchange(agent.port, http_request(SECRET_PATH, host=None, token=None, version=b"HTTP/1.0"))
    assert assert_4xx(no_token.reply, 403).json()["Code"] == "BadToken"
    for host in (b"evil.example", b""):
        result = await exchange(agent.port, http_request(SECRET_PATH, host=host, version=b"HTTP/1.0"))
        assert assert_4xx(result.reply, 403).json()["Code"] == "BadHost"
        assert_no_secret(result.received)


async def test_http10_with_host_and_token_is_served(start_agent: StartAgent) -> None:
    agent = await start_agent()
    result = await exchange(agent.port, http_request(SECRET_PATH, version=b"HTTP/1.0", close=False))
    assert_secret(result.reply)
    assert result.closed


async def test_an_absolute_form_target_is_not_routed(start_agent: StartAgent) -> None:
    """RFC 9112 §3.2.2 asks servers to accept absolute-form; the agent treats it as an unknown
    path (404 after the token check), which is safe: no secret with or without the token."""
    agent = await start_agent()
    target = b"http://localhost/secretsmanager/get?secretId=db/password"
    without = await exchange(agent.port, http_request(target, token=None))
    assert assert_4xx(without.reply, 403).json()["Code"] == "BadToken"
    assert_no_secret(without.received)
    with_token = await exchange(agent.port, http_request(target))
    assert assert_4xx(with_token.reply, 404).json()["Code"] == "NotFound"
    assert_no_secret(with_token.received)
    for evil in (b"http://evil.example/ping", b"http://evil.example/secretsmanager/get?secretId=db/password"):
        result = await exchange(agent.port, http_request(evil, token=None))
        assert_4xx(result.reply, 403)


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(
            http_request(b"/ping", headers=[(b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")])
            + b"0\r\n\r\n",
            id="CL-and-TE",
        ),
        pytest.param(
            http_request(b"/ping", headers=[(b"Content-Length", b"1"), (b"Content-Length", b"2")]) + b"ab",
            id="two-different-CL",
        ),
        pytest.param(http_request(b"/ping", headers=[(b"Content-Length", b"-1")]), id="negative-CL"),
        pytest.param(http_request(b"/ping", headers=[(b"Content-Length", b"1e3")]), id="non-numeric-CL"),
        pytest.param(
            http_request(b"/ping", headers=[(b"Transfer-Encoding", b"chunked")]) + b"zz\r\n\r\n", id="bad-chunk-size"
        ),
        pytest.param(
            http_request(b"/ping", headers=[(b"Content-Length", b"99999999999999999999")]), id="huge-CL"
        ),
    ],
)
async def test_conflicting_body_framing_is_refused_or_handled(start_agent: StartAgent, request_bytes: bytes) -> None:
    agent = await start_agent()
    result = await exchange(agent.port, request_bytes, wait_close=False)
    if result.reply is not None and result.reply.status == 200:
        assert result.reply.body == b"healthy"
    else:
        assert_4xx_or_closed(result)
    assert_no_secret(result.received)
    await assert_still_serving(agent)


@pytest.mark.parametrize(
    "framing",
    [
        [(b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")],
        [(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"0")],
    ],
    ids=["CL-then-TE", "TE-then-CL"],
)
async def test_content_length_with_transfer_encoding_is_answered_then_closed(
    start_agent: StartAgent, framing: list[tuple[bytes, bytes]]
) -> None:
    """RFC 9112 §6.1: such a request may be a smuggling attempt; whatever the answer, the
    connection closes after it, so nothing behind it is read as a request (h11 alone kept it open)."""
    agent = await start_agent()
    request = http_request(b"/ping", headers=framing, close=False) + b"0\r\n\r\n" + http_request(b"/ping", close=False)
    async with await RawConn.open(agent.port) as conn:
        with trio.fail_after(2):  # not the 5 s keep-alive timeout
            await conn.send(request)
            reply = await conn.reply()
            assert await conn.closed()
    assert conn.received.count(b"HTTP/1.1 ") == 1
    assert assert_4xx(reply, 400).json()["Code"] == "BadRequest"
    assert reply is not None and reply.header(b"connection") == b"close"


@pytest.mark.parametrize(
    "encodings",
    [[b"gzip"], [b"chunked", b"chunked"], [b"gzip, chunked"], [b"identity"]],
    ids=["gzip", "chunked-twice", "gzip-chunked", "identity"],
)
async def test_an_unsupported_transfer_encoding_is_a_4xx_not_a_501(
    start_agent: StartAgent, encodings: list[bytes]
) -> None:
    agent = await start_agent()
    headers = [(b"Transfer-Encoding", encoding) for encoding in encodings]
    result = await exchange(agent.port, http_request(SECRET_PATH, headers=headers) + b"0\r\n\r\n")
    assert_no_secret(result.received)
    assert_4xx_or_closed(result)


async def test_a_smuggled_request_behind_a_body_is_checked_on_its_own(start_agent: StartAgent) -> None:
    """Whichever framing wins, the bytes after the body are either refused or a request of their own
    that goes through every check (here: no token, so 403)."""
    agent = await start_agent()
    smuggled = http_request(SECRET_PATH, token=None)
    for framing in (
        [(b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")],
        [(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"%d" % (5 + len(smuggled)))],
        [(b"Content-Length", b"0"), (b"Content-Length", b"%d" % (5 + len(smuggled)))],
    ):
        request = http_request(b"/ping", token=None, headers=framing, close=False) + b"0\r\n\r\n" + smuggled
        async with await RawConn.open(agent.port) as conn:
            with trio.fail_after(ANSWER_TIMEOUT):
                await conn.send(request)
                first = await conn.reply()
                if first is not None and first.status == 200:
                    assert first.body == b"healthy"
                    assert_4xx(await conn.reply(), 403)
                else:
                    assert_4xx_or_closed(Exchange(first, conn.received, True))
                await conn.closed()
            assert_no_secret(conn.received)
    await assert_still_serving(agent)


async def test_a_get_with_a_body_is_served_and_the_body_is_not_a_request(start_agent: StartAgent) -> None:
    agent = await start_agent()
    body = http_request(SECRET_PATH, token=None, close=False)  # looks like a request, but is a body
    first = http_request(SECRET_PATH, headers=[(b"Content-Length", b"%d" % len(body))], close=False) + body
    async with await RawConn.open(agent.port) as conn:
        with trio.fail_after(ANSWER_TIMEOUT):
            await conn.send(first + http_request(b"/ping"))
            assert_secret(await conn.reply())
            second = await conn.reply()
            assert second is not None and (second.status, second.body) == (200, b"healthy")
            await conn.closed()
        assert conn.received.count(b"HTTP/1.1 ") == 2


async def test_a_body_that_comes_while_its_request_waits_for_kms_keeps_the_connection(
    start_agent: StartAgent, emulator: KmsEmulator
) -> None:
    """Bytes read while a request is in progress wait unparsed, but not the rest of its own body:
    that is parsed (and discarded), so the request completes and the next one is answered."""
    agent = await start_agent()
    emulator.inject(Fault(delay=0.3), times=1)
    async with await RawConn.open(agent.port) as conn:
        with trio.fail_after(ANSWER_TIMEOUT):
            await conn.send(http_request(SECRET_PATH, headers=[(b"Content-Length", b"4")], close=False))
            await trio.testing.wait_all_tasks_blocked()  # the KMS call is under way
            await conn.send(b"body" + http_request(b"/ping"))
            assert_secret(await conn.reply())
            ping = await conn.reply()
            assert ping is not None and (ping.status, ping.body) == (200, b"healthy")
            assert await conn.closed()


@pytest.mark.parametrize(
    "framing",
    [
        [(b"Content-Length", b"2000000")],
        [(b"Content-Length", b"1000")],  # announced, never sent in full
        [(b"Transfer-Encoding", b"chunked")],  # a chunk that never ends
    ],
    ids=["2MB-body", "unfinished-body", "unfinished-chunk"],
)
async def test_a_get_with_a_large_or_unfinished_body_is_answered_then_closed(
    start_agent: StartAgent, framing: list[tuple[bytes, bytes]]
) -> None:
    agent = await start_agent()
    body = b"x" * 2_000_000 if framing[0][1] == b"2000000" else b"5\r\nabc"
    async with await RawConn.open(agent.port) as conn, trio.open_nursery() as nursery:
        # The agent never reads a body, so it may stop reading (and reset) before all is sent.
        nursery.start_soon(conn.send, http_request(SECRET_PATH, headers=framing, close=False) + body)
        with trio.fail_after(ANSWER_TIMEOUT):
            assert_secret(await conn.reply())
            await conn.closed()  # the rest of the body is not taken for a next request
        nursery.cancel_scope.cancel()
    await assert_still_serving(agent)


ODD_IDS = [
    "a b", "a+b", "a#b", "a%b", "a%25b", "a&b", "a=b", "a?b", "a*b", "a~b", "a'b", 'a"b', "a;b", "a,b", "a!b",
    "a(b)", "a[b]", "a{b}", "a|b", "a\\b", "a^b", "a`b", "a<b>", "a:b", "a@b", "a$b", "é", "中文", "🔑", "\u200f",
    "\u2028", "\ufeff", "a\u00a0b", "\U0010ffff", "..", ".", "/", "//", "a/", "/a", "../ping", "x" * MAX_ID_BYTES,
    "é" * (MAX_ID_BYTES // 2),
]


async def test_odd_but_valid_secret_ids_reach_kms_and_come_back_as_its_404(start_agent: StartAgent) -> None:
    """Ids the client chooses go into a signed KMS request: whatever they hold, the agent encodes
    them so that KMS (the emulator checks signatures) answers for the id, not with a 5xx."""
    agent = await start_agent()
    for secret_id in ODD_IDS:
        for target in (
            b"/secretsmanager/get?secretId=" + quote(secret_id, safe="").encode(),
            b"/v1/" + quote(secret_id, safe="/").encode(),
        ):
            result = await exchange(agent.port, http_request(target))
            reply = assert_4xx(result.reply, 404)
            assert reply.json()["Code"] == "Forbidden.ResourceNotFound", (secret_id, reply.body)


async def test_two_host_headers_are_refused(start_agent: StartAgent) -> None:
    """RFC 9112 §3.2: 400 (h11 does it); SPEC §3: 403 BadHost (the agent's own check, if h11 did not)."""
    agent = await start_agent()
    for second in (b"localhost", b"evil.example", b"127.0.0.1"):
        result = await exchange(agent.port, http_request(SECRET_PATH, headers=[(b"Host", second)]))
        assert_4xx(result.reply, 400, 403)
        assert_no_secret(result.received)
    # A Host smuggled into another header's value by a line break is a second Host too.
    result = await exchange(agent.port, http_request(SECRET_PATH, headers=[(b"X-A", b"1\r\nHost: evil.example")]))
    assert_4xx(result.reply, 400, 403)
    assert_no_secret(result.received)


@pytest.mark.parametrize(
    ("host", "status"),
    [
        (b"localhost", 200),
        (b"LOCALHOST", 200),
        (b"LocalHost:2025", 200),
        (b"127.0.0.1:1", 200),
        (b"[::1]", 200),
        (b"[::1]:2025", 200),
        (b"localhost:99999999999999999999", 200),  # any digits: the port is not checked
        (b"localhost@evil.example", 403),
        (b"user@localhost", 403),
        (b"localhost:80@evil.example", 403),
        (b"localhost.", 403),
        (b"localhost.:2025", 403),
        (b"[0:0:0:0:0:0:0:1]", 403),
        (b"[0::1]", 403),
        (b"[::ffff:127.0.0.1]", 403),
        (b"::1", 403),
        (b"[::1", 403),
        (b"[::1]]", 403),
        (b"[::1]:", 403),
        (b"127.1", 403),
        (b"2130706433", 403),
        (b"0x7f.0.0.1", 403),
        (b"127.0.0.1.", 403),
        (b"localhost:", 403),
        (b"localhost:abc", 403),
        (b"localhost:+80", 403),
        (b"localhost: 80", 403),
        (b"localhost,evil.example", 403),
        (b"evil.example", 403),
        (b"localhost.evil.example", 403),
        (b"", 403),
    ],
)
async def test_host_variants(start_agent: StartAgent, host: bytes, status: int) -> None:
    agent = await start_agent()
    result = await exchange(agent.port, http_request(SECRET_PATH, host=host))
    if status == 200:
        assert_secret(result.reply)
    else:
        assert assert_4xx(result.reply, status).json()["Code"] == "BadHost"
        assert_no_secret(result.received)


@pytest.mark.parametrize("name", [b"Forwarded", b"X-Forwarded-For", b"x-forwarded-for", b"FORWARDED"])
async def test_forwarded_requests_are_400_even_with_the_token(start_agent: StartAgent, name: bytes) -> None:
    agent = await start_agent()
    result = await exchange(agent.port, http_request(SECRET_PATH, headers=[(name, b"for=127.0.0.1")]))
    assert assert_4xx(result.reply, 400).json()["Code"] == "Forwarded"
    assert_no_secret(result.received)


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(b"GET /ping HTTP/1.1\r\nHost : localhost\r\n\r\n", id="space-before-colon-host"),
        pytest.param(
            http_request(SECRET_PATH, token=None, headers=[(b"X-KMS-Token ", TOKEN_B)]), id="space-before-colon-token"
        ),
        pytest.param(
            http_request(SECRET_PATH, token=None, headers=[(b"X-KMS-Token\t", TOKEN_B)]), id="tab-before-colon-token"
        ),
        pytest.param(http_request(SECRET_PATH, token=None, headers=[(b"X KMS Token", TOKEN_B)]), id="spaces-in-name"),
    ],
)
async def test_whitespace_around_header_names_is_400(start_agent: StartAgent, request_bytes: bytes) -> None:
    agent = await start_agent()
    result = await exchange(agent.port, request_bytes)
    assert_4xx(result.reply, 400)
    assert_no_secret(result.received)
    assert result.closed
    await assert_still_serving(agent)


@pytest.mark.parametrize(
    ("folded", "allowed"),
    [
        # RFC 9112 §5.2: reject obs-fold with 400, or replace it by SP before interpreting the value.
        (b"X-KMS-Token:\r\n " + TOKEN_B, {400, 200}),
        (b"X-KMS-Token: " + TOKEN_B[:9] + b"\r\n " + TOKEN_B[9:], {400, 403}),
        (b"X-KMS-Token: wrong\r\n " + TOKEN_B, {400, 403}),
        (b"X-KMS-Token: " + TOKEN_B + b"\r\n\t" + TOKEN_B, {400, 403}),
        (b"X-Other: a\r\n X-KMS-Token: " + TOKEN_B, {400, 403}),
        (b"Host: localhost\r\n X-KMS-Token: " + TOKEN_B, {400}),  # a second Host, its value folded
    ],
)
async def test_obs_fold_continuation_lines(start_agent: StartAgent, folded: bytes, allowed: set[int]) -> None:
    agent = await start_agent()
    request = b"GET " + SECRET_PATH + b" HTTP/1.1\r\nHost: localhost\r\n" + folded + b"\r\nConnection: close\r\n\r\n"
    result = await exchange(agent.port, request)
    assert result.reply is not None and result.reply.status in allowed, result.received[:300]
    if result.reply.status == 200:
        assert_secret(result.reply)
    else:
        assert_4xx(result.reply)
        assert_no_secret(result.received)


async def test_obs_fold_into_the_host_or_before_the_first_header(start_agent: StartAgent) -> None:
    agent = await start_agent()
    for request in (
        b"GET " + SECRET_PATH + b" HTTP/1.1\r\nHost: local\r\n host\r\nX-KMS-Token: " + TOKEN_B + b"\r\n\r\n",
        b"GET " + SECRET_PATH + b" HTTP/1.1\r\n Host: localhost\r\nX-KMS-Token: " + TOKEN_B + b"\r\n\r\n",
    ):
        result = await exchange(agent.port, request, wait_close=False)
        assert_4xx(result.reply, 400, 403)
        assert_no_secret(result.received)


@pytest.mark.parametrize(
    ("method", "token", "status"),
    [
        (b"A" * 2000, None, 403),
        (b"A" * 2000, TOKEN_B, 405),
        (b"G" * 70_000, TOKEN_B, None),  # beyond the parser's buffer: a 4xx or a close
        (b"POST", TOKEN_B, 405),
        (b"HEAD", TOKEN_B, 405),
        (b"PRI", TOKEN_B, 405),
        (b"CONNECT", TOKEN_B, 405),
    ],
)
async def test_odd_and_long_methods(
    start_agent: StartAgent, method: bytes, token: bytes | None, status: int | None
) -> None:
    agent = await start_agent()
    result = await exchange(agent.port, http_request(SECRET_PATH, method=method, token=token), head=method == b"HEAD")
    if status is None:
        assert_4xx_or_closed(result)
    else:
        assert_4xx(result.reply, status)
        assert len(result.received) < 2000  # the method is not echoed at length
    assert_no_secret(result.received)
    await assert_still_serving(agent)


async def test_a_lowercase_get_is_treated_as_get(start_agent: StartAgent) -> None:
    """Methods are case-sensitive (RFC 9110 §9.1) but hypercorn upper-cases them; harmless, since
    the token is still required."""
    agent = await start_agent()
    assert_4xx((await exchange(agent.port, http_request(SECRET_PATH, method=b"get", token=None))).reply, 403)
    assert_secret((await exchange(agent.port, http_request(SECRET_PATH, method=b"get"))).reply)


@pytest.mark.parametrize(
    "data",
    [b"", b"\r\n", b"\r\n\r\n", b"G", b"GET", b"GET / HTTP/1.1\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"],
    ids=["nothing", "CRLF", "CRLFCRLF", "G", "GET", "request-line-only", "TLS-ClientHello"],
)
async def test_an_empty_or_partial_request_then_close(start_agent: StartAgent, data: bytes) -> None:
    agent = await start_agent()
    async with await RawConn.open(agent.port) as conn:
        await conn.send(data)
        await conn.send_eof()
        with trio.fail_after(ANSWER_TIMEOUT):
            reply = await conn.reply()
            await conn.closed()
    assert_4xx_or_closed(Exchange(reply, conn.received, True))
    await trio.testing.wait_all_tasks_blocked()
    await assert_still_serving(agent)


async def test_an_idle_connection_that_never_sends_is_closed(
    start_agent: StartAgent, autojump_clock: trio.testing.MockClock
) -> None:
    agent = await start_agent(server={"max_conn": 1})
    async with await RawConn.open(agent.port) as conn:
        started = trio.current_time()
        with trio.fail_after(KEEP_ALIVE + 5):
            await conn.closed()
        assert trio.current_time() - started <= KEEP_ALIVE + 1
        assert conn.received == b""
    await trio.testing.wait_all_tasks_blocked()
    await assert_still_serving(agent)


async def test_a_protocol_error_closes_at_once_and_frees_the_slot(start_agent: StartAgent) -> None:
    """After h11's 400 (`Connection: close`), the agent closes without waiting for the idle timeout."""
    agent = await start_agent(server={"max_conn": 1})
    async with await RawConn.open(agent.port) as conn:
        await conn.send(b"GET /ping HTTP/1.1\r\nHost : localhost\r\n\r\n")
        with trio.fail_after(2):  # not KEEP_ALIVE
            assert_4xx(await conn.reply(), 400)
            await conn.closed()
    await trio.testing.wait_all_tasks_blocked(cushion=0.05)
    with trio.fail_after(2):
        await assert_still_serving(agent)


async def test_expect_100_continue_gets_its_final_answer(start_agent: StartAgent) -> None:
    agent = await start_agent()
    for headers in ([(b"Expect", b"100-continue")], [(b"Expect", b"100-continue"), (b"Content-Length", b"2")]):
        async with await RawConn.open(agent.port) as conn:
            with trio.fail_after(ANSWER_TIMEOUT):
                await conn.send(http_request(SECRET_PATH, headers=headers))
                if (b"Content-Length", b"2") in headers:
                    await conn.send(b"{}")
                assert_secret(await conn.reply())


@pytest.mark.parametrize(("token", "status"), [(None, 403), (TOKEN_B, 200)], ids=["refused", "served"])
async def test_100_continue_is_never_sent_before_the_checks_have_decided(
    start_agent: StartAgent, token: bytes | None, status: int
) -> None:
    """Issue 10: hypercorn sent `100 Continue` as soon as it parsed the head, inviting the body of a
    request the checks then refused. The final answer comes first (RFC 9110 §10.1.1 allows it)."""
    agent = await start_agent()
    expect = [(b"Expect", b"100-continue"), (b"Content-Length", b"2")]
    async with await RawConn.open(agent.port) as conn:
        with trio.fail_after(ANSWER_TIMEOUT):
            await conn.send(http_request(SECRET_PATH, token=token, headers=expect, close=False))  # the body waits
            reply = await conn.reply()
            assert await conn.closed()  # the unread body would be taken for the next request
    assert conn.received.startswith(b"HTTP/1.1 %d " % status), conn.received[:80]
    assert b"HTTP/1.1 100" not in conn.received
    if status == 200:
        assert_secret(reply)
    else:
        assert_4xx(reply, 403)


#: Past h11's limit for an incomplete head (16 KB), and all read at once (no reset for unread bytes).
BIG_HEAD = b"GET /ping HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"b" * 20_000 + b"\r\n"
PARSER_ERRORS = [
    pytest.param(b"GET /ping HTTP/1.1\r\nHost : localhost\r\n\r\n", 400, "BadRequest", id="space-before-colon"),
    pytest.param(b"GET /ping HTTP/1.1\r\n\r\n", 400, "BadRequest", id="HTTP/1.1-without-Host"),
    pytest.param(
        http_request(b"/ping", headers=[(b"Transfer-Encoding", b"gzip")]), 400, "BadRequest", id="unknown-TE"
    ),
    pytest.param(BIG_HEAD, 431, "RequestHeaderFieldsTooLarge", id="20KB-unfinished-head"),
]


@pytest.mark.parametrize(("request_bytes", "status", "code"), PARSER_ERRORS)
@pytest.mark.parametrize("response_type", [0, 1, 2])
async def test_parser_errors_carry_the_error_body_of_spec_4(
    start_agent: StartAgent, request_bytes: bytes, status: int, code: str, response_type: int
) -> None:
    """Issue 10: h11's own 400 and 431 had an empty body; they are SPEC §4 errors like any other,
    in the configured ResponseType, and the connection closes after them."""
    agent = await start_agent(server={"response_type": response_type})
    result = await exchange(agent.port, request_bytes)
    assert result.reply is not None and result.closed
    assert result.received.startswith(b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode()))
    assert result.reply.status == status and result.reply.header(b"content-type") == b"application/json"
    assert result.reply.header(b"connection") == b"close"
    body = result.reply.json()
    if response_type == 0:
        assert (body["Code"], body["HttpStatus"]) == (code, status) and body["Message"]
    elif response_type == 1:
        assert body["__type"] == code and body["message"]
    else:
        assert body["errors"][0].startswith(code + ": ")


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        pytest.param(http_request(b"/ping"), 200, id="ping"),
        pytest.param(http_request(b"/metrics"), 200, id="metrics"),
        pytest.param(http_request(SECRET_PATH), 200, id="secret"),
        pytest.param(http_request(b"/secretsmanager/get?secretId=nope"), 404, id="kms-404"),
        pytest.param(http_request(b"/nowhere"), 404, id="not-found"),
        pytest.param(http_request(SECRET_PATH, token=None), 403, id="bad-token"),
        pytest.param(http_request(SECRET_PATH, host=b"evil.example"), 403, id="bad-host"),
        pytest.param(http_request(SECRET_PATH, method=b"POST"), 405, id="post"),
        pytest.param(http_request(SECRET_PATH, headers=[(b"Forwarded", b"for=1.2.3.4")]), 400, id="forwarded"),
        pytest.param(http_request(b"/secretsmanager/get?bogus=1"), 400, id="bad-parameter"),
        pytest.param(b"GET /ping HTTP/1.1\r\nHost : localhost\r\n\r\n", 400, id="parser-400"),
        pytest.param(BIG_HEAD, 431, id="parser-431"),
    ],
)
async def test_status_lines_carry_the_standard_reason_phrase(
    start_agent: StartAgent, request_bytes: bytes, status: int
) -> None:
    """SPEC §3 (issue 11): `HTTP/1.1 404 Not Found`, never `HTTP/1.1 404 ` (clients printed
    "HTTP Error 404: " and nothing after it)."""
    agent = await start_agent()
    result = await exchange(agent.port, request_bytes)
    status_line = result.received.split(b"\r\n", 1)[0]
    assert status_line == b"HTTP/1.1 %d %s" % (status, HTTPStatus(status).phrase.encode())


@pytest.mark.parametrize("target", [b"?secretId=db/password", b"?", b"??", b"#", b"#?secretId=db/password"])
async def test_a_target_without_a_path_is_a_4xx_not_a_500(start_agent: StartAgent, target: bytes) -> None:
    """Until 5339fed this was a 500: Quart's request construction indexed path[0] of an empty path."""
    agent = await start_agent()
    for token in (None, TOKEN_B):
        result = await exchange(agent.port, http_request(target, token=token))
        assert_no_secret(result.received)
        assert_4xx(result.reply, 403 if token is None else 404)


@pytest.mark.parametrize(
    ("host", "token", "code"),
    [(b"evil.example", None, "BadHost"), (b"localhost", None, "BadToken"), (b"localhost", TOKEN_B, None)],
)
async def test_a_websocket_upgrade_gets_the_checks_of_spec_3(
    start_agent: StartAgent, host: bytes, token: bytes | None, code: str | None
) -> None:
    agent = await start_agent()
    websocket = [
        (b"Upgrade", b"websocket"),
        (b"Connection", b"Upgrade"),
        (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
        (b"Sec-WebSocket-Version", b"13"),
    ]
    result = await exchange(
        agent.port, http_request(SECRET_PATH, host=host, token=token, headers=websocket, close=False), wait_close=False
    )
    assert_no_secret(result.received)
    reply = assert_4xx(result.reply)
    assert reply.body, "an empty body is not SPEC §4's error shape"
    if code is not None:
        assert reply.json()["Code"] == code


# --- 3. Token-bypass attempts ----------------------------------------------------------------------

# (target, status without the token, status with it, secret served with it)
PATH_TRICKS = [
    (b"/v1/../ping", 403, None, None),
    (b"/v1/%2e%2e/ping", 403, None, None),
    (b"/v1/%2E%2E/%2E%2E/ping", 403, None, None),
    (b"/v1/..%2fping", 403, None, None),
    (b"//secretsmanager/get?secretId=db/password", 403, 404, None),
    (b"/secretsmanager/get/?secretId=db/password", 403, 404, None),
    (b"/secretsmanager//get?secretId=db/password", 403, 404, None),
    (b"/secretsmanager/get;?secretId=db/password", 403, 404, None),
    (b"/secretsmanager/get%3FsecretId=db/password", 403, 404, None),
    (b"/secretsmanager/%67et?secretId=db/password", 403, 404, None),
    (b"/SECRETSMANAGER/GET?secretId=db/password", 403, 404, None),
    (b"/%70ing", 403, 404, None),
    (b"/PING", 403, 404, None),
    (b"/ping/", 403, 404, None),
    (b"//ping", 403, 404, None),
    (b"/ping;", 403, 404, None),
    (b"/ping?x", 200, 200, None),
    (b"/ping?secretId=db/password", 200, 200, None),
    (b"/ping#/../secretsmanager/get?secretId=db/password", 403, 404, None),
    (b"/ping/../secretsmanager/get?secretId=db/password", 403, 404, None),
    (b"/metrics/../secretsmanager/get?secretId=db/password", 403, 404, None),
    (b"/metrics?secretId=db/password", 200, 200, None),
    (b"/v1/../secretsmanager/get?secretId=db/password", 403, 400, None),
    (b"/v1/%2e%2e/secretsmanager/get?secretId=db/password", 403, 400, None),
    (b"/secretsmanager/get?secretId=db/password#x", 403, None, None),
    (b"/secretsmanager/get?secretId=db/password&secretId=api-key", 403, 400, None),
    (b"/secretsmanager/get?secretid=db/password", 403, 400, None),
    (b"/secretsmanager/get?secretId=db/password&X-KMS-Token=" + TOKEN_B, 403, 400, None),
    (b"/secretsmanager/get?X-KMS-Token=" + TOKEN_B + b"&secretId=db/password", 403, 400, None),
    (b"/v1//db/password", 403, None, None),
    (b"/v1/db/password/", 403, None, None),
    (b"/v1", 403, 404, None),
    (b"/v1/db/password", 403, 200, "db/password"),
    (b"/v1/db%2Fpassword", 403, 200, "db/password"),
    (b"/v1/db%2fpassword?versionStage=ACSCurrent", 403, 200, "db/password"),
    (b"/secretsmanager/get?secretId=db%2Fpassword", 403, 200, "db/password"),
    (b"/secretsmanager/get?secret%49d=db/password", 403, 200, "db/password"),
    (b"/secretsmanager/get?&&secretId=db/password&&", 403, 200, "db/password"),
]


@pytest.mark.parametrize(
    ("target", "without", "with_token", "secret"),
    PATH_TRICKS,
    ids=[row[0].decode("latin-1")[:60] for row in PATH_TRICKS],
)
async def test_path_tricks_never_skip_the_token(
    start_agent: StartAgent, target: bytes, without: int, with_token: int | None, secret: str | None
) -> None:
    agent = await start_agent()
    result = await exchange(agent.port, http_request(target, token=None))
    assert result.reply is not None and result.reply.status == without, result.received[:300]
    if without == 403:
        assert assert_4xx(result.reply).json()["Code"] == "BadToken"
    assert_no_secret(result.received)

    result = await exchange(agent.port, http_request(target))
    if secret is not None:
        assert_secret(result.reply, secret)
        return
    assert_no_secret(result.received)
    if with_token == 200:
        assert result.reply is not None and result.reply.status == 200
    else:
        # None: the id goes to KMS, which answers for itself (404 for a name it does not hold).
        assert_4xx(result.reply, *([with_token] if with_token else []))


# (headers carrying the token, served) — names are case-insensitive and OWS around a value is not
# part of it (RFC 9110 §5.1, §5.5); SPEC §3: *any* SSRF header equal to the token opens the door.
TOKEN_HEADERS = [
    ([(b"X-KMS-Token", TOKEN_B)], True),
    ([(b"x-kms-token", TOKEN_B)], True),
    ([(b"X-KMS-TOKEN", TOKEN_B)], True),
    ([(b"x-KmS-tOkEn", TOKEN_B)], True),
    ([(b"X-Vault-Token", TOKEN_B)], True),
    ([(b"X-KMS-Token", b"  " + TOKEN_B + b"  ")], True),
    ([(b"X-KMS-Token", b"\t" + TOKEN_B + b"\t")], True),
    ([(b"X-KMS-Token", b"wrong"), (b"X-KMS-Token", TOKEN_B)], True),
    ([(b"X-KMS-Token", TOKEN_B), (b"X-KMS-Token", b"wrong")], True),
    ([(b"X-KMS-Token", b"wrong"), (b"X-Vault-Token", TOKEN_B)], True),
    ([(b"X-KMS-Token", b"")], False),
    ([(b"X-KMS-Token", TOKEN_B.upper())], False),
    ([(b"X-KMS-Token", TOKEN_B.lower() if TOKEN_B.lower() != TOKEN_B else TOKEN_B.swapcase())], False),
    ([(b"X-KMS-Token", TOKEN_B[:-1])], False),
    ([(b"X-KMS-Token", TOKEN_B + b"x")], False),
    ([(b"X-KMS-Token", b"x" + TOKEN_B)], False),
    ([(b"X-KMS-Token", TOKEN_B + b" " + TOKEN_B)], False),
    ([(b"X-KMS-Token", b"wrong, " + TOKEN_B)], False),
    ([(b"X-KMS-Token", TOKEN_B + b", " + TOKEN_B)], False),
    ([(b"X-KMS-Token", b'"' + TOKEN_B + b'"')], False),
    ([(b"X-KMS-Token", b"Bearer " + TOKEN_B)], False),
    ([(b"X-KMS-Token", TOKEN_B + b"\xff")], False),
    ([(b"X-KMS-Token", TOKEN_B.replace(b"-", b"%2D"))], False),
    ([(b"Authorization", b"Bearer " + TOKEN_B)], False),
    ([(b"Cookie", b"X-KMS-Token=" + TOKEN_B)], False),
    ([(b"X_KMS_Token", TOKEN_B)], False),
    ([(b"X-KMS-Token2", TOKEN_B)], False),
    ([(b"X-KMS", TOKEN_B)], False),
    ([(b"KMS-Token", TOKEN_B)], False),
    ([(b"X-Vault-Namespace", TOKEN_B)], False),
    ([(b"X-Forwarded-KMS-Token", TOKEN_B)], False),
    ([], False),
]


@pytest.mark.parametrize(("headers", "served"), TOKEN_HEADERS, ids=[repr(row[0])[:70] for row in TOKEN_HEADERS])
async def test_only_the_exact_token_in_an_ssrf_header_opens_a_secret(
    start_agent: StartAgent, headers: list[tuple[bytes, bytes]], served: bool
) -> None:
    agent = await start_agent()
    for target in (SECRET_PATH, b"/v1/db/password"):
        result = await exchange(agent.port, http_request(target, token=None, headers=headers))
        if served:
            assert_secret(result.reply)
        else:
            assert assert_4xx(result.reply, 403).json()["Code"] == "BadToken"
            assert_no_secret(result.received)


async def test_the_token_is_not_taken_from_a_non_ssrf_header_even_if_configured_elsewhere(
    start_agent: StartAgent,
) -> None:
    agent = await start_agent(server={"ssrf_headers": ("X-Custom-Auth",)})
    for name, served in (
        (b"X-Custom-Auth", True), (b"x-custom-auth", True), (b"X-KMS-Token", False), (b"X-Vault-Token", False)
    ):
        result = await exchange(agent.port, http_request(SECRET_PATH, token=None, headers=[(name, TOKEN_B)]))
        if served:
            assert_secret(result.reply)
        else:
            assert_4xx(result.reply, 403)
            assert_no_secret(result.received)


async def test_a_valid_token_does_not_excuse_a_bad_host_or_a_forwarded_header(start_agent: StartAgent) -> None:
    agent = await start_agent()
    for host, extra, status in (
        (b"evil.example", [], 403),
        (None, [], 400),  # h11 refuses an HTTP/1.1 request without Host (RFC 9112 §3.2)
        (b"localhost", [(b"Forwarded", b"for=10.0.0.1")], 400),
        (b"localhost", [(b"X-Forwarded-For", b"10.0.0.1")], 400),
        (b"localhost", [(b"X-Forwarded-For", b"")], 400),
    ):
        result = await exchange(agent.port, http_request(SECRET_PATH, host=host, headers=extra))
        assert_4xx(result.reply, status)
        assert_no_secret(result.received)
