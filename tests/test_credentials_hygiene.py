"""No AccessKeyId, AccessKeySecret or security token from STS answers, profile files or credential
URIs reaches a log line (at debug), a response body or header: renewals, outages, refusals (STS's
SignatureDoesNotMatch message quotes the caller's token, as the real gateway's does), broken files
whose bad line holds a secret, and a URI whose query holds a token."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from conftest import AK_ID, AK_SECRET, StartAgent, eventually
from kmsagent.config import CredentialsConfig
from kmsagent.credentials import Credentials, CredentialsUnavailable, StaticCredentials, credential_source, profiles
from kmsagent.credentials.sts import AssumeRoleSession, RoleRequest, StsEndpoint
from kmsagent.emulator import CredentialsUriEmulator, KmsEmulator, StsEmulator
from kmsagent.logs import QUIET_LIBRARIES

SOURCE_KEY, SOURCE_SECRET, SOURCE_TOKEN = "STS.sourceKeyId77", "source-secret-Pq8Wn2", "SourceSecurityToken0Kx5Tz9"
URI_QUERY_TOKEN = "uri-query-token-Hs4Nd1"


class Sweep:
    """Collects every answer the agent gives; `leaks` lists what appears of `material`."""

    def __init__(self) -> None:
        self.outputs: list[str] = []

    async def read(self, agent: object, path: str) -> int:
        response: httpx.Response = await agent.get(path)  # type: ignore[attr-defined]
        if response.status_code != 200:
            self.outputs.append(response.text)
        self.outputs.append(repr(dict(response.headers)))
        return response.status_code

    def leaks(self, logs: list[str], material: list[str]) -> list[str]:
        text = "\n".join([*logs, *self.outputs])
        return [value for value in material if value in text]


class TestStsAnswers:
    """On trio's autojump clock: emulators, agent and session share the virtual wall clock."""

    @pytest.fixture
    async def wall_clock(self, autojump_clock: trio.testing.MockClock) -> Callable[[], float]:
        offset = time.time() - trio.current_time()
        return lambda: offset + trio.current_time()

    async def test_sts_answers_leave_no_key_secret_or_token(
        self,
        start_agent: StartAgent,
        emulator: KmsEmulator,
        nursery: trio.Nursery,
        wall_clock: Callable[[], float],
        autojump_clock: trio.testing.MockClock,
        captured_logs: list[str],
    ) -> None:
        clock = wall_clock
        sts = StsEmulator(emulator, clock=clock)
        await nursery.start(sts.serve)
        emulator.add_credentials(SOURCE_KEY, SOURCE_SECRET, SOURCE_TOKEN)
        good = StaticCredentials(Credentials(SOURCE_KEY, SOURCE_SECRET, SOURCE_TOKEN), "source")
        endpoint = StsEndpoint(str(sts.endpoint), "http")
        role = sts.add_role("reader", secrets=["api-key"])
        session = AssumeRoleSession(
            good, RoleRequest(role, duration_seconds=900), endpoint, renew_before=900, clock=clock
        )
        agent = await start_agent(credentials=session, cache={"ttl_seconds": 0})
        sweep = Sweep()
        statuses = set()
        for _ in range(31):  # renewals every 600 s
            statuses.add(await sweep.read(agent, "/v1/api-key"))
            statuses.add(await sweep.read(agent, "/v1/db/password"))  # 403 Forbidden.NoPermission
            await trio.sleep(60)
        assert statuses == {200, 403}
        sts.outage = True
        for _ in range(20):  # retries, then expiry: 502
            statuses.add(await sweep.read(agent, "/v1/api-key"))
            await trio.sleep(60)
        assert 502 in statuses
        sts.outage = False
        # A caller whose secret is wrong: STS's SignatureDoesNotMatch quotes the string to sign, token and all.
        wrong = StaticCredentials(Credentials(SOURCE_KEY, "not-the-secret-Zz1", SOURCE_TOKEN), "wrong")
        refused = AssumeRoleSession(wrong, RoleRequest(role), endpoint, renew_before=900, clock=clock)
        refused_agent = await start_agent(credentials=refused)
        assert await sweep.read(refused_agent, "/v1/api-key") == 403
        assert "SignatureDoesNotMatch" in [call.code for call in sts.calls]
        assert len(sts.issued) >= 4 and any("renewed" in line for line in captured_logs)
        material = [SOURCE_KEY, SOURCE_SECRET, SOURCE_TOKEN, "not-the-secret-Zz1", AK_SECRET]
        for issued in sts.issued:
            material += [issued.access_key_id, issued.access_key_secret, issued.security_token]
        assert sweep.leaks(captured_logs, material) == []


