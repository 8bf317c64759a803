"""Conditional and waiting reads (SPEC §3, issue 12): ETag, If-None-Match → 304, Prefer: wait.

The header parsing on its own; the cache's per-key announcements on their own (10,000 waiters);
then the agent in-process against the emulator on trio's autojump clock (a 300 s wait takes no
real time), over real sockets; and the agent as a process for SIGTERM.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SECRETS, TOKEN, RunningAgent, StartAgent, eventually
from kmsagent.cache import SecretCache
from kmsagent.conditional import Conditions, entity_tag, read_conditions, wait_preference
from kmsagent.emulator import KmsEmulator
from kmsagent.errors import KmsError, is_transient
from test_cli import AGENT_ENV, agent_process, write_config
from test_connections import one_request, raw_exchange, scrape

SECRET_PATH = "/secretsmanager/get?secretId=db/password"
ROTATED = "value-of-db-password-rotated-Tz6y"
README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")

# --- parsing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "tags", "any_tag"),
    [
        (b'"v1"', {b'"v1"'}, False),
        (b'"a", W/"v1" ,"b"', {b'"a"', b'"v1"', b'"b"'}, False),
        (b'W/"v1"', {b'"v1"'}, False),
        (b"*", set(), True),
        (b'"a,b", , "c"', {b'"a,b"', b'"c"'}, False),  # a comma inside a tag; an empty element
        (b'""', {b'""'}, False),
    ],
)
def test_if_none_match_is_a_list_of_entity_tags(field: bytes, tags: set[bytes], any_tag: bool) -> None:
    conditions = read_conditions([(b"host", b"localhost"), (b"if-none-match", field)])
    assert conditions is not None
    assert (set(conditions.tags), conditions.any_tag) == (tags, any_tag)


@pytest.mark.parametrize("field", [b"v1", b'"v1', b'w/"v1"', b'"a" "b"', b'"a\x01"', b",", b""])
def test_an_if_none_match_that_is_not_entity_tags_is_ignored(field: bytes) -> None:
    assert read_conditions([(b"if-none-match", field), (b"prefer", b"wait=5")]) is None


@pytest.mark.parametrize(
    "field",
    [b" " * 16_000 + b"x", b", " * 8_000 + b"x", b'"a" ,' * 3_000 + b"x", b'"' + b" " * 16_000, b"W/" * 8_000],
)
def test_hostile_if_none_match_values_cost_linear_time(field: bytes) -> None:
    """16 KB (h11's limit for a request head) of blanks took 4.3 s of the event loop when the
    list pattern could split a run of blanks two ways."""
    started = time.perf_counter()
    assert read_conditions([(b"if-none-match", field), (b"prefer", field)]) is None
    assert time.perf_counter() - started < 0.5


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=3), st.lists(st.binary(max_size=64), max_size=3))
def test_any_header_bytes_parse_without_raising(if_none_match: list[bytes], prefer: list[bytes]) -> None:
    headers = [(b"if-none-match", value) for value in if_none_match] + [(b"prefer", value) for value in prefer]
    conditions = read_conditions(headers)
    if conditions is not None:
        assert conditions.tags or conditions.any_tag
        assert conditions.wait is None or 0 <= conditions.wait <= 10**9


def test_repeated_if_none_match_fields_make_one_list_and_prefer_alone_is_nothing() -> None:
    conditions = read_conditions([(b"if-none-match", b'"a"'), (b"prefer", b"wait=5"), (b"if-none-match", b'"b"')])
    assert conditions == Conditions((b'"a"', b'"b"'), False, 5)
    assert read_conditions([(b"prefer", b"wait=5")]) is None
    assert read_conditions([(b"host", b"localhost")]) is None


@pytest.mark.parametrize(
    ("fields", "seconds"),
    [
        ([b"wait=10"], 10),
        ([b"WAIT = 10"], 10),
        ([b'wait="7"'], 7),
        ([b"return=minimal, wait=3; foo=bar"], 3),
        ([b'foo="x,wait=9", wait=4'], 4),  # a comma in a quoted value does not split
        ([b"respond-async", b"wait=8"], 8),  # two Prefer fields are one list
        ([b"wait=5, wait=7"], 5),  # RFC 7240 §2: the first instance counts
        ([b"wait=0"], 0),
        ([b"wait=" + b"9" * 5000], 10**9),  # huge: capped later by MaxWaitSeconds, never int() of 5000 digits
        ([b"wait=-1"], None),
        ([b"wait=abc"], None),
        ([b"wait=1.5"], None),
        ([b"wait"], None),
        ([b"wait="], None),
        ([b"handling=lenient"], None),
        ([b'"wait=5'], None),
    ],
)
def test_prefer_wait(fields: list[bytes], seconds: int | None) -> None:
    assert wait_preference(fields) == seconds


def test_the_etag_is_the_quoted_version_id_and_always_a_valid_header() -> None:
    assert entity_tag("64a1dd07e1e24bb6a274c81d4353c3d0") == b'"64a1dd07e1e24bb6a274c81d4353c3d0"'
    assert entity_tag("v1_x-2") == b'"v1_x-2"'
    assert entity_tag('a"b c\r\nd\ud800é') == b'"a%22b%20c%0D%0Ad%ED%A0%80%C3%A9"'


# --- the cache's announcements -------------------------------------------------------------------


async def test_ten_thousand_waiters_on_one_key_wake_in_one_pass(nursery: trio.Nursery) -> None:
    cache: SecretCache[str, str] = SecretCache(max_entries=10, ttl=60, loads=nursery)

    async def load() -> str:
        return "v2"

    woken: list[BaseException | None] = []

    async def wait() -> None:
        woken.append(await cache.changes.wait("k"))

    async with trio.open_nursery() as waiters:
        for _ in range(10_000):
            waiters.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        assert cache.changes.waiting("k") == 10_000 and len(cache.changes) == 1
        cache.changes.announce("k")
        # One call made every waiter runnable: none waits for another to wake it.
        assert trio.lowlevel.current_statistics().tasks_runnable == 10_000
    assert woken == [None] * 10_000 and len(cache.changes) == 0
    with trio.fail_after(5):
        async with trio.open_nursery() as waiters:
            for _ in range(100):
                waiters.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            await cache.get("k", load)  # the cache announces a load
    assert len(woken) == 10_100 and len(cache.changes) == 0


async def test_a_final_failure_is_announced_with_its_error_and_a_transient_one_is_not(nursery: trio.Nursery) -> None:
    cache: SecretCache[str, str] = SecretCache(max_entries=10, ttl=60, loads=nursery, is_transient=is_transient)
    failure: list[Exception] = []

    async def load() -> str:
        if failure:
            raise failure[0]
        return "v1"

    await cache.get("k", load)
    woken: list[BaseException | None] = []

    async def wait() -> None:
        woken.append(await cache.changes.wait("k"))

    with trio.fail_after(5):  # not forever when the announcement is missing
        async with trio.open_nursery() as waiters:
            waiters.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            failure.append(KmsError(503, "ServiceUnavailableTemporary", "down"))
            await cache.get("k", load, refresh=True)  # stale: the waiter sleeps on
            await trio.testing.wait_all_tasks_blocked()
            assert woken == []
            failure[0] = KmsError(404, "Forbidden.ResourceNotFound", "The resource not exists.")
            with pytest.raises(KmsError):
                await cache.get("k", load, refresh=True)
    assert woken == [failure[0]]


async def test_a_waiter_that_leaves_leaves_nothing_behind(nursery: trio.Nursery) -> None:
    cache: SecretCache[str, str] = SecretCache(max_entries=10, ttl=60, loads=nursery)
    with trio.move_on_after(0.01):
        await cache.changes.wait("k")
    assert len(cache.changes) == 0 and cache.changes.waiting("k") == 0


# --- the agent in-process ------------------------------------------------------------------------


def conditional(etag: str, wait: int | str | None = None) -> dict[str, str]:
    headers = {"If-None-Match": etag}
    if wait is not None:
        headers["Prefer"] = f"wait={wait}"
    return headers


async def held_read(agent: RunningAgent, etag: str, wait: int, path: str = SECRET_PATH) -> httpx.Response:
    """A waiting read; the client's own timeout is far beyond any wait (virtual time)."""
    return await agent.get(path, headers=conditional(etag, wait), timeout=10_000)


async def waiting(agent: RunningAgent) -> float:
    return await scrape(agent, "kmsagent_waiting_requests")


@pytest.mark.parametrize("response_type", [0, 1, 2])
async def test_etag_and_304_in_each_response_type(
    start_agent: StartAgent, emulator: KmsEmulator, response_type: int
) -> None:
    version = emulator.rotate("db/password", ROTATED, version_id="v2-rotated")
    agent = await start_agent(server={"response_type": response_type})
    first = await agent.get(SECRET_PATH)
    assert first.status_code == 200 and first.headers["etag"] == '"v2-rotated"' == f'"{version}"'
    for etag in ('"v2-rotated"', 'W/"v2-rotated"', '"old", "v2-rotated"', "*"):
        again = await agent.get(SECRET_PATH, headers=conditional(etag))
        assert again.status_code == 304 and again.content == b"", etag
        assert again.headers["etag"] == '"v2-rotated"'
        assert (again.headers["x-kms-agent-cache"], again.headers["cache-control"]) == ("hit", "no-store")
        assert "content-type" not in again.headers and "preference-applied" not in again.headers
    stale_tag = await agent.get(SECRET_PATH, headers=conditional('"v1", "nope"'))
    assert stale_tag.status_code == 200 and stale_tag.headers["etag"] == '"v2-rotated"'
    assert ROTATED in stale_tag.text
    # The cache rules are unchanged: a conditional miss asks KMS once, and says so.
    miss = await agent.get("/v1/api-key", headers=conditional("*"))
    assert (miss.status_code, miss.headers["x-kms-agent-cache"]) == (304, "miss")
    assert emulator.call_count("api-key") == 1 and emulator.call_count("db/password") == 1


async def test_a_304_has_no_body_no_content_type_and_no_content_length_on_the_wire(start_agent: StartAgent) -> None:
    agent = await start_agent()
    etag = (await agent.get(SECRET_PATH)).headers["etag"]
    request = (
        f"GET {SECRET_PATH} HTTP/1.1\r\nHost: localhost\r\nX-KMS-Token: {TOKEN}\r\n"
        f"If-None-Match: {etag}\r\nConnection: close\r\n\r\n"
    )
    raw = await raw_exchange(agent.port, request.encode())
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 304 Not Modified\r\n") and body == b""
    names = {line.split(b":", 1)[0].lower() for line in head.split(b"\r\n")[1:]}
    assert {b"etag", b"x-kms-agent-cache", b"cache-control"} <= names
    assert not names & {b"content-type", b"content-length", b"transfer-encoding"}


async def test_a_waiter_gets_the_new_value_at_once_after_another_clients_refresh_now(
    start_agent: StartAgent, emulator: KmsEmulator, autojump_clock: trio.testing.MockClock
) -> None:
    agent = await start_agent()
    etag = (await agent.get(SECRET_PATH)).headers["etag"]
    answers: list[tuple[float, httpx.Response]] = []

    async def hold() -> None:
        response = await held_read(agent, etag, 120)
        answers.append((trio.current_time(), response))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold)
        await trio.sleep(30)
        assert answers == [] and await waiting(agent) == 1
        emulator.rotate("db/password", ROTATED)
        refreshed_at = trio.current_time()
        assert ROTATED in (await agent.get(SECRET_PATH + "&refreshNow=true")).text
    (answered_at, response), = answers
    assert answered_at - refreshed_at < 1
    assert response.status_code == 200 and response.json()["SecretData"] == ROTATED
    assert response.headers["etag"] != etag and response.headers["preference-applied"] == "wait=120"
    assert response.headers["x-kms-agent-cache"] == "hit" and response.headers["content-type"] == "application/json"
    assert await waiting(agent) == 0


