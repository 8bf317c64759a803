"""The SSRF token source: which variable, literal or file, re-read on change, constant-time match."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmsagent.token import TokenError, TokenSource

NAMES = ("KMS_TOKEN", "KMS_SESSION_TOKEN")


def test_the_first_set_variable_wins() -> None:
    source = TokenSource.from_environment(NAMES, {"KMS_SESSION_TOKEN": "second", "KMS_TOKEN": "first"})
    assert source.matches([b"first"]) and not source.matches([b"second"])
    assert TokenSource.from_environment(NAMES, {"KMS_SESSION_TOKEN": "second"}).matches([b"second"])


def test_no_variable_set_names_them_all() -> None:
    with pytest.raises(TokenError, match="KMS_TOKEN, KMS_SESSION_TOKEN"):
        TokenSource.from_environment(NAMES, {})


def test_an_empty_token_is_refused() -> None:
    with pytest.raises(TokenError, match="empty"):
        TokenSource.from_environment(NAMES, {"KMS_TOKEN": "  "})


def test_matches_any_candidate_and_nothing_else() -> None:
    source = TokenSource(b"tok")
    assert source.matches([b"x", b"tok"])
    assert not source.matches([])
    assert not source.matches([b"tok2", b"to", b""])


async def test_a_token_file_is_read_and_re_read_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("first-token\n")
    source = TokenSource.from_environment(NAMES, {"KMS_TOKEN": f"file://{path}"})
    assert source.matches([b"first-token"])
    assert not await source.reload_if_changed()
    path.write_text("second-token-longer\n")
    assert await source.reload_if_changed()
    assert source.matches([b"second-token-longer"]) and not source.matches([b"first-token"])


async def test_an_emptied_or_missing_file_keeps_the_current_token(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("first-token")
    source = TokenSource.from_environment(NAMES, {"KMS_TOKEN": f"file://{path}"})
    path.write_text("")
    assert not await source.reload_if_changed()
    path.unlink()
    assert not await source.reload_if_changed()
    assert source.matches([b"first-token"])
    path.write_text("third")
    assert await source.reload_if_changed() and source.matches([b"third"])


def test_an_unreadable_token_file_is_a_start_error(tmp_path: Path) -> None:
    with pytest.raises(TokenError, match="cannot read token file"):
        TokenSource.from_environment(NAMES, {"KMS_TOKEN": f"file://{tmp_path / 'missing'}"})


@pytest.mark.parametrize(("mode", "warned"), [(0o644, True), (0o666, True), (0o640, False), (0o600, False)])
def test_a_world_readable_token_file_is_warned_about(
    tmp_path: Path, captured_logs: list[str], mode: int, warned: bool
) -> None:
    path = tmp_path / "token"
    path.write_text("file-token-value")
    path.chmod(mode)
    TokenSource.from_environment(NAMES, {"KMS_TOKEN": f"file://{path}"})
    assert any("every user" in line for line in captured_logs) is warned
