"""The agent's configuration: SPEC §2's TOML file as frozen, validated dataclasses.

Every key is optional and defaulted here; unknown sections or keys, wrong types and values out of
range raise `ConfigError`, whose message is the one stderr line the CLI prints before exit 2.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tempfile
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeGuard


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
    max_wait_seconds: int = 300


@dataclass(frozen=True)
class CacheConfig:
    cache_size: int = 1000
    ttl_seconds: int = 300
    max_stale_seconds: int = 0
    prefetch: tuple[str, ...] = ()


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

    @property
    def effective_endpoint(self) -> str:
        """`Endpoint`, or the shared gateway of `Region` when it is empty."""
        return self.endpoint or f"kms.{self.region}.aliyuncs.com"


@dataclass(frozen=True)
class CredentialsConfig:
    type: str = "auto"
    role_name: str = ""
    metadata_endpoint: str = "http://100.100.100.200"
    disable_imdsv1: bool = False
    renew_before_seconds: int = 900


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    path: str = "./logs/"
    max_file_size_mb: int = 100
    backups: int = 2
    format: str = "json"


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    kms: KmsConfig = field(default_factory=KmsConfig)
    credentials: CredentialsConfig = field(default_factory=CredentialsConfig)
    log: LogConfig = field(default_factory=LogConfig)


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


def _show_name(name: str) -> str:
    """A section or key name as typed; quoted TOML keys may hold anything, so those are repr'd."""
    return name if _BARE_KEY.fullmatch(name) else _show(name)


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


_SECTIONS: dict[str, tuple[str, type]] = {
    "Server": ("server", ServerConfig),
    "Cache": ("cache", CacheConfig),
    "KMS": ("kms", KmsConfig),
    "Credentials": ("credentials", CredentialsConfig),
    "Log": ("log", LogConfig),
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
_role_name = _text(
    'must be "" (discover it) or a RAM role name of 1..64 characters [A-Za-z0-9._@-]',
    lambda name: name == "" or _ROLE_NAME.fullmatch(name),
)
_credentials_type = _one_of("auto", "ecs_ram_role", "access_key", "sts", "oidc_role_arn")

_KEYS: tuple[_Key, ...] = (
    _Key("Server", "HttpPort", "http_port", _http_port),
    _Key("Server", "MaxConn", "max_conn", _int_in(1, 1000)),
    _Key("Server", "SSRFHeaders", "ssrf_headers", _ssrf_headers),
    _Key("Server", "SSRFEnvVariables", "ssrf_env_variables", _ssrf_env_variables),
    _Key("Server", "PathPrefix", "path_prefix", _path_prefix),
    _Key("Server", "ResponseType", "response_type", _int_in(0, 2)),
    _Key("Server", "IgnoreTransientErrors", "ignore_transient_errors", _bool),
    _Key("Server", "BindIPv6", "bind_ipv6", _bool),
    _Key("Server", "MaxWaitSeconds", "max_wait_seconds", _int_in(0, 3600)),
    _Key("Cache", "CacheSize", "cache_size", _int_in(1, 1000)),
    _Key("Cache", "TtlSeconds", "ttl_seconds", _int_in(0, 3600)),
    _Key("Cache", "MaxStaleSeconds", "max_stale_seconds", _int_in(0, 31_536_000)),
    _Key("Cache", "Prefetch", "prefetch", _prefetch),
    _Key("KMS", "Region", "region", _region),
    _Key("KMS", "Endpoint", "endpoint", _endpoint),
    _Key("KMS", "Protocol", "protocol", _one_of("https", "http")),
    _Key("KMS", "CaFilePath", "ca_file_path", _ca_file_path),
    _Key("KMS", "ConnectTimeoutMs", "connect_timeout_ms", _int_in(1, 60_000)),
    _Key("KMS", "ReadTimeoutMs", "read_timeout_ms", _int_in(1, 300_000)),
    _Key("KMS", "MaxRetries", "max_retries", _int_in(0, 10)),
    _Key("KMS", "MaxConcurrentRequests", "max_concurrent_requests", _int_in(1, 100)),
    _Key("Credentials", "Type", "type", _credentials_type),
    _Key("Credentials", "RoleName", "role_name", _role_name),
    _Key("Credentials", "MetadataEndpoint", "metadata_endpoint", _metadata_endpoint),
    _Key("Credentials", "DisableIMDSv1", "disable_imdsv1", _bool),
    _Key("Credentials", "RenewBeforeSeconds", "renew_before_seconds", _int_in(1, 43_200)),
    _Key("Log", "Level", "level", _one_of("debug", "info", "warn", "error")),
    _Key("Log", "Path", "path", _text("must be a non-empty string", bool)),
    _Key("Log", "MaxFileSizeMB", "max_file_size_mb", _int_in(1, 10_240)),
    _Key("Log", "Backups", "backups", _int_in(0, 100)),
    _Key("Log", "Format", "format", _one_of("json", "text")),
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


# --- Public API -----------------------------------------------------------------------------------


def parse_config(document: dict[str, Any]) -> Config:
    """Validates a parsed TOML document (sections → keys → values) into a `Config`."""
    sections: dict[str, Any] = {}
    for name, body in document.items():
        if name not in _SECTIONS:
            allowed = ", ".join(_SECTIONS)
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
    """Raises `ConfigError` unless `[Log] Path` can be created and written (for `--check-config`).

    Parsing cannot tell that `/proc/nope/` or a path under a regular file will fail at start-up,
    so this tries what start-up will do: a missing folder's first missing part is created and
    removed again, an existing one gets a temporary file. Nothing is left behind.
    """
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


def differences(old: Config, new: Config) -> list[tuple[str, str, Any, Any]]:
    """(section, key, old value, new value) for every key that differs, in SPEC §2 order."""
    changed = []
    for row in _KEYS:
        attr = _SECTIONS[row.section][0]
        before = getattr(getattr(old, attr), row.field_name)
        after = getattr(getattr(new, attr), row.field_name)
        if before != after:
            changed.append((row.section, row.key, before, after))
    return changed


def dump_config(config: Config) -> str:
    """The effective config as TOML text, every key in SPEC §2 order (for `--check-config`)."""
    blocks: list[str] = []
    for name, (attr, _) in _SECTIONS.items():
        section = getattr(config, attr)
        lines = [f"[{name}]"]
        for row in _KEYS_BY_SECTION[name].values():
            lines.append(f"{row.key} = {_toml_value(getattr(section, row.field_name))}")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)