async def test_a_background_refresh_that_brings_a_new_version_wakes_the_waiter_without_its_own_kms_call(
    start_agent: StartAgent, emulator: KmsEmulator, autojump_clock: trio.testing.MockClock
) -> None:
    agent = await start_agent(cache={"ttl_seconds": 60})
    etag = (await agent.get(SECRET_PATH)).headers["etag"]
    emulator.rotate("db/password", ROTATED)
    started = trio.current_time()
    response = await held_read(agent, etag, 300)
    assert response.status_code == 200 and response.json()["SecretData"] == ROTATED
    assert trio.current_time() - started < 60  # the refresh ahead, before the TTL ran out
    assert emulator.call_count("db/password") == 2  # the first read and the refresh


async def test_the_wait_ends_with_304_and_keeps_the_entry_hot_without_kms_calls_of_its_own(
    start_agent: StartAgent, emulator: KmsEmulator, autojump_clock: trio.testing.MockClock
) -> None:
    """50 requests held 250 s on a 60 s TTL: KMS sees the refreshes of one hot entry (about one
    per TTL), not one call per waiter or per wake-up; a read after the waits is a hit."""
    agent = await start_agent(cache={"ttl_seconds": 60})
    etag = (await agent.get(SECRET_PATH)).headers["etag"]
    answers: list[tuple[float, httpx.Response]] = []
    started = trio.current_time()

    limits = httpx.Limits(max_connections=50)
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{agent.port}", timeout=10_000, limits=limits)

    async def hold() -> None:
        response = await client.get(SECRET_PATH, headers={"X-KMS-Token": TOKEN, **conditional(etag, 250)})
        answers.append((trio.current_time() - started, response))

    async with client, trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(hold)
        await trio.sleep(1)
        assert await waiting(agent) == 50
    assert len(answers) == 50
    for took, response in answers:
        assert 250 <= took < 251
        assert response.status_code == 304 and response.content == b""
        assert response.headers["etag"] == etag and response.headers["preference-applied"] == "wait=250"
    assert 4 <= emulator.call_count("db/password") <= 1 + 250 // 60 + 1
    assert (await agent.get(SECRET_PATH)).headers["x-kms-agent-cache"] == "hit"  # kept hot by the waiters


