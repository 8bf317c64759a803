"""scripts/install.sh and scripts/uninstall.sh (SPEC §7): the staged tree, the systemd units, the
token writer, the agent running from the installed venv, a live install's accounts (with stubs),
the manifest that makes uninstall.sh remove exactly what install.sh made, and a user-level
install by a user other than root."""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import tomllib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from kmsagent import __version__
from kmsagent.emulator import KmsEmulator
from kmsagent.server import MAX_REFUSING, OTHER_DESCRIPTORS, PING_RESERVE
from test_cli import read_lines_until

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "/usr/local/alibabacloudkmsagent"
UNITS = ("kmsagent-token.service", "kmsagent.service")
MANIFEST = ".kmsagent-manifest"
#: What a first install makes under the prefix (with the units, also /etc/systemd/system/UNITS).
MADE = ("", "/bin", "/bin/kmsagent", "/bin/kmsagent-token", "/conf", "/conf/kmsagent.toml", "/logs", "/venv")
#: The drop-ins installed with the units, not enabled, and what else that makes under the prefix.
DROPINS = ("files-folders.conf", "files-owner.conf", "exec-jit.conf")
MADE_WITH_UNITS = ("/share", "/share/systemd", *(f"/share/systemd/{name}" for name in DROPINS))
#: SPEC §9's StopTimeoutSeconds default: the unit's TimeoutStopSec must be at least 5 s more.
DEFAULT_STOP_TIMEOUT_SECONDS = 10
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
        check=False,
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

    @property
    def manifest(self) -> Path:
        return self.prefix / MANIFEST

    def listed(self) -> set[str]:
        """The manifest's paths (as on the target host)."""
        return manifest_paths(self.manifest)

    def files(self) -> set[str]:
        """Every path under the root (not inside the venv), to see that nothing changed."""
        venv = self.prefix / "venv"
        return {str(path.relative_to(self.root)) for path in self.root.rglob("*") if venv not in path.parents}


def manifest_paths(manifest: Path) -> set[str]:
    return {line for line in manifest.read_text().splitlines() if line and not line.startswith("#")}


def install(root: Path, *args: str) -> Tree:
    result = run_script("install.sh", "--root", str(root), *args)
    assert result.returncode == 0, f"install.sh failed: {result.stderr[-3000:]}"
    return Tree(root, result)


def copy_tree(tree: Tree, root: Path, *, venv: bool = True) -> Tree:
    """A copy to change freely; the venv keeps working, as its interpreter is an absolute link.
    With venv=False the venv is a stub (its pyvenv.cfg): enough for uninstall.sh, and quick."""
    stub = str(tree.prefix / "venv")
    shutil.copytree(
        tree.root,
        root,
        symlinks=True,
        ignore=lambda folder, names: (
            [name for name in names if name != "pyvenv.cfg"] if folder == stub and not venv else []
        ),
    )
    return Tree(root, tree.result)


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Tree:
    """The one real installation of the module (it builds a venv from PyPI): no units."""
    return install(tmp_path_factory.mktemp("staged"), "--no-systemd")


@pytest.fixture(scope="module")
def upgraded(staged: Tree, tmp_path_factory: pytest.TempPathFactory) -> Tree:
    """`staged` after an operator edited the config, installed again, now with the units."""
    tree = copy_tree(staged, tmp_path_factory.mktemp("upgraded") / "root")
    tree.conf.write_text(
        tree.conf.read_text().replace('Level = "info"', 'Level = "warn"') + "# edited by the operator\n"
    )
    return install(tree.root)


def unit_settings(text: str) -> dict[str, list[str]]:
    """"Section.Key" -> its values in order (a systemd key may be repeated)."""
    settings: dict[str, list[str]] = defaultdict(list)
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
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


def test_install_lists_what_it_made_in_a_manifest(staged: Tree) -> None:
    assert staged.listed() == {PREFIX + path for path in MADE}  # final paths, not the staged ones
    assert stat.S_IMODE(staged.manifest.stat().st_mode) == 0o644
    assert sorted(path.name for path in staged.prefix.iterdir()) == [MANIFEST, "bin", "conf", "logs", "venv"]  # no .tmp


