"""SPEC §3's checks, in SPEC §3's order, over the raw parts of a request.

A pure function of bytes so that the order is testable on its own and nothing the client sends is
decoded before the check that needs it. It answers which route the request is for, or raises the
`AgentError` of the first check that fails.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from kmsagent.config import ServerConfig, is_role_arn
from kmsagent.errors import AgentError

MAX_ID_BYTES = 1024
DEFAULT_STAGE = "ACSCurrent"
SECRETS_MANAGER_PATH = b"/secretsmanager/get"
ALLOWED_HOSTS = frozenset({b"localhost", b"127.0.0.1", b"[::1]"})
REFRESH_VALUES = {"true": True, "1": True, "false": False, "0": False}
Headers = Sequence[tuple[bytes, bytes]]
#: (role, secretId, versionId, versionStage): SPEC §5; role "" is the agent's own credentials.
CacheKey = tuple[str, str, str, str]


class Route(enum.Enum):
    PING = b"/ping"
    METRICS = b"/metrics"


@dataclass(frozen=True)
class SecretQuery:
    """A valid secret request, with SPEC §3's defaults applied."""

    secret_id: str
    version_id: str = ""
    version_stage: str = DEFAULT_STAGE
    refresh: bool = False
    #: A per-request role's ARN, its name lower-cased (RAM names ignore case); "" = the agent's own.
    role: str = ""

    @property
    def cache_key(self) -> CacheKey:
        return (self.role, self.secret_id, self.version_id, self.version_stage)


def check_request(
    *,
    method: str,
    path: bytes,
    query_string: bytes,
    headers: Headers,
    over_limit: bool,
    config: ServerConfig,
    token_matches: Callable[[Sequence[bytes]], bool],
    http_version: str = "1.1",
) -> Route | SecretQuery:
    """Runs the checks of SPEC §3 in order; `headers` have lower-case names, as in ASGI, and
    `http_version` is the ASGI scope's ("1.0", "1.1")."""
    route = Route(path) if path in (Route.PING.value, Route.METRICS.value) else None
    if over_limit and route is not Route.PING:
        raise AgentError(429, "ConnectionLimitExceeded", f"more than {config.max_conn} connections open")
    if any(name in (b"x-forwarded-for", b"forwarded") for name, _ in headers):
        raise AgentError(400, "Forwarded", "forwarded requests are refused: call the agent directly")
    _check_host(headers, optional=http_version == "1.0")
    if route is None:
        wanted = {name.lower().encode() for name in config.ssrf_headers}
        if not token_matches([value for name, value in headers if name in wanted]):
            raise AgentError(403, "BadToken", f"missing or wrong token header ({', '.join(config.ssrf_headers)})")
    if method != "GET":
        raise AgentError(405, "MethodNotAllowed", f"method {method[:16]!r} is not allowed; use GET")
    if route is not None:
        return route
    if path == SECRETS_MANAGER_PATH:
        params = _parse_query(query_string, ("secretId", "versionId", "versionStage", "refreshNow", "roleArn"))
        return _secret_query(params.pop("secretId", ""), params)
    prefix = config.path_prefix.encode()
    if path.startswith(prefix):
        params = _parse_query(query_string, ("versionId", "versionStage", "refreshNow", "roleArn"))
        return _secret_query(_decode(path[len(prefix) :], "secret id"), params)
    raise AgentError(404, "NotFound", "unknown path")


def _check_host(headers: Headers, *, optional: bool) -> None:
    """SPEC §3: one loopback Host; HTTP/1.0 predates Host, so there it may be missing."""
    hosts = [value for name, value in headers if name == b"host"]
    if not hosts and optional:
        return
    if len(hosts) != 1 or _host_name(hosts[0]) not in ALLOWED_HOSTS:
        raise AgentError(403, "BadHost", "Host must be localhost, 127.0.0.1 or [::1]")


def _host_name(host: bytes) -> bytes:
    """`host` without its `:port`, lower-cased; b"" when the port part is not digits."""
    if host.startswith(b"["):
        end = host.find(b"]") + 1
        name, rest = (host[:end], host[end:]) if end else (b"", b"")
    else:
        name, colon, port = host.partition(b":")
        rest = colon + port
    if rest and not (rest.startswith(b":") and rest[1:].isdigit()):
        return b""
    return name.lower()


def _parse_query(query_string: bytes, allowed: tuple[str, ...]) -> dict[str, str]:
    params: dict[str, str] = {}
    for part in query_string.split(b"&"):
        if not part:
            continue
        raw_name, _, raw_value = part.partition(b"=")
        name = _decode(raw_name.replace(b"+", b" "), "parameter name")
        if name not in allowed:
            raise AgentError(
                400, "UnknownParameter", f"unknown parameter {name[:64]!r} (allowed: {', '.join(allowed)})"
            )
        if name in params:
            raise AgentError(400, "InvalidParameter", f"parameter {name} is repeated")
        params[name] = _decode(raw_value.replace(b"+", b" "), name)
    return params


def _secret_query(secret_id: str, params: dict[str, str]) -> SecretQuery:
    if not secret_id:
        raise AgentError(400, "MissingParameter", "secretId is missing or empty")
    for name, value in (("secretId", secret_id), *params.items()):
        if len(value.encode()) > MAX_ID_BYTES:
            raise AgentError(400, "InvalidParameter", f"{name} is longer than {MAX_ID_BYTES} bytes")
        if name in ("versionId", "versionStage") and not value:
            raise AgentError(400, "InvalidParameter", f"{name} is empty")
    refresh_text = params.get("refreshNow", "false")
    if refresh_text not in REFRESH_VALUES:
        raise AgentError(400, "InvalidParameter", "refreshNow must be true, false, 1 or 0")
    version_id = params.get("versionId", "")
    # KMS rejects a VersionId beside a stage it does not carry, so the default stage goes alone.
    version_stage = params.get("versionStage", "" if version_id else DEFAULT_STAGE)
    role = params.get("roleArn", "")
    if "roleArn" in params and not is_role_arn(role):  # AllowedRoleArns is the store's check, next in order
        raise AgentError(400, "InvalidParameter", "roleArn must be acs:ram::<account-id>:role/<name>")
    return SecretQuery(secret_id, version_id, version_stage, REFRESH_VALUES[refresh_text], role.lower())


def _decode(raw: bytes, what: str) -> str:
    """Percent-decodes `raw` as UTF-8; anything else is the client's error, not ours."""
    try:
        text = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise AgentError(400, "InvalidParameter", f"{what} is not valid percent-encoded UTF-8") from None
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in text):
        raise AgentError(400, "InvalidParameter", f"{what} contains control characters")
    return text