async def test_without_a_waiter_the_entry_expires(
    start_agent: StartAgent, emulator: KmsEmulator, autojump_clock: trio.testing.MockClock
) -> None:
    """The control of the test above: nobody reads, nothing is refreshed, the read is a miss."""
    agent = await start_agent(cache={"ttl_seconds": 60})
    await agent.get(SECRET_PATH)
    await trio.sleep(250)
    assert (await agent.get(SECRET_PATH)).headers["x-kms-agent-cache"] == "miss"


async def test_a_wait_beyond_max_wait_seconds_is_capped_not_refused(
    start_agent: StartAgent, autojump_clock: trio.testing.MockClock
) -> None:
    agent = await start_agent(server={"max_wait_seconds": 10})
    etag = (await agent.get(SECRET_PATH)).headers["etag"]
    for asked in (3600, "99999999999999999999999"):
        started = trio.current_time()
        response = await agent.get(SECRET_PATH, headers=conditional(etag, asked), timeout=10_000)
        assert response.status_code == 304 and response.headers["preference-applied"] == "wait=10"
        assert 10 <= trio.current_time() - started < 11


@pytest.mark.parametrize(
    "prefer", [b"wait=-1", b"wait=abc", b"wait=1.5", b"wait", "wait=\u00bd".encode(), b"wait=\xff"]
)
async def test_malformed_preferences_are_ignored(start_agent: StartAgent, prefer: bytes) -> None:
    agent = await start_agent()
    etag = (await agent.get(SECRET_PATH)).headers["etag"]
    with trio.fail_after(2):
        response = await agent.get(SECRET_PATH, headers={"If-None-Match": etag, "Prefer": prefer})
    assert response.status_code == 304 and "preference-applied" not in response.headers


