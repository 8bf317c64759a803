"""The agent's configuration: SPEC §2's TOML file as frozen, validated dataclasses.

Every key is optional and defaulted here; unknown sections or keys, wrong types and values out of
range raise `ConfigError`, whose message is the one stderr line the CLI prints before exit 2.
"""

from __future__ import annotations

import grp
import ipaddress
import json
import os
import pwd
import re
import shutil
import signal
import stat
import tempfile
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple, TypeGuard
from urllib.parse import urlsplit


class ConfigError(ValueError):
    """A user-caused configuration problem; `str()` is one line naming key, value and what is allowed."""


@dataclass(frozen=True)
class ServerConfig:
    http_port: int = 2025
    max_conn: int = 800
    ssrf_headers: tuple[str, ...] = ("X-KMS-Token", "X-Vault-Token")
    ssrf_env_variables: tuple[str, ...] = (
        "KMS_TOKEN",
        "KMS_SESSION_TOKEN",
        "KMS_CONTAINER_AUTHORIZATION_TOKEN",
    )
    path_prefix: str = "/v1/"
    response_type: int = 0
    ignore_transient_errors: bool = True
    bind_ipv6: bool = False
    unix_socket: str = ""
    unix_socket_mode: str = "0660"
    unix_socket_group: str = ""
    request_timeout_ms: int = 30000
    max_wait_seconds: int = 300


@dataclass(frozen=True)
class CacheConfig:
    cache_size: int = 1000
    ttl_seconds: int = 300
    max_stale_seconds: int = 0
    prefetch: tuple[str, ...] = ()
    not_found_ttl_seconds: int = 5


@dataclass(frozen=True)
class KmsConfig:
    region: str = "cn-hangzhou"
    endpoint: str = ""
    protocol: str = "https"
    ca_file_path: str = ""
    connect_timeout_ms: int = 3000
    read_timeout_ms: int = 5000
    max_retries: int = 3
    max_concurrent_requests: int = 8
    fallback_endpoints: tuple[str, ...] = ()
    batch_refresh: bool = True

    @property
    def effective_endpoint(self) -> str:
        """`Endpoint`, or the shared gateway of `Region` when it is empty."""
        return self.endpoint or f"kms.{self.region}.aliyuncs.com"

    @property
    def endpoints(self) -> tuple[str, ...]:
        """Every endpoint in the order they are tried: the primary, then `FallbackEndpoints`."""
        return (self.effective_endpoint, *self.fallback_endpoints)


@dataclass(frozen=True)
class CredentialsConfig:
    type: str = "auto"
    role_name: str = ""
    metadata_endpoint: str = "http://100.100.100.200"
    disable_imdsv1: bool = False
    renew_before_seconds: int = 900
    role_arn: str = ""
    role_session_name: str = "kmsagent"
    duration_seconds: int = 3600
    external_id: str = ""
    policy: str = ""
    source_type: str = "auto"
    sts_endpoint: str = ""
    sts_protocol: str = "https"
    profile: str = ""
    cli_config_path: str = ""
    credentials_file: str = ""
    credentials_uri: str = ""
    allowed_role_arns: tuple[str, ...] = ()


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    path: str = "./logs/"
    max_file_size_mb: int = 100
    backups: int = 2
    format: str = "json"


# --- [Exec] and [[Files]] (SPEC §8, §9) -----------------------------------------------------------


@dataclass(frozen=True)
class ExecConfig:
    command: tuple[str, ...] = ()
    #: (NAME, "secretId" or "secretId#jsonKey") pairs, in file order (a tuple keeps Config hashable).
    env: tuple[tuple[str, str], ...] = ()
    on_change: str = "restart"
    stop_timeout_seconds: int = 10
    stop_signal: str = "SIGTERM"

    @property
    def env_secrets(self) -> tuple[str, ...]:
        """The distinct secret ids that Env names, in order."""
        return tuple(dict.fromkeys(reference.partition("#")[0] for _, reference in self.env))


