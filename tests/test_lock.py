"""The locks (requirements.lock, requirements-runtime.lock) and the version, kept in one place.

scripts/_venv.sh installs requirements.lock and nothing else, so the versions tested are the
versions locked; the Dockerfile and install.sh install requirements-runtime.lock, which must be
the runtime part of that same set. Both are made by scripts/lock from pyproject.toml's ranges,
which stay ranges for people who install the package into an environment of their own.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
RUNTIME_LOCK = ROOT / "requirements-runtime.lock"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
#: In every venv but not in the lock: the installer that came with the interpreter, and the
#: package itself (installed editable from the checkout, with --no-deps).
NOT_LOCKED = {canonicalize_name("pip"), canonicalize_name(PYPROJECT["name"])}
REBUILD = "the venv is not the lock's: run `rm -rf .venv && scripts/test` to rebuild it from requirements.lock"


@dataclass(frozen=True)
class Pin:
    version: str
    hashes: frozenset[str]


def read_lock(path: Path) -> dict[NormalizedName, Pin]:
    """`name==version` followed by its `--hash=sha256:…` options (backslash-continued lines)."""
    pins: dict[NormalizedName, Pin] = {}
    text = re.sub(r"\\\n", " ", path.read_text())
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})*)", line)
        assert match, f"{path.name}: not a hashed pin: {line[:120]!r}"
        name = canonicalize_name(match[1])
        assert name not in pins, f"{path.name} pins {name} twice"
        pins[name] = Pin(match[2], frozenset(re.findall(r"sha256:([0-9a-f]{64})", match[3])))
    return pins


def project_requirements(*extras: str) -> list[Requirement]:
    """pyproject.toml's dependencies (and those of the extras), as they apply here."""
    texts = list(PYPROJECT["dependencies"])
    for extra in extras:
        texts += PYPROJECT["optional-dependencies"][extra]
    return [req for req in map(Requirement, texts) if req.marker is None or req.marker.evaluate()]


def closure(requirements: list[Requirement]) -> set[NormalizedName]:
    """Every distribution these requirements bring in, walked through the installed metadata."""
    seen: set[tuple[NormalizedName, str]] = set()  # (distribution, one of its extras or "")
    todo = [(req, "") for req in requirements]  # a requirement, and the extra of its dependant
    while todo:
        req, context = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": context}):
            continue
        name = canonicalize_name(req.name)
        for extra in ("", *sorted(canonicalize_name(e) for e in req.extras)):
            if (name, extra) not in seen:
                seen.add((name, extra))
                todo += [(Requirement(text), extra) for text in importlib.metadata.requires(name) or []]
    return {name for name, _ in seen}


@pytest.fixture(scope="module")
def lock() -> dict[NormalizedName, Pin]:
    return read_lock(LOCK)


@pytest.fixture(scope="module")
def runtime_lock() -> dict[NormalizedName, Pin]:
    return read_lock(RUNTIME_LOCK)


def installed() -> dict[NormalizedName, str]:
    """What this interpreter imports from: name → version (the first of a name on sys.path wins).

    Importing setuptools (a test that builds the wheel does) puts its `_vendor` folder on sys.path;
    the copies there belong to setuptools, not to the venv, and are left out.
    """
    found: dict[NormalizedName, str] = {}
    for dist in importlib.metadata.distributions():
        if "_vendor" in Path(str(dist.locate_file(""))).parts:
            continue
        found.setdefault(canonicalize_name(dist.metadata["Name"]), dist.version)
    return found


def test_the_venv_holds_exactly_the_locked_versions(lock: dict[NormalizedName, Pin]) -> None:
    """The run under test uses the versions locked, each of them, and nothing unlocked beside them."""
    have = installed()
    wrong = {name: (pin.version, have.get(name)) for name, pin in lock.items() if have.get(name) != pin.version}
    assert not wrong, f"locked vs installed: {wrong}; {REBUILD}"
    extra = sorted(set(have) - set(lock) - NOT_LOCKED)
    assert not extra, f"installed but not locked: {extra}; {REBUILD}"