async def test_prefer_wait_is_ignored_without_if_none_match_and_with_ttl_zero(start_agent: StartAgent) -> None:
    agent = await start_agent()
    with trio.fail_after(2):
        response = await agent.get(SECRET_PATH, headers={"Prefer": "wait=100"})
    assert response.status_code == 200 and "preference-applied" not in response.headers
    uncached = await start_agent(cache={"ttl_seconds": 0})
    etag = (await uncached.get(SECRET_PATH)).headers["etag"]
    with trio.fail_after(2):
        response = await uncached.get(SECRET_PATH, headers=conditional(etag, 100))
    assert (response.status_code, response.headers["x-kms-agent-cache"]) == (304, "miss")
    assert "preference-applied" not in response.headers


async def test_held_requests_get_the_kms_4xx_at_once(
    start_agent: StartAgent, emulator: KmsEmulator, autojump_clock: trio.testing.MockClock
) -> None:
    agent = await start_agent(server={"response_type": 1})
    etag = (await agent.get(SECRET_PATH)).headers["etag"]
    answers: list[httpx.Response] = []

    async def hold() -> None:
        answers.append(await held_read(agent, etag, 300))

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(hold)
        await trio.sleep(5)
        emulator.delete_secret("db/password")
        deleted_at = trio.current_time()
        assert (await agent.get(SECRET_PATH + "&refreshNow=true")).status_code == 404
    assert trio.current_time() - deleted_at < 1
    for response in answers:
        assert response.status_code == 404
        assert response.json() == {"__type": "Forbidden.ResourceNotFound", "message": "The resource not exists."}


