"""scripts/install.sh and scripts/uninstall.sh (SPEC §7): the staged tree, the systemd units, the
token writer, the agent running from the installed venv, a live install's accounts (with stubs)."""

from __future__ import annotations

import grp
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tomllib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from kmsagent import __version__
from kmsagent.emulator import KmsEmulator
from test_cli import read_lines_until

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "/usr/local/alibabacloudkmsagent"
UNITS = ("kmsagent-token.service", "kmsagent.service")
AK_ID, AK_SECRET = "LTAIinstallTestKeyId01", "install-test-AccessKeySecret-Vb7q"
SECRET_NAME, SECRET_VALUE = "install/db-password", "value-of-install-secret-Wm4k"
#: pip needs the environment's index settings and its cache under HOME; the venv is built from
#: the interpreter running the tests, which is known to be new enough.
INSTALL_ENV = {**os.environ, "PYTHON": sys.executable}


def run_script(name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / name), *args],
        env=env or INSTALL_ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


@dataclass(frozen=True)
class Tree:
    """A tree staged by `install.sh --root`."""

    root: Path
    result: subprocess.CompletedProcess[str]

    @property
    def prefix(self) -> Path:
        return self.root / PREFIX.lstrip("/")

    @property
    def units_dir(self) -> Path:
        return self.root / "etc" / "systemd" / "system"

    @property
    def conf(self) -> Path:
        return self.prefix / "conf" / "kmsagent.toml"

    def unit(self, name: str) -> str:
        return (self.units_dir / name).read_text()


def install(root: Path, *args: str) -> Tree:
    result = run_script("install.sh", "--root", str(root), *args)
    assert result.returncode == 0, f"install.sh failed: {result.stderr[-3000:]}"
    return Tree(root, result)


def copy_tree(tree: Tree, root: Path) -> Tree:
    """A copy to change freely; the venv keeps working, as its interpreter is an absolute link."""
    shutil.copytree(tree.root, root, symlinks=True)
    return Tree(root, tree.result)


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Tree:
    """The one real installation of the module (it builds a venv from PyPI): no units."""
    return install(tmp_path_factory.mktemp("staged"), "--no-systemd")


@pytest.fixture(scope="module")
def upgraded(staged: Tree, tmp_path_factory: pytest.TempPathFactory) -> Tree:
    """`staged` after an operator edited the config, installed again, now with the units."""
    tree = copy_tree(staged, tmp_path_factory.mktemp("upgraded") / "root")
    tree.conf.write_text(tree.conf.read_text().replace('Level = "debug"', 'Level = "warn"') + "# edited by the operator\n")
    return install(tree.root)


def unit_settings(text: str) -> dict[str, list[str]]:
    """"Section.Key" -> its values in order (a systemd key may be repeated)."""
    settings: dict[str, list[str]] = defaultdict(list)
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings[f"{section}.{key}"].append(value)
    return settings


def assert_one_line(text: str) -> None:
    assert len(text.strip().splitlines()) == 1 and "Traceback" not in text, text


def token_group() -> str:
    """A group this process may give a file to: its own."""
    return grp.getgrgid(os.getgid()).gr_name


# --- install.sh --root --no-systemd ---------------------------------------------------------


def test_install_lays_out_the_tree_without_units(staged: Tree) -> None:
    prefix = staged.prefix
    assert os.access(prefix / "venv" / "bin" / "python", os.X_OK)
    assert staged.conf.is_file() and (prefix / "logs").is_dir()
    for wrapper in ("kmsagent", "kmsagent-token"):
        assert os.access(prefix / "bin" / wrapper, os.X_OK)
    assert not (staged.root / "etc").exists()
    # Staged: no accounts, no systemctl; the packager is told what is left to do.
    assert "useradd --system" in staged.result.stdout and "systemctl" not in staged.result.stdout


def test_the_installed_config_is_the_shipped_one_logging_into_the_prefix(staged: Tree) -> None:
    installed = tomllib.loads(staged.conf.read_text())
    shipped = tomllib.loads((ROOT / "conf" / "kmsagent.toml").read_text())
    assert installed["Log"].pop("Path") == f"{PREFIX}/logs/"  # the final path, not the staged one
    shipped["Log"].pop("Path")
    assert installed == shipped
    assert stat.S_IMODE(staged.conf.stat().st_mode) == 0o640


