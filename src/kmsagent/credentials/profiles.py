"""Credentials from profile files: the Aliyun CLI's `~/.aliyun/config.json` (`cli_profile`) and
the SDK's ini file `~/.alibabacloud/credentials.ini` (`credentials_file`), SPEC §6.

A profile is parsed into a `Spec` (static keys, an AssumeRole of another spec, the ECS role, an
OIDC role) with the field names and defaults of alibabacloud-credentials' `CLIProfileCredentials
Provider` and `ProfileCredentialsProvider`, then built into a source (`build`). Those SDK
providers read the file once, with blocking I/O, and run their role sessions on threads or
asyncio; here the file is watched (a stat every WATCH_INTERVAL off the trio thread) and read again
when it changes, and a changed profile swaps in a newly built source.

A profile file holds AccessKeySecrets. A file that turns unreadable or malformed keeps the last
good credentials and is logged once per change, naming the file, the line and the kind of error,
never the parser's message: configparser and json quote the offending line, which may be the one
with the secret. Files are opened without blocking (a FIFO would hang the read for ever) and read
only up to MAX_FILE.
"""

from __future__ import annotations

import configparser
import errno
import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from loguru import logger

from kmsagent.credentials.base import Credentials, CredentialSource, StaticCredentials
from kmsagent.credentials.sts import RoleRequest

WATCH_INTERVAL = 1.0
#: Profile files are a few KB; a bigger one is not a profile file (and is never read whole).
MAX_FILE = 1024 * 1024
OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
#: A ChainableRamRoleArn chain longer than this is a loop or a mistake.
MAX_CHAIN = 8
#: (device, inode, mode, size, mtime, ctime), or (errno,) when stat failed.
Stamp = tuple[int, ...]


class ProfileError(Exception):
    """A profile file that gives no credentials; `str()` names the file, line or profile, and the
    kind of error, never a value from the file."""


# --- what a profile describes ---------------------------------------------------------------------


@dataclass(frozen=True)
class StaticSpec:
    access_key_id: str
    access_key_secret: str = field(repr=False)
    security_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class RoleSpec:
    """AssumeRole of `request`, signed with the credentials `source` describes."""

    source: Spec
    request: RoleRequest
    sts_region: str = ""  # the profile's own STS region ("" = [Credentials] StsEndpoint)
    vpc: bool | None = None


@dataclass(frozen=True)
class EcsSpec:
    role_name: str = ""


@dataclass(frozen=True)
class OidcSpec:
    role_arn: str
    provider_arn: str
    token_file: str
    session_name: str
    duration_seconds: int
    policy: str = ""
    sts_region: str = ""


Spec = StaticSpec | RoleSpec | EcsSpec | OidcSpec


@dataclass(frozen=True)
class Defaults:
    """What a profile leaves out: [Credentials] RoleSessionName and DurationSeconds."""

    session_name: str = "kmsagent"
    duration_seconds: int = 3600


# --- reading a file ---------------------------------------------------------------------------------