async def test_held_requests_count_toward_max_conn(
    start_agent: StartAgent, autojump_clock: trio.testing.MockClock
) -> None:
    agent = await start_agent(server={"max_conn": 2})
    etag = (await agent.get(SECRET_PATH)).headers["etag"]
    await agent.client.aclose()  # its keep-alive connection would take a slot too
    agent.client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{agent.port}", limits=httpx.Limits(max_connections=2))
    async with trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(held_read, agent, etag, 60)
        await trio.sleep(1)
        refused = await one_request(agent.port, SECRET_PATH)
        assert (refused.status_code, refused.json()["Code"]) == (429, "ConnectionLimitExceeded")
        assert (await one_request(agent.port, "/ping")).status_code == 200  # the reserve
    await agent.client.aclose()  # the two connections the waits held
    await trio.testing.wait_all_tasks_blocked(cushion=0.05)
    assert (await one_request(agent.port, SECRET_PATH)).status_code == 200


async def test_a_client_hanging_up_frees_its_slot_at_once(start_agent: StartAgent) -> None:
    agent = await start_agent(server={"max_conn": 1})
    etag = (await agent.get(SECRET_PATH)).headers["etag"]
    await agent.client.aclose()
    await trio.testing.wait_all_tasks_blocked(cushion=0.05)  # its slot is back
    stream = await trio.open_tcp_stream("127.0.0.1", agent.port)
    request = (
        f"GET {SECRET_PATH} HTTP/1.1\r\nHost: localhost\r\nX-KMS-Token: {TOKEN}\r\n"
        f"If-None-Match: {etag}\r\nPrefer: wait=300\r\n\r\n"
    )
    await stream.send_all(request.encode())
    await trio.testing.wait_all_tasks_blocked(cushion=0.05)
    assert (await one_request(agent.port, SECRET_PATH)).status_code == 429  # it holds the only slot
    await stream.aclose()
    await trio.testing.wait_all_tasks_blocked(cushion=0.05)
    with trio.fail_after(1):
        assert (await one_request(agent.port, SECRET_PATH)).status_code == 200
        assert await scrape_port(agent.port, "kmsagent_waiting_requests") == 0


async def scrape_port(port: int, name: str) -> float:
    text = (await one_request(port, "/metrics")).text
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, name
    return float(match[1])


async def test_stopping_answers_held_requests_304_at_once(
    start_agent: StartAgent, autojump_clock: trio.testing.MockClock
) -> None:
    agent = await start_agent()
    etag = (await agent.get(SECRET_PATH)).headers["etag"]
    answers: list[httpx.Response] = []

    async def hold() -> None:
        answers.append(await held_read(agent, etag, 300))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(hold)
        await trio.sleep(10)
        stopped_at = trio.current_time()
        agent.stop.set()
    assert trio.current_time() - stopped_at < 0.5
    assert [response.status_code for response in answers] == [304] * 5
    assert all(response.headers["preference-applied"] == "wait=300" for response in answers)


async def test_sigterm_answers_held_requests_304_and_exits_0_within_5_s(tmp_path: Path, emulator: KmsEmulator) -> None:
    config = write_config(tmp_path, emulator.endpoint)
    async with agent_process(["--config", str(config)], AGENT_ENV, tmp_path) as agent:
        base = f"http://127.0.0.1:{agent.port}"
        async with httpx.AsyncClient(base_url=base, headers={"X-KMS-Token": TOKEN}, timeout=30) as client:
            etag = (await client.get(SECRET_PATH)).headers["etag"]
            answers: list[httpx.Response] = []

            async def hold() -> None:
                answers.append(await client.get(SECRET_PATH, headers=conditional(etag, 300)))

            async def all_held() -> bool:
                return await scrape_port(agent.port, "kmsagent_waiting_requests") >= 3

            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(hold)
                await eventually(all_held, seconds=10)
                agent.process.send_signal(signal.SIGTERM)
                started = trio.current_time()
                with trio.fail_after(5):
                    assert await agent.process.wait() == 0
                exited = trio.current_time() - started
        assert [response.status_code for response in answers] == [304] * 3
        assert exited < 2, "held requests must not wait for the 3 s graceful period"


# --- README "Following rotation" ---------------------------------------------------------------


def follow_recipe() -> str:
    match = re.search(r"^<!-- recipe: follow -->\n```python\n(.*?)^```$", README, re.MULTILINE | re.DOTALL)
    assert match, "README.md has no follow recipe"
    return match[1]


