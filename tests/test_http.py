"""The agent in-process, over real loopback sockets, against the KMS emulator: SPEC §3 and §4 end to end."""

from __future__ import annotations

import json

import httpx
import pytest
import trio
import trio.testing
from alibabacloud_kms20160120.models import GetSecretValueResponseBody

from conftest import SECRETS, TOKEN, StartAgent
from kmsagent.emulator import Fault, KmsEmulator

SECRET_PATH = "/secretsmanager/get?secretId=db/password"


async def test_a_secret_is_served_in_kms_shape_then_from_the_cache(
    start_agent: StartAgent, emulator: KmsEmulator
) -> None:
    agent = await start_agent()
    first = await agent.get(SECRET_PATH)
    assert first.status_code == 200
    assert first.headers["content-type"] == "application/json"
    assert first.headers["x-kms-agent-cache"] == "miss"
    body = first.json()
    assert body["SecretName"] == "db/password" and body["SecretData"] == SECRETS["db/password"]
    assert body["VersionStages"] == {"VersionStage": ["ACSCurrent"]} and "RequestId" not in body
    parsed = GetSecretValueResponseBody().from_map(body)
    assert parsed.secret_data == SECRETS["db/password"] and parsed.secret_data_type == "text"
    second = await agent.get(SECRET_PATH)
    assert second.headers["x-kms-agent-cache"] == "hit" and second.json() == body
    assert emulator.call_count("db/password") == 1


async def test_the_path_prefix_route_serves_the_same_secret(start_agent: StartAgent) -> None:
    agent = await start_agent()
    response = await agent.get("/v1/db%2Fpassword")
    assert response.status_code == 200 and response.json()["SecretData"] == SECRETS["db/password"]
    response = await agent.get("/v1/db/password")
    assert response.headers["x-kms-agent-cache"] == "hit"


async def test_ping_needs_no_token(start_agent: StartAgent) -> None:
    agent = await start_agent()
    response = await agent.get("/ping", token=None)
    assert (response.status_code, response.text) == (200, "healthy")
    assert response.headers["content-type"].startswith("text/plain")


@pytest.mark.parametrize(
    ("method", "path", "headers", "status", "code"),
    [
        ("GET", SECRET_PATH, {"X-Forwarded-For": "10.0.0.1"}, 400, "Forwarded"),
        ("GET", SECRET_PATH, {"Forwarded": "for=10.0.0.1"}, 400, "Forwarded"),
        ("GET", SECRET_PATH, {"Host": "metadata.internal"}, 403, "BadHost"),
        ("GET", SECRET_PATH, {"X-KMS-Token": "wrong"}, 403, "BadToken"),
        ("POST", SECRET_PATH, {}, 405, "MethodNotAllowed"),
        ("DELETE", "/nowhere", {}, 405, "MethodNotAllowed"),
        ("GET", "/nowhere", {}, 404, "NotFound"),
        ("GET", "/secretsmanager/get?secretId=a&bogus=1", {}, 400, "UnknownParameter"),
        ("GET", "/secretsmanager/get?secretId=a&secretId=b", {}, 400, "InvalidParameter"),
        ("GET", "/secretsmanager/get?secretId=", {}, 400, "MissingParameter"),
        ("GET", "/secretsmanager/get?secretId=a&refreshNow=maybe", {}, 400, "InvalidParameter"),
        ("GET", "/secretsmanager/get?secretId=" + "x" * 1025, {}, 400, "InvalidParameter"),
        ("GET", "/secretsmanager/get?secretId=nope", {}, 404, "Forbidden.ResourceNotFound"),
    ],
)
async def test_check_table_rows_over_http(
    start_agent: StartAgent, method: str, path: str, headers: dict[str, str], status: int, code: str
) -> None:
    agent = await start_agent()
    response = await agent.client.request(method, path, headers={"X-KMS-Token": TOKEN, **headers})
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert (body["Code"], body["HttpStatus"]) == (code, status) and body["Message"]


async def test_a_missing_token_header_is_403(start_agent: StartAgent) -> None:
    agent = await start_agent()
    response = await agent.get(SECRET_PATH, token=None)
    assert (response.status_code, response.json()["Code"]) == (403, "BadToken")


async def test_version_id_and_stage_reach_kms(start_agent: StartAgent, emulator: KmsEmulator) -> None:
    new_version = emulator.rotate("api-key", "value-of-api-key-rotated-Qd3s")
    agent = await start_agent()
    current = (await agent.get("/secretsmanager/get?secretId=api-key")).json()
    previous = (await agent.get("/secretsmanager/get?secretId=api-key&versionStage=ACSPrevious")).json()
    by_id = (await agent.get(f"/secretsmanager/get?secretId=api-key&versionId={new_version}")).json()
    assert current["SecretData"] == "value-of-api-key-rotated-Qd3s" == by_id["SecretData"]
    assert previous["SecretData"] == SECRETS["api-key"]
    assert emulator.calls[-1].version_id == new_version and emulator.calls[-1].version_stage in (None, "")


async def test_refresh_now_asks_kms_and_stores_the_answer(start_agent: StartAgent, emulator: KmsEmulator) -> None:
    agent = await start_agent()
    await agent.get(SECRET_PATH)
    emulator.rotate("db/password", "value-of-db-password-rotated-Wm4k")
    assert (await agent.get(SECRET_PATH)).json()["SecretData"] == SECRETS["db/password"]
    refreshed = await agent.get(SECRET_PATH + "&refreshNow=true")
    assert refreshed.headers["x-kms-agent-cache"] == "miss"
    assert refreshed.json()["SecretData"] == "value-of-db-password-rotated-Wm4k"
    after = await agent.get(SECRET_PATH)
    assert after.headers["x-kms-agent-cache"] == "hit"
    assert after.json()["SecretData"] == "value-of-db-password-rotated-Wm4k"
    assert emulator.call_count("db/password") == 2


