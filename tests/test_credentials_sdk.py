"""The official SDK providers and the agent, given the same emulators and the same files, end up
with the same credentials: alibabacloud-credentials' URLCredentialsProvider,
CLIProfileCredentialsProvider, ProfileCredentialsProvider and RamRoleArnCredentialsProvider.

Static keys and a credentials URI (which hands out the same credentials for half their lifetime)
must be equal value for value. An AssumeRole mints new keys on every call, so there "the same"
means: STS saw the same caller, role, session name, duration, policy and ExternalId from both,
accepted both signatures, and both sessions may read exactly what the role may read.

The SDK providers block (requests), so they run in a worker thread. The SDK sends AssumeRole only
over https, so the STS emulator also listens with TLS, trusted through the test CA; and it names
the STS host itself (sts.<region>.aliyuncs.com), so the test points its constructor at the
emulator. Everything else (parameters, signing, file parsing) is the SDK's own.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import certifi
import pytest
import trio
from alibabacloud_credentials.provider import cli_profile as sdk_cli_profile
from alibabacloud_credentials.provider import profile as sdk_profile
from alibabacloud_credentials.provider.cli_profile import CLIProfileCredentialsProvider
from alibabacloud_credentials.provider.profile import ProfileCredentialsProvider
from alibabacloud_credentials.provider.ram_role_arn import RamRoleArnCredentialsProvider
from alibabacloud_credentials.provider.uri import URLCredentialsProvider

from conftest import AK_ID, AK_SECRET, StartAgent
from kmsagent.config import CredentialsConfig
from kmsagent.credentials import Credentials, CredentialSource, StaticCredentials, credential_source
from kmsagent.emulator import CredentialsUriEmulator, KmsEmulator, StsEmulator
from test_credentials import make_ca_and_server_cert

ALLOWED, DENIED = "api-key", "db/password"
STS_TOKEN_KEY, STS_TOKEN_SECRET, STS_TOKEN = "STS.profile-key", "profile-sts-secret", "profile-sts-token-Lm3"


def triple(credentials: Any) -> tuple[str, str, str | None]:
    """(key id, secret, token) of an SDK answer or of our Credentials."""
    if isinstance(credentials, Credentials):
        return credentials.access_key_id, credentials.access_key_secret, credentials.security_token
    return (
        credentials.get_access_key_id(),
        credentials.get_access_key_secret(),
        credentials.get_security_token() or None,
    )


async def sdk_credentials(provider: Any) -> tuple[str, str, str | None]:
    return triple(await trio.to_thread.run_sync(provider.get_credentials))


async def agent_credentials(source: CredentialSource, nursery: trio.Nursery) -> tuple[str, str, str | None]:
    await nursery.start(source.run)
    return triple(await source.current())


async def reads(start_agent: StartAgent, credentials: tuple[str, str, str | None]) -> tuple[int, int]:
    """The statuses of reading the role's secret and another one with these credentials."""
    agent = await start_agent(credentials=StaticCredentials(Credentials(*credentials), "under test"))
    return (await agent.get(f"/v1/{ALLOWED}")).status_code, (await agent.get(f"/v1/{DENIED}")).status_code