def stamp_of(path: Path) -> Stamp:
    """What tells the file changed; blocking (a stat), so called in a worker thread."""
    try:
        st = os.stat(path)
    except OSError as error:
        return (error.errno or 0,)
    return (st.st_dev, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def read_file(path: Path) -> tuple[Stamp, bytes]:
    """The file's stamp and bytes; blocking, so called in a worker thread. Raises ProfileError."""
    try:
        fd = os.open(path, OPEN_FLAGS)
    except OSError as error:
        if error.errno == errno.ENOENT:
            raise ProfileError(f"{path}: not found") from None
        raise ProfileError(f"{path}: cannot be opened ({os.strerror(error.errno or 0)})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ProfileError(f"{path}: not a regular file")
        if st.st_size > MAX_FILE:
            raise ProfileError(f"{path}: larger than {MAX_FILE} bytes")
        chunks, size = [], 0
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_FILE:
                raise ProfileError(f"{path}: larger than {MAX_FILE} bytes")
    except OSError as error:
        raise ProfileError(f"{path}: cannot be read ({os.strerror(error.errno or 0)})") from None
    finally:
        os.close(fd)
    stamp = (st.st_dev, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return stamp, b"".join(chunks)


def _text(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ProfileError(f"{path}: line {line}: not UTF-8") from None


# --- the Aliyun CLI's config.json ---------------------------------------------------------------------

CLI_MODES = ("AK", "StsToken", "RamRoleArn", "EcsRamRole", "ChainableRamRoleArn", "OIDC")


def parse_cli_config(raw: bytes, path: Path, profile: str, defaults: Defaults = Defaults()) -> tuple[str, Spec]:
    """(profile name, spec) of `profile` ("" = the file's `current`) in a CLI config.json."""
    try:
        document = json.loads(_text(raw, path))
    except json.JSONDecodeError as error:
        raise ProfileError(f"{path}: line {error.lineno}: not valid JSON") from None
    if not isinstance(document, dict):
        raise ProfileError(f"{path}: not a JSON object")
    name = profile or document.get("current")
    if not isinstance(name, str) or not name:
        raise ProfileError(f"{path}: no profile named and no \"current\" profile")
    profiles = document.get("profiles")
    if not isinstance(profiles, list):
        raise ProfileError(f"{path}: no \"profiles\" list")
    by_name = {
        item.get("name"): item for item in profiles if isinstance(item, dict) and isinstance(item.get("name"), str)
    }
    return name, _cli_spec(by_name, name, path, defaults, chain=())


def _cli_spec(
    profiles: dict[Any, dict[str, Any]], name: str, path: Path, defaults: Defaults, chain: tuple[str, ...]
) -> Spec:
    where = f"{path}: profile {name!r}"
    if name in chain or len(chain) >= MAX_CHAIN:
        raise ProfileError(f"{where}: source_profile chain loops or is longer than {MAX_CHAIN}")
    item = profiles.get(name)
    if item is None:
        raise ProfileError(f"{path}: no profile {name!r}")
    fields = _Fields(item, where)
    mode = item.get("mode")
    if mode == "AK":
        return StaticSpec(fields.required("access_key_id"), fields.required("access_key_secret"))
    if mode == "StsToken":
        return StaticSpec(
            fields.required("access_key_id"), fields.required("access_key_secret"), fields.required("sts_token")
        )
    if mode == "EcsRamRole":
        return EcsSpec(fields.optional("ram_role_name"))
    if mode in ("RamRoleArn", "ChainableRamRoleArn"):
        if mode == "RamRoleArn":
            source: Spec = StaticSpec(fields.required("access_key_id"), fields.required("access_key_secret"))
        else:
            source = _cli_spec(profiles, fields.required("source_profile"), path, defaults, (*chain, name))
        request = RoleRequest(
            role_arn=fields.required("ram_role_arn"),
            session_name=fields.optional("ram_session_name") or defaults.session_name,
            duration_seconds=fields.duration("expired_seconds", defaults.duration_seconds),
            external_id=fields.optional("external_id"),
            policy=fields.optional("policy"),
        )
        return RoleSpec(source, request, fields.optional("sts_region"), fields.flag("enable_vpc"))
    if mode == "OIDC":
        return OidcSpec(
            role_arn=fields.required("ram_role_arn"),
            provider_arn=fields.required("oidc_provider_arn"),
            token_file=fields.required("oidc_token_file"),
            session_name=fields.optional("role_session_name") or defaults.session_name,
            duration_seconds=fields.duration("expired_seconds", defaults.duration_seconds),
            policy=fields.optional("policy"),
            sts_region=fields.optional("sts_region"),
        )
    shown = mode if isinstance(mode, str) and mode.isalnum() and len(mode) <= 32 else "(not a mode name)"
    raise ProfileError(f"{where}: mode {shown} is not supported (use one of {', '.join(CLI_MODES)})")


class _Fields:
    """A profile's fields; errors name the field, never its value."""

    def __init__(self, item: dict[str, Any], where: str) -> None:
        self._item = item
        self._where = where

    def optional(self, name: str) -> str:
        value = self._item.get(name)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ProfileError(f"{self._where}: {name} is not a string")
        return value.strip()

    def required(self, name: str) -> str:
        value = self.optional(name)
        if not value:
            raise ProfileError(f"{self._where}: {name} is missing or empty")
        return value

    def duration(self, name: str, default: int) -> int:
        value = self._item.get(name)
        if value in (None, "", 0, "0"):  # the CLI writes 0 for "not set"
            return default
        try:
            seconds = int(value)
        except (TypeError, ValueError):
            raise ProfileError(f"{self._where}: {name} is not a number") from None
        if not 900 <= seconds <= 43200:
            raise ProfileError(f"{self._where}: {name} must be 900..43200")
        return seconds

    def flag(self, name: str) -> bool | None:
        value = self._item.get(name)
        if value is None:
            return None
        if isinstance(value, bool):
            return value
        return str(value).strip().lower() == "true"


# --- the SDK's credentials.ini ------------------------------------------------------------------------

INI_TYPES = ("access_key", "ecs_ram_role", "ram_role_arn", "oidc_role_arn")


def parse_credentials_ini(raw: bytes, path: Path, profile: str, defaults: Defaults = Defaults()) -> tuple[str, Spec]:
    """(section name, spec) of `[<profile>]` ("" = `[default]`) in the SDK's credentials.ini."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(_text(raw, path), source=str(path))
    except configparser.MissingSectionHeaderError as error:
        raise ProfileError(f"{path}: line {error.lineno}: a line before the first [section]") from None
    except configparser.DuplicateSectionError as error:
        raise ProfileError(f"{path}: line {error.lineno}: a [section] given twice") from None
    except configparser.DuplicateOptionError as error:
        raise ProfileError(f"{path}: line {error.lineno}: a key given twice in one section") from None
    except configparser.ParsingError as error:
        line = error.errors[0][0] if error.errors else "?"
        raise ProfileError(f"{path}: line {line}: not a \"key = value\" line") from None
    except configparser.Error:
        raise ProfileError(f"{path}: not an ini file") from None
    name = profile or "default"
    if not parser.has_section(name):
        raise ProfileError(f"{path}: no [{name}] section")
    # As the SDK reads values: anything after a "#" is a comment, surrounding spaces go.
    section = {key: value.split("#")[0].strip() for key, value in parser.items(name)}
    fields = _Fields(section, f"{path}: [{name}]")
    kind = section.get("type", "")
    if kind == "access_key":
        return name, StaticSpec(fields.required("access_key_id"), fields.required("access_key_secret"))
    if kind == "ecs_ram_role":
        return name, EcsSpec(fields.optional("role_name"))
    if kind == "ram_role_arn":
        source = StaticSpec(fields.required("access_key_id"), fields.required("access_key_secret"))
        request = RoleRequest(
            role_arn=fields.required("role_arn"),
            session_name=fields.optional("role_session_name") or defaults.session_name,
            duration_seconds=defaults.duration_seconds,
            policy=fields.optional("policy"),
        )
        return name, RoleSpec(source, request)
    if kind == "oidc_role_arn":
        return name, OidcSpec(
            role_arn=fields.required("role_arn"),
            provider_arn=fields.required("oidc_provider_arn"),
            token_file=fields.required("oidc_token_file_path"),
            session_name=fields.optional("role_session_name") or defaults.session_name,
            duration_seconds=defaults.duration_seconds,
            policy=fields.optional("policy"),
        )
    shown = kind if kind.replace("_", "").isalnum() and len(kind) <= 32 else "(missing or not a type name)"
    raise ProfileError(f"{path}: [{name}]: type {shown} is not supported (use one of {', '.join(INI_TYPES)})")


# --- the watching source --------------------------------------------------------------------------------

Parse = Callable[[bytes], tuple[str, Spec]]
Build = Callable[[Spec], CredentialSource]


@dataclass(frozen=True)
class Loaded:
    """One good read of a profile file."""

    stamp: Stamp
    profile: str
    spec: Spec


def load(path: Path, parse: Parse) -> Loaded:
    """Reads and parses the file; blocking, so called in a worker thread. Raises ProfileError."""
    stamp, raw = read_file(path)
    profile, spec = parse(raw)
    return Loaded(stamp, profile, spec)


def static_source(spec: StaticSpec, kind: str) -> StaticCredentials:
    return StaticCredentials(Credentials(spec.access_key_id, spec.access_key_secret, spec.security_token), kind)


class ProfileCredentials:
    """The credentials of one profile in a watched file; the built source does the work."""

    def __init__(self, path: Path, loaded: Loaded, parse: Parse, build: Build, *, what: str) -> None:
        """`what` is the Type for the log ("cli_profile"); `build` makes a source from a spec."""
        self._path = path
        self._parse = parse
        self._build = build
        self._what = what
        self._stamp: Stamp = loaded.stamp
        self._spec = loaded.spec
        self._inner = build(loaded.spec)
        self._reported: str | None = None  # the file error last logged, so each is logged once
        self.kind = f"{what} (profile {loaded.profile!r} of {path}: {self._inner.kind})"
        #: Profiles built so far (the first one included), for tests and the log.
        self.builds = 1

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            scope = await nursery.start(_run_scoped, self._inner)
            task_status.started()
            while True:
                await trio.sleep(WATCH_INTERVAL)
                stamp = await trio.to_thread.run_sync(stamp_of, self._path)
                if stamp == self._stamp:
                    continue
                self._stamp = stamp
                try:
                    loaded = await trio.to_thread.run_sync(load, self._path, self._parse)
                except ProfileError as error:
                    if str(error) != self._reported:
                        logger.error("{}; keeping the last good credentials", error)
                        self._reported = str(error)
                    continue
                self._stamp = loaded.stamp
                if self._reported is not None:
                    logger.info("{} is usable again", self._path)
                    self._reported = None
                if loaded.spec == self._spec:
                    continue
                inner = self._build(loaded.spec)
                new_scope = await nursery.start(_run_scoped, inner)
                self._inner, self._spec = inner, loaded.spec
                self.builds += 1
                scope.cancel()
                scope = new_scope
                logger.info("{} changed: {} credentials now from {}", self._path, self._what, inner.kind)

    async def current(self) -> Credentials:
        return await self._inner.current()

    async def rejected(self, credentials: Credentials) -> bool:
        return await self._inner.rejected(credentials)

    def expiration(self) -> float | None:
        return self._inner.expiration()


async def _run_scoped(source: CredentialSource, *, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
    """Runs `source` and reports a scope that stops it (when its profile is replaced)."""
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run)
            task_status.started(scope)