async def test_the_readme_follow_loop_sees_a_rotation(
    start_agent: StartAgent, emulator: KmsEmulator, tmp_path: Path
) -> None:
    agent = await start_agent()
    token_file = tmp_path / "kmstoken"
    token_file.write_text(TOKEN + "\n")
    code = follow_recipe()
    substitutions = {"http://localhost:2025": f"http://localhost:{agent.port}", "/var/run/kmstoken": str(token_file)}
    for before, after in substitutions.items():
        assert before in code
        code = code.replace(before, after)
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md follow recipe", "exec"), namespace)  # noqa: S102 - the README's recipe, as printed
    follow: Callable[..., None] = namespace["follow"]  # type: ignore[assignment]
    values: list[str] = []
    first_seen = trio.Event()
    token = trio.lowlevel.current_trio_token()

    class Enough(Exception):
        pass

    def on_change(value: str) -> None:
        values.append(value)
        if len(values) == 1:
            trio.from_thread.run_sync(first_seen.set, trio_token=token)
        else:
            raise Enough

    async with trio.open_nursery() as nursery:

        async def run_follow() -> None:
            with pytest.raises(Enough):
                await trio.to_thread.run_sync(follow, "db/password", on_change, abandon_on_cancel=True)

        nursery.start_soon(run_follow)
        with trio.fail_after(10):
            await first_seen.wait()
            await trio.testing.wait_all_tasks_blocked(cushion=0.1)
            emulator.rotate("db/password", ROTATED)
            assert (await agent.get(SECRET_PATH + "&refreshNow=true")).status_code == 200
    assert values == [SECRETS["db/password"], ROTATED]
    assert emulator.call_count("db/password") == 2  # the first read and the refreshNow


# --- what a held request costs ----------------------------------------------------------------


#: Holds `count` requests on the agent from another process (so that tracemalloc counts the agent's
#: allocations alone), prints "held", and keeps them until its stdin closes.
HOLDER = """
import socket, sys
port, count, request = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].encode()
held = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
for connection in held:
    connection.sendall(request)
print("held", flush=True)
sys.stdin.read()
"""


async def test_a_held_request_costs_at_most_18_kb_of_the_agents_heap(start_agent: StartAgent) -> None:
    """Issue 12's ≤ 20 KB RSS per waiter (`scripts/bench watch`) rests on the Python objects a held
    request keeps: its connection, request, task and waits, counted by tracemalloc with the
    clients in another process. It was 20.3 KB with hypercorn's per-request memory channel, a
    `trio.Lock` per connection and a cancel scope of the connection's own; 17.5 KB without."""
    import tracemalloc

    agent = await start_agent(server={"max_conn": 400}, cache={"ttl_seconds": 3600})
    etag = (await agent.get(SECRET_PATH)).headers["etag"]
    request = (
        f"GET {SECRET_PATH} HTTP/1.1\r\nHost: localhost\r\nX-KMS-Token: {TOKEN}\r\n"
        f"If-None-Match: {etag}\r\nPrefer: wait=3600\r\n\r\n"
    )
    count = 300
    tracemalloc.start(1)
    try:
        before = tracemalloc.take_snapshot()
        holder = await trio.lowlevel.open_process(
            [sys.executable, "-c", HOLDER, str(agent.port), str(count), request],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert holder.stdout is not None and holder.stdin is not None
        try:
            with trio.fail_after(20):
                assert await holder.stdout.receive_some(16) == b"held\n"
                await trio.testing.wait_all_tasks_blocked(cushion=0.1)
                assert await scrape_port(agent.port, "kmsagent_waiting_requests") == count
            after = tracemalloc.take_snapshot()
        finally:
            await holder.stdin.aclose()
            with trio.fail_after(5):
                await holder.wait()
    finally:
        tracemalloc.stop()
    per_waiter = sum(stat.size_diff for stat in after.compare_to(before, "filename")) / count
    assert 8_000 < per_waiter <= 18_000, f"{per_waiter:.0f} bytes per held request"


async def test_the_app_inbox_keeps_order_and_its_bound() -> None:
    from kmsagent.connection import _AppInbox

    inbox = _AppInbox(2)
    messages = [{"type": "http.request", "body": b"%d" % i, "more_body": True} for i in range(5)]
    received: list[object] = []

    async def consume() -> None:
        received.extend([await inbox.receive() for _ in messages])

    async with trio.open_nursery() as nursery:
        await inbox.put(messages[0])  # type: ignore[arg-type]
        await inbox.put(messages[1])  # type: ignore[arg-type]
        with trio.move_on_after(0.05) as full:
            await inbox.put(messages[2])  # type: ignore[arg-type]
        assert full.cancelled_caught and received == []  # the third waits for room
        nursery.start_soon(consume)
        for message in messages[2:]:
            await inbox.put(message)  # type: ignore[arg-type]
    assert received == messages