@pytest.fixture
async def sts(
    nursery: trio.Nursery, emulator: KmsEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[StsEmulator, str, str]:
    """The STS emulator on plain http (the agent's) and TLS (the SDK's); returns it with both endpoints."""
    service = StsEmulator(emulator)
    http_port = await nursery.start(service.serve)
    ca_path, server_context = make_ca_and_server_cert(tmp_path)
    tls_port = await nursery.start(partial(service.serve, ssl_context=server_context))
    monkeypatch.setattr(certifi, "where", lambda: str(ca_path))  # the SDK's TLS trusts certifi's bundle only
    return service, f"127.0.0.1:{http_port}", f"127.0.0.1:{tls_port}"


def point_sdk_at(module: Any, endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK module's RamRoleArnCredentialsProvider, with its STS host replaced by `endpoint`."""

    def redirected(**kwargs: Any) -> RamRoleArnCredentialsProvider:
        return RamRoleArnCredentialsProvider(**{**kwargs, "sts_endpoint": endpoint})

    monkeypatch.setattr(module, "RamRoleArnCredentialsProvider", redirected)


def same_assume_role_calls(sts: StsEmulator) -> None:
    sdk, agent = sts.calls
    assert (sdk.status, agent.status) == (200, 200)
    fields = ("access_key_id", "role_arn", "session_name", "duration_seconds", "policy", "external_id")
    assert [getattr(sdk, name) for name in fields] == [getattr(agent, name) for name in fields]


async def test_url_provider(nursery: trio.Nursery, emulator: KmsEmulator, start_agent: StartAgent) -> None:
    uri = CredentialsUriEmulator(emulator, secrets=[ALLOWED])
    await nursery.start(uri.serve)
    theirs = await sdk_credentials(URLCredentialsProvider(uri=uri.uri))
    config = CredentialsConfig(type="credentials_uri", credentials_uri=str(uri.uri))
    ours = await agent_credentials(await credential_source(config, {}), nursery)
    assert ours == theirs and len(uri.issued) == 1
    assert await reads(start_agent, ours) == (200, 403)


async def test_ram_role_arn_provider(
    nursery: trio.Nursery, sts: tuple[StsEmulator, str, str], start_agent: StartAgent
) -> None:
    service, http_endpoint, tls_endpoint = sts
    role = service.add_role("reader", secrets=[ALLOWED], max_session_duration=7200, external_id="ext-1")
    settings: dict[str, Any] = {
        "role_session_name": "same-session",
        "duration_seconds": 7200,
        "policy": '{"Version":"1"}',
        "external_id": "ext-1",
    }
    provider = RamRoleArnCredentialsProvider(
        access_key_id=AK_ID, access_key_secret=AK_SECRET, role_arn=role, sts_endpoint=tls_endpoint, **settings
    )
    theirs = await sdk_credentials(provider)
    config = CredentialsConfig(
        type="ram_role_arn",
        role_arn=role,
        source_type="access_key",
        role_session_name="same-session",
        duration_seconds=7200,
        policy='{"Version":"1"}',
        external_id="ext-1",
        sts_endpoint=http_endpoint,
        sts_protocol="http",
    )
    env = {"ALIBABA_CLOUD_ACCESS_KEY_ID": AK_ID, "ALIBABA_CLOUD_ACCESS_KEY_SECRET": AK_SECRET}
    ours = await agent_credentials(await credential_source(config, env), nursery)
    same_assume_role_calls(service)
    assert {theirs, ours} == {(i.access_key_id, i.access_key_secret, i.security_token) for i in service.issued}
    assert await reads(start_agent, theirs) == await reads(start_agent, ours) == (200, 403)


def write_cli_config(path: Path, role: str) -> None:
    profiles = [
        {"name": "ak", "mode": "AK", "access_key_id": AK_ID, "access_key_secret": AK_SECRET},
        {
            "name": "sts",
            "mode": "StsToken",
            "access_key_id": STS_TOKEN_KEY,
            "access_key_secret": STS_TOKEN_SECRET,
            "sts_token": STS_TOKEN,
        },
        {
            "name": "role",
            "mode": "RamRoleArn",
            "access_key_id": AK_ID,
            "access_key_secret": AK_SECRET,
            "ram_role_arn": role,
            "ram_session_name": "cli-session",
            "expired_seconds": 900,
        },
    ]
    path.write_text(json.dumps({"current": "ak", "profiles": profiles}))


@pytest.mark.parametrize("profile", ["ak", "sts", "role"])
async def test_cli_profile_provider(
    tmp_path: Path,
    nursery: trio.Nursery,
    emulator: KmsEmulator,
    sts: tuple[StsEmulator, str, str],
    start_agent: StartAgent,
    monkeypatch: pytest.MonkeyPatch,
    profile: str,
) -> None:
    service, http_endpoint, tls_endpoint = sts
    emulator.add_credentials(STS_TOKEN_KEY, STS_TOKEN_SECRET, STS_TOKEN)
    role = service.add_role("reader", secrets=[ALLOWED])
    path = tmp_path / "config.json"
    write_cli_config(path, role)
    point_sdk_at(sdk_cli_profile, tls_endpoint, monkeypatch)
    theirs = await sdk_credentials(CLIProfileCredentialsProvider(profile_file=str(path), profile_name=profile))
    config = CredentialsConfig(
        type="cli_profile", cli_config_path=str(path), sts_endpoint=http_endpoint, sts_protocol="http"
    )
    ours = await agent_credentials(await credential_source(config, {"ALIBABA_CLOUD_PROFILE": profile}), nursery)
    if profile == "role":
        same_assume_role_calls(service)
        assert await reads(start_agent, theirs) == await reads(start_agent, ours) == (200, 403)
    else:
        assert ours == theirs
        assert await reads(start_agent, ours) == (200, 200)


@pytest.mark.parametrize("section", ["default", "role"])
async def test_profile_provider(
    tmp_path: Path,
    nursery: trio.Nursery,
    sts: tuple[StsEmulator, str, str],
    start_agent: StartAgent,
    monkeypatch: pytest.MonkeyPatch,
    section: str,
) -> None:
    service, http_endpoint, tls_endpoint = sts
    role = service.add_role("reader", secrets=[ALLOWED])
    path = tmp_path / "credentials.ini"
    path.write_text(
        f"[default]\ntype = access_key\naccess_key_id = {AK_ID}\naccess_key_secret = {AK_SECRET}  # a comment\n\n"
        f"[role]\ntype = ram_role_arn\naccess_key_id = {AK_ID}\naccess_key_secret = {AK_SECRET}\n"
        f"role_arn = {role}\nrole_session_name = ini-session\n"
    )
    point_sdk_at(sdk_profile, tls_endpoint, monkeypatch)
    theirs = await sdk_credentials(ProfileCredentialsProvider(profile_file=str(path), profile_name=section))
    config = CredentialsConfig(
        type="credentials_file",
        credentials_file=str(path),
        profile=section,
        sts_endpoint=http_endpoint,
        sts_protocol="http",
    )
    ours = await agent_credentials(await credential_source(config, {}), nursery)
    if section == "role":
        same_assume_role_calls(service)
        assert await reads(start_agent, theirs) == await reads(start_agent, ours) == (200, 403)
    else:
        assert ours == theirs == (AK_ID, AK_SECRET, None)

