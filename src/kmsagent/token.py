"""The SSRF token: where it comes from (SPEC §2) and the constant-time check of request headers.

The first variable of `SSRFEnvVariables` that is set holds the token itself or `file:///path` to a
file that holds it. A file is watched (stat every second, off the trio thread) and read again when
it changes, so an operator can rotate the token without restarting the agent.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import trio
from loguru import logger

from kmsagent import redact

WATCH_INTERVAL = 1.0
#: What tells a token file changed (mtime, size, inode, mode); the mode also feeds a warning.
Stamp = tuple[int, int, int, int]


class TokenError(Exception):
    """No usable token: the agent cannot start (exit 1). The message never contains a token."""


class TokenSource:
    """Holds the current token; `matches` is the only way to use it."""

    def __init__(self, token: bytes, path: Path | None = None) -> None:
        redact.remember(token.decode(errors="replace"))
        self._token = token
        self._path = path
        self._stamp = _stamp(path) if path is not None else None

    @classmethod
    def from_environment(cls, names: Sequence[str], env: Mapping[str, str]) -> TokenSource:
        """Reads the token from the first of `names` that is set in `env` (a value or a file)."""
        for name in names:
            value = env.get(name)
            if value is None:
                continue
            if value.startswith("file://"):
                path = Path(value.removeprefix("file://"))
                try:
                    token = _read_token_file(path)
                except OSError as error:
                    raise TokenError(f"{name}: cannot read token file {path}: {error.strerror}") from None
                if not token:
                    raise TokenError(f"{name}: token file {path} is empty")
                source = cls(token, path)
                _warn_if_loose(path, source._stamp)
                return source
            if not value.strip():
                raise TokenError(f"{name} is set but empty")
            return cls(value.strip().encode())
        raise TokenError(f"no SSRF token: set one of {', '.join(names)} (a token, or file:///path)")

    def matches(self, candidates: Sequence[bytes]) -> bool:
        """True when any candidate header value equals the token, compared in constant time."""
        token = self._token
        found = False
        for candidate in candidates:
            found |= hmac.compare_digest(candidate, token)
        return found

    async def watch(self) -> None:
        """Re-reads the token file whenever it changes; runs until cancelled (no-op for a literal)."""
        if self._path is None:
            return
        while True:
            await trio.sleep(WATCH_INTERVAL)
            await self.reload_if_changed()

    async def reload_if_changed(self) -> bool:
        """Reads the file again if its mtime, size or inode changed; True when the token changed.

        A file that is missing or empty for a moment (an editor or `echo >` rewriting it) keeps
        the old token rather than locking every client out; the next change is picked up.
        """
        path = self._path
        if path is None:
            return False
        stamp = await trio.to_thread.run_sync(_stamp, path)
        if stamp == self._stamp:
            return False
        try:
            token = await trio.to_thread.run_sync(_read_token_file, path)
        except OSError as error:
            logger.warning("token file {} unreadable, keeping the current token: {}", path, error.strerror)
            return False
        if not token:
            logger.warning("token file {} is empty, keeping the current token", path)
            return False
        self._stamp = stamp
        _warn_if_loose(path, stamp)
        redact.remember(token.decode(errors="replace"))
        changed = not hmac.compare_digest(token, self._token)
        self._token = token
        if changed:
            logger.info("token file {} changed: new token in use", path)
        return changed


def _warn_if_loose(path: Path, stamp: Stamp | None) -> None:
    """Any local user who can read the token can read every secret through the agent."""
    mode = stamp[3] if stamp is not None else 0
    if mode & 0o006:
        logger.warning(
            "token file {} is {} by every user (mode {:o}): make it 0640 with a reader group",
            path,
            "writable" if mode & 0o002 else "readable",
            mode & 0o777,
        )


def _read_token_file(path: Path) -> bytes:
    return path.read_bytes().strip()


def _stamp(path: Path) -> Stamp | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_mtime_ns, info.st_size, info.st_ino, info.st_mode)