async def test_concurrent_cold_reads_make_one_kms_call(start_agent: StartAgent, emulator: KmsEmulator) -> None:
    emulator.inject(Fault(delay=0.2), times=1)
    agent = await start_agent()
    responses: list[httpx.Response] = []

    async def read() -> None:
        responses.append(await agent.get(SECRET_PATH))

    async with trio.open_nursery() as readers:
        for _ in range(20):
            readers.start_soon(read)
    assert [r.status_code for r in responses] == [200] * 20
    assert [r.headers["x-kms-agent-cache"] for r in responses] == ["miss"] * 20
    assert emulator.call_count("db/password") == 1


async def test_lru_eviction_over_http(start_agent: StartAgent, emulator: KmsEmulator) -> None:
    agent = await start_agent(cache={"cache_size": 2})
    for name in ("db/password", "api-key", "app/config"):
        assert (await agent.get(f"/secretsmanager/get?secretId={name}")).status_code == 200
    assert (await agent.get("/secretsmanager/get?secretId=app/config")).headers["x-kms-agent-cache"] == "hit"
    assert (await agent.get(SECRET_PATH)).headers["x-kms-agent-cache"] == "miss"  # evicted first
    assert emulator.call_count("db/password") == 2


async def test_ttl_expiry_over_http(
    start_agent: StartAgent, emulator: KmsEmulator, mock_clock: trio.testing.MockClock
) -> None:
    agent = await start_agent(cache={"ttl_seconds": 60})
    assert (await agent.get(SECRET_PATH)).headers["x-kms-agent-cache"] == "miss"
    mock_clock.jump(59.9)
    await trio.testing.wait_all_tasks_blocked()
    mock_clock.jump(0.1)  # nobody read it after its load: it expires, unrefreshed
    await trio.testing.wait_all_tasks_blocked()
    assert emulator.call_count("db/password") == 1
    assert (await agent.get(SECRET_PATH)).headers["x-kms-agent-cache"] == "miss"
    assert emulator.call_count("db/password") == 2


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        (Fault.server_error(), 502, "InternalFailure"),
        (Fault.unavailable(), 502, "ServiceUnavailableTemporary"),
        (Fault.throttling(), 429, "Rejected.Throttling"),
        (Fault(drop=True), 502, "UpstreamUnavailable"),
        (Fault(malformed=True), 502, "UpstreamUnavailable"),
        (Fault(delay=5.0), 504, "UpstreamTimeout"),
    ],
)
async def test_kms_failures_with_nothing_cached(
    start_agent: StartAgent, emulator: KmsEmulator, fault: Fault, status: int, code: str
) -> None:
    emulator.inject(fault)
    agent = await start_agent(kms={"max_retries": 1, "read_timeout_ms": 200})
    response = await agent.get(SECRET_PATH)
    assert (response.status_code, response.json()["Code"]) == (status, code)
    assert emulator.call_count("db/password") == 2  # the first try and one retry
    emulator.clear_faults()
    assert (await agent.get(SECRET_PATH)).status_code == 200


async def test_a_kms_that_refuses_connections_is_502_and_the_agent_stays_up(
    start_agent: StartAgent,
) -> None:
    with trio.socket.socket() as closed:  # a port nobody listens on
        await closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    agent = await start_agent(kms={"endpoint": f"127.0.0.1:{port}", "max_retries": 0})
    response = await agent.get(SECRET_PATH)
    assert (response.status_code, response.json()["Code"]) == (502, "UpstreamUnavailable")
    assert "127.0.0.1" in response.json()["Message"]
    assert (await agent.get("/ping")).status_code == 200


async def test_a_kms_error_is_not_retried(start_agent: StartAgent, emulator: KmsEmulator) -> None:
    agent = await start_agent(kms={"max_retries": 3})
    assert (await agent.get("/secretsmanager/get?secretId=missing")).status_code == 404
    assert emulator.call_count("missing") == 1


async def test_stale_value_is_served_when_kms_fails(
    start_agent: StartAgent, emulator: KmsEmulator
) -> None:
    agent = await start_agent(kms={"max_retries": 0})
    await agent.get(SECRET_PATH)
    emulator.inject(Fault.unavailable())
    stale = await agent.get(SECRET_PATH + "&refreshNow=true")
    assert stale.status_code == 200 and stale.headers["x-kms-agent-cache"] == "stale"
    assert stale.json()["SecretData"] == SECRETS["db/password"]


async def test_an_unexpected_failure_is_500_internal_failure(
    start_agent: StartAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kmsagent.kms import KmsClient

    async def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(KmsClient, "get_secret_value", explode)
    agent = await start_agent()
    response = await agent.get(SECRET_PATH)
    assert response.status_code == 500
    assert response.json() == {"Code": "InternalFailure", "Message": "internal error", "HttpStatus": 500}


async def test_error_bodies_never_echo_the_token(start_agent: StartAgent) -> None:
    agent = await start_agent()
    for path in (SECRET_PATH + "&x=" + TOKEN, "/nowhere", "/secretsmanager/get?secretId=nope"):
        response = await agent.get(path)
        assert TOKEN not in response.text
    assert json.loads((await agent.get("/nowhere")).text)["Code"] == "NotFound"
