"""The last line of defence: no log record carries a secret value, credential or token it knows.

The agent never logs those on purpose. In case a future message does by mistake, every secret
value (and each string inside a JSON secret), AccessKeySecret, security token and SSRF token the
agent handles is remembered here, and loguru's patcher (installed by logs.py) replaces any of
them in a record's message with `[REDACTED]`. Values shorter than `MIN_LENGTH` are not guarded,
since replacing them would mangle ordinary words; the most recent `LIMIT` values are kept.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

MIN_LENGTH = 8
LIMIT = 4096
MARK = "[REDACTED]"

_known: OrderedDict[str, None] = OrderedDict()
_by_prefix: dict[str, set[str]] = {}


def remember(*values: str | None) -> None:
    """Guards these strings from now on."""
    for value in values:
        if value is None or len(value) < MIN_LENGTH:
            continue
        if value in _known:
            _known.move_to_end(value)
            continue
        _known[value] = None
        _by_prefix.setdefault(value[:MIN_LENGTH], set()).add(value)
        if len(_known) > LIMIT:
            oldest, _ = _known.popitem(last=False)
            prefixed = _by_prefix[oldest[:MIN_LENGTH]]
            prefixed.discard(oldest)
            if not prefixed:
                del _by_prefix[oldest[:MIN_LENGTH]]


def remember_secret(data: str) -> None:
    """Guards a secret's text and, when it is a JSON object, every string inside it."""
    remember(data)
    try:
        document = json.loads(data)
    except ValueError:
        return
    stack: list[Any] = [document]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            remember(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def scrub(text: str) -> str:
    """`text` with every guarded value replaced; one dictionary look-up per character."""
    if not _by_prefix or len(text) < MIN_LENGTH:
        return text
    found = {
        value
        for start in range(len(text) - MIN_LENGTH + 1)
        for value in _by_prefix.get(text[start : start + MIN_LENGTH], ())
        if text.startswith(value, start)
    }
    for value in sorted(found, key=len, reverse=True):
        text = text.replace(value, MARK)
    return text


def patch_record(record: Any) -> None:
    """loguru patcher: scrubs the message before any sink formats it."""
    record["message"] = scrub(record["message"])
