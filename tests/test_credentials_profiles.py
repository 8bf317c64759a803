"""`cli_profile` and `credentials_file`: every mode and type, profile selection, errors that name
the file, line and kind (never a value), and files read again when they change (a broken one
keeps the last good credentials)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from conftest import AK_ID, AK_SECRET, SECRETS, StartAgent, eventually
from kmsagent.config import CredentialsConfig
from kmsagent.credentials import CredentialsUnavailable, check_credentials, credential_source, profiles
from kmsagent.credentials.oidc import OidcRoleCredentials
from kmsagent.credentials.profiles import (
    EcsSpec,
    OidcSpec,
    ProfileCredentials,
    ProfileError,
    RoleSpec,
    StaticSpec,
    parse_cli_config,
    parse_credentials_ini,
)
from kmsagent.credentials.sts import RoleRequest
from kmsagent.emulator import KmsEmulator, MetadataEmulator, StsEmulator

SECRET_PATH = "/secretsmanager/get?secretId=api-key"
CLI = Path("/home/u/.aliyun/config.json")
INI = Path("/home/u/.alibabacloud/credentials.ini")
ROLE = "acs:ram::1234567890123456:role/reader"
#: A value that stands for an AccessKeySecret on a broken line: it must never reach a message or log.
SECRET_ON_BAD_LINE = "sk-on-the-bad-line-Vb7Qe2"


def cli_file(*profiles: dict[str, Any], current: str = "default") -> bytes:
    return json.dumps({"current": current, "profiles": list(profiles)}, indent=2).encode()


# --- the CLI's config.json ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("profile", "expected"),
    [
        ({"mode": "AK", "access_key_id": "id", "access_key_secret": "sk"}, StaticSpec("id", "sk")),
        (
            {"mode": "StsToken", "access_key_id": "id", "access_key_secret": "sk", "sts_token": "t"},
            StaticSpec("id", "sk", "t"),
        ),
        ({"mode": "EcsRamRole", "ram_role_name": "r"}, EcsSpec("r")),
        (
            {
                "mode": "RamRoleArn",
                "access_key_id": "id",
                "access_key_secret": "sk",
                "ram_role_arn": ROLE,
                "ram_session_name": "s1",
                "expired_seconds": 1800,
                "external_id": "ext",
                "policy": "{}",
                "sts_region": "cn-beijing",
                "enable_vpc": True,
            },
            RoleSpec(StaticSpec("id", "sk"), RoleRequest(ROLE, "s1", 1800, "ext", "{}"), "cn-beijing", True),
        ),
        (
            {
                "mode": "RamRoleArn",
                "access_key_id": "id",
                "access_key_secret": "sk",
                "ram_role_arn": ROLE,
                "expired_seconds": 0,
            },
            RoleSpec(StaticSpec("id", "sk"), RoleRequest(ROLE, "kmsagent", 3600)),  # the CLI writes 0 for "not set"
        ),
        (
            {
                "mode": "OIDC",
                "ram_role_arn": ROLE,
                "oidc_provider_arn": "acs:ram::1:oidc-provider/p",
                "oidc_token_file": "/var/run/token",
                "role_session_name": "s2",
            },
            OidcSpec(ROLE, "acs:ram::1:oidc-provider/p", "/var/run/token", "s2", 3600),
        ),
    ],
    ids=["AK", "StsToken", "EcsRamRole", "RamRoleArn", "RamRoleArn-defaults", "OIDC"],
)
def test_each_cli_mode(profile: dict[str, Any], expected: object) -> None:
    assert parse_cli_config(cli_file({"name": "default", **profile}), CLI, "") == ("default", expected)


def test_a_chainable_role_signs_with_its_source_profile() -> None:
    raw = cli_file(
        {"name": "base", "mode": "AK", "access_key_id": "id", "access_key_secret": "sk"},
        {"name": "first", "mode": "ChainableRamRoleArn", "source_profile": "base", "ram_role_arn": ROLE},
        {"name": "second", "mode": "ChainableRamRoleArn", "source_profile": "first", "ram_role_arn": ROLE + "2"},
        current="second",
    )
    first = RoleSpec(StaticSpec("id", "sk"), RoleRequest(ROLE))
    assert parse_cli_config(raw, CLI, "") == ("second", RoleSpec(first, RoleRequest(ROLE + "2")))
    assert parse_cli_config(raw, CLI, "first") == ("first", first)  # a named profile wins over "current"


@pytest.mark.parametrize(
    ("raw", "profile", "message"),
    [
        (
            b'{"current": "default",\n "profiles": [\n  {"name": "default", "access_key_secret": "'
            + SECRET_ON_BAD_LINE.encode()
            + b'" "mode": "AK"}\n]}',
            "",
            "line 3: not valid JSON",
        ),
        (b'{"profiles": []}\n\xff' + SECRET_ON_BAD_LINE.encode(), "", "line 2: not UTF-8"),
        (b"[1, 2]", "", "not a JSON object"),
        (cli_file(), "", "no profile 'default'"),
        (cli_file({"name": "default", "mode": "AK"}), "other", "no profile 'other'"),
        (
            cli_file({"name": "default", "mode": "AK", "access_key_id": "id"}),
            "",
            "profile 'default': access_key_secret is missing",
        ),
        (cli_file({"name": "default", "mode": "CloudSSO"}), "", "mode CloudSSO is not supported"),
        (
            cli_file({"name": "default", "mode": f"x {SECRET_ON_BAD_LINE}"}),
            "",
            "mode (not a mode name) is not supported",
        ),
        (
            cli_file({"name": "default", "mode": "AK", "access_key_id": 5, "access_key_secret": "s"}),
            "",
            "access_key_id is not a string",
        ),
        (
            cli_file(
                {"name": "default", "mode": "ChainableRamRoleArn", "source_profile": "default", "ram_role_arn": ROLE}
            ),
            "",
            "source_profile chain loops",
        ),
        (
            cli_file(
                {
                    "name": "default",
                    "mode": "RamRoleArn",
                    "access_key_id": "i",
                    "access_key_secret": "s",
                    "ram_role_arn": ROLE,
                    "expired_seconds": 60,
                }
            ),
            "",
            "expired_seconds must be 900..43200",
        ),
    ],
    ids=[
        "bad-json",
        "not-utf8",
        "not-object",
        "no-profile",
        "no-named-profile",
        "missing-field",
        "mode",
        "odd-mode",
        "type",
        "loop",
        "duration",
    ],
)
def test_cli_errors_name_file_line_and_kind_never_a_value(raw: bytes, profile: str, message: str) -> None:
    with pytest.raises(ProfileError) as caught:
        parse_cli_config(raw, CLI, profile)
    assert str(caught.value).startswith(str(CLI)) and message in str(caught.value)
    assert SECRET_ON_BAD_LINE not in str(caught.value) and "sk" not in str(caught.value).split(": ", 1)[1]


# --- the SDK's credentials.ini ------------------------------------------------------------------------


INI_TEXT = f"""
[default]
type = access_key
access_key_id = id
access_key_secret = sk   # a comment, as the SDK strips it

