"""`[[Files]] Template` (SPEC §8): `${NAME}` is a top-level key of a JSON secret, `${SecretData}`
the whole value, `$$` a `$`, and any other `$` is literal.

Why not `string.Template`: its identifiers are `[_a-z][_a-z0-9]*`, so `${tls.crt}` or
`${db-password}` — ordinary JSON keys — would be errors, and a lone `$` in a PEM or a password
would raise. Here a name is any text up to the next `}`, so any key can be named.

A template is parsed once, when the config is loaded (a typo fails at start-up), and rendered on
every new value. Rendering errors name the key, never the value.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

#: `${SecretData}` names the whole secret value, whatever the JSON holds.
WHOLE_VALUE = "SecretData"


class TemplateError(ValueError):
    """The template text is malformed; the message says where."""


class RenderError(ValueError):
    """The secret does not fit (not JSON, a key is missing); the message never holds the value."""


@dataclass(frozen=True)
class Template:
    """Literal text and names, in order: `parts[i]` is a `str` literal or a `_Name`."""

    parts: tuple[str | _Name, ...]

    @property
    def needs_json(self) -> bool:
        return any(isinstance(part, _Name) and part.key != WHOLE_VALUE for part in self.parts)

    def render(self, data: str) -> str:
        """The text with every name replaced from `data`, the secret's value."""
        document = json_object(data) if self.needs_json else None
        out: list[str] = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
            elif part.key == WHOLE_VALUE:
                out.append(data)
            else:
                assert document is not None
                out.append(member(document, part.key))
        return "".join(out)


@dataclass(frozen=True)
class _Name:
    key: str


def parse_template(text: str) -> Template:
    """Splits `text` into literals and `${...}` names; an unclosed `${` or `${}` is an error."""
    parts: list[str | _Name] = []
    literal: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        following = text[i + 1 : i + 2]
        if char == "$" and following == "$":
            literal.append("$")
            i += 2
        elif char == "$" and following == "{":
            end = text.find("}", i + 2)
            if end < 0:
                raise TemplateError(f'"${{" at character {i + 1} has no closing "}}" (write $$ for a literal $)')
            if end == i + 2:
                raise TemplateError(f'"${{}}" at character {i + 1} names no key')
            if literal:
                parts.append("".join(literal))
                literal = []
            parts.append(_Name(text[i + 2 : end]))
            i = end + 1
        else:
            literal.append(char)
            i += 1
    if literal:
        parts.append("".join(literal))
    return Template(tuple(parts))


def json_object(data: str) -> dict[str, Any]:
    """The secret parsed as a JSON object, or RenderError (without the parser's message, which may quote it)."""
    try:
        document = json.loads(data)
    except ValueError:
        raise RenderError("the secret value is not JSON") from None
    if not isinstance(document, dict):
        raise RenderError("the secret value is JSON but not an object")
    return document


def member(document: dict[str, Any], key: str) -> str:
    """One top-level member: a string as is, anything else as JSON."""
    if key not in document:
        raise RenderError(f"the secret's JSON has no key {json.dumps(key)[:80]}")
    value = document[key]
    return value if isinstance(value, str) else json.dumps(value)
