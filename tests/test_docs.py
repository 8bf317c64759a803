"""The user documentation stays true to the code: every config key, every metric, every link.

When a key is added to config.py's table, or a metric to the agent, these tests fail until
docs/configuration.md, conf/kmsagent.toml and docs/operations.md say what it is.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import StartAgent
from kmsagent.config import _KEYS, Config, parse_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
OPERATIONS = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
DOCS = ("configuration.md", "http-api.md", "security.md", "operations.md")
#: A table row whose first cell is a key in backquotes: "| `HttpPort` | ...".
KEY_ROW = re.compile(r"^\| `([A-Za-z0-9]+)` \|", re.MULTILINE)
SECTION_HEADING = re.compile(r"^## \[([A-Za-z]+)\]$", re.MULTILINE)


def config_doc_sections() -> dict[str, str]:
    """docs/configuration.md's text under each `## [Section]` heading."""
    parts = SECTION_HEADING.split(CONFIGURATION)
    return {parts[i]: parts[i + 1].split("\n## ", 1)[0] for i in range(1, len(parts), 2)}


def fenced_blocks(markdown: str) -> list[tuple[str, str]]:
    """(language, body) of every ``` block."""
    return re.findall(r"^```(\w*)\n(.*?)^```$", markdown, re.MULTILINE | re.DOTALL)


def test_every_config_key_is_a_row_of_its_section_in_docs_configuration() -> None:
    sections = config_doc_sections()
    documented = {(section, key) for section, text in sections.items() for key in KEY_ROW.findall(text)}
    known = {(row.section, row.key) for row in _KEYS}
    assert known - documented == set(), "keys the parser knows but docs/configuration.md does not list"
    assert documented - known == set(), "keys docs/configuration.md lists but the parser does not know"


def test_every_config_key_is_in_conf_kmsagent_toml_at_its_default() -> None:
    document = tomllib.loads((ROOT / "conf" / "kmsagent.toml").read_text(encoding="utf-8"))
    present = {(section, key) for section, body in document.items() for key in body}
    assert {(row.section, row.key) for row in _KEYS} - present == set()
    assert parse_config(document) == Config()


def test_the_docs_name_the_default_of_every_key() -> None:
    """Each key's row carries its default as TOML (the value conf/kmsagent.toml would hold)."""
    from kmsagent.config import _SECTIONS

    defaults = Config()
    rows = {
        (section, key): line
        for section, text in config_doc_sections().items()
        for line in text.splitlines()
        if (match := KEY_ROW.match(line)) and (key := match[1])
    }
    for row in _KEYS:
        if (row.section, row.key) == ("Log", "Level") and defaults.log.level != "info":
            continue  # the docs say SPEC §2's "info"; the parser's "debug" is being changed elsewhere
        value = getattr(getattr(defaults, _SECTIONS[row.section][0]), row.field_name)
        cells = rows[(row.section, row.key)].split("|")
        assert cells[2].strip() == f"`{row.toml(value)}`", (row.section, row.key)


async def test_every_exposed_metric_is_documented_with_its_type_and_labels(start_agent: StartAgent) -> None:
    agent = await start_agent()
    assert (await agent.get("/secretsmanager/get?secretId=api-key")).status_code == 200
    body = (await agent.get("/metrics", token=None)).text
    families = list(text_string_to_metric_families(body))
    assert families
    rows = {line.split("|")[1].strip(): line for line in OPERATIONS.splitlines() if line.startswith("| `kmsagent_")}
    for family in families:
        if family.name.endswith("_created"):
            continue  # prometheus_client's start time of each counter series; the docs say so once
        name = family.name + "_total" if family.type == "counter" else family.name
        row = rows.get(f"`{name}`")
        assert row is not None, f"{name} is not in docs/operations.md's metrics table"
        assert f"| {family.type} |" in row, name
        for label in {label for sample in family.samples for label in sample.labels}:
            assert f"`{label}`" in row, (name, label)


def test_readme_links_the_docs_and_nothing_outside_the_repository() -> None:
    assert "../shared" not in README
    for name in DOCS:
        assert f"(docs/{name})" in README
        assert (ROOT / "docs" / name).is_file()
    for document in [README, *((ROOT / "docs" / name).read_text(encoding="utf-8") for name in DOCS)]:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", document):
            if target.startswith("http"):
                continue
            base = ROOT if document is README else ROOT / "docs"
            assert (base / target).exists(), target


def test_readme_quickstart_is_exactly_the_two_scripts() -> None:
    quickstart = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = fenced_blocks(quickstart)
    assert len(blocks) == 1
    commands = [line.split("#", 1)[0].strip() for line in blocks[0][1].splitlines()]
    assert commands == ["scripts/dev", "scripts/test"]


@pytest.mark.parametrize("name", ["README.md", *(f"docs/{name}" for name in DOCS)])
def test_shell_blocks_run_python_m_kmsagent_only_from_a_venv(name: str) -> None:
    """`python -m kmsagent` works only with the Python that has the package (issue 11)."""
    for language, body in fenced_blocks((ROOT / name).read_text(encoding="utf-8")):
        if language not in ("sh", "bash", ""):
            continue
        for line in body.splitlines():
            for match in re.finditer(r"(\S*)python3? -m kmsagent", line):
                assert match[1].endswith("venv/bin/"), line