[role]
type = ram_role_arn
access_key_id = id
access_key_secret = sk
role_arn = {ROLE}
role_session_name = s1
policy = {{}}

[ecs]
type = ecs_ram_role
role_name = r

[oidc]
type = oidc_role_arn
role_arn = {ROLE}
oidc_provider_arn = acs:ram::1:oidc-provider/p
oidc_token_file_path = /var/run/token
"""


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("", StaticSpec("id", "sk")),
        ("role", RoleSpec(StaticSpec("id", "sk"), RoleRequest(ROLE, "s1", 3600, "", "{}"))),
        ("ecs", EcsSpec("r")),
        ("oidc", OidcSpec(ROLE, "acs:ram::1:oidc-provider/p", "/var/run/token", "kmsagent", 3600)),
    ],
)
def test_each_ini_type(section: str, expected: object) -> None:
    assert parse_credentials_ini(INI_TEXT.encode(), INI, section) == (section or "default", expected)


@pytest.mark.parametrize(
    ("text", "profile", "message"),
    [
        (f"access_key_secret = {SECRET_ON_BAD_LINE}\n[default]\n", "", "line 1: a line before the first [section]"),
        (
            f"[default]\ntype = access_key\naccess_key_secret {SECRET_ON_BAD_LINE}\n",
            "",
            'line 3: not a "key = value" line',
        ),
        (f"[default]\na = 1\na = {SECRET_ON_BAD_LINE}\n", "", "line 3: a key given twice"),
        ("[default]\n[default]\n", "", "line 2: a [section] given twice"),
        ("[other]\ntype = access_key\n", "", "no [default] section"),
        ("[default]\ntype = rsa_key_pair\n", "", "type rsa_key_pair is not supported"),
        (f"[default]\ntype = {SECRET_ON_BAD_LINE}!\n", "", "type (missing or not a type name) is not supported"),
        ("[default]\ntype = access_key\naccess_key_id = id\n", "", "[default]: access_key_secret is missing"),
    ],
)
def test_ini_errors_name_file_line_and_kind_never_a_value(text: str, profile: str, message: str) -> None:
    with pytest.raises(ProfileError) as caught:
        parse_credentials_ini(text.encode(), INI, profile)
    assert str(caught.value).startswith(str(INI)) and message in str(caught.value)
    assert SECRET_ON_BAD_LINE not in str(caught.value)


# --- the sources, end to end -----------------------------------------------------------------------


@pytest.fixture
async def metadata(nursery: trio.Nursery, emulator: KmsEmulator) -> MetadataEmulator:
    service = MetadataEmulator(emulator)
    await nursery.start(service.serve)
    return service


def settings(sts: StsEmulator, metadata: MetadataEmulator, **keys: Any) -> CredentialsConfig:
    return CredentialsConfig(
        sts_endpoint=str(sts.endpoint), sts_protocol="http", metadata_endpoint=str(metadata.endpoint), **keys
    )


CLI_PROFILES = {
    "AK": {"mode": "AK", "access_key_id": AK_ID, "access_key_secret": AK_SECRET},
    "StsToken": {
        "mode": "StsToken",
        "access_key_id": "STS.file",
        "access_key_secret": "file-sk",
        "sts_token": "file-token-1",
    },
    "RamRoleArn": {
        "mode": "RamRoleArn",
        "access_key_id": AK_ID,
        "access_key_secret": AK_SECRET,
        "ram_role_arn": "@role",
    },
    "ChainableRamRoleArn": {"mode": "ChainableRamRoleArn", "source_profile": "AK", "ram_role_arn": "@role"},
    "EcsRamRole": {"mode": "EcsRamRole", "ram_role_name": "KmsAgentRole"},
}


@pytest.mark.parametrize("mode", CLI_PROFILES)
async def test_a_cli_profile_signs_kms_calls(
    tmp_path: Path,
    start_agent: StartAgent,
    emulator: KmsEmulator,
    sts: StsEmulator,
    metadata: MetadataEmulator,
    mode: str,
) -> None:
    emulator.add_credentials("STS.file", "file-sk", "file-token-1")
    role = sts.add_role("reader")
    entries = [
        {"name": name, **{k: role if v == "@role" else v for k, v in body.items()}}
        for name, body in CLI_PROFILES.items()
    ]
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"current": "AK", "profiles": entries}))
    config = settings(sts, metadata, type="cli_profile", cli_config_path=str(path), profile=mode)
    source = await credential_source(config, {})
    assert source.kind.startswith(f"cli_profile (profile '{mode}' of {path}: ")
    agent = await start_agent(credentials=source)
    response = await agent.get(SECRET_PATH)
    assert response.status_code == 200 and response.json()["SecretData"] == SECRETS["api-key"]
    expected = {"AK": AK_ID, "StsToken": "STS.file"}.get(mode)
    if mode in ("RamRoleArn", "ChainableRamRoleArn"):
        expected = sts.issued[-1].access_key_id
        assert [call.access_key_id for call in sts.calls] == [AK_ID]
    elif mode == "EcsRamRole":
        expected = metadata.issued[-1].access_key_id
    assert emulator.calls[-1].access_key_id == expected


@pytest.mark.parametrize("section", ["default", "role", "ecs"])
async def test_a_credentials_file_signs_kms_calls(
    tmp_path: Path,
    start_agent: StartAgent,
    emulator: KmsEmulator,
    sts: StsEmulator,
    metadata: MetadataEmulator,
    section: str,
) -> None:
    role = sts.add_role("reader")
    path = tmp_path / "credentials.ini"
    path.write_text(
        f"[default]\ntype = access_key\naccess_key_id = {AK_ID}\naccess_key_secret = {AK_SECRET}\n"
        f"[role]\ntype = ram_role_arn\naccess_key_id = {AK_ID}\naccess_key_secret = {AK_SECRET}\nrole_arn = {role}\n"
        "[ecs]\ntype = ecs_ram_role\n"
    )
    env = {"ALIBABA_CLOUD_CREDENTIALS_FILE": str(path), "ALIBABA_CLOUD_PROFILE": section}
    source = await credential_source(settings(sts, metadata, type="credentials_file"), env)
    agent = await start_agent(credentials=source)
    assert (await agent.get(SECRET_PATH)).status_code == 200
    expected = {"default": AK_ID, "role": sts.issued[-1].access_key_id if sts.issued else None}.get(section)
    if section == "ecs":
        expected = metadata.issued[-1].access_key_id
    assert emulator.calls[-1].access_key_id == expected


async def test_an_oidc_profile_builds_the_sdk_provider_with_its_settings(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "current": "k8s",
                "profiles": [
                    {
                        "name": "k8s",
                        "mode": "OIDC",
                        "ram_role_arn": ROLE,
                        "oidc_provider_arn": "acs:ram::1:oidc-provider/p",
                        "oidc_token_file": "/var/run/token",
                        "sts_region": "cn-beijing",
                    }
                ],
            }
        )
    )
    source = await credential_source(CredentialsConfig(type="cli_profile", cli_config_path=str(path)), {})
    assert isinstance(source, ProfileCredentials)
    inner = source._inner
    assert isinstance(inner, OidcRoleCredentials)
    provider = inner._provider
    assert (provider._role_arn, provider._oidc_token_file_path, provider._sts_endpoint) == (
        ROLE,
        "/var/run/token",
        "sts.cn-beijing.aliyuncs.com",
    )


@pytest.mark.parametrize(
    ("kind", "message"),
    [("cli_profile", "config.json: not found"), ("credentials_file", "credentials.ini: not found")],
)
async def test_an_explicit_profile_type_without_its_file_is_unavailable(
    tmp_path: Path, kind: str, message: str
) -> None:
    config = CredentialsConfig(type=kind)
    with pytest.raises(CredentialsUnavailable, match=f'Type = "{kind}": {tmp_path}.*{message}'):
        await credential_source(config, {"HOME": str(tmp_path)})
    with pytest.raises(CredentialsUnavailable, match=message):
        check_credentials(config, {"HOME": str(tmp_path)})


# --- reading again when the file changes ---------------------------------------------------------


@pytest.fixture
def fast_watch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(profiles, "WATCH_INTERVAL", 0.02)


def write(path: Path, text: str) -> None:
    """Replaces the file's content, and makes sure its stamp changes even within one mtime tick."""
    path.write_text(text)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))


