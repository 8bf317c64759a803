"""`ram_role_arn`: the AssumeRole session against the STS emulator, on trio's autojump clock.

The request and its signature are the SDK's byte for byte; the session renews by SPEC §6's rule
(a 900 s session after 600 s, not in a loop); STS down keeps the session until it expires; STS
refusing is a 403 with STS's code; the source credentials run inside the session.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import trio
import trio.testing

from conftest import AK_ID, AK_SECRET, SECRETS, StartAgent
from kmsagent.config import CredentialsConfig
from kmsagent.credentials import Credentials, CredentialSource, StaticCredentials, credential_source
from kmsagent.credentials.sts import (
    AssumeRoleSession,
    RoleRequest,
    StsEndpoint,
    StsRefused,
    assume_role_query,
    rpc_signature,
)
from kmsagent.emulator import KmsEmulator, MetadataEmulator, StsEmulator

SECRET_PATH = "/secretsmanager/get?secretId=api-key"


@pytest.fixture
async def wall_clock(autojump_clock: trio.testing.MockClock) -> Callable[[], float]:
    offset = time.time() - trio.current_time()
    return lambda: offset + trio.current_time()


def static_source() -> StaticCredentials:
    return StaticCredentials(Credentials(AK_ID, AK_SECRET), "test keys")


def session(
    sts: StsEmulator,
    role_arn: str,
    wall_clock: Callable[[], float],
    *,
    source: CredentialSource | None = None,
    renew_before: float = 900,
    **request: Any,
) -> AssumeRoleSession:
    return AssumeRoleSession(
        source or static_source(),
        RoleRequest(role_arn, **request),
        StsEndpoint(str(sts.endpoint), "http"),
        renew_before=renew_before,
        clock=wall_clock,
    )


def minted_at(sts: StsEmulator, duration: float) -> list[float]:
    return [issued.expires_at - duration for issued in sts.issued]


# --- the request is the SDK's --------------------------------------------------------------------


class _Captured(Exception):
    pass


@pytest.mark.parametrize(
    ("token", "policy", "external_id"),
    [
        (None, "", ""),
        ("CAIS-source-token/+=", "", ""),
        (None, '{"Version":"1","Statement":[{"Effect":"Allow","Action":"kms:GetSecretValue","Resource":"*"}]}', ""),
        ("tok", '{"Version":"1"}', "ext:id/=,.@-_9"),
    ],
)
def test_the_assume_role_query_is_the_sdks_byte_for_byte(
    monkeypatch: pytest.MonkeyPatch, token: str | None, policy: str, external_id: str
) -> None:
    """The SDK's RamRoleArnCredentialsProvider builds and signs; its sending is replaced by a catch."""
    from alibabacloud_credentials.provider import ram_role_arn as sdk
    from alibabacloud_credentials.utils import parameter_helper

    captured: dict[str, str] = {}

    def catch(request: Any, runtime: Any) -> None:
        captured.update(request.query)
        raise _Captured

    monkeypatch.setattr(sdk.TeaCore, "do_action", catch)
    monkeypatch.setattr(parameter_helper, "get_iso_8061_date", lambda: "2026-11-30T12:00:00Z")
    monkeypatch.setattr(parameter_helper, "get_uuid", lambda: "nonce-1")
    provider = sdk.RamRoleArnCredentialsProvider(
        access_key_id=AK_ID,
        access_key_secret=AK_SECRET,
        security_token=token,
        role_arn="acs:ram::1234567890123456:role/kms-reader",
        role_session_name="kmsagent",
        duration_seconds=1800,
        policy=policy or None,
        external_id=external_id or None,
    )
    with pytest.raises(_Captured):
        provider._refresh_credentials()
    request = RoleRequest("acs:ram::1234567890123456:role/kms-reader", "kmsagent", 1800, external_id, policy)
    timestamp = datetime(2026, 11, 30, 12, tzinfo=UTC).timestamp()
    credentials = Credentials(AK_ID, AK_SECRET, token)
    ours = assume_role_query(request, credentials, timestamp=timestamp, nonce="nonce-1", method="GET")
    assert ours == captured  # every parameter, the Signature of the SDK's GET included
    # And the signer itself agrees with the credentials package's helpers.
    unsigned = {key: value for key, value in captured.items() if key != "Signature"}
    expected = parameter_helper.sign_string(parameter_helper.compose_string_to_sign("GET", unsigned), AK_SECRET + "&")
    assert rpc_signature(unsigned, AK_SECRET, "GET") == expected
    # The agent sends the same parameters as a POST form (no token in a URL): signed for POST.
    posted = assume_role_query(request, credentials, timestamp=timestamp, nonce="nonce-1")
    assert {**posted, "Signature": ""} == {**captured, "Signature": ""}
    assert posted["Signature"] == rpc_signature(unsigned, AK_SECRET, "POST") != expected


