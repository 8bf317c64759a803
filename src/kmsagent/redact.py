"""The last line of defence: no log record carries a secret value, credential or token it knows.

The agent never logs those on purpose. In case a future message does by mistake, the values it
handles are guarded here, and loguru's patcher (installed by logs.py) replaces any of them in a
record's message with `[REDACTED]`. Values shorter than `MIN_LENGTH` are not guarded, since
replacing them would mangle ordinary words.

What is guarded, and for how long, is bounded (SPEC §2: CacheSize is the memory limit; this
module used to keep the last 4096 secret values of any size, with TtlSeconds = 0 too):
- AccessKeySecrets, security tokens and the SSRF token (`remember`): always. They are few and
  short; the newest `PINNED_LIMIT` of at most `PINNED_MAX_LENGTH` characters are kept.
- A secret's text, and each string inside a JSON secret: while the cache holds it. The store
  calls `hold_secret` for every value a load returns, and `release_secret` with what it returned
  once the cache lets go of it (replaced, evicted, dropped, or not kept at all with TtlSeconds
  = 0); a value held by several entries is counted. At most `HELD_BYTES` are held; a value beyond
  that is not guarded.
- Released values stay guarded in a small recent set of `RECENT_BYTES`, oldest out first: a log
  line written just after an eviction, or about a value that was never kept, is still masked.

A guarded string is found by the dictionary of its first `MIN_LENGTH` characters, so scrubbing
costs one look-up per character of the message, whatever the number of values guarded.

The guard keeps no copy of a secret (issue 17: one copy per cached secret, its response body): a
guarded string is known by its first `MIN_LENGTH` characters, its length and its hash, and a
stretch of a message that starts with those characters and has that length is masked when its
hash matches. Two different strings alike in all three are 1 in 2^64 apart; such a stretch would
be masked for nothing.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

MIN_LENGTH = 8
MARK = "[REDACTED]"
PINNED_LIMIT = 256
#: SPEC §2: a token file over 4 KB is refused; credentials are far shorter.
PINNED_MAX_LENGTH = 4096
#: Characters of secret text guarded while the cache holds it (1000 entries of 32 KB).
HELD_BYTES = 32 * 2**20
#: Characters of released secret text still guarded (a few of KMS's largest values).
RECENT_BYTES = 256 * 2**10

#: A guarded string without the string: its length and hash (filed under its first characters).
Print = tuple[int, int]
#: The guarded strings of one value: (first `MIN_LENGTH` characters, print) of each.
Parts = tuple[tuple[str, Print], ...]


class Held:
    """What `hold_secret` returns, to give back to `release_secret`: one guarded value."""

    __slots__ = ("holders", "key", "parts", "size")

    def __init__(self, key: Print, parts: Parts, size: int) -> None:
        self.key = key
        self.parts = parts
        self.size = size
        #: Cache entries holding it; 0 for a value the guard did not take (over `HELD_BYTES`).
        self.holders = 0


class Guard:
    """The guarded values' prints and the prefix index that `scrub` looks them up by."""

    def __init__(self) -> None:
        #: How many sources (pinned, held, recent) guard each string.
        self._sources: dict[Print, int] = {}
        self._by_prefix: dict[str, set[Print]] = {}
        self._pinned: OrderedDict[str, Parts] = OrderedDict()
        self._held: dict[Print, Held] = {}
        self._held_bytes = 0
        self._recent: OrderedDict[Print, tuple[Parts, int]] = OrderedDict()
        self._recent_bytes = 0

    def remember(self, *values: str | None) -> None:
        """Guards these credentials or tokens from now on."""
        for value in values:
            if value is None or not MIN_LENGTH <= len(value) <= PINNED_MAX_LENGTH:
                continue
            if value in self._pinned:
                self._pinned.move_to_end(value)
                continue
            parts = self._pinned[value] = (_part(value),)
            self._guard(parts)
            if len(self._pinned) > PINNED_LIMIT:
                _, oldest = self._pinned.popitem(last=False)
                self._unguard(oldest)

    def hold_secret(self, data: str) -> Held:
        """Guards a secret's text (and the strings of a JSON secret) until `release_secret` is
        called with what this returns."""
        key = _print(data)
        held = self._held.get(key)
        if held is not None:
            held.holders += 1
            return held
        recent = self._recent.pop(key, None)
        if recent is not None:
            self._recent_bytes -= recent[1]
            parts, size = recent  # already guarded: it moves from the recent set
        else:
            parts = _parts(data)
            size = sum(length for _, (length, _) in parts)
            if self._held_bytes + size > HELD_BYTES:
                return Held(key, parts, size)  # over the bound: not guarded (`release_secret` then keeps it briefly)
            self._guard(parts)
        held = self._held[key] = Held(key, parts, size)
        held.holders = 1
        self._held_bytes += size
        return held

    def release_secret(self, held: Held) -> None:
        """The cache let go of one holder of a value: guarded a little longer, in the recent set."""
        registered = self._held.get(held.key)
        if registered is held:
            held.holders -= 1
            if held.holders:
                return
            del self._held[held.key]
            self._held_bytes -= held.size
        elif registered is not None:
            return  # the same text, held by others since: guarded while they hold it
        elif held.key in self._recent:
            self._recent.move_to_end(held.key)
            return
        else:
            self._guard(held.parts)
        self._recent[held.key] = (held.parts, held.size)
        self._recent_bytes += held.size
        while self._recent_bytes > RECENT_BYTES:
            _, (old_parts, old_size) = self._recent.popitem(last=False)
            self._recent_bytes -= old_size
            self._unguard(old_parts)

    def remember_secret(self, data: str) -> None:
        """Guards a secret that nothing holds, for a short while (the recent set)."""
        key = _print(data)
        if key in self._held:
            return
        parts = _parts(data)
        self.release_secret(Held(key, parts, sum(length for _, (length, _) in parts)))

    def guarded_bytes(self) -> int:
        """Characters of secret text guarded (held and recent)."""
        return self._held_bytes + self._recent_bytes

    def scrub(self, text: str) -> str:
        """`text` with every guarded value replaced; one dictionary look-up per character."""
        if not self._by_prefix or len(text) < MIN_LENGTH:
            return text
        by_prefix = self._by_prefix
        found: set[str] = set()
        for start in range(len(text) - MIN_LENGTH + 1):
            prints = by_prefix.get(text[start : start + MIN_LENGTH])
            if prints:
                for length, digest in prints:
                    piece = text[start : start + length]
                    if len(piece) == length and hash(piece) == digest:
                        found.add(piece)
        for value in sorted(found, key=len, reverse=True):
            text = text.replace(value, MARK)
        return text

    def _guard(self, parts: Parts) -> None:
        for prefix, key in parts:
            count = self._sources.get(key, 0)
            self._sources[key] = count + 1
            if not count:
                self._by_prefix.setdefault(prefix, set()).add(key)

    def _unguard(self, parts: Parts) -> None:
        for prefix, key in parts:
            count = self._sources[key] - 1
            if count:
                self._sources[key] = count
                continue
            del self._sources[key]
            prefixed = self._by_prefix[prefix]
            prefixed.discard(key)
            if not prefixed:
                del self._by_prefix[prefix]


def _print(text: str) -> Print:
    return len(text), hash(text)


def _part(text: str) -> tuple[str, Print]:
    return text[:MIN_LENGTH], _print(text)


def _parts(data: str) -> Parts:
    """The strings to guard for a secret: its text and, for a JSON object, every string inside."""
    found = dict.fromkeys([data] if len(data) >= MIN_LENGTH else [])
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):  # not JSON, or nested deeper than the parser goes
        document = None
    stack: list[Any] = [document]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if len(item) >= MIN_LENGTH:
                found[item] = None
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return tuple(map(_part, found))


_guard = Guard()
remember = _guard.remember
hold_secret = _guard.hold_secret
release_secret = _guard.release_secret
remember_secret = _guard.remember_secret
guarded_bytes = _guard.guarded_bytes
scrub = _guard.scrub


def patch_record(record: Any) -> None:
    """loguru patcher: scrubs the message before any sink formats it."""
    record["message"] = scrub(record["message"])