async def test_a_changed_file_is_read_again_and_a_broken_one_keeps_the_last_good_credentials(
    tmp_path: Path, nursery: trio.Nursery, emulator: KmsEmulator, fast_watch: None, captured_logs: list[str]
) -> None:
    path = tmp_path / "config.json"
    profile = {"name": "default", "mode": "AK", "access_key_id": "LTAIfirst", "access_key_secret": "first-secret-Aa1"}
    write(path, json.dumps({"current": "default", "profiles": [profile]}))
    source = await credential_source(CredentialsConfig(type="cli_profile", cli_config_path=str(path)), {})
    assert isinstance(source, ProfileCredentials)
    await nursery.start(source.run)
    assert (await source.current()).access_key_id == "LTAIfirst"

    # Broken: the bad line holds a secret; the log names file, line and kind, never the line.
    write(
        path,
        '{"current": "default",\n "profiles": [{"name": "default", "mode": "AK",\n "access_key_secret": "'
        + SECRET_ON_BAD_LINE
        + '" "x": 1}]}',
    )
    await eventually(lambda: any("not valid JSON" in line for line in captured_logs), seconds=5)
    assert (await source.current()).access_key_id == "LTAIfirst"
    errors = [line for line in captured_logs if "not valid JSON" in line]
    assert len(errors) == 1 and f"{path}: line 3: not valid JSON; keeping the last good credentials" in errors[0]
    await trio.sleep(0.2)  # watched again and again: logged once per change, not per look
    assert len([line for line in captured_logs if "not valid JSON" in line]) == 1

    # Gone: the same.
    path.unlink()
    await eventually(lambda: any("not found" in line for line in captured_logs), seconds=5)
    assert (await source.current()).access_key_id == "LTAIfirst"

    # Fixed with new keys: they are used from now on.
    profile.update(access_key_id="LTAIsecond", access_key_secret="second-secret-Bb2")
    write(path, json.dumps({"current": "default", "profiles": [profile]}))
    await eventually(lambda: source.builds == 2, seconds=5)
    assert (await source.current()).access_key_id == "LTAIsecond"
    assert any("is usable again" in line for line in captured_logs)
    text = "\n".join(captured_logs)
    for value in (SECRET_ON_BAD_LINE, "first-secret-Aa1", "second-secret-Bb2"):
        assert value not in text


