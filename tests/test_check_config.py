"""`--check-config` checks what start-up will need of the host, not only the file's syntax (issue 11 #9)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from kmsagent.config import ConfigError, LogConfig, check_log_folder
from test_cli import BASE_ENV, run_cli


def test_a_writable_existing_folder_passes_and_stays_empty(tmp_path: Path) -> None:
    check_log_folder(LogConfig(path=str(tmp_path)))
    assert list(tmp_path.iterdir()) == []


def test_a_missing_folder_that_can_be_created_passes_and_is_not_left_behind(tmp_path: Path) -> None:
    check_log_folder(LogConfig(path=str(tmp_path / "a" / "b")))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda tmp: "/proc/nope/", "cannot be created"),
        (lambda tmp: (tmp / "file").write_text("x") and str(tmp / "file" / "logs"), "is not a folder"),
        (lambda tmp: (tmp / "file").write_text("x") and str(tmp / "file"), "is not a folder"),
    ],
    ids=["proc", "under-a-file", "a-file"],
)
def test_unusable_log_paths_are_config_errors(tmp_path: Path, make: Callable[[Path], str], reason: str) -> None:
    with pytest.raises(ConfigError, match=r"\[Log\] Path = .*" + reason):
        check_log_folder(LogConfig(path=make(tmp_path)))


def test_check_config_exits_2_for_a_log_folder_start_up_could_not_create(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text('[Log]\nPath = "/proc/nope/"\n')
    result = run_cli("--check-config", "--config", str(tmp_path / "c.toml"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "[Log] Path" in result.stderr and "Traceback" not in result.stderr


def test_check_config_exits_2_when_the_credential_source_lacks_its_variables(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(f'[Credentials]\nType = "access_key"\n[Log]\nPath = "{tmp_path}/logs"\n')
    result = run_cli("--check-config", "--config", str(tmp_path / "c.toml"), env=BASE_ENV)
    assert result.returncode == 2, result.stderr
    assert "ALIBABA_CLOUD_ACCESS_KEY_ID" in result.stderr and result.stderr.count("\n") == 1
    env = {**BASE_ENV, "ALIBABA_CLOUD_ACCESS_KEY_ID": "id", "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "secret-value-x"}
    ok = run_cli("--check-config", "--config", str(tmp_path / "c.toml"), env=env)
    assert ok.returncode == 0, ok.stderr
    assert "secret-value-x" not in ok.stdout + ok.stderr
    assert not os.path.exists(tmp_path / "logs")


def test_check_config_notes_a_files_folder_this_user_cannot_write(tmp_path: Path) -> None:
    """An immutable folder (chattr +i) stands for one the agent may not write: another owner's,
    read-only, or outside a systemd unit's ReadWritePaths=. Root passes every other access check."""
    import shutil
    import subprocess

    folder = tmp_path / "out"
    folder.mkdir(mode=0o755)
    config = tmp_path / "c.toml"
    config.write_text(
        f'[Log]\nPath = ""\n[[Files]]\nSecretId = "s"\nPath = "{folder}/f"\n'
    )
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(folder)], capture_output=True, check=False).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        result = run_cli("--check-config", "--config", str(config))
    finally:
        subprocess.run([chattr, "-i", str(folder)], check=True)
    assert result.returncode == 0, result.stderr
    assert "[[Files]] #1" in result.stderr and "not writable" in result.stderr and "ReadWritePaths" in result.stderr
    writable = run_cli("--check-config", "--config", str(config))
    assert writable.returncode == 0 and "not writable" not in writable.stderr
