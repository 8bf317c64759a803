"""Per-request roles (SPEC §3, §5, §6): `roleArn=ARN` reads with an STS session of that role.

Against the STS and KMS emulators on trio's autojump clock: a role the emulator's STS grants
reads only what that role may read in KMS, with the session's own keys. Malformed roles are 400,
roles outside AllowedRoleArns 403 RoleNotAllowed, STS's refusals 403 with STS's code (remembered
per role for NotFoundTtlSeconds); roles never share cache entries with each other or with the
agent's own credentials; the 21st role drops the least recently used one with its entries and
its renewal task; the metrics count roles and never name them; no key, secret or token of a
session reaches a log line or an answer.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from conftest import AK_ID, AK_SECRET, SECRETS, TOKEN, RunningAgent, agent_config
from kmsagent.agent import run_agent
from kmsagent.cache import Outcome, SecretCache
from kmsagent.checks import SecretQuery, check_request
from kmsagent.config import CredentialsConfig, ServerConfig
from kmsagent.credentials import Credentials, CredentialSource, StaticCredentials, credential_source
from kmsagent.credentials.sts import StsEndpoint
from kmsagent.emulator import KmsEmulator, MetadataEmulator, StsEmulator
from kmsagent.errors import AgentError
from kmsagent.roles import MAX_ACTIVE_ROLES, RoleSessions
from kmsagent.token import TokenSource

GET = "/secretsmanager/get"


@pytest.fixture
async def wall_clock(autojump_clock: trio.testing.MockClock) -> Callable[[], float]:
    offset = time.time() - trio.current_time()
    return lambda: offset + trio.current_time()


StartAgent = Callable[..., Any]


@pytest.fixture
async def start(
    nursery: trio.Nursery, emulator: KmsEmulator, sts: StsEmulator, wall_clock: Callable[[], float]
) -> AsyncIterator[StartAgent]:
    """Starts the agent with `allowed` as AllowedRoleArns and the STS emulator as StsEndpoint."""
    clients: list[httpx.AsyncClient] = []

    async def start_agent(
        allowed: list[str],
        *,
        own: CredentialSource | None = None,
        credentials: dict[str, Any] | None = None,
        **sections: Any,
    ) -> RunningAgent:
        settings = CredentialsConfig(
            allowed_role_arns=tuple(allowed), sts_endpoint=str(sts.endpoint), sts_protocol="http", **(credentials or {})
        )
        config = replace(agent_config(emulator.endpoint, **sections), credentials=settings)
        stop = trio.Event()
        port = await nursery.start(
            partial(
                run_agent,
                config,
                token=TokenSource(TOKEN.encode()),
                credentials=own or StaticCredentials(Credentials(AK_ID, AK_SECRET), "test"),
                shutdown=stop.wait,
                clock=wall_clock,
            )
        )
        client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30)
        clients.append(client)
        return RunningAgent(port, client, stop)

    yield start_agent
    for client in clients:
        await client.aclose()


async def read(agent: RunningAgent, secret: str, role: str | None = None, **params: str) -> httpx.Response:
    query = {"secretId": secret, **params}
    if role is not None:
        query["roleArn"] = role
    return await agent.get(GET, params=query)


def answer(response: httpx.Response) -> tuple[int, str]:
    """(status, Code or cache outcome)."""
    if response.status_code == 200:
        return 200, response.headers["x-kms-agent-cache"]
    return response.status_code, response.json()["Code"]


def sts_calls(sts: StsEmulator, arn: str) -> int:
    return sum(call.role_arn == arn for call in sts.calls)


# --- the parameter -------------------------------------------------------------------------------


def check(query: bytes, path: bytes = GET.encode()) -> SecretQuery:
    target = check_request(
        method="GET",
        path=path,
        query_string=query,
        headers=[(b"host", b"localhost"), (b"x-kms-token", b"t")],
        over_limit=False,
        config=ServerConfig(),
        token_matches=lambda values: values == [b"t"],
    )
    assert isinstance(target, SecretQuery)
    return target


def test_both_routes_take_a_role_into_the_cache_key_lower_cased() -> None:
    arn = "acs:ram::1234567890123456:role/Kms-Reader"
    on_get = check(b"secretId=s&roleArn=" + arn.encode())
    on_path = check(b"roleArn=" + arn.encode().replace(b":", b"%3A"), path=b"/v1/s")
    assert on_get == on_path == SecretQuery("s", role=arn.lower())
    assert on_get.cache_key == (arn.lower(), "s", "", "ACSCurrent")
    assert check(b"secretId=s").cache_key == ("", "s", "", "ACSCurrent")  # the agent's own


@pytest.mark.parametrize(
    "role",
    [
        "",
        "acs:ram::1:role/",
        "acs:ram:cn-hangzhou:1:role/r",
        "acs:ram::12a:role/r",
        "arn:aws:iam::1:role/r",
        "acs:ram::1:user/r",
        "acs:ram::1:role/a b",
        "acs:ram::1:role/a/b",
        "ACS:RAM::1:ROLE/r",
        "acs:ram::1:role/" + "r" * 65,
        " acs:ram::1:role/r",
    ],
)
def test_a_malformed_role_is_400_invalid_parameter(role: str) -> None:
    for query, path in ((b"secretId=s&roleArn=", GET.encode()), (b"roleArn=", b"/v1/s")):
        with pytest.raises(AgentError) as raised:
            check(query + role.replace(" ", "%20").encode(), path)
        assert (raised.value.status, raised.value.code) == (400, "InvalidParameter")
        assert "roleArn" in raised.value.message and (not role.strip() or role.strip() not in raised.value.message)


def test_a_repeated_role_is_400() -> None:
    with pytest.raises(AgentError) as raised:
        check(b"secretId=s&roleArn=acs:ram::1:role/a&roleArn=acs:ram::1:role/b")
    assert (raised.value.status, raised.value.code) == (400, "InvalidParameter")


# --- allowed, not allowed, malformed, refused ----------------------------------------------------


async def test_an_allowed_role_reads_what_its_role_may_read_with_its_own_session(
    start: StartAgent, emulator: KmsEmulator, sts: StsEmulator,
    autojump_clock: trio.testing.MockClock,
) -> None:
    arn = sts.add_role("api-reader", secrets=["api-key"])
    agent = await start([arn], cache={"ttl_seconds": 10})
    response = await read(agent, "api-key", arn)
    assert answer(response) == (200, "miss") and response.json()["SecretData"] == SECRETS["api-key"]
    [call] = sts.calls
    assert (call.access_key_id, call.role_arn, call.session_name, call.duration_seconds) == (
        AK_ID,
        arn,
        "kmsagent",
        "3600",
    )
    session_key = sts.issued[0].access_key_id
    assert emulator.calls[-1].access_key_id == session_key
    assert answer(await agent.get(f"/v1/api-key?roleArn={arn}")) == (200, "hit")  # the path route, same entry
    # The role's permissions are the role's, not the agent's: KMS refuses what it may not read.
    assert answer(await read(agent, "db/password", arn)) == (403, "Forbidden.NoPermission")
    # Its entries are refreshed ahead with its own session.
    for _ in range(6):
        assert (await read(agent, "api-key", arn)).status_code == 200
        await trio.sleep(4)  # not 5: the agent closes idle connections after 5 s
    reads = [c for c in emulator.calls if c.secret_name == "api-key"]
    assert len(reads) >= 3 and {c.access_key_id for c in reads} == {session_key}
    assert len(sts.calls) == 1


@pytest.mark.parametrize("allowed", [[], ["acs:ram::1:role/another"]], ids=["none allowed", "another allowed"])
async def test_a_role_not_allowed_is_403_role_not_allowed_without_sts_or_kms(
    start: StartAgent, emulator: KmsEmulator, sts: StsEmulator, allowed: list[str],
    autojump_clock: trio.testing.MockClock,
) -> None:
    arn = sts.add_role("reader")
    agent = await start(allowed)
    kms_calls = len(emulator.calls)
    for path in (f"{GET}?secretId=api-key&roleArn={arn}", f"/v1/api-key?roleArn={arn}", f"/v1/missing?roleArn={arn}"):
        response = await agent.get(path)
        assert answer(response) == (403, "RoleNotAllowed")
        assert arn in response.json()["Message"]
    # The parameter checks come first (SPEC §3's order): a malformed role is 400 even here.
    assert answer(await read(agent, "api-key", "acs:ram::1:role/a b")) == (400, "InvalidParameter")
    assert sts.calls == [] and len(emulator.calls) == kms_calls
    assert answer(await read(agent, "api-key")) == (200, "miss")  # the agent's own reads are unaffected


async def test_a_role_is_one_however_its_name_is_spelt(
    start: StartAgent, sts: StsEmulator, autojump_clock: trio.testing.MockClock,
) -> None:
    arn = sts.add_role("Kms-Reader")
    agent = await start([arn])
    assert answer(await read(agent, "api-key", arn)) == (200, "miss")
    assert answer(await read(agent, "api-key", arn.lower())) == (200, "hit")
    assert [call.role_arn for call in sts.calls] == [arn]  # asked as AllowedRoleArns spells it


@pytest.mark.parametrize(
    ("setup", "code"), [("untrusted", "NoPermission"), ("no such role", "EntityNotExist.Role")]
)
async def test_an_sts_refusal_is_403_with_stss_code_remembered_per_role(
    start: StartAgent, sts: StsEmulator, captured_logs: list[str], setup: str, code: str,
    autojump_clock: trio.testing.MockClock,
) -> None:
    good = sts.add_role("good")
    arn = (
        sts.add_role("refused", trusted=["LTAIsomeoneElse"])
        if setup == "untrusted"
        else f"acs:ram::{sts.account_id}:role/gone"
    )
    agent = await start([good, arn])
    started = trio.current_time()
    response = await read(agent, "api-key", arn)
    assert answer(response) == (403, code) and arn in response.json()["Message"]
    assert trio.current_time() - started < 0.5  # answered when STS answered, not after the 2 s wait
    assert sts_calls(sts, arn) == 1
    # Remembered for NotFoundTtlSeconds (5 s): the same answer, no STS call; other roles unaffected.
    for second in range(4):
        assert answer(await read(agent, "db/password", arn)) == (403, code)
        assert answer(await read(agent, "api-key", good)) == (200, "miss" if second == 0 else "hit")
        await trio.sleep(1)
    assert sts_calls(sts, arn) == 1
    sts.add_role("refused" if setup == "untrusted" else "gone")  # fixed in RAM meanwhile
    await trio.sleep(1.5)
    assert answer(await read(agent, "api-key", arn)) == (200, "miss")
    assert sts_calls(sts, arn) == 2
    text = "\n".join([*captured_logs, response.text])
    assert f"refused AssumeRole of {arn}: {code}" in text
    assert "You are not authorized" not in text and "not exists" not in text  # STS's Message


async def test_a_refused_role_costs_sts_no_call_once_clients_stop(
    start: StartAgent, sts: StsEmulator, autojump_clock: trio.testing.MockClock,
) -> None:
    """The refused session is dropped, not left retrying with back-off."""
    arn = sts.add_role("refused", trusted=["LTAIsomeoneElse"])
    agent = await start([arn])
    assert answer(await read(agent, "api-key", arn)) == (403, "NoPermission")
    await trio.sleep(600)
    assert len(sts.calls) == 1
    assert "kmsagent_active_roles 0.0" in (await agent.get("/metrics", token=None)).text


async def test_refusals_are_not_remembered_with_a_zero_ttl(
    nursery: trio.Nursery, emulator: KmsEmulator, sts: StsEmulator, wall_clock: Callable[[], float],
    autojump_clock: trio.testing.MockClock,
) -> None:
    arn = sts.add_role("refused", trusted=["LTAIsomeoneElse"])
    cache: SecretCache[Any, Any] = SecretCache(max_entries=10, ttl=60, loads=nursery)
    own = StaticCredentials(Credentials(AK_ID, AK_SECRET), "test")
    endpoint = StsEndpoint(str(sts.endpoint), "http")
    roles = RoleSessions([arn], own, endpoint, cache=cache, tasks=nursery, refusal_ttl=0, clock=wall_clock)
    for count in (1, 2):
        with pytest.raises(AgentError) as raised:
            await roles.session(arn.lower()).current()
        assert (raised.value.status, raised.value.code) == (403, "NoPermission")
        assert len(sts.calls) == count


async def test_sts_unreachable_is_502_and_the_role_recovers(
    start: StartAgent, sts: StsEmulator, autojump_clock: trio.testing.MockClock,
) -> None:
    arn = sts.add_role("reader")
    agent = await start([arn])
    sts.outage = True
    response = await read(agent, "api-key", arn)
    assert answer(response) == (502, "UpstreamUnavailable")
    assert f"STS at {sts.endpoint}" in response.json()["Message"]
    sts.outage = False
    await trio.sleep(4)  # the session's back-off
    assert answer(await read(agent, "api-key", arn)) == (200, "miss")


async def test_concurrent_first_reads_of_a_role_assume_it_once(
    start: StartAgent, emulator: KmsEmulator, sts: StsEmulator,
    autojump_clock: trio.testing.MockClock,
) -> None:
    arn = sts.add_role("reader")
    agent = await start([arn])
    statuses: list[int] = []

    async def one() -> None:
        statuses.append((await read(agent, "api-key", arn)).status_code)

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(one)
    assert statuses == [200] * 10
    assert len(sts.calls) == 1 and sum(c.secret_name == "api-key" for c in emulator.calls) == 1


# --- isolation -------------------------------------------------------------------------------------


async def test_roles_never_see_each_others_entries_nor_the_agents(
    start: StartAgent, emulator: KmsEmulator, sts: StsEmulator,
    autojump_clock: trio.testing.MockClock,
) -> None:
    narrow = sts.add_role("api-only", secrets=["api-key"])
    wide = sts.add_role("everything")
    agent = await start([narrow, wide])
    assert answer(await read(agent, "db/password")) == (200, "miss")  # the agent's own, cached
    assert answer(await read(agent, "db/password", wide)) == (200, "miss")  # cached too, apart
    # A role KMS refuses gets KMS's refusal, never the value the agent or another role cached.
    assert answer(await read(agent, "db/password", narrow)) == (403, "Forbidden.NoPermission")
    for role in (narrow, wide, None):  # each its own miss, then its own hit
        assert answer(await read(agent, "api-key", role)) == (200, "miss")
    for role in (narrow, wide, None):
        assert answer(await read(agent, "api-key", role)) == (200, "hit")
    assert answer(await read(agent, "db/password", narrow)) == (403, "Forbidden.NoPermission")
    keys = {call.access_key_id for call in emulator.calls if call.secret_name == "api-key"}
    assert keys == {AK_ID, *(issued.access_key_id for issued in sts.issued)} and len(keys) == 3
    # refreshNow of one role leaves the others' entries alone.
    assert answer(await read(agent, "api-key", narrow, refreshNow="true")) == (200, "miss")
    assert answer(await read(agent, "api-key", wide)) == (200, "hit")


async def test_the_21st_role_drops_the_least_recently_used_with_its_entries_and_renewals(
    start: StartAgent, sts: StsEmulator, captured_logs: list[str],
    autojump_clock: trio.testing.MockClock,
) -> None:
    arns = [sts.add_role(f"role-{i:02d}") for i in range(MAX_ACTIVE_ROLES + 1)]
    agent = await start(arns, cache={"ttl_seconds": 3600})

    async def active_roles() -> str:
        text = (await agent.get("/metrics", token=None)).text
        assert "acs:ram" not in text  # a count, never ARNs
        return next(line for line in text.splitlines() if line.startswith("kmsagent_active_roles "))

    for arn in arns[:MAX_ACTIVE_ROLES]:
        assert answer(await read(agent, "api-key", arn)) == (200, "miss")
    assert await active_roles() == f"kmsagent_active_roles {MAX_ACTIVE_ROLES}.0"
    assert answer(await read(agent, "api-key", arns[0])) == (200, "hit")  # role-00 used again: role-01 is the oldest
    assert answer(await read(agent, "api-key", arns[MAX_ACTIVE_ROLES])) == (200, "miss")
    assert await active_roles() == f"kmsagent_active_roles {MAX_ACTIVE_ROLES}.0"
    assert any(f"per-request role {arns[1]} dropped (least recently used" in line for line in captured_logs)
    assert answer(await read(agent, "api-key", arns[0])) == (200, "hit")
    assert answer(await read(agent, "api-key", arns[2])) == (200, "hit")
    await trio.sleep(3000)  # an hour's sessions renew 900 s before expiry; the dropped one does not
    assert sts_calls(sts, arns[1]) == 1 and sts_calls(sts, arns[2]) == 2
    assert answer(await read(agent, "api-key", arns[1])) == (200, "miss")  # its entry went with it
    assert sts_calls(sts, arns[1]) == 2


async def test_a_dropped_key_keeps_no_value_a_running_load_brings(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock,
) -> None:
    cache: SecretCache[tuple[str, str], str] = SecretCache(max_entries=10, ttl=60, loads=nursery)
    released: list[str] = []
    cache.released = released.append
    gate = trio.Event()

    async def slow() -> str:
        await gate.wait()
        return "a-slow"

    async def quick(value: str) -> str:
        return value

    await cache.get(("a", "kept"), partial(quick, "a-kept"))
    await cache.get(("b", "kept"), partial(quick, "b-kept"))
    results: list[tuple[str, Outcome]] = []

    async def reader() -> None:
        results.append(await cache.get(("a", "slow"), slow))

    nursery.start_soon(reader)
    await trio.testing.wait_all_tasks_blocked()
    assert cache.drop_where(lambda key: key[0] == "a") == 1
    gate.set()
    await trio.testing.wait_all_tasks_blocked()
    assert results == [("a-slow", Outcome.MISS)]  # its reader got it
    assert ("a", "slow") not in cache and ("a", "kept") not in cache and ("b", "kept") in cache
    assert sorted(released) == ["a-kept", "a-slow"]


# --- the agent's own credentials as the source ---------------------------------------------------------


async def test_auto_from_the_environment_signs_the_roles(
    start: StartAgent, emulator: KmsEmulator, sts: StsEmulator, autojump_clock: trio.testing.MockClock,
) -> None:
    own = await credential_source(
        CredentialsConfig(), {"ALIBABA_CLOUD_ACCESS_KEY_ID": AK_ID, "ALIBABA_CLOUD_ACCESS_KEY_SECRET": AK_SECRET}
    )
    arn = sts.add_role("reader")
    agent = await start([arn], own=own)
    assert answer(await read(agent, "api-key", arn)) == (200, "miss")
    assert [call.access_key_id for call in sts.calls] == [AK_ID]


async def test_auto_on_the_ecs_role_signs_the_roles_across_its_renewals(
    start: StartAgent, emulator: KmsEmulator, sts: StsEmulator, nursery: trio.Nursery, tmp_path: Path,
    wall_clock: Callable[[], float],
    autojump_clock: trio.testing.MockClock,
) -> None:
    metadata = MetadataEmulator(emulator, lifetime=900, clock=wall_clock)
    await nursery.start(metadata.serve)
    env = {"HOME": str(tmp_path), "ALIBABA_CLOUD_CLI_PROFILE_DISABLED": "true"}
    own = await credential_source(CredentialsConfig(metadata_endpoint=str(metadata.endpoint)), env, clock=wall_clock)
    assert own.kind.startswith("ecs_ram_role")
    arn = sts.add_role("reader")
    agent = await start([arn], own=own, credentials={"duration_seconds": 900}, cache={"ttl_seconds": 0})
    for _ in range(8):  # both renew every 600 s
        assert answer(await read(agent, "api-key", arn)) == (200, "miss")
        await trio.sleep(300)
    assert len(metadata.issued) >= 3 and len(sts.issued) >= 3
    signers = {call.access_key_id for call in sts.calls}
    assert signers <= {issued.access_key_id for issued in metadata.issued} and len(signers) >= 3


async def test_a_ram_role_arn_agent_chains_into_per_request_roles(
    start: StartAgent, emulator: KmsEmulator, sts: StsEmulator, wall_clock: Callable[[], float],
    autojump_clock: trio.testing.MockClock,
) -> None:
    first = sts.add_role("agent-role")
    second = sts.add_role("app-role", secrets=["api-key"])
    config = CredentialsConfig(
        type="ram_role_arn",
        role_arn=first,
        source_type="access_key",
        sts_endpoint=str(sts.endpoint),
        sts_protocol="http",
    )
    env = {"ALIBABA_CLOUD_ACCESS_KEY_ID": AK_ID, "ALIBABA_CLOUD_ACCESS_KEY_SECRET": AK_SECRET}
    own = await credential_source(config, env, clock=wall_clock)
    agent = await start([second], own=own)
    assert answer(await read(agent, "api-key", second)) == (200, "miss")
    assert [(call.role_arn, call.access_key_id) for call in sts.calls] == [
        (first, AK_ID),
        (second, sts.issued[0].access_key_id),
    ]
    assert emulator.calls[-1].access_key_id == sts.issued[1].access_key_id


# --- hygiene ---------------------------------------------------------------------------------------------

SOURCE_KEY, SOURCE_SECRET, SOURCE_TOKEN = "STS.roleSourceKey42", "role-source-secret-Vb7Qm", "RoleSourceToken9Lp3Xw"


async def test_role_sessions_leave_no_key_secret_or_token_in_logs_or_answers(
    start: StartAgent, emulator: KmsEmulator, sts: StsEmulator, captured_logs: list[str],
    autojump_clock: trio.testing.MockClock,
) -> None:
    emulator.add_credentials(SOURCE_KEY, SOURCE_SECRET, SOURCE_TOKEN)
    good = StaticCredentials(Credentials(SOURCE_KEY, SOURCE_SECRET, SOURCE_TOKEN), "source")
    narrow = sts.add_role("narrow", secrets=["api-key"])
    wide = sts.add_role("wide")
    refused = sts.add_role("refused", trusted=["LTAIsomeoneElse"])
    allowed = [narrow, wide, refused, f"acs:ram::{sts.account_id}:role/gone"]
    agent = await start(allowed, own=good, credentials={"duration_seconds": 900}, cache={"ttl_seconds": 0})
    outputs: list[str] = []
    statuses: set[int] = set()

    async def sweep(agent: RunningAgent, role: str, secret: str) -> None:
        response = await read(agent, secret, role)
        statuses.add(response.status_code)
        if response.status_code != 200:
            outputs.append(response.text)
        outputs.append(repr(dict(response.headers)))

    for _ in range(11):  # renewals every 600 s
        for role in allowed:
            await sweep(agent, role, "api-key")
            await sweep(agent, role, "db/password")
        outputs.append((await agent.get("/metrics", token=None)).text)
        await trio.sleep(120)
    sts.outage = True
    for _ in range(10):  # retries, then expiry: 502
        await sweep(agent, narrow, "api-key")
        await trio.sleep(100)
    sts.outage = False
    # Signed with a wrong secret: STS's SignatureDoesNotMatch quotes the string to sign, token and all.
    wrong = StaticCredentials(Credentials(SOURCE_KEY, "wrong-source-secret-Hh2", SOURCE_TOKEN), "wrong")
    other = await start([narrow], own=wrong)
    await sweep(other, narrow, "api-key")
    assert statuses == {200, 403, 502}
    codes = {call.code for call in sts.calls}
    assert {"SignatureDoesNotMatch", "NoPermission", "EntityNotExist.Role", "ServiceUnavailable"} <= codes
    assert len(sts.issued) >= 6 and any("renewed" in line for line in captured_logs)
    material = [SOURCE_SECRET, SOURCE_TOKEN, "wrong-source-secret-Hh2", AK_SECRET, TOKEN, SECRETS["db/password"]]
    for issued in sts.issued:
        material += [issued.access_key_id, issued.access_key_secret, issued.security_token]
    text = "\n".join([*captured_logs, *outputs])
    assert [value for value in material if value in text] == []
