"""Conditional and waiting reads (SPEC §3): entity tags, `If-None-Match` and `Prefer: wait`.

A pure module over bytes, like checks.py: it renders a secret's `ETag`, reads the two request
headers, and says whether a cached version is news to the client. Holding a request and the
cache's change announcements are the app's business (app.py, changes.py).

Parsing follows the RFCs and never fails a request: an `If-None-Match` that is not a list of
entity tags (RFC 9110 §8.8.3, §13.1.2) is ignored as if absent (the client gets the full 200,
which is always correct), and a preference that cannot be read is ignored, as RFC 7240 §2 asks.
Both are looked at only when present: the one scan of the header list is all a plain read pays.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from urllib.parse import quote

Headers = Sequence[tuple[bytes, bytes]]
#: Characters of a VersionId that go into the ETag as they are: RFC 9110's `etagc` (visible
#: ASCII but `"`); anything else is percent-encoded, so the header is always valid.
_ETAG_SAFE = "!#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
#: One element of an `If-None-Match` list: `*` or an entity tag (its `W/` dropped), or nothing
#: (RFC 9110 §5.6.1: empty elements are allowed), then the comma or the end. One run of blanks
#: around an empty element, not two: `[ \t]*X?[ \t]*` took 4.3 s on 16 KB of blanks (backtracking).
_LIST_ELEMENT = re.compile(rb'[ \t]*(?:(?:(\*)|(?:W/)?("[\x21\x23-\x7e\x80-\xff]*"))[ \t]*)?(?:,|\Z)')
#: One entity tag alone, the usual `If-None-Match` (parsed without the list loop).
_ONE_TAG = re.compile(rb'(?:W/)?("[\x21\x23-\x7e\x80-\xff]*")')
#: A longer `wait=` value than this many digits is "forever": capped like any long wait.
_MAX_DIGITS = 9


def entity_tag(version_id: str) -> bytes:
    """`"<VersionId>"`, the ETag of a secret answer (KMS's VersionIds are letters, digits, `-`, `_`)."""
    return b'"%s"' % quote(version_id.encode("utf-8", "surrogatepass"), safe=_ETAG_SAFE).encode("ascii")


@dataclass(frozen=True, slots=True)
class Conditions:
    """What a request's `If-None-Match` (and, with it, `Prefer: wait`) ask for.

    Kept by every held request, so small: slots, and the tags in a tuple (one tag, the usual
    case, is 48 bytes there and 216 in a frozenset; the header is at most 16 KB anyway).
    """

    #: The opaque tags listed, quotes included, weakness dropped (a weak comparison).
    tags: tuple[bytes, ...]
    #: `If-None-Match: *`: any current version matches.
    any_tag: bool = False
    #: Seconds asked with `Prefer: wait=N`; None when absent or unreadable.
    wait: int | None = None

    def matches(self, etag: bytes) -> bool:
        """The client already has this version: the answer is 304."""
        return self.any_tag or etag in self.tags

    def is_news(self, etag: bytes, held: bytes) -> bool:
        """A held request ends with 200 on `etag`: not a version the client listed, or (`*`)
        another one than `held`, the version it was held on."""
        return etag != held if self.any_tag else etag not in self.tags


def read_conditions(headers: Headers) -> Conditions | None:
    """The request's conditions; None without a readable `If-None-Match` (`Prefer` alone is
    ignored: SPEC §3 holds only conditional reads). `headers` have lower-case names, as in ASGI."""
    if_none_match: list[bytes] = []
    prefer: list[bytes] = []
    for name, value in headers:
        if name == b"if-none-match":
            if_none_match.append(value)
        elif name == b"prefer":
            prefer.append(value)
    if not if_none_match:
        return None
    listed = _entity_tags(b",".join(if_none_match))  # RFC 9110 §5.3: repeated fields are one list
    if listed is None:
        return None
    tags, any_tag = listed
    return Conditions(tags, any_tag, wait_preference(prefer))


def _entity_tags(field: bytes) -> tuple[tuple[bytes, ...], bool] | None:
    """(tags, `*` seen) of an `If-None-Match` value, or None when it is not a list of entity tags."""
    one = _ONE_TAG.fullmatch(field)
    if one is not None:
        return (one[1],), False
    tags: dict[bytes, None] = {}
    any_tag = False
    position = 0
    while position < len(field):
        element = _LIST_ELEMENT.match(field, position)
        if element is None:
            return None
        star, tag = element.groups()
        if star:
            any_tag = True
        elif tag:
            tags[tag] = None
        position = element.end()
    if not tags and not any_tag:
        return None
    return tuple(tags), any_tag


def wait_preference(values: Sequence[bytes]) -> int | None:
    """Seconds of the first `wait` preference of `Prefer` fields (RFC 7240 §4.3: delta-seconds),
    or None: absent, or not a number (`wait=-1`, `wait=abc`: ignored, RFC 7240 §2)."""
    field = b",".join(values)
    for preference in _list_elements(field) if b'"' in field else field.split(b","):
        name, equals, rest = preference.partition(b"=")
        if name.strip(b" \t").lower() != b"wait":
            continue
        # Only the first instance counts (RFC 7240 §2); its parameters after ";" are not wait's.
        value = rest.partition(b";")[0].strip(b" \t")
        if len(value) >= 2 and value[0] == value[-1] == 0x22:  # a quoted-string `word`
            value = value[1:-1]
        if not equals or not value.isdigit():
            return None
        return int(value) if len(value) <= _MAX_DIGITS else 10**_MAX_DIGITS
    return None


def _list_elements(field: bytes) -> Iterator[bytes]:
    """The comma-separated elements of a header list; commas inside quoted strings stay."""
    start = 0
    quoted = escaped = False
    for index, byte in enumerate(field):
        if escaped:
            escaped = False
        elif quoted and byte == 0x5C:  # a quoted-pair's backslash
            escaped = True
        elif byte == 0x22:
            quoted = not quoted
        elif byte == 0x2C and not quoted:
            yield field[start:index]
            start = index + 1
    yield field[start:]