@dataclass(frozen=True)
class FileConfig:
    """One `[[Files]]` table; `uid`/`gid` are Owner/Group resolved when the config was loaded."""

    secret_id: str
    path: str
    version_stage: str = "ACSCurrent"
    json_key: str = ""
    template: str = ""
    mode: int = 0o600
    owner: str = ""
    group: str = ""
    on_change: tuple[str, ...] = ()
    uid: int | None = None
    gid: int | None = None


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    kms: KmsConfig = field(default_factory=KmsConfig)
    credentials: CredentialsConfig = field(default_factory=CredentialsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    exec: ExecConfig = field(default_factory=ExecConfig)
    files: tuple[FileConfig, ...] = ()


# --- Messages and TOML output ---------------------------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_SHOW_LIMIT = 60

# TOML basic strings must escape `"`, `\` and control characters other than tab (TOML 1.0 §String).
_TOML_ESCAPES = str.maketrans(
    {chr(c): f"\\u{c:04X}" for c in (*range(0x20), 0x7F)}
    | {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
)


def _show(value: object) -> str:
    """`repr` cut to a length that keeps the error on one readable line (repr escapes newlines)."""
    text = repr(value)
    return text if len(text) <= _SHOW_LIMIT else text[: _SHOW_LIMIT - 3] + "..."


def _show_path(path: object) -> str:
    """A path in full (it is what the reader needs to find), unless it is absurdly long."""
    text = repr(path)
    return text if len(text) <= 4 * _SHOW_LIMIT else _show(path)


def _show_name(name: str) -> str:
    """A section or key name as typed; quoted TOML keys may hold anything, so those are repr'd."""
    return name if _BARE_KEY.fullmatch(name) else _show(name)


def _toml_key(name: str) -> str:
    return name if _BARE_KEY.fullmatch(name) else _toml_string(name)


def _toml_table(pairs: tuple[tuple[str, str], ...]) -> str:
    """An inline table of strings, for (name, text) pairs such as `[Exec] Env`."""
    return "{" + ", ".join(f"{_toml_key(name)} = {_toml_string(text)}" for name, text in pairs) + "}"


def _toml_string(text: str) -> str:
    """A TOML basic string; json.dumps would leave DEL raw or split astral chars into surrogates."""
    return '"' + text.translate(_TOML_ESCAPES) + '"'


def _toml_value(value: object) -> str:
    """The TOML literal for the value types the dataclasses hold: bool, int, str, tuple of str."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_string(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


# --- Validators --------------------------------------------------------------------------------
# A validator takes the raw TOML value and returns what the dataclass stores (lists become tuples),
# or raises `_Invalid` with the "what is allowed" half of the message; `parse_config` adds the
# section, key and value, so every message has the same shape.

_Check = Callable[[Any], Any]


class _Invalid(Exception):
    """Raised by a validator; `str()` says what the key allows."""


def _is_int(value: object) -> TypeGuard[int]:
    """TOML integers only: `bool` is an `int` subclass in Python, but `true` is not a number."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_text(value: object) -> TypeGuard[str]:
    """A `str` that TOML can carry: lone surrogates (only from a hand-built dict) have no UTF-8."""
    if not isinstance(value, str):
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _int_in(low: int, high: int) -> _Check:
    """An integer in `low..high`, inclusive."""

    def check(value: Any) -> int:
        if _is_int(value) and low <= value <= high:
            return value
        raise _Invalid(f"must be an integer in {low}..{high}")

    return check


def _http_port(value: Any) -> int:
    """0 asks the OS for a free port (tests); otherwise an unprivileged port."""
    if _is_int(value) and (value == 0 or 1024 <= value <= 65535):
        return value
    raise _Invalid("must be 0 or an integer in 1024..65535")


def _bool(value: Any) -> bool:
    """A TOML boolean; 0/1 and "true" are refused rather than guessed at."""
    if isinstance(value, bool):
        return value
    raise _Invalid("must be true or false")


def _text(allowed: str, ok: Callable[[str], object] = lambda text: True) -> _Check:
    """A string that `ok` accepts; `allowed` describes it."""

    def check(value: Any) -> str:
        if _is_text(value) and ok(value):
            return value
        raise _Invalid(allowed)

    return check


def _one_of(*choices: str) -> _Check:
    """One of a fixed set of words, case-sensitive like the Alibaba agent's config."""
    allowed = "must be one of " + ", ".join(_toml_string(choice) for choice in choices)
    return _text(allowed, choices.__contains__)


def _list_of(
    allowed: str, item_ok: Callable[[str], object], *, non_empty: bool, unique_nocase: bool = False
) -> _Check:
    """A TOML array of strings that `item_ok` accepts, as a tuple so the config stays hashable."""

    def check(value: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or (non_empty and not value):
            raise _Invalid(allowed)
        seen: set[str] = set()
        for item in value:
            if not (_is_text(item) and item_ok(item)):
                raise _Invalid(f"{allowed}; bad item: {_show(item)}")
            if unique_nocase and item.lower() in seen:
                raise _Invalid(f"{allowed}; duplicate: {_show(item)}")
            seen.add(item.lower())
        return tuple(value)

    return check


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 7230 `token`
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_REGION = re.compile(r"[a-z0-9-]+")
_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*")
_PORT = re.compile(r"[0-9]{1,5}")
_ROLE_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")  # it becomes a path segment of the metadata URL
_ROLE_ARN = re.compile(r"acs:ram::[0-9]{1,32}:role/[A-Za-z0-9._@-]{1,64}")
_SESSION_NAME = re.compile(r"[A-Za-z0-9_.@-]{2,64}")  # STS's RoleSessionName rule
_EXTERNAL_ID = re.compile(r"[A-Za-z0-9_+=,.@:/-]{2,1224}")  # STS's ExternalId rule
#: An inline policy is a short JSON document; the bound keeps a pasted file out of every STS call.
_MAX_POLICY = 8192


def _is_path_prefix(text: str) -> bool:
    """Routes are matched on the raw path, so the prefix must not need or contain escaping."""
    return (
        text.startswith("/")
        and text.endswith("/")
        and not any(c in "?#%" or c.isspace() or not c.isprintable() for c in text)
    )


def _is_hostname(host: str) -> bool:
    """A DNS name or dotted IPv4 address (a numeric last label must make a real IPv4 address)."""
    if len(host) > 253 or not _HOSTNAME.fullmatch(host):
        return False
    if host.rsplit(".", 1)[-1].isdigit():
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
    return True


def _authority_host(text: str) -> str | None:
    """The host of `host[:port]` (IPv6 in brackets, returned without them), or None if malformed."""
    if text.startswith("["):
        host, closed, rest = text[1:].partition("]")
        if not closed:
            return None
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
    else:
        host, _, _ = text.partition(":")
        rest = text[len(host) :]
        if not _is_hostname(host):
            return None
    if rest:
        port = rest.removeprefix(":")
        if port == rest or not _PORT.fullmatch(port) or not 1 <= int(port) <= 65535:
            return None
    return host


def _is_loopback(host: str) -> bool:
    """`localhost`, 127.0.0.0/8 or ::1: the only places a plain-http "KMS" may live (emulators)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_readable_file(path: str) -> bool:
    """Checked at load so a wrong CA path fails `--check-config`, not the first TLS handshake."""
    return os.path.isfile(path) and os.access(path, os.R_OK)


def is_role_arn(text: str) -> bool:
    """`acs:ram::<account-id>:role/<name>`, the only form a RoleArn or roleArn= may take."""
    return _ROLE_ARN.fullmatch(text) is not None


def is_credentials_uri(text: str) -> bool:
    """An https:// URL, or http:// to a loopback or link-local address (credentials in clear
    text may only cross the host or the link); no user info, no fragment."""
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc or parts.fragment:
        return False
    authority = parts.netloc
    if _authority_host(authority) is None or (port is not None and port == 0):
        return False
    if any(c.isspace() or not c.isprintable() for c in text):
        return False
    if parts.scheme == "https":
        return True
    host = parts.hostname
    if _is_loopback(host):
        return True
    try:
        return ipaddress.ip_address(host).is_link_local
    except ValueError:
        return False


def _is_policy(text: str) -> bool:
    if len(text) > _MAX_POLICY:
        return False
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _is_path_text(text: str) -> bool:
    """A file path as typed: no NUL or other control characters."""
    return all(c.isprintable() for c in text)


def _metadata_endpoint(value: Any) -> str:
    """A base URL without path; the trailing slash is dropped so callers can append `/latest/...`."""
    allowed = 'must be an http:// or https:// URL of a host[:port], no path (e.g. "http://10.0.0.1")'
    if _is_text(value):
        for scheme in ("http://", "https://"):
            authority = value.removeprefix(scheme)
            if authority != value:
                authority = authority.removesuffix("/")
                if _authority_host(authority) is not None:
                    return scheme + authority
    raise _Invalid(allowed)


# --- The table: every TOML key, in SPEC §2 order --------------------------------------------------


class _Key(NamedTuple):
    """One config key: where it lives in TOML, which dataclass field it fills, how it is checked."""

    section: str
    key: str
    field_name: str
    check: _Check
    #: Its TOML form in `dump_config`.
    toml: Callable[[Any], str] = _toml_value


_SECTIONS: dict[str, tuple[str, type]] = {
    "Server": ("server", ServerConfig),
    "Cache": ("cache", CacheConfig),
    "KMS": ("kms", KmsConfig),
    "Credentials": ("credentials", CredentialsConfig),
    "Log": ("log", LogConfig),
    "Exec": ("exec", ExecConfig),
}

_ssrf_headers = _list_of(
    "must be a non-empty list of distinct HTTP header names (RFC 7230 token characters)",
    _HEADER_NAME.fullmatch,
    non_empty=True,
    unique_nocase=True,
)
_ssrf_env_variables = _list_of(
    "must be a non-empty list of environment variable names ([A-Za-z_][A-Za-z0-9_]*)",
    _ENV_NAME.fullmatch,
    non_empty=True,
)
_path_prefix = _text(
    'must start and end with "/" and contain no "?", "#", "%", whitespace or control characters',
    _is_path_prefix,
)
_prefetch = _list_of(
    "must be a list of secret names, each 1..1024 UTF-8 bytes",
    lambda name: 0 < len(name.encode()) <= 1024,
    non_empty=False,
)
_region = _text("must be a non-empty string of [a-z0-9-]", _REGION.fullmatch)
_endpoint = _text(
    'must be "" or host[:port] (no scheme or path; IPv6 in brackets; port 1..65535)',
    lambda text: text == "" or _authority_host(text) is not None,
)
_ca_file_path = _text(
    'must be "" or the path of an existing, readable file',
    lambda path: path == "" or _is_readable_file(path),
)
#: Replicas beyond this would only lengthen a failing call: each is tried once per call.
MAX_FALLBACK_ENDPOINTS = 5
_endpoint_list = _list_of(
    f"must be a list of at most {MAX_FALLBACK_ENDPOINTS} distinct host[:port] (no scheme or path; IPv6 in brackets)",
    lambda text: _authority_host(text) is not None,
    non_empty=False,
    unique_nocase=True,
)


def _fallback_endpoints(value: Any) -> tuple[str, ...]:
    endpoints: tuple[str, ...] = _endpoint_list(value)
    if len(endpoints) > MAX_FALLBACK_ENDPOINTS:
        raise _Invalid(f"must be a list of at most {MAX_FALLBACK_ENDPOINTS} distinct host[:port]")
    return endpoints

_role_name = _text(
    'must be "" (discover it) or a RAM role name of 1..64 characters [A-Za-z0-9._@-]',
    lambda name: name == "" or _ROLE_NAME.fullmatch(name),
)
_CREDENTIAL_TYPES = (
    "auto",
    "access_key",
    "sts",
    "ecs_ram_role",
    "oidc_role_arn",
    "ram_role_arn",
    "cli_profile",
    "credentials_file",
    "credentials_uri",
)
_credentials_type = _one_of(*_CREDENTIAL_TYPES)
_source_type = _one_of(*(kind for kind in _CREDENTIAL_TYPES if kind != "ram_role_arn"))
_role_arn = _text('must be "" or acs:ram::<account-id>:role/<name>', lambda text: text == "" or is_role_arn(text))
_role_session_name = _text("must be 2..64 characters of [A-Za-z0-9_.@-] (STS's rule)", _SESSION_NAME.fullmatch)
_external_id = _text(
    'must be "" or 2..1224 characters of [A-Za-z0-9_+=,.@:/-] (STS\'s rule)',
    lambda text: text == "" or _EXTERNAL_ID.fullmatch(text),
)
_policy = _text(
    f'must be "" or a JSON object (a RAM policy document) of at most {_MAX_POLICY} characters',
    lambda text: text == "" or _is_policy(text),
)
_profile = _text(
    'must be "" or a profile name of at most 128 printable characters',
    lambda text: len(text) <= 128 and text.isprintable(),
)
_file_path = _text('must be "" or a file path (no control characters)', _is_path_text)
_credentials_uri = _text(
    'must be "" or an https:// URL, or an http:// URL of a loopback or link-local address',
    lambda text: text == "" or is_credentials_uri(text),
)
_allowed_role_arns = _list_of(
    "must be a list of distinct role ARNs, acs:ram::<account-id>:role/<name>",
    is_role_arn,
    non_empty=False,
    unique_nocase=True,
)

# --- [Exec] keys (SPEC §9) ---------------------------------------------------------------------------

#: Signals a name may choose: the catchable ones a program may use to stop or reload.
_SIGNALS = tuple(sorted({sig.name for sig in signal.Signals} - {"SIGKILL", "SIGSTOP"}))
_ENV_REFERENCE = re.compile(r"[^#]{1,1024}(?:#[^#]+)?")


def _is_signal_name(name: str) -> bool:
    return name in _SIGNALS and not name.startswith("SIGRT")


def _argv(allowed: str) -> _Check:
    """A program and its arguments: a list of strings, the first one not empty, no NUL anywhere."""

    def check(value: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or (value and not (_is_text(value[0]) and value[0])):
            raise _Invalid(allowed)
        for item in value:
            if not _is_text(item) or "\0" in item:
                raise _Invalid(f"{allowed}; bad item: {_show(item)}")
        return tuple(value)

    return check


def _exec_env(value: Any) -> tuple[tuple[str, str], ...]:
    allowed = 'must be a table of NAME = "secretId" or "secretId#jsonKey" (NAME: [A-Za-z_][A-Za-z0-9_]*)'
    if not isinstance(value, dict):
        raise _Invalid(allowed)
    for name, reference in value.items():
        if not (_ENV_NAME.fullmatch(name) and _is_text(reference) and _ENV_REFERENCE.fullmatch(reference)):
            raise _Invalid(f"{allowed}; bad entry: {_show_name(name)} = {_show(reference)}")
    return tuple(value.items())


def _exec_on_change(value: Any) -> str:
    if _is_text(value) and (value in ("restart", "none") or _is_signal_name(value)):
        return value
    raise _Invalid('must be "restart", "none" or a signal name such as "SIGHUP"')


_stop_signal = _text('must be a signal name such as "SIGTERM" (not SIGKILL or SIGSTOP)', _is_signal_name)

_EXEC_KEYS = (
    _Key("Exec", "Command", "command", _argv("must be a list of strings: the program, then its arguments")),
    _Key("Exec", "Env", "env", _exec_env, _toml_table),
    _Key("Exec", "OnChange", "on_change", _exec_on_change),
    _Key("Exec", "StopTimeoutSeconds", "stop_timeout_seconds", _int_in(1, 3600)),
    _Key("Exec", "StopSignal", "stop_signal", _stop_signal),
)


#: sun_path holds 108 bytes, the last one a NUL.
MAX_SOCKET_PATH = 107
_unix_socket = _text(
    f'must be "" or an absolute path of at most {MAX_SOCKET_PATH} bytes, not ending in "/"',
    lambda path: path == ""
    or (
        os.path.isabs(path)
        and not path.endswith("/")
        and "\0" not in path
        and len(os.fsencode(path)) <= MAX_SOCKET_PATH
    ),
)
_unix_socket_mode = _text(
    'must be octal permission bits within 0777, as a string such as "0660"',
    lambda mode: re.fullmatch(r"[0-7]{3,4}", mode) is not None and int(mode, 8) <= 0o777,
)
_unix_socket_group = _text(
    'must be "" (the agent\'s primary group), a group name or a numeric gid',
    lambda group: group == "" or group.isdecimal() or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*\$?", group) is not None,
)

_KEYS: tuple[_Key, ...] = (
    _Key("Server", "HttpPort", "http_port", _http_port),
    _Key("Server", "MaxConn", "max_conn", _int_in(1, 1000)),
    _Key("Server", "SSRFHeaders", "ssrf_headers", _ssrf_headers),
    _Key("Server", "SSRFEnvVariables", "ssrf_env_variables", _ssrf_env_variables),
    _Key("Server", "PathPrefix", "path_prefix", _path_prefix),
    _Key("Server", "ResponseType", "response_type", _int_in(0, 2)),
    _Key("Server", "IgnoreTransientErrors", "ignore_transient_errors", _bool),
    _Key("Server", "BindIPv6", "bind_ipv6", _bool),
    _Key("Server", "UnixSocket", "unix_socket", _unix_socket),
    _Key("Server", "UnixSocketMode", "unix_socket_mode", _unix_socket_mode),
    _Key("Server", "UnixSocketGroup", "unix_socket_group", _unix_socket_group),
    _Key("Server", "RequestTimeoutMs", "request_timeout_ms", _int_in(1000, 120_000)),
    _Key("Server", "MaxWaitSeconds", "max_wait_seconds", _int_in(0, 3600)),
    _Key("Cache", "CacheSize", "cache_size", _int_in(1, 1000)),
    _Key("Cache", "TtlSeconds", "ttl_seconds", _int_in(0, 3600)),
    _Key("Cache", "MaxStaleSeconds", "max_stale_seconds", _int_in(0, 31_536_000)),
    _Key("Cache", "Prefetch", "prefetch", _prefetch),
    _Key("Cache", "NotFoundTtlSeconds", "not_found_ttl_seconds", _int_in(0, 300)),
    _Key("KMS", "Region", "region", _region),
    _Key("KMS", "Endpoint", "endpoint", _endpoint),
    _Key("KMS", "Protocol", "protocol", _one_of("https", "http")),
    _Key("KMS", "CaFilePath", "ca_file_path", _ca_file_path),
    _Key("KMS", "ConnectTimeoutMs", "connect_timeout_ms", _int_in(1, 60_000)),
    _Key("KMS", "ReadTimeoutMs", "read_timeout_ms", _int_in(1, 300_000)),
    _Key("KMS", "MaxRetries", "max_retries", _int_in(0, 10)),
    _Key("KMS", "MaxConcurrentRequests", "max_concurrent_requests", _int_in(1, 100)),
    _Key("KMS", "FallbackEndpoints", "fallback_endpoints", _fallback_endpoints),
    _Key("KMS", "BatchRefresh", "batch_refresh", _bool),
    _Key("Credentials", "Type", "type", _credentials_type),
    _Key("Credentials", "RoleName", "role_name", _role_name),
    _Key("Credentials", "MetadataEndpoint", "metadata_endpoint", _metadata_endpoint),
    _Key("Credentials", "DisableIMDSv1", "disable_imdsv1", _bool),
    _Key("Credentials", "RenewBeforeSeconds", "renew_before_seconds", _int_in(1, 43_200)),
    _Key("Credentials", "RoleArn", "role_arn", _role_arn),
    _Key("Credentials", "RoleSessionName", "role_session_name", _role_session_name),
    _Key("Credentials", "DurationSeconds", "duration_seconds", _int_in(900, 43_200)),
    _Key("Credentials", "ExternalId", "external_id", _external_id),
    _Key("Credentials", "Policy", "policy", _policy),
    _Key("Credentials", "SourceType", "source_type", _source_type),
    _Key("Credentials", "StsEndpoint", "sts_endpoint", _endpoint),
    _Key("Credentials", "StsProtocol", "sts_protocol", _one_of("https", "http")),
    _Key("Credentials", "Profile", "profile", _profile),
    _Key("Credentials", "CliConfigPath", "cli_config_path", _file_path),
    _Key("Credentials", "CredentialsFile", "credentials_file", _file_path),
    _Key("Credentials", "CredentialsUri", "credentials_uri", _credentials_uri),
    _Key("Credentials", "AllowedRoleArns", "allowed_role_arns", _allowed_role_arns),
    _Key("Log", "Level", "level", _one_of("debug", "info", "warn", "error")),
    _Key("Log", "Path", "path", _text('must be a folder, or "" for stderr only', lambda path: "\0" not in path)),
    _Key("Log", "MaxFileSizeMB", "max_file_size_mb", _int_in(1, 10_240)),
    _Key("Log", "Backups", "backups", _int_in(0, 100)),
    _Key("Log", "Format", "format", _one_of("json", "text")),
    *_EXEC_KEYS,
)

_KEYS_BY_SECTION: dict[str, dict[str, _Key]] = {
    section: {row.key: row for row in _KEYS if row.section == section} for section in _SECTIONS
}


def _check_protocol(kms: KmsConfig) -> None:
    """Plain http would send credentials and secrets in clear text, so only emulators on loopback."""
    host = _authority_host(kms.endpoint) if kms.endpoint else None
    if kms.protocol == "http" and not (host and _is_loopback(host)):
        raise ConfigError(
            f'[KMS] Protocol = {_show(kms.protocol)}: must be "https" unless Endpoint is a loopback '
            f"host (127.0.0.0/8, [::1] or localhost); Endpoint = {_show(kms.endpoint)}"
        )
    for fallback in kms.fallback_endpoints:
        if kms.protocol == "http" and not _is_loopback(_authority_host(fallback) or ""):
            raise ConfigError(
                f'[KMS] FallbackEndpoints = {_show(list(kms.fallback_endpoints))}: with Protocol = "http" '
                f"every one must be a loopback host (127.0.0.0/8, [::1] or localhost); {_show(fallback)} is not"
            )
    if kms.effective_endpoint.lower() in (fallback.lower() for fallback in kms.fallback_endpoints):
        raise ConfigError(
            f"[KMS] FallbackEndpoints = {_show(list(kms.fallback_endpoints))}: must not repeat the primary "
            f"endpoint {_show(kms.effective_endpoint)}"
        )


def _check_credentials(credentials: CredentialsConfig) -> None:
    """Keys that only make sense together: a role to assume, and plain http only to an emulator."""
    if credentials.type == "ram_role_arn" and not credentials.role_arn:
        raise ConfigError(
            '[Credentials] RoleArn = "": must be acs:ram::<account-id>:role/<name> when Type = "ram_role_arn"'
        )
    host = _authority_host(credentials.sts_endpoint) if credentials.sts_endpoint else None
    if credentials.sts_protocol == "http" and not (host and _is_loopback(host)):
        raise ConfigError(
            f'[Credentials] StsProtocol = {_show(credentials.sts_protocol)}: must be "https" unless StsEndpoint is a '
            f"loopback host (127.0.0.0/8, [::1] or localhost); StsEndpoint = {_show(credentials.sts_endpoint)}"
        )


# --- [[Files]] tables (SPEC §8) --------------------------------------------------------------------


def _mode(value: Any) -> int:
    """Permission bits as an octal string ("0600", "640"); setuid, setgid and sticky are refused."""
    if _is_text(value) and re.fullmatch(r"[0-7]{3,4}", value) and int(value, 8) <= 0o777:
        return int(value, 8)
    raise _Invalid('must be octal permission bits within 0777, as a string such as "0600" or "0640"')


def _template(value: Any) -> str:
    """Checked here so that a typo fails at start-up, not at the first rotation."""
    from kmsagent.template import TemplateError, parse_template

    if not _is_text(value):
        raise _Invalid("must be a string")
    try:
        parse_template(value)
    except TemplateError as error:
        raise _Invalid(str(error)) from None
    return value


def _account(kind: str, lookup: Callable[[str], int], by_id: Callable[[int], object]) -> _Check:
    """A user or group name or a numeric id that exists; only root may hand files to others."""

    def check(value: Any) -> str:
        if not _is_text(value):
            raise _Invalid(f"must be a {kind} name or id")
        if value and os.geteuid() != 0:
            raise _Invalid(f"is allowed only when the agent runs as root (its uid is {os.geteuid()})")
        if value:
            try:
                _ = by_id(int(value)) if value.isdigit() else lookup(value)
            except (KeyError, ValueError, OverflowError):
                raise _Invalid(f"must be an existing {kind} name or id") from None
        return value

    return check


def _uid(owner: str) -> int | None:
    return None if not owner else int(owner) if owner.isdigit() else pwd.getpwnam(owner).pw_uid


def _gid(group: str) -> int | None:
    return None if not group else int(group) if group.isdigit() else grp.getgrnam(group).gr_gid


_FILE_KEYS: dict[str, tuple[str, _Check]] = {
    "SecretId": (
        "secret_id",
        _text("must be a secret name, 1..1024 UTF-8 bytes", lambda t: 0 < len(t.encode()) <= 1024),
    ),
    "Path": ("path", _text("must be an absolute path", lambda t: os.path.isabs(t) and "\0" not in t)),
    "VersionStage": ("version_stage", _text("must be a non-empty version stage", lambda t: 0 < len(t) <= 64)),
    "JsonKey": ("json_key", _text("must be a string")),
    "Template": ("template", _template),
    "Mode": ("mode", _mode),
    "Owner": ("owner", _account("user", lambda name: pwd.getpwnam(name).pw_uid, pwd.getpwuid)),
    "Group": ("group", _account("group", lambda name: grp.getgrnam(name).gr_gid, grp.getgrgid)),
    "OnChange": ("on_change", _argv("must be a list of strings: a program, then its arguments (no shell)")),
}
_FILE_REQUIRED = ("SecretId", "Path")


def _folder_problem(path: str) -> str | None:
    """Why the folder of `path` may not hold a secret file, or None.

    The folder must exist, and only root and the agent may write to it: anyone else could swap
    the file between the agent's rename and the reader's open, or plant a link (SPEC §8). A
    group may write only when it is root's group.
    """
    folder = os.path.dirname(path) or "/"
    try:
        info = os.stat(folder)
    except OSError as error:
        return f"its folder {folder} cannot be used ({error.strerror or error})"
    if not stat.S_ISDIR(info.st_mode):
        return f"{folder} is not a folder"
    if info.st_uid not in (0, os.geteuid()):
        return f"its folder {folder} must belong to root or the agent's user (it belongs to uid {info.st_uid})"
    if info.st_mode & stat.S_IWOTH or (info.st_mode & stat.S_IWGRP and info.st_gid != 0):
        mode = stat.S_IMODE(info.st_mode)
        return f"its folder {folder} is writable by others (mode {mode:04o}); only root and the agent may write there"
    if os.path.isdir(path):
        return "is a folder; it must name a file"
    return None


def _parse_file(number: int, body: Any) -> FileConfig:
    where = f"[[Files]] #{number}"
    if not isinstance(body, dict):
        raise ConfigError(f"{where}: must be a table")
    values: dict[str, Any] = {}
    for key, value in body.items():
        entry = _FILE_KEYS.get(key)
        if entry is None:
            raise ConfigError(f"{where} {_show_name(key)}: unknown key (allowed: {', '.join(_FILE_KEYS)})")
        field_name, check = entry
        try:
            values[field_name] = check(value)
        except _Invalid as invalid:
            shown = _show_path(value) if key == "Path" else _show(value)
            raise ConfigError(f"{where} {key} = {shown}: {invalid}") from None
    for key in _FILE_REQUIRED:
        if key not in body:
            raise ConfigError(f"{where}: {key} is required")
    if values.get("json_key") and values.get("template"):
        raise ConfigError(f"{where} JsonKey = {_show(body['JsonKey'])}: set JsonKey or Template, not both")
    problem = _folder_problem(values["path"])
    if problem is not None:
        raise ConfigError(f"{where} Path = {_show_path(body['Path'])}: {problem}")
    return FileConfig(**values, uid=_uid(values.get("owner", "")), gid=_gid(values.get("group", "")))


def _parse_files(value: Any) -> tuple[FileConfig, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"Files = {_show(value)}: must be [[Files]] tables")
    files: list[FileConfig] = []
    seen: dict[str, int] = {}
    for number, body in enumerate(value, start=1):
        file = _parse_file(number, body)
        path = os.path.normpath(file.path)
        if path in seen:
            raise ConfigError(
                f"[[Files]] #{number} Path = {_show_path(file.path)}: the same Path as [[Files]] #{seen[path]}"
            )
        seen[path] = number
        files.append(file)
    return tuple(files)


def pinned_secrets(config: Config) -> set[tuple[str, str, str]]:
    """The secrets (id, version, stage) that feed files or the child's environment: always hot,
    never evicted (SPEC §5); counted against CacheSize. The agent's cache keys add the role ("")."""
    keys = {(file.secret_id, "", file.version_stage) for file in config.files}
    keys |= {(secret_id, "", "ACSCurrent") for secret_id in config.exec.env_secrets}
    return keys


def _check_files_and_exec(config: Config, *, command_known: bool) -> None:
    """The rules that span sections: caching on, pinned secrets fit the cache, Env has a program."""
    runs_child = bool(config.exec.command)
    if config.files or runs_child:
        if config.cache.ttl_seconds == 0:
            users = "[[Files]]" if config.files else "[Exec]"
            raise ConfigError(f"[Cache] TtlSeconds = 0: must be at least 1 with {users} (their secrets stay cached)")
        pinned = len(pinned_secrets(config))
        if pinned > config.cache.cache_size:
            raise ConfigError(
                f"[Cache] CacheSize = {config.cache.cache_size}: [[Files]] and [Exec] Env keep {pinned} secrets "
                "always cached; CacheSize must be at least that"
            )
    if command_known and config.exec.env and not runs_child:
        raise ConfigError(
            "[Exec] Env: there is no program to give it to; set [Exec] Command or run kmsagent -- CMD ARGS"
        )
    if command_known and runs_child:
        program = config.exec.command[0]
        if shutil.which(program) is None:
            raise ConfigError(
                f"[Exec] Command = {_show(list(config.exec.command))}: {_show(program)} is not an executable file"
                + ("" if "/" in program else " found in PATH")
            )


def with_command(config: Config, command: Sequence[str] | None) -> Config:
    """`config` with `kmsagent -- CMD ARGS` in place of `[Exec] Command` (when given), checked as
    a whole: the rules that need to know whether a child runs are applied here."""
    if command is not None:
        config = replace(config, exec=replace(config.exec, command=tuple(command)))
    _check_files_and_exec(config, command_known=True)
    return config


# --- Public API -----------------------------------------------------------------------------------


def parse_config(document: dict[str, Any]) -> Config:
    """Validates a parsed TOML document (sections → keys → values) into a `Config`."""
    sections: dict[str, Any] = {}
    for name, body in document.items():
        if name == "Files":
            sections["files"] = _parse_files(body)
            continue
        if name not in _SECTIONS:
            allowed = ", ".join([*_SECTIONS, "[Files]"])
            raise ConfigError(f"[{_show_name(name)}]: unknown section (allowed: {allowed})")
        if not isinstance(body, dict):
            raise ConfigError(f"{name} = {_show(body)}: must be a [{name}] table")
        rows = _KEYS_BY_SECTION[name]
        values: dict[str, Any] = {}
        for key, value in body.items():
            row = rows.get(key)
            if row is None:
                allowed = ", ".join(rows)
                raise ConfigError(f"[{name}] {_show_name(key)}: unknown key (allowed: {allowed})")
            try:
                values[row.field_name] = row.check(value)
            except _Invalid as invalid:
                raise ConfigError(f"[{name}] {key} = {_show(value)}: {invalid}") from None
        attr, cls = _SECTIONS[name]
        sections[attr] = cls(**values)
    config = Config(**sections)
    _check_protocol(config.kms)
    _check_credentials(config.credentials)
    _check_files_and_exec(config, command_known=False)
    return config


def load_config(path: str | Path | None) -> Config:
    """Reads and validates the TOML file at `path`; `None` gives the built-in defaults."""
    if path is None:
        return Config()
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config file: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        reason = f"not UTF-8 ({error.reason} at byte {error.start})"
        raise ConfigError(f"{path}: invalid TOML: {reason}") from None
    except tomllib.TOMLDecodeError as error:
        message = " ".join(str(error).split())
        raise ConfigError(f"{path}: invalid TOML: {message}") from None
    return parse_config(document)


def check_log_folder(log: LogConfig) -> None:
    """Raises `ConfigError` unless `[Log] Path` can be created and written, or is "" (stderr only),
    for `--check-config`.

    Parsing cannot tell that `/proc/nope/` or a path under a regular file will fail at start-up,
    so this tries what start-up will do: a missing folder's first missing part is created and
    removed again, an existing one gets a temporary file. Nothing is left behind.
    """
    if not log.path:
        return  # stderr only
    folder = Path(log.path)
    problem = _unwritable_folder(folder)
    if problem is not None:
        raise ConfigError(f"[Log] Path = {_show(log.path)}: {problem}")


def _unwritable_folder(folder: Path) -> str | None:
    missing: Path | None = None
    existing = folder
    while not existing.exists():
        if existing.is_symlink():
            return f"{existing} is a broken symbolic link"
        missing, existing = existing, existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    try:
        if missing is None:
            with tempfile.TemporaryFile(dir=existing):
                pass
        else:
            missing.mkdir()
            missing.rmdir()
    except OSError as error:
        return f"the log folder cannot be {'written' if missing is None else 'created'} ({error.strerror or error})"
    return None


def files_folder_notes(config: Config) -> list[str]:
    """`--check-config` notes for `[[Files]]` folders this process may not write (issue 16).

    Parsing already refused folders that are missing or writable by others; a folder the agent
    cannot write to (another owner's, read-only, or outside a systemd unit's `ReadWritePaths=`)
    is only known when the first write fails, so `--check-config` says so ahead.
    """
    notes = []
    for number, file in enumerate(config.files, start=1):
        folder = os.path.dirname(file.path) or "/"
        if not os.access(folder, os.W_OK | os.X_OK):
            notes.append(
                f"[[Files]] #{number} Path = {_show_path(file.path)}: its folder {folder} is not writable by this "
                "user; under the installed systemd unit add it with the files-folders.conf drop-in (ReadWritePaths=)"
            )
    return notes


def check_unix_socket(server: ServerConfig, *, starting: bool) -> tuple[int | None, list[str]]:
    """The gid that `[Server] UnixSocketGroup` names (None without a socket), and notes.

    Raises `ConfigError` when the socket's folder is not a folder, belongs to a user other than
    root and the agent's, or is writable by others, sticky or not (SPEC §3: anyone who may write
    there may replace the socket with their own and collect the tokens that clients send). What
    only the host at start can settle — a folder or a group that does not exist yet (systemd's
    `RuntimeDirectory=` makes the folder as the service starts; install.sh makes the group) —
    is an error when `starting`, else a note for `--check-config`.
    """
    path = server.unix_socket
    if not path:
        return None, []
    problems: list[tuple[str, str, str]] = []  # (key, value, problem)
    folder = os.path.dirname(path)
    try:
        info = os.stat(folder)
    except FileNotFoundError:
        problems.append(("UnixSocket", path, f"its folder {folder} does not exist"))
    except OSError as error:
        raise ConfigError(
            f"[Server] UnixSocket = {_show(path)}: its folder {folder} cannot be used ({error.strerror})"
        ) from None
    else:
        if not stat.S_ISDIR(info.st_mode):
            raise ConfigError(f"[Server] UnixSocket = {_show(path)}: {folder} is not a folder")
        if info.st_uid not in (0, os.geteuid()):
            raise ConfigError(
                f"[Server] UnixSocket = {_show(path)}: its folder {folder} must belong to root or the agent's "
                f"user (uid {os.geteuid()}), not uid {info.st_uid}"
            )
        if info.st_mode & stat.S_IWOTH:
            raise ConfigError(
                f"[Server] UnixSocket = {_show(path)}: its folder {folder} is writable by others "
                f"(mode {stat.S_IMODE(info.st_mode):04o}), who could replace the socket; use a folder only "
                "root and the agent may write to, such as systemd's RuntimeDirectory"
            )
    group = server.unix_socket_group
    gid: int | None = os.getegid()
    if group.isdecimal():
        gid = int(group)
    elif group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            gid = None
            problems.append(("UnixSocketGroup", group, "no such group"))
    if starting and problems:
        key, value, problem = problems[0]
        raise ConfigError(f"[Server] {key} = {_show(value)}: {problem}")
    notes = [
        f"[Server] {key} = {_show(value)}: {problem} (yet); the agent needs it at start"
        for key, value, problem in problems
    ]
    return gid, notes


def differences(old: Config, new: Config) -> list[tuple[str, str, Any, Any]]:
    """(section, key, old value, new value) for every key that differs, in SPEC §2 order."""
    changed = []
    for row in _KEYS:
        attr = _SECTIONS[row.section][0]
        before = getattr(getattr(old, attr), row.field_name)
        after = getattr(getattr(new, attr), row.field_name)
        if before != after:
            changed.append((row.section, row.key, before, after))
    if old.files != new.files:
        changed.append(("Files", "tables", len(old.files), len(new.files)))
    return changed


def dump_config(config: Config) -> str:
    """The effective config as TOML text, every key in SPEC §2 order (for `--check-config`)."""
    blocks: list[str] = []
    for name, (attr, _) in _SECTIONS.items():
        section = getattr(config, attr)
        lines = [f"[{name}]"]
        rows = _KEYS_BY_SECTION[name].values()
        lines.extend(f"{row.key} = {row.toml(getattr(section, row.field_name))}" for row in rows)
        blocks.append("\n".join(lines) + "\n")
    for file in config.files:
        lines = ["[[Files]]"]
        for key, (field_name, _) in _FILE_KEYS.items():
            value = getattr(file, field_name)
            lines.append(f"{key} = {_toml_string(f'{value:04o}') if key == 'Mode' else _toml_value(value)}")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)