def test_the_wrapper_runs_the_installed_agent(staged: Tree) -> None:
    wrapper = str(staged.prefix / "bin" / "kmsagent")
    version = subprocess.run([wrapper, "--version"], capture_output=True, text=True, timeout=30)
    assert version.stdout.strip() == f"kmsagent {__version__}"
    check = subprocess.run([wrapper, "--check-config", "--config", str(staged.conf)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr


# --- a second run, with units ---------------------------------------------------------------


def test_a_second_run_keeps_the_operators_config(upgraded: Tree) -> None:
    text = upgraded.conf.read_text()
    assert text.endswith("# edited by the operator\n") and 'Level = "warn"' in text
    assert "keeping the existing config" in upgraded.result.stdout
    assert sorted(path.name for path in upgraded.units_dir.iterdir()) == sorted(UNITS)


def test_the_agent_unit_runs_the_installed_agent_as_its_user_hardened(upgraded: Tree) -> None:
    text = upgraded.unit("kmsagent.service")
    assert str(upgraded.root) not in text  # the units name where files will be, not the staging root
    unit = unit_settings(text)
    assert set(unit["Unit.Requires"]) == {"kmsagent-token.service"}
    assert {"kmsagent-token.service", "network-online.target"} <= set(" ".join(unit["Unit.After"]).split())
    expected = {
        "ExecStart": f"{PREFIX}/venv/bin/python -m kmsagent --config {PREFIX}/conf/kmsagent.toml",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "User": "kmsagent",
        "Group": "kmsagent",
        "SupplementaryGroups": "kmstokenreader",
        "Environment": "KMS_TOKEN=file:///var/run/kmstoken",
        "Restart": "on-failure",
        "RestartSec": "2",
        "KillSignal": "SIGTERM",
        "TimeoutStopSec": "10",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ReadWritePaths": f"{PREFIX}/logs",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "RestrictRealtime": "yes",
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "UMask": "0077",
    }
    assert {key: unit[f"Service.{key}"] for key in expected} == {key: [value] for key, value in expected.items()}
    assert unit["Install.WantedBy"] == ["multi-user.target"]


def test_the_token_unit_writes_the_token_once_per_boot(upgraded: Tree) -> None:
    unit = unit_settings(upgraded.unit("kmsagent-token.service"))
    assert unit["Service.Type"] == ["oneshot"] and unit["Service.RemainAfterExit"] == ["yes"]
    assert unit["Service.ExecStart"] == [f"{PREFIX}/bin/kmsagent-token /var/run/kmstoken"]
    # The writer it runs is the one tested below: mode 0640, group kmstokenreader by default.
    writer = (upgraded.prefix / "bin" / "kmsagent-token").read_text()
    assert "chmod 0640" in writer and "KMSAGENT_TOKEN_GROUP-kmstokenreader" in writer


def test_systemd_analyze_verifies_the_units(upgraded: Tree, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify checks that the commands exist, so the copies point at the staged tree.
    for name in UNITS:
        (tmp_path / name).write_text(upgraded.unit(name).replace(PREFIX, str(upgraded.prefix)))
    result = subprocess.run(
        [analyze, "verify", *(str(tmp_path / name) for name in UNITS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "kmsagent" not in result.stderr, result.stderr


# --- the token writer -----------------------------------------------------------------------


def test_the_token_writer_writes_a_fresh_token_readable_by_the_group(staged: Tree, tmp_path: Path) -> None:
    writer, target = str(staged.prefix / "bin" / "kmsagent-token"), tmp_path / "kmstoken"
    env = {"PATH": os.environ["PATH"], "KMSAGENT_TOKEN_GROUP": token_group()}
    tokens = []
    for _ in range(2):
        result = subprocess.run([writer, str(target)], env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        status = target.stat()
        assert (stat.S_IMODE(status.st_mode), status.st_gid) == (0o640, os.getgid())
        tokens.append(target.read_text())
    assert all(re.fullmatch(r"[0-9a-f]{64}\n", token) for token in tokens)
    assert tokens[0] != tokens[1]
    assert [path.name for path in tmp_path.iterdir()] == ["kmstoken"]  # no temporary file left


def test_the_token_writer_fails_without_its_group(staged: Tree, tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "KMSAGENT_TOKEN_GROUP": "no-such-group-kmsagent"}
    writer = str(staged.prefix / "bin" / "kmsagent-token")
    result = subprocess.run([writer, str(tmp_path / "kmstoken")], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert_one_line(result.stderr)
    assert list(tmp_path.iterdir()) == []


# --- the agent from the staged tree ---------------------------------------------------------


async def test_the_units_command_serves_secrets_from_the_staged_tree(
    upgraded: Tree, tmp_path: Path, nursery: trio.Nursery
) -> None:
    kms = KmsEmulator()
    kms.add_credentials(AK_ID, AK_SECRET)
    kms.put_secret(SECRET_NAME, SECRET_VALUE)
    await nursery.start(kms.serve)
    config = tmp_path / "kmsagent.toml"
    config.write_text(
        f'[Server]\nHttpPort = 0\n[KMS]\nEndpoint = "{kms.endpoint}"\nProtocol = "http"\n'
        f'[Credentials]\nMetadataEndpoint = "http://127.0.0.1:9"\n[Log]\nPath = "{tmp_path / "logs"}"\n'
    )
    # As under systemd: the token writer's file, named by KMS_TOKEN=file://.
    token_file = tmp_path / "kmstoken"
    writer = [str(upgraded.prefix / "bin" / "kmsagent-token"), str(token_file)]
    await trio.run_process(writer, env={"PATH": os.environ["PATH"], "KMSAGENT_TOKEN_GROUP": token_group()})
    token = token_file.read_text().strip()
    # The unit's own command line, with the staged prefix and the test's config.
    command = unit_settings(upgraded.unit("kmsagent.service"))["Service.ExecStart"][0].split()
    command = [part.replace(PREFIX, str(upgraded.prefix)) for part in command]
    command[command.index("--config") + 1] = str(config)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "KMS_TOKEN": f"file://{token_file}",
        "ALIBABA_CLOUD_ACCESS_KEY_ID": AK_ID,
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": AK_SECRET,
    }
    stderr_path = tmp_path / "stderr.txt"
    with stderr_path.open("wb") as stderr:
        process = await trio.lowlevel.open_process(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=stderr)
    try:
        lines = await read_lines_until(process, "listening on")
        port = int(lines[-1].rsplit(":", 1)[1])
        assert lines == [f"kmsagent {__version__} listening on http://127.0.0.1:{port}"]
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(
                f"http://127.0.0.1:{port}/secretsmanager/get?secretId={SECRET_NAME}", headers={"X-KMS-Token": token}
            )
        assert response.status_code == 200 and response.json()["SecretData"] == SECRET_VALUE
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(5):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        print(f"agent stderr:\n{stderr_path.read_text()}")  # shown when the test fails


# --- uninstall.sh -----------------------------------------------------------------------------


def test_uninstall_keeps_the_config_and_purge_removes_it(upgraded: Tree, tmp_path: Path) -> None:
    tree = copy_tree(upgraded, tmp_path / "root")
    edited = tree.conf.read_text()
    for _ in range(2):  # a second run finds nothing more to do
        result = run_script("uninstall.sh", "--root", str(tree.root))
        assert result.returncode == 0, result.stderr
        assert list(tree.units_dir.iterdir()) == []
        assert sorted(path.name for path in tree.prefix.iterdir()) == [".kmsagent-install", "conf"]
        assert tree.conf.read_text() == edited
    result = run_script("uninstall.sh", "--root", str(tree.root), "--purge")
    assert result.returncode == 0, result.stderr
    assert not tree.prefix.exists()
    assert "userdel kmsagent" in result.stdout  # staged: the accounts are the packager's to remove


@pytest.mark.parametrize("script", ["install.sh", "uninstall.sh"])
def test_a_folder_install_sh_did_not_make_is_left_alone(script: str, tmp_path: Path) -> None:
    """--prefix /usr/local must not end with uninstall.sh deleting /usr/local/bin."""
    foreign = tmp_path / "opt" / "shared"
    (foreign / "bin").mkdir(parents=True)
    (foreign / "bin" / "tool").write_text("keep me")
    result = run_script(script, "--root", str(tmp_path), "--prefix", "/opt/shared")
    assert result.returncode == 1
    assert_one_line(result.stderr)
    assert sorted(path.name for path in foreign.iterdir()) == ["bin"] and (foreign / "bin" / "tool").read_text() == "keep me"


# --- command lines ------------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["install.sh", "uninstall.sh"])
@pytest.mark.parametrize("args", [["--bogus"], ["--prefix"], ["--prefix", "relative/dir"], ["--prefix", "/"], ["--prefix", "/a b"]])
def test_a_bad_command_line_exits_2_with_one_line(script: str, args: list[str], tmp_path: Path) -> None:
    result = run_script(script, "--root", str(tmp_path), *args)
    assert result.returncode == 2
    assert_one_line(result.stderr)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script", ["install.sh", "uninstall.sh"])
def test_help(script: str) -> None:
    result = run_script(script, "--help")
    assert result.returncode == 0 and result.stdout.startswith(f"Usage: scripts/{script}")


# --- a live install, with the account tools replaced by stubs -------------------------------------


def stubbed_env(tmp_path: Path, uid: int) -> tuple[dict[str, str], Path]:
    """An environment whose id, getent, account tools, chown/chgrp and systemctl are stubs that
    log their arguments: no user, group or service of this host is touched."""
    stubs, log = tmp_path / "stubs", tmp_path / "calls.log"
    stubs.mkdir()
    scripts = {
        "id": f'[ "$1" = -u ] && echo {uid}',  # the scripts ask only for `id -u`
        "getent": "exit 2",  # no such user or group yet
        **{tool: "" for tool in ("groupadd", "useradd", "usermod", "chown", "chgrp", "systemctl")},
    }
    for name, body in scripts.items():
        (stubs / name).write_text(f'#!/bin/sh\necho "{name} $*" >>"{log}"\n{body}\n')
        (stubs / name).chmod(0o755)
    return {**INSTALL_ENV, "PATH": f"{stubs}:{os.environ['PATH']}"}, log


def calls(log: Path) -> list[str]:
    """The stubs' calls that change something (`id` and `getent` only look)."""
    if not log.exists():
        return []
    return [line for line in log.read_text().splitlines() if not line.startswith(("id ", "getent "))]


def test_a_live_install_needs_root(tmp_path: Path) -> None:
    env, log = stubbed_env(tmp_path, uid=1000)
    prefix = tmp_path / "opt" / "kmsagent"
    for script in ("install.sh", "uninstall.sh"):
        result = run_script(script, "--prefix", str(prefix), env=env)
        assert result.returncode == 1 and "run as root" in result.stderr
        assert_one_line(result.stderr)
    assert not prefix.exists() and calls(log) == []


@pytest.mark.skipif(Path("/run/systemd/system").exists(), reason="this host runs systemd: the units would be real")
def test_a_live_install_without_a_running_systemd_asks_for_no_systemd(tmp_path: Path) -> None:
    env, log = stubbed_env(tmp_path, uid=0)
    prefix = tmp_path / "opt" / "kmsagent"
    result = run_script("install.sh", "--prefix", str(prefix), env=env)
    assert result.returncode == 1 and "--no-systemd" in result.stderr
    assert not prefix.exists() and calls(log) == []


def test_a_live_install_creates_the_accounts_and_owns_the_logs(staged: Tree, tmp_path: Path) -> None:
    env, log = stubbed_env(tmp_path, uid=0)
    prefix = tmp_path / "opt" / "kmsagent"
    # The staged venv is reused (as in an upgrade), which spares building one; the config is new.
    shutil.copytree(staged.prefix, prefix, symlinks=True, ignore=lambda folder, _: ["conf"] if folder == str(staged.prefix) else [])
    result = run_script("install.sh", "--prefix", str(prefix), "--no-systemd", env=env)
    assert result.returncode == 0, result.stderr
    useradd = next(call for call in calls(log) if call.startswith("useradd "))
    shell = useradd.split("--shell ")[1].split()[0]
    assert shell in ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false")
    assert calls(log) == [
        "groupadd --system kmstokenreader",
        f"useradd --system --user-group --no-create-home --home-dir /nonexistent --shell {shell} kmsagent",
        "usermod -a -G kmstokenreader kmsagent",
        f"chown kmsagent:kmsagent {prefix}/logs",
        f"chgrp kmsagent {prefix}/conf {prefix}/conf/kmsagent.toml",
    ]
    assert tomllib.loads((prefix / "conf" / "kmsagent.toml").read_text())["Log"]["Path"] == f"{prefix}/logs/"


# --- the Kubernetes example -------------------------------------------------------------------------


def test_the_kubernetes_example_config_is_valid(staged: Tree, tmp_path: Path) -> None:
    """The ConfigMap's kmsagent.toml (a YAML block scalar, read without a YAML library)."""
    lines = (ROOT / "conf" / "kubernetes" / "kmsagent-sidecar.yaml").read_text().splitlines()
    start = next(index for index, line in enumerate(lines) if line.strip() == "kmsagent.toml: |") + 1
    indent = len(lines[start]) - len(lines[start].lstrip())
    block = []
    for line in lines[start:]:
        if line.strip() and len(line) - len(line.lstrip()) < indent:
            break
        block.append(line[indent:])
    (tmp_path / "kmsagent.toml").write_text("\n".join(block) + "\n")
    python = str(staged.prefix / "venv" / "bin" / "python")
    check = subprocess.run(
        [python, "-m", "kmsagent", "--check-config", "--config", str(tmp_path / "kmsagent.toml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stderr
    effective = tomllib.loads(check.stdout)
    assert effective["Credentials"]["Type"] == "oidc_role_arn" and effective["KMS"]["Region"]