def test_the_installed_config_is_the_shipped_one_logging_into_the_prefix(staged: Tree) -> None:
    installed = tomllib.loads(staged.conf.read_text())
    shipped = tomllib.loads((ROOT / "conf" / "kmsagent.toml").read_text())
    assert installed["Log"].pop("Path") == f"{PREFIX}/logs/"  # the final path, not the staged one
    shipped["Log"].pop("Path")
    assert installed == shipped
    assert stat.S_IMODE(staged.conf.stat().st_mode) == 0o640


def test_the_wrapper_runs_the_installed_agent(staged: Tree) -> None:
    wrapper = str(staged.prefix / "bin" / "kmsagent")
    version = subprocess.run([wrapper, "--version"], capture_output=True, text=True, timeout=30, check=False)
    assert version.stdout.strip() == f"kmsagent {__version__}"
    check = subprocess.run(
        [wrapper, "--check-config", "--config", str(staged.conf)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert check.returncode == 0, check.stderr


# --- a second run, with units ---------------------------------------------------------------


def test_a_second_run_keeps_the_operators_config(upgraded: Tree) -> None:
    text = upgraded.conf.read_text()
    assert text.endswith("# edited by the operator\n") and 'Level = "warn"' in text
    assert "keeping the existing config" in upgraded.result.stdout
    assert sorted(path.name for path in upgraded.units_dir.iterdir()) == sorted(UNITS)


def test_a_second_run_adds_the_units_to_the_manifest(upgraded: Tree) -> None:
    # The config is still listed: the first run made it, although this one kept it.
    assert upgraded.listed() == {PREFIX + path for path in (*MADE, *MADE_WITH_UNITS)} | {
        f"/etc/systemd/system/{name}" for name in UNITS
    }


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
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "30",
        "TimeoutStopSec": "15",
        "LimitNOFILE": "4096",
        "RuntimeDirectory": "kmsagent",
        "RuntimeDirectoryMode": "0755",
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
        "SystemCallFilter": "@system-service",
        "SystemCallErrorNumber": "EPERM",
        "PrivateMounts": "yes",
        "RemoveIPC": "yes",
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
        [analyze, "verify", *(str(tmp_path / name) for name in UNITS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "kmsagent" not in result.stderr, result.stderr


# --- the agent under systemd: notify, watchdog, limits, its socket, drop-ins (issue 16) ---------


@pytest.fixture(scope="module")
def with_units(staged: Tree, tmp_path_factory: pytest.TempPathFactory) -> Tree:
    """A first install with the units, so with a new config (the staged venv is reused)."""
    tree = copy_tree(staged, tmp_path_factory.mktemp("with-units") / "root")
    tree.conf.unlink()
    return install(tree.root)


def test_with_the_units_the_config_gives_the_token_readers_a_unix_socket(with_units: Tree) -> None:
    server = tomllib.loads(with_units.conf.read_text())["Server"]
    assert (server["UnixSocket"], server["UnixSocketMode"], server["UnixSocketGroup"]) == (
        "/run/kmsagent/kmsagent.sock",
        "0660",
        "kmstokenreader",
    )
    unit = unit_settings(with_units.unit("kmsagent.service"))
    assert Path(server["UnixSocket"]).parent == Path("/run") / unit["Service.RuntimeDirectory"][0]  # the agent's own
    assert "kmstokenreader" in unit["Service.SupplementaryGroups"]  # so that it may give the socket that group
    assert tomllib.loads((ROOT / "conf" / "kmsagent.toml").read_text())["Server"]["UnixSocket"] == ""  # shipped: none


def test_the_unit_fits_the_agent(with_units: Tree) -> None:
    """TimeoutStopSec ≥ StopTimeoutSeconds (SPEC §9: 10 by default) + 5; LimitNOFILE what
    MaxConn = 1000 needs (server.py raises the soft limit that far, never the hard one)."""
    unit = unit_settings(with_units.unit("kmsagent.service"))
    assert int(unit["Service.TimeoutStopSec"][0]) >= DEFAULT_STOP_TIMEOUT_SECONDS + 5
    assert int(unit["Service.LimitNOFILE"][0]) >= 1000 + PING_RESERVE + MAX_REFUSING + OTHER_DESCRIPTORS


def exposure(analyze: str, unit: Path) -> tuple[float, str]:
    """`systemd-analyze security --offline=true UNIT`'s overall score and rating."""
    command = [analyze, "security", "--offline=true", str(unit)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    if "offline" in result.stderr and result.returncode != 0:
        pytest.skip(f"this systemd-analyze has no --offline: {result.stderr.strip()[:200]}")
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert match, result.stdout[-2000:] + result.stderr[-2000:]
    return float(match[1]), match[2]


@pytest.mark.parametrize("dropin", ["none", *DROPINS])
def test_systemd_analyze_security_rates_the_unit_ok_or_better(with_units: Tree, tmp_path: Path, dropin: str) -> None:
    """Issue 16: "OK" or better, with each drop-in too (2.1 OK alone, 2.8 OK as root with
    files-owner.conf, with systemd 252)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    (tmp_path / "kmsagent.service").write_text(with_units.unit("kmsagent.service"))
    if dropin != "none":  # found beside the unit, as in /etc/systemd/system/kmsagent.service.d/
        (tmp_path / "kmsagent.service.d").mkdir()
        shutil.copy(with_units.prefix / "share" / "systemd" / dropin, tmp_path / "kmsagent.service.d")
    score, rating = exposure(analyze, tmp_path / "kmsagent.service")
    print(f"systemd-analyze security, drop-in {dropin}: {score} {rating}")
    assert rating in ("PERFECT", "SAFE", "OK"), (score, rating)


def test_systemd_analyze_verifies_the_unit_with_each_dropin(with_units: Tree, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    for name in DROPINS:
        folder = tmp_path / name
        (folder / "kmsagent.service.d").mkdir(parents=True)
        for unit in UNITS:  # verify checks that the commands exist: the copies name the staged tree
            (folder / unit).write_text(with_units.unit(unit).replace(PREFIX, str(with_units.prefix)))
        text = (with_units.prefix / "share" / "systemd" / name).read_text()
        (folder / "kmsagent.service.d" / name).write_text(text.replace(PREFIX, str(with_units.prefix)))
        command = [analyze, "verify", *(str(folder / unit) for unit in UNITS)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, (name, result.stderr)
        assert "kmsagent" not in result.stderr, (name, result.stderr)


def test_the_dropins_are_installed_not_enabled_and_documented(with_units: Tree) -> None:
    """The sandbox forbids [[Files]] outside the logs, their Owner/Group and JIT [Exec] programs:
    one drop-in each, beside the unit but not in its kmsagent.service.d/."""
    folder = with_units.prefix / "share" / "systemd"
    assert sorted(path.name for path in folder.iterdir()) == sorted(DROPINS)
    assert not (with_units.units_dir / "kmsagent.service.d").exists()
    settings = {name: unit_settings((folder / name).read_text()) for name in DROPINS}
    assert settings["files-folders.conf"]["Service.ReadWritePaths"] == ["/var/lib/myapp/secrets"]
    assert settings["files-owner.conf"]["Service.User"] == ["root"]
    assert settings["files-owner.conf"]["Service.CapabilityBoundingSet"] == ["CAP_CHOWN CAP_FOWNER"]
    assert settings["exec-jit.conf"]["Service.MemoryDenyWriteExecute"] == ["no"]
    operations = (ROOT / "docs" / "operations.md").read_text()
    for name in DROPINS:
        text = (folder / name).read_text()
        assert str(with_units.root) not in text  # the final paths
        assert f"cp {PREFIX}/share/systemd/{name} /etc/systemd/system/kmsagent.service.d/" in text
        assert f"share/systemd/{name}" in operations, f"docs/operations.md does not say how to enable {name}"
    assert stat.S_IMODE((folder / DROPINS[0]).stat().st_mode) == 0o644


# --- the token writer -----------------------------------------------------------------------


def test_the_token_writer_writes_a_fresh_token_readable_by_the_group(staged: Tree, tmp_path: Path) -> None:
    writer, target = str(staged.prefix / "bin" / "kmsagent-token"), tmp_path / "kmstoken"
    env = {"PATH": os.environ["PATH"], "KMSAGENT_TOKEN_GROUP": token_group()}
    tokens = []
    for _ in range(2):
        result = subprocess.run([writer, str(target)], env=env, capture_output=True, text=True, timeout=30, check=False)
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
    result = subprocess.run(
        [writer, str(tmp_path / "kmstoken")], env=env, capture_output=True, text=True, timeout=30, check=False
    )
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
        process = await trio.lowlevel.open_process(
            command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=stderr
        )
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
    tree = copy_tree(upgraded, tmp_path / "root", venv=False)
    edited = tree.conf.read_text()
    for _ in range(2):  # a second run finds nothing more to do
        result = run_script("uninstall.sh", "--root", str(tree.root))
        assert result.returncode == 0, result.stderr
        assert list(tree.units_dir.iterdir()) == []
        assert sorted(path.name for path in tree.prefix.iterdir()) == [MANIFEST, "conf", "logs"]
        assert tree.conf.read_text() == edited
        assert tree.listed() == {PREFIX, f"{PREFIX}/conf", f"{PREFIX}/conf/kmsagent.toml", f"{PREFIX}/logs"}
    result = run_script("uninstall.sh", "--root", str(tree.root), "--purge")
    assert result.returncode == 0, result.stderr
    assert not tree.prefix.exists()
    assert "userdel kmsagent" in result.stdout  # staged: the accounts are the packager's to remove


@pytest.mark.parametrize(("script", "code"), [("install.sh", 1), ("uninstall.sh", 2)])
def test_a_folder_install_sh_did_not_make_is_left_alone(script: str, code: int, tmp_path: Path) -> None:
    """A folder with other things in it and no manifest: install.sh does not mix kmsagent's files
    into it, and uninstall.sh, with no manifest to say what is kmsagent's, removes nothing."""
    foreign = tmp_path / "opt" / "shared"
    (foreign / "bin").mkdir(parents=True)
    (foreign / "bin" / "tool").write_text("keep me")
    result = run_script(script, "--root", str(tmp_path), "--prefix", "/opt/shared")
    assert result.returncode == code
    assert_one_line(result.stderr)
    assert (
        sorted(path.name for path in foreign.iterdir()) == ["bin"]
        and (foreign / "bin" / "tool").read_text() == "keep me"
    )


def test_uninstall_removes_only_what_install_made(upgraded: Tree, tmp_path: Path) -> None:
    """Files someone else put in PREFIX/bin and PREFIX/logs stay, even with --purge, and so do
    their folders; a later run removes those once they are empty."""
    tree = copy_tree(upgraded, tmp_path / "root", venv=False)
    (tree.prefix / "bin" / "mytool").write_text("not kmsagent's")
    (tree.prefix / "logs" / "audit.log").write_text("not kmsagent's either")
    result = run_script("uninstall.sh", "--root", str(tree.root), "--purge")
    assert result.returncode == 0, result.stderr
    assert (tree.prefix / "bin" / "mytool").read_text() == "not kmsagent's"
    assert (tree.prefix / "logs" / "audit.log").read_text() == "not kmsagent's either"
    prefix = PREFIX.lstrip("/")
    left = {"etc", "etc/systemd", "etc/systemd/system", "usr", "usr/local", prefix}
    left |= {f"{prefix}/{path}" for path in (MANIFEST, "bin", "bin/mytool", "logs", "logs/audit.log")}
    assert tree.files() == left
    assert tree.listed() == {PREFIX, f"{PREFIX}/bin", f"{PREFIX}/logs"}
    assert f"kept {tree.prefix}/bin" in result.stdout
    (tree.prefix / "bin" / "mytool").unlink()
    (tree.prefix / "logs" / "audit.log").unlink()
    result = run_script("uninstall.sh", "--root", str(tree.root), "--purge")
    assert result.returncode == 0, result.stderr
    assert not tree.prefix.exists()


@pytest.mark.parametrize("legacy_marker", [False, True], ids=["nothing", "older-marker"])
def test_uninstall_without_a_manifest_refuses_and_removes_nothing(
    legacy_marker: bool, staged: Tree, tmp_path: Path
) -> None:
    """Without the manifest it would be guessing, even where an older install.sh left its marker."""
    tree = copy_tree(staged, tmp_path / "root", venv=False)
    tree.manifest.unlink()
    if legacy_marker:
        (tree.prefix / ".kmsagent-install").write_text("kmsagent, installed by scripts/install.sh\n")
    before = tree.files()
    result = run_script("uninstall.sh", "--root", str(tree.root), "--purge")
    assert result.returncode == 2 and MANIFEST in result.stderr
    assert_one_line(result.stderr)
    assert tree.files() == before


@pytest.mark.parametrize("script", ["install.sh", "uninstall.sh"])
@pytest.mark.parametrize(
    "entry",
    ["/etc/victim", f"{PREFIX}/../../../etc/victim", f"{PREFIX}-old/victim", "etc/victim", f"{PREFIX}/logs/victim"],
    ids=["outside", "dot-dot", "sibling", "relative", "through-a-symlink"],
)
def test_a_manifest_naming_other_files_is_refused(script: str, entry: str, staged: Tree, tmp_path: Path) -> None:
    """An edited manifest must not make uninstall.sh delete /etc (nor install.sh adopt it)."""
    tree = copy_tree(staged, tmp_path / "root", venv=False)
    (tree.root / "etc").mkdir()
    victim = tree.root / "etc" / "victim"
    victim.write_text("keep me")
    if entry.endswith("/logs/victim"):  # logs/ is a symlink to etc/, so logs/victim is etc/victim
        (tree.prefix / "logs").rmdir()
        (tree.prefix / "logs").symlink_to(tree.root / "etc")
    with tree.manifest.open("a") as manifest:
        manifest.write(f"{entry}\n")
    before, text = tree.files(), tree.manifest.read_text()
    result = run_script(script, "--root", str(tree.root), *(["--purge"] if script == "uninstall.sh" else []))
    assert result.returncode == 1 and entry in result.stderr
    assert_one_line(result.stderr)
    assert victim.read_text() == "keep me" and (tree.prefix / "venv" / "pyvenv.cfg").exists()
    assert tree.files() == before and tree.manifest.read_text() == text


def test_uninstall_with_no_systemd_leaves_the_units_alone(upgraded: Tree, tmp_path: Path) -> None:
    tree = copy_tree(upgraded, tmp_path / "root", venv=False)
    units = {name: tree.unit(name) for name in UNITS}
    result = run_script("uninstall.sh", "--root", str(tree.root), "--no-systemd", "--purge")
    assert result.returncode == 0, result.stderr
    assert {name: tree.unit(name) for name in UNITS} == units
    assert sorted(path.name for path in tree.prefix.iterdir()) == [MANIFEST]
    assert tree.listed() == {PREFIX, *(f"/etc/systemd/system/{name}" for name in UNITS)}
    # Without it, the units go too, and the manifest with the prefix.
    result = run_script("uninstall.sh", "--root", str(tree.root))
    assert result.returncode == 0, result.stderr
    assert list(tree.units_dir.iterdir()) == [] and not tree.prefix.exists()


# --- command lines ------------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["install.sh", "uninstall.sh"])
@pytest.mark.parametrize(
    "args", [["--bogus"], ["--prefix"], ["--prefix", "relative/dir"], ["--prefix", "/"], ["--prefix", "/a b"]]
)
def test_a_bad_command_line_exits_2_with_one_line(script: str, args: list[str], tmp_path: Path) -> None:
    result = run_script(script, "--root", str(tmp_path), *args)
    assert result.returncode == 2
    assert_one_line(result.stderr)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script", ["install.sh", "uninstall.sh"])
@pytest.mark.parametrize(
    ("root", "prefix"),
    [
        ("tmp", "/usr/local"),  # staged, but bound for /usr/local
        ("tmp", "/usr/local/bin"),
        ("tmp", "/opt"),
        ("tmp", "/home/someone"),
        ("tmp", "/opt/kmsagent/../../usr/local"),
        ("/", "/usr/local"),
        ("/usr", "/local/bin"),  # /local/bin is no system folder, but /usr + /local/bin is
    ],
)
def test_a_shared_folder_is_refused_as_prefix_with_root_too(
    script: str, root: str, prefix: str, tmp_path: Path
) -> None:
    """Such a folder is refused before anything is read or written, --root or not (the tests with
    real system folders are safe either way: install.sh also refuses a non-empty folder without a
    manifest, and uninstall.sh removes only what a manifest names)."""
    env, log = stubbed_env(tmp_path, uid=0)
    (tmp_path / "root").mkdir()
    root = str(tmp_path / "root") if root == "tmp" else root
    result = run_script(script, "--root", root, "--prefix", prefix, "--no-systemd", env=env)
    assert result.returncode == 2, result.stderr
    assert "a folder shared with other software" in result.stderr or "without . or .. parts" in result.stderr
    assert_one_line(result.stderr)
    assert list((tmp_path / "root").iterdir()) == [] and calls(log) == []


@pytest.mark.parametrize("script", ["install.sh", "uninstall.sh"])
@pytest.mark.parametrize("below_home", ["", "/.local", "/.config"])
def test_the_home_folder_is_refused_as_prefix(script: str, below_home: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".config").mkdir(parents=True)  # even empty: kmsagent's files would be mixed with the user's
    env, log = stubbed_env(tmp_path, uid=1000)
    result = run_script(script, "--prefix", f"{home}{below_home}", "--no-systemd", env={**env, "HOME": str(home)})
    assert result.returncode == 2 and "shared" in result.stderr, result.stderr
    assert_one_line(result.stderr)
    assert sorted(path.name for path in home.iterdir()) == [".config"] and calls(log) == []


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
        **dict.fromkeys(("groupadd", "useradd", "usermod", "chown", "chgrp", "systemctl"), ""),
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
    # The tree is made one of an older install.sh (a marker, no manifest), which is adopted.
    shutil.copytree(
        staged.prefix, prefix, symlinks=True, ignore=lambda folder, _: ["conf"] if folder == str(staged.prefix) else []
    )
    (prefix / MANIFEST).unlink()
    (prefix / ".kmsagent-install").write_text("kmsagent, installed by scripts/install.sh\n")
    result = run_script("install.sh", "--prefix", str(prefix), "--no-systemd", env=env)
    assert result.returncode == 0, result.stderr
    assert manifest_paths(prefix / MANIFEST) == {f"{prefix}{path}" for path in MADE}
    assert not (prefix / ".kmsagent-install").exists()
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


# --- a user-level install, by a user other than root ---------------------------------------------


@dataclass(frozen=True)
class User:
    """A user other than root, and how to run a command as it with HOME set."""

    uid: int
    home: Path
    switch: tuple[str, ...]  # runs the rest of the command line as the user; () when we are it

    def run(self, *command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.switch, "env", f"HOME={self.home}", *command],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )


@pytest.fixture
def user() -> Iterator[User]:
    """This process's user when it is not root; otherwise nobody (setpriv, else runuser), with a
    home folder of its own outside pytest's (which only root may enter)."""
    if os.geteuid() != 0:
        uid, switch = os.getuid(), ()
    else:
        try:
            nobody = pwd.getpwnam("nobody")
        except KeyError:
            pytest.skip("there is no user 'nobody' to install as")
        uid = nobody.pw_uid
        if shutil.which("setpriv"):
            switch = ("setpriv", f"--reuid={uid}", f"--regid={nobody.pw_gid}", "--clear-groups")
        elif shutil.which("runuser"):
            switch = ("runuser", "-u", "nobody", "--")
        else:
            pytest.skip("neither setpriv nor runuser is installed: cannot run install.sh as a user other than root")
    home = Path(tempfile.mkdtemp(prefix="kmsagent-user-home."))
    try:
        # The user's pip finds packages where ours does (an index set up for this host's user, as
        # INSTALL_ENV passes on the environment's), and reuses the wheels ours built from sources
        # (about 2 MB, a third of the install's time).
        for mine in (Path.home() / ".config" / "pip" / "pip.conf", Path.home() / ".pip" / "pip.conf"):
            if mine.is_file():
                (home / mine.relative_to(Path.home())).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(mine, home / mine.relative_to(Path.home()))
        wheels = Path.home() / ".cache" / "pip" / "wheels"
        if wheels.is_dir():
            shutil.copytree(wheels, home / ".cache" / "pip" / "wheels", symlinks=True)
        for path in (home, *home.rglob("*")):
            os.chown(path, uid, -1)
        yield User(uid, home, switch)
    finally:
        shutil.rmtree(home)


def test_a_user_level_install_and_uninstall(user: User) -> None:
    """`install.sh --prefix ~/.local/kmsagent --no-systemd` as a user other than root: no
    accounts, no chown, no units; it says how to run the agent, which runs as that user; then
    uninstall.sh with the same flags removes it, and with --purge the config and logs too."""
    env = {key: value for key, value in INSTALL_ENV.items() if not key.startswith(("XDG_", "TMPDIR"))}
    # A Python this user may run (the tests' own may live in root's home).
    for python in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        probe = "import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))"
        if user.run(python, "-c", probe, env=env).returncode == 0:
            env["PYTHON"] = python
            break
    else:
        pytest.skip(f"no Python 3.11+ with venv that uid {user.uid} may run")
    prefix = user.home / ".local" / "kmsagent"
    (user.home / ".local").mkdir()
    (user.home / ".local" / "notes.txt").write_text("the user's")
    os.chown(user.home / ".local", user.uid, -1)
    os.chown(user.home / ".local" / "notes.txt", user.uid, -1)

    result = user.run("bash", "scripts/install.sh", "--prefix", str(prefix), "--no-systemd", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        f"KMS_TOKEN=file://{user.home}/kmstoken {prefix}/bin/kmsagent --config {prefix}/conf/kmsagent.toml"
        in result.stdout
    )
    assert f"KMSAGENT_TOKEN_GROUP= {prefix}/bin/kmsagent-token {user.home}/kmstoken" in result.stdout
    assert manifest_paths(prefix / MANIFEST) == {f"{prefix}{path}" for path in MADE}
    assert {path.lstat().st_uid for path in (prefix, *prefix.rglob("*"))} == {user.uid}  # no chown to 'kmsagent'
    assert tomllib.loads((prefix / "conf" / "kmsagent.toml").read_text())["Log"]["Path"] == f"{prefix}/logs/"
    version = user.run(str(prefix / "bin" / "kmsagent"), "--version", env=env)
    assert version.stdout.strip() == f"kmsagent {__version__}", version.stderr

    result = user.run("bash", "scripts/uninstall.sh", "--prefix", str(prefix), "--no-systemd", env=env)
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in prefix.iterdir()) == [MANIFEST, "conf", "logs"]
    result = user.run("bash", "scripts/uninstall.sh", "--prefix", str(prefix), "--no-systemd", "--purge", env=env)
    assert result.returncode == 0, result.stderr
    assert not prefix.exists() and (user.home / ".local" / "notes.txt").read_text() == "the user's"
    assert "userdel" not in result.stdout


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
    (tmp_path / "oidc-token").write_text("a-projected-service-account-token")
    rrsa = {  # what the pod's RRSA webhook (or the manifest itself) sets
        "ALIBABA_CLOUD_ROLE_ARN": "acs:ram::1234567890123456:role/my-app",
        "ALIBABA_CLOUD_OIDC_PROVIDER_ARN": "acs:ram::1234567890123456:oidc-provider/ack-rrsa-c0ffee",
        "ALIBABA_CLOUD_OIDC_TOKEN_FILE": str(tmp_path / "oidc-token"),
    }
    check = subprocess.run(
        [python, "-m", "kmsagent", "--check-config", "--config", str(tmp_path / "kmsagent.toml")],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **rrsa},
        check=False,
    )
    assert check.returncode == 0, check.stderr
    effective = tomllib.loads(check.stdout)
    assert effective["Credentials"]["Type"] == "oidc_role_arn" and effective["KMS"]["Region"]