async def test_an_unchanged_profile_is_not_rebuilt_and_a_changed_role_replaces_the_session(
    tmp_path: Path, nursery: trio.Nursery, emulator: KmsEmulator, sts: StsEmulator, fast_watch: None
) -> None:
    first, second = sts.add_role("first"), sts.add_role("second")
    path = tmp_path / "credentials.ini"

    def ini(role: str, comment: str = "") -> str:
        return (
            f"{comment}[default]\ntype = ram_role_arn\n"
            f"access_key_id = {AK_ID}\naccess_key_secret = {AK_SECRET}\nrole_arn = {role}\n"
        )

    write(path, ini(first))
    config = CredentialsConfig(
        type="credentials_file", credentials_file=str(path), sts_endpoint=str(sts.endpoint), sts_protocol="http"
    )
    source = await credential_source(config, {})
    assert isinstance(source, ProfileCredentials)
    await nursery.start(source.run)
    assert (await source.current()).access_key_id == sts.issued[0].access_key_id
    write(path, ini(first, comment="# touched, same profile\n"))
    await trio.sleep(0.3)
    assert source.builds == 1 and len(sts.calls) == 1
    write(path, ini(second))
    await eventually(lambda: source.builds == 2, seconds=5)
    await eventually(lambda: len(sts.issued) == 2, seconds=5)
    assert [call.role_arn for call in sts.calls] == [first, second]
    assert (await source.current()).access_key_id == sts.issued[1].access_key_id
