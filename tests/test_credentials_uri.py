"""`credentials_uri`: STS credentials from `GET <uri>`, renewed like the ECS role's (autojump_clock)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import pytest
import trio
import trio.testing

from conftest import SECRETS, StartAgent, read_for
from kmsagent.config import CredentialsConfig
from kmsagent.credentials import CredentialsUnavailable, credential_source
from kmsagent.credentials.uri import UriCredentials
from kmsagent.emulator import CredentialsUriEmulator, KmsEmulator

SECRET_PATH = "/secretsmanager/get?secretId=api-key"


@pytest.fixture
async def wall_clock(autojump_clock: trio.testing.MockClock) -> Callable[[], float]:
    offset = time.time() - trio.current_time()
    return lambda: offset + trio.current_time()


@pytest.fixture
async def uri(nursery: trio.Nursery, emulator: KmsEmulator, wall_clock: Callable[[], float]) -> CredentialsUriEmulator:
    service = CredentialsUriEmulator(emulator, lifetime=60, clock=wall_clock)
    await nursery.start(service.serve)
    return service


def source(uri: CredentialsUriEmulator, wall_clock: Callable[[], float], renew_before: float = 900) -> UriCredentials:
    return UriCredentials(str(uri.uri), renew_before=renew_before, clock=wall_clock)


async def test_uri_credentials_renew_a_third_of_their_lifetime_before_expiry(
    start_agent: StartAgent,
    emulator: KmsEmulator,
    uri: CredentialsUriEmulator,
    wall_clock: Callable[[], float],
    autojump_clock: trio.testing.MockClock,
) -> None:
    agent = await start_agent(credentials=source(uri, wall_clock), cache={"ttl_seconds": 0})
    statuses = await read_for(lambda: agent.get(SECRET_PATH), seconds=210, every=1)
    assert {status for _, status in statuses} == {200}
    minted = [issued.expires_at - uri.lifetime for issued in uri.issued]
    assert len(minted) == 6  # at 0, 40, 80, 120, 160, 200 s: min(900, 60 / 3) = 20 s before expiry
    assert [later - earlier for earlier, later in itertools.pairwise(minted)] == pytest.approx([40] * 5, abs=1)
    assert emulator.calls[-1].access_key_id in {issued.access_key_id for issued in uri.issued[-2:]}


async def test_a_uri_outage_keeps_the_credentials_until_expiry_then_502_then_recovers(
    start_agent: StartAgent,
    uri: CredentialsUriEmulator,
    wall_clock: Callable[[], float],
    autojump_clock: trio.testing.MockClock,
) -> None:
    agent = await start_agent(credentials=source(uri, wall_clock), cache={"ttl_seconds": 0})
    assert (await agent.get(SECRET_PATH)).status_code == 200
    expires_in = uri.issued[0].expires_at - wall_clock()
    uri.outage = True
    during = await read_for(lambda: agent.get(SECRET_PATH), seconds=90, every=1)
    assert all(status == 200 for at, status in during if at < expires_in - 1)
    assert all(status == 502 for at, status in during if at > expires_in + 1)
    response = await agent.get(SECRET_PATH)
    assert f"http://127.0.0.1:{uri.uri.split(':')[2].split('/')[0]}/credentials" in response.json()["Message"]  # type: ignore[union-attr]
    uri.outage = False
    after = await read_for(lambda: agent.get(SECRET_PATH), seconds=35, every=1)
    assert after[-1][1] == 200 and len(uri.issued) == 2
    assert (await agent.get(SECRET_PATH)).json()["SecretData"] == SECRETS["api-key"]


@pytest.mark.parametrize("breakage", ["malformed", "failure_code", "not_found"])
async def test_bad_uri_answers_are_502(
    start_agent: StartAgent,
    emulator: KmsEmulator,
    nursery: trio.Nursery,
    wall_clock: Callable[[], float],
    captured_logs: list[str],
    autojump_clock: trio.testing.MockClock,
    breakage: str,
) -> None:
    service = CredentialsUriEmulator(
        emulator, clock=wall_clock, path="/elsewhere" if breakage == "not_found" else "/credentials"
    )
    service.malformed = breakage == "malformed"
    service.failure_code = "Failed" if breakage == "failure_code" else None
    await nursery.start(service.serve)
    assert service.uri is not None
    credentials = UriCredentials(service.uri.replace("/elsewhere", "/credentials"), renew_before=900, clock=wall_clock)
    agent = await start_agent(credentials=credentials)
    assert (await agent.get(SECRET_PATH)).status_code == 502
    reason = {"malformed": "not JSON", "failure_code": "Code 'Failed'", "not_found": "HTTP 404"}[breakage]
    assert any(reason in line for line in captured_logs)


@pytest.mark.parametrize(
    "given",
    [
        "http://10.0.0.5/credentials",
        "http://credentials.internal/c",
        "ftp://127.0.0.1/c",
        "https://user:pw@host/c",
        "not a url",
    ],
)
async def test_an_environment_uri_must_be_https_or_local_http(given: str) -> None:
    config = CredentialsConfig(type="credentials_uri")
    with pytest.raises(CredentialsUnavailable, match="ALIBABA_CLOUD_CREDENTIALS_URI must be an https:// URL") as caught:
        await credential_source(config, {"ALIBABA_CLOUD_CREDENTIALS_URI": given})
    assert "pw" not in str(caught.value)


async def test_the_uri_is_logged_without_its_query(
    uri: CredentialsUriEmulator, wall_clock: Callable[[], float], autojump_clock: trio.testing.MockClock
) -> None:
    with_token = f"{uri.uri}?token=uri-query-token-Qw3"
    from_config = await credential_source(CredentialsConfig(type="credentials_uri", credentials_uri=with_token), {})
    from_env = await credential_source(
        CredentialsConfig(type="credentials_uri"), {"ALIBABA_CLOUD_CREDENTIALS_URI": with_token}
    )
    for credentials in (from_config, from_env):
        assert credentials.kind == f"credentials_uri ({uri.uri})"
    with pytest.raises(CredentialsUnavailable, match="needs CredentialsUri or ALIBABA_CLOUD_CREDENTIALS_URI"):
        await credential_source(CredentialsConfig(type="credentials_uri"), {})