async def test_files_and_uris_leave_no_key_secret_or_token(
    tmp_path: Path,
    start_agent: StartAgent,
    emulator: KmsEmulator,
    nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch,
    captured_logs: list[str],
) -> None:
    monkeypatch.setattr(profiles, "WATCH_INTERVAL", 0.02)
    for library in QUIET_LIBRARIES:  # as configure_logging sets them: httpx logs every URL at INFO
        monkeypatch.setattr(logging.getLogger(library), "level", logging.WARNING)
    sweep = Sweep()
    # A CLI profile file that breaks with its secret on the bad line, then is fixed.
    path = tmp_path / "config.json"
    good = {
        "current": "p",
        "profiles": [{"name": "p", "mode": "AK", "access_key_id": AK_ID, "access_key_secret": AK_SECRET}],
    }
    path.write_text(json.dumps(good))
    source = await credential_source(CredentialsConfig(type="cli_profile", cli_config_path=str(path)), {})
    agent = await start_agent(credentials=source)
    assert await sweep.read(agent, "/v1/api-key") == 200
    path.write_text(
        '{"current": "p", "profiles": [{"name": "p", "mode": "AK", "access_key_id": "'
        + AK_ID
        + '",\n"access_key_secret": "'
        + AK_SECRET
        + '" oops}]}'
    )
    os.utime(path, ns=(0, time.time_ns() + 10**9))
    await eventually(lambda: any("not valid JSON" in line for line in captured_logs), seconds=5)
    assert await sweep.read(agent, "/v1/db/password") == 200  # the last good credentials
    ini = tmp_path / "credentials.ini"
    ini.write_text(f"[default]\ntype = access_key\naccess_key_id {AK_ID}\naccess_key_secret = {AK_SECRET}\n")
    broken = CredentialsConfig(type="credentials_file", credentials_file=str(ini))
    with pytest.raises(CredentialsUnavailable) as caught:
        await credential_source(broken, {})
    sweep.outputs.append(str(caught.value))
    # A credentials URI with a token in its query string, renewed and then down.
    uri = CredentialsUriEmulator(emulator, lifetime=3)
    await nursery.start(uri.serve)
    from_uri = await credential_source(
        CredentialsConfig(type="credentials_uri", credentials_uri=f"{uri.uri}?token={URI_QUERY_TOKEN}"), {}
    )
    uri_agent = await start_agent(credentials=from_uri, cache={"ttl_seconds": 0})
    assert await sweep.read(uri_agent, "/v1/api-key") == 200
    await eventually(lambda: len(uri.issued) >= 2, seconds=5, interval=0.05)  # renewed a third of 3 s before expiry

    async def refused() -> bool:
        return await sweep.read(uri_agent, "/v1/api-key") == 502

    uri.outage = True
    await eventually(refused, seconds=6, interval=0.2)  # kept until they expire, then 502
    assert len(uri.issued) >= 2
    material = [AK_ID, AK_SECRET, URI_QUERY_TOKEN]
    for issued in uri.issued:
        material += [issued.access_key_id, issued.access_key_secret, issued.security_token]
    assert sweep.leaks(captured_logs, material) == []