@pytest.mark.parametrize("extras", [(), ("test",)], ids=["runtime", "test"])
def test_pyproject_ranges_admit_the_locked_versions(extras: tuple[str, ...], lock: dict[NormalizedName, Pin]) -> None:
    """A range edited in pyproject.toml without a new lock is caught here: run scripts/lock."""
    for req in project_requirements(*extras):
        name = canonicalize_name(req.name)
        assert name in lock, f"{req} is in pyproject.toml but not in requirements.lock: run scripts/lock"
        assert req.specifier.contains(lock[name].version, prereleases=True), (
            f"requirements.lock has {name}=={lock[name].version}, outside pyproject.toml's {req}: run scripts/lock"
        )


def test_the_lock_holds_what_the_project_needs_and_no_more(lock: dict[NormalizedName, Pin]) -> None:
    """A dependency dropped from pyproject.toml leaves the lock too (scripts/lock resolves afresh)."""
    assert closure(project_requirements("test")) == set(lock)


def test_the_runtime_lock_is_the_runtime_part_of_the_tested_set(
    lock: dict[NormalizedName, Pin], runtime_lock: dict[NormalizedName, Pin]
) -> None:
    """The image and install.sh get what the package needs at run time, at the versions tested
    (same files, same hashes), and none of the test tools."""
    assert set(runtime_lock) == closure(project_requirements())
    assert {name: lock[name] for name in runtime_lock} == runtime_lock
    assert "pytest" not in runtime_lock and "mypy" not in runtime_lock


@pytest.mark.parametrize("path", [LOCK, RUNTIME_LOCK], ids=lambda path: path.name)
def test_a_lock_names_no_index_and_hashes_every_pin(path: Path) -> None:
    """The index is the installing machine's own setting (pip config, a mirror), never the lock's;
    and pip's --require-hashes needs a hash on every line."""
    lines = path.read_text().splitlines()
    assert [line for line in lines if line.lstrip().startswith("-") and "--hash=" not in line] == []
    assert not re.search(r"://|file:|/opt/", path.read_text())
    assert all(pin.hashes for pin in read_lock(path).values())


def test_version_lives_in_pyproject_and_version_prints_it() -> None:
    """One place for the version: pyproject.toml. `kmsagent --version` reads the installed
    metadata, which scripts/_venv.sh refreshes whenever pyproject.toml changes."""
    result = subprocess.run(
        [sys.executable, "-m", "kmsagent", "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    assert (result.returncode, result.stdout) == (0, f"kmsagent {PYPROJECT['version']}\n")
    init = (ROOT / "src" / "kmsagent" / "__init__.py").read_text()
    assert PYPROJECT["version"] not in init and "__version__ =" not in init


@pytest.mark.parametrize("path", ["Dockerfile", "scripts/install.sh"])
def test_the_image_and_install_sh_install_the_runtime_lock(path: str) -> None:
    """Their dependencies are the tested ones: the runtime lock, hash-checked, then the package
    with --no-deps (tests/test_image.py and tests/test_install.py run those steps)."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / path).read_text())
    assert re.search(r"pip .*install .*--require-hashes .*-r \S*requirements-runtime\.lock", text), path
    assert re.search(r"pip .*install .*--no-deps", text), path


def test_ci_runs_the_locked_checks_and_then_the_tests(lock: dict[NormalizedName, Pin]) -> None:
    """.ci/run stops at the first failure; scripts/check runs ruff and mypy from the venv, so the
    lock must pin them (a clean clone has nothing else)."""
    ci = (ROOT / ".ci" / "run").read_text()
    assert "set -euo pipefail" in ci
    assert [line for line in ci.splitlines() if line.startswith("bash ")] == ["bash scripts/check", "bash scripts/test"]
    check = (ROOT / "scripts" / "check").read_text()
    for tool in ("ruff", "mypy"):
        assert f'"$venv/bin/{tool}"' in check, tool
        assert canonicalize_name(tool) in lock, f"{tool} is not in requirements.lock"