async def test_a_policy_with_spaces_is_signed_as_documented_and_accepted(
    sts: StsEmulator, wall_clock: Callable[[], float], nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The credentials package's helper encodes a space as "+", the RPC documentation (and the
    OpenAPI SDK's signer, which the agent uses) as %20; STS checks the latter."""
    arn = sts.add_role("reader")
    source = session(sts, arn, wall_clock, policy='{"Version": "1", "Statement": []}')
    await nursery.start(source.run)
    await source.current()
    assert [call.status for call in sts.calls] == [200]
    assert sts.calls[0].policy == '{"Version": "1", "Statement": []}'


# --- the session end to end --------------------------------------------------------------------------


async def test_a_session_reads_what_its_role_may_read_and_nothing_else(
    start_agent: StartAgent, sts: StsEmulator, wall_clock: Callable[[], float],
    autojump_clock: trio.testing.MockClock,
) -> None:
    arn = sts.add_role("api-reader", secrets=["api-key"])
    agent = await start_agent(credentials=session(sts, arn, wall_clock), cache={"ttl_seconds": 0})
    response = await agent.get(SECRET_PATH)
    assert response.status_code == 200 and response.json()["SecretData"] == SECRETS["api-key"]
    denied = await agent.get("/secretsmanager/get?secretId=db/password")
    assert (denied.status_code, denied.json()["Code"]) == (403, "Forbidden.NoPermission")
    [call] = sts.calls
    assert (call.access_key_id, call.role_arn, call.session_name, call.duration_seconds) == (
        AK_ID,
        arn,
        "kmsagent",
        "3600",
    )


async def test_a_900_s_session_renews_every_600_s_not_in_a_loop(
    nursery: trio.Nursery, sts: StsEmulator, wall_clock: Callable[[], float],
    autojump_clock: trio.testing.MockClock,
) -> None:
    arn = sts.add_role("reader")
    source = session(sts, arn, wall_clock, renew_before=900, duration_seconds=900)
    await nursery.start(source.run)
    await source.current()
    await trio.sleep(3000)
    minted = minted_at(sts, 900)
    assert len(minted) == 6  # the first one and 5 renewals, at 600 s each
    gaps = [later - earlier for earlier, later in itertools.pairwise(minted)]
    assert gaps == pytest.approx([600] * 5, abs=1)


async def test_an_hour_session_renews_900_s_before_expiry(
    nursery: trio.Nursery, sts: StsEmulator, wall_clock: Callable[[], float],
    autojump_clock: trio.testing.MockClock,
) -> None:
    arn = sts.add_role("reader")
    source = session(sts, arn, wall_clock, renew_before=900, duration_seconds=3600)
    await nursery.start(source.run)
    first = await source.current()
    await trio.sleep(2700 - 2)  # Expiration comes in whole seconds: up to 1 s early
    assert await source.current() is first and len(sts.issued) == 1
    await trio.sleep(3)
    second = await source.current()
    assert second is not first and len(sts.issued) == 2
    assert first.expiration is not None and wall_clock() < first.expiration  # renewed while still valid


async def test_sts_down_keeps_the_session_until_expiry_then_502_then_recovers(
    start_agent: StartAgent, sts: StsEmulator, wall_clock: Callable[[], float], autojump_clock: trio.testing.MockClock
) -> None:
    arn = sts.add_role("reader")
    agent = await start_agent(credentials=session(sts, arn, wall_clock, duration_seconds=900), cache={"ttl_seconds": 0})
    assert (await agent.get(SECRET_PATH)).status_code == 200
    expires_in = sts.issued[0].expires_at - wall_clock()
    sts.outage = True
    started = trio.current_time()
    statuses: list[tuple[float, int, str]] = []
    while trio.current_time() - started < 1000:
        response = await agent.get(SECRET_PATH)
        statuses.append((trio.current_time() - started, response.status_code, response.text))
        await trio.sleep(10)
    assert all(status == 200 for at, status, _ in statuses if at < expires_in - 1)
    after = [(status, text) for at, status, text in statuses if at > expires_in + 1]
    assert after and all(status == 502 for status, _ in after)
    assert "STS at 127.0.0.1" in after[0][1] and "UpstreamUnavailable" in after[0][1]
    assert len(sts.issued) == 1 and len(sts.calls) > 10  # it kept retrying, with back-off
    assert len(sts.calls) < 1000 / 10  # ... not in a loop
    sts.outage = False
    await trio.sleep(31)  # at most the back-off cap
    assert (await agent.get(SECRET_PATH)).status_code == 200 and len(sts.issued) == 2


@pytest.mark.parametrize(
    ("setup", "code"),
    [("untrusted", "NoPermission"), ("no such role", "EntityNotExist.Role"), ("wrong external id", "NoPermission")],
)
async def test_an_sts_refusal_is_a_403_with_stss_code(
    start_agent: StartAgent,
    sts: StsEmulator,
    wall_clock: Callable[[], float],
    captured_logs: list[str],
    setup: str,
    code: str,
    autojump_clock: trio.testing.MockClock,
) -> None:
    arn = f"acs:ram::{sts.account_id}:role/missing"
    if setup == "untrusted":
        arn = sts.add_role("reader", trusted=["LTAIsomeoneElse"])
    elif setup == "wrong external id":
        arn = sts.add_role("reader", external_id="expected-id")
    agent = await start_agent(credentials=session(sts, arn, wall_clock, external_id="another-id"))
    response = await agent.get(SECRET_PATH)
    assert (response.status_code, response.json()["Code"]) == (403, code)
    assert arn in response.json()["Message"]
    assert any(f"refused AssumeRole of {arn}: {code}" in line for line in captured_logs)
    assert not any("You are not authorized" in line or "not exists" in line for line in captured_logs)  # STS's Message


class RenewableSource:
    """A source whose first credentials STS refuses as expired; `rejected` hands out fresh ones."""

    kind = "renewable test source"

    def __init__(self, kms: KmsEmulator, clock: Callable[[], float]) -> None:
        self.kms = kms
        self.rejections = 0
        self.credentials = self._mint("STS.first", expired=True, clock=clock)
        self.clock = clock

    def _mint(self, key: str, *, expired: bool, clock: Callable[[], float]) -> Credentials:
        self.kms.add_credentials(key, f"{key}-secret", f"{key}-token", expires_at=clock() + (-1 if expired else 3600))
        return Credentials(key, f"{key}-secret", f"{key}-token", clock() + 3600)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    async def current(self) -> Credentials:
        return self.credentials

    async def rejected(self, credentials: Credentials) -> bool:
        self.rejections += 1
        self.credentials = self._mint("STS.second", expired=False, clock=self.clock)
        return True

    def expiration(self) -> float | None:
        return self.credentials.expiration


async def test_sts_rejecting_the_source_token_renews_the_source(
    nursery: trio.Nursery, emulator: KmsEmulator, sts: StsEmulator, wall_clock: Callable[[], float],
    autojump_clock: trio.testing.MockClock,
) -> None:
    arn = sts.add_role("reader")
    source = RenewableSource(emulator, wall_clock)
    role = session(sts, arn, wall_clock, source=source)
    await nursery.start(role.run)
    credentials = await role.current()  # the first try failed; the retry (after back-off) worked
    assert credentials.access_key_id == sts.issued[0].access_key_id
    assert [(call.access_key_id, call.code) for call in sts.calls] == [
        ("STS.first", "InvalidSecurityToken.Expired"),
        ("STS.second", None),
    ]
    assert source.rejections == 1


async def test_kms_rejecting_the_session_token_assumes_the_role_again(
    start_agent: StartAgent, emulator: KmsEmulator, sts: StsEmulator, wall_clock: Callable[[], float],
    autojump_clock: trio.testing.MockClock,
) -> None:
    arn = sts.add_role("reader")
    agent = await start_agent(credentials=session(sts, arn, wall_clock), cache={"ttl_seconds": 0})
    assert (await agent.get(SECRET_PATH)).status_code == 200
    first = sts.issued[0]
    emulator.add_credentials(
        first.access_key_id, first.access_key_secret, first.security_token, expires_at=wall_clock() - 1
    )
    assert (await agent.get(SECRET_PATH)).status_code == 200
    assert len(sts.issued) == 2 and emulator.calls[-1].access_key_id == sts.issued[1].access_key_id


async def test_sessions_of_two_roles_share_one_running_source(
    nursery: trio.Nursery, emulator: KmsEmulator, sts: StsEmulator, wall_clock: Callable[[], float],
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The shape per-request roles take: the agent's own source, running once, signs every session."""
    metadata = MetadataEmulator(emulator, lifetime=3600, clock=wall_clock)
    await nursery.start(metadata.serve)
    config = CredentialsConfig(type="ecs_ram_role", metadata_endpoint=str(metadata.endpoint))
    own = await credential_source(config, {}, clock=wall_clock)
    await nursery.start(own.run)
    endpoint = StsEndpoint(str(sts.endpoint), "http")
    roles = [
        AssumeRoleSession(
            own, RoleRequest(sts.add_role(name)), endpoint, renew_before=900, clock=wall_clock, owns_source=False
        )
        for name in ("a", "b")
    ]
    for role in roles:
        await nursery.start(role.run)
        await role.current()
    assert len(metadata.issued) == 1
    assert [call.access_key_id for call in sts.calls] == [metadata.issued[0].access_key_id] * 2


# --- through the chain: SourceType and StsEndpoint -----------------------------------------------------


async def test_ram_role_arn_signs_with_its_source_type(
    start_agent: StartAgent,
    emulator: KmsEmulator,
    sts: StsEmulator,
    nursery: trio.Nursery,
    wall_clock: Callable[[], float],
    autojump_clock: trio.testing.MockClock,
) -> None:
    metadata = MetadataEmulator(emulator, lifetime=3600, clock=wall_clock)
    await nursery.start(metadata.serve)
    arn = sts.add_role("reader", secrets=["api-key"])
    config = CredentialsConfig(
        type="ram_role_arn",
        role_arn=arn,
        role_session_name="agent-1",
        duration_seconds=1200,
        source_type="ecs_ram_role",
        metadata_endpoint=str(metadata.endpoint),
        sts_endpoint=str(sts.endpoint),
        sts_protocol="http",
    )
    source = await credential_source(config, {}, clock=wall_clock)
    assert source.kind.startswith(f"ram_role_arn ({arn} via {sts.endpoint}, signed with ecs_ram_role")
    agent = await start_agent(credentials=source)
    assert (await agent.get(SECRET_PATH)).status_code == 200
    [call] = sts.calls
    assert (call.access_key_id, call.session_name, call.duration_seconds) == (
        metadata.issued[0].access_key_id,
        "agent-1",
        "1200",
    )
    assert emulator.calls[-1].access_key_id == sts.issued[0].access_key_id


@pytest.mark.parametrize(
    ("endpoint", "env", "expected"),
    [
        ("", {}, "sts.cn-shanghai.aliyuncs.com"),
        ("", {"ALIBABA_CLOUD_STS_REGION": "ap-southeast-1"}, "sts.ap-southeast-1.aliyuncs.com"),
        ("", {"ALIBABA_CLOUD_VPC_ENDPOINT_ENABLED": "true"}, "sts-vpc.cn-shanghai.aliyuncs.com"),
        ("sts.example:8443", {"ALIBABA_CLOUD_STS_REGION": "ap-southeast-1"}, "sts.example:8443"),
    ],
)
def test_the_sts_endpoint(endpoint: str, env: dict[str, str], expected: str) -> None:
    assert StsEndpoint.of(endpoint, "https", region="cn-shanghai", env=env) == StsEndpoint(expected, "https")
    # A CLI profile's own sts_region wins over everything.
    assert StsEndpoint.of(endpoint, "https", region="cn-shanghai", env=env, profile_region="eu-central-1").host == (
        "sts-vpc.eu-central-1.aliyuncs.com"
        if env.get("ALIBABA_CLOUD_VPC_ENDPOINT_ENABLED")
        else "sts.eu-central-1.aliyuncs.com"
    )


def test_a_refusal_names_code_and_role_only() -> None:
    refusal = StsRefused("NoPermission", "acs:ram::1:role/r")
    assert (refusal.status, refusal.code) == (403, "NoPermission")
    assert refusal.message == "STS refused to assume acs:ram::1:role/r (NoPermission)"

