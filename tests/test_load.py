"""Load on the connection cap and the cache (SPEC §3, §5), kept small enough for CI.

Clients are raw trio streams speaking minimal HTTP/1.1 (httpx costs too much per connection at
these counts). The agent runs in this process, so the RSS measured here is the agent's plus the
clients'.
"""

from __future__ import annotations

import contextlib
import json
import random
import resource
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
from loguru import logger
from prometheus_client.parser import text_string_to_metric_families

from conftest import SECRETS, TOKEN, StartAgent, eventually
from kmsagent.emulator import Fault, KmsEmulator

MAX_CONN = 100
FLOOD = 2 * MAX_CONN
MANY_CLIENTS = 1000
REQUESTS_PER_CLIENT = 5
#: Held connections ping this often, so the agent's 5 s keep-alive timeout never closes them.
HOLD_PING_INTERVAL = 2.0
#: File descriptors kept free for everything else in the test process (emulator, agent, pytest).
FD_SPARE = 200


class Closed(Exception):
    """The server closed (or reset) the connection before a whole response arrived."""


@dataclass
class Reply:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


@dataclass
class RawClient:
    """One keep-alive HTTP/1.1 connection; `get` sends one request and reads its response."""

    stream: trio.SocketStream
    buffer: bytes = b""
    lock: trio.Lock = field(default_factory=trio.Lock)

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def get(self, path: str, *, token: str | None = TOKEN) -> Reply:
        async with self.lock:
            await self.send(path, token=token)
            return await self.receive()

    async def send(self, path: str, *, token: str | None = TOKEN) -> None:
        request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        if token is not None:
            request += f"X-KMS-Token: {token}\r\n"
        try:
            await self.stream.send_all((request + "\r\n").encode())
        except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
            raise Closed(str(error)) from None

    async def receive(self) -> Reply:
        while b"\r\n\r\n" not in self.buffer:
            await self._fill()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.split(b"\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get(b"content-length", b"0"))
        while len(self.buffer) < length:
            await self._fill()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return Reply(int(status_line.split()[1]), headers, body)

    async def _fill(self) -> None:
        try:
            chunk = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
            raise Closed(str(error)) from None
        if not chunk:
            raise Closed("end of stream")
        self.buffer += chunk

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


@asynccontextmanager
async def held(port: int, count: int) -> AsyncIterator[list[RawClient]]:
    """`count` connections, each opened by a /ping, then idle but for a ping every 2 s."""
    clients = []
    try:
        for _ in range(count):
            client = await RawClient.connect(port)
            clients.append(client)
            assert (await client.get("/ping")).status == 200
        async with trio.open_nursery() as nursery:
            for client in clients:
                nursery.start_soon(keep_alive, client)
            yield clients
            nursery.cancel_scope.cancel()
    finally:
        for client in clients:
            await client.aclose()


async def keep_alive(client: RawClient) -> None:
    while True:
        await trio.sleep(HOLD_PING_INTERVAL)
        assert (await client.get("/ping")).status == 200


async def flood_one(port: int, path: str) -> str:
    """One connection beyond the cap: sends a request; "429" for a ConnectionLimitExceeded answer,
    "closed" when the agent closed or reset it without one."""
    try:
        client = await RawClient.connect(port)
    except OSError:
        return "closed"
    try:
        with contextlib.suppress(Closed):  # the canned 429 may already be waiting, sent before the request was read
            await client.send(path)
        reply = await client.receive()
    except Closed:
        return "closed"
    finally:
        await client.aclose()
    assert reply.status == 429, reply
    assert reply.json()["Code"] == "ConnectionLimitExceeded"
    assert reply.headers[b"connection"] == b"close"
    return "429"


async def flood(port: int, count: int, path: str) -> Counter[str]:
    outcomes: Counter[str] = Counter()

    async def one() -> None:
        outcomes[await flood_one(port, path)] += 1

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    return outcomes


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def connections_open(port: int) -> int:
    """`kmsagent_connections_open` from /metrics, asked on a connection of its own (counted too)."""
    client = await RawClient.connect(port)
    try:
        reply = await client.get("/metrics", token=None)
    finally:
        await client.aclose()
    assert reply.status == 200, reply
    for family in text_string_to_metric_families(reply.body.decode()):
        if family.name == "kmsagent_connections_open":
            return int(family.samples[0].value)
    raise AssertionError("no kmsagent_connections_open in /metrics")


async def wait_for_connections(port: int, expected: int, seconds: float = 5.0) -> None:
    """Polls /metrics until the agent counts `expected` connections (the poll's own included)."""
    seen = None

    async def counted() -> bool:
        nonlocal seen
        seen = await connections_open(port)
        return seen == expected

    try:
        await eventually(counted, seconds=seconds, interval=0.05)
    except trio.TooSlowError:
        raise AssertionError(f"kmsagent_connections_open stayed at {seen}, expected {expected}") from None


def secret_path(name: str) -> str:
    return f"/secretsmanager/get?secretId={name}"


async def warm_up(port: int, names: list[str]) -> None:
    """Caches `names`, on a connection closed before returning (every slot is free afterwards)."""
    client = await RawClient.connect(port)
    try:
        for name in names:
            assert (await client.get(secret_path(name))).status == 200
    finally:
        await client.aclose()
    await wait_for_connections(port, 1)


@pytest.fixture
def quiet_logs() -> Iterator[None]:
    """Thousands of requests make thousands of debug lines; the tests here do not read them."""
    logger.disable("kmsagent")
    yield
    logger.enable("kmsagent")


async def test_a_flood_beyond_max_conn_is_refused_quickly_and_every_slot_comes_back(
    start_agent: StartAgent, quiet_logs: None
) -> None:
    """MaxConn=100 held + 2 in the ping reserve, then a flood of 200 connections with a request each.

    Asserts: every flood connection gets a 429 ConnectionLimitExceeded (with Connection: close) or
    is closed, all within 10 s; /ping keeps answering 200 on the reserve connections during the
    flood, and the held connections stay served; the process's RSS grows by less than 50 MB; a
    second flood with the reserve free is refused the same way; after every client has left,
    /metrics counts only its own connection, MaxConn fresh connections all get a 200 for a
    secret, and one more beyond them gets the 429 again.
    """
    agent = await start_agent(server={"max_conn": MAX_CONN})
    path = secret_path("db/password")
    await warm_up(agent.port, ["db/password"])  # cached, so the clients below never wait for KMS
    rss_before = rss_bytes()
    async with held(agent.port, MAX_CONN) as held_clients:
        beyond = await RawClient.connect(agent.port)  # in the /ping reserve (SPEC §3): MaxConn + 2
        reply = await beyond.get(path)
        assert reply.status == 429 and reply.headers[b"connection"] == b"close"  # only /ping is served there
        await beyond.aclose()
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)  # its slot is back
        async with held(agent.port, 2) as reserve:
            pings: list[int] = []

            async def ping_during_flood(done: trio.Event) -> None:
                while not done.is_set():
                    pings.extend([(await client.get("/ping")).status for client in reserve])
                    await trio.sleep(0.01)

            done = trio.Event()
            started = time.monotonic()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ping_during_flood, done)
                with trio.fail_after(10):
                    outcomes = await flood(agent.port, FLOOD, path)
                done.set()
            flood_seconds = time.monotonic() - started
            assert sum(outcomes.values()) == FLOOD
            assert set(outcomes) <= {"429", "closed"}
            assert outcomes["429"] > 0, outcomes
            assert pings and set(pings) == {200}, Counter(pings)
        # The reserve is free again: the first flood connections get a parsed 429, the rest the canned one.
        with trio.fail_after(10):
            outcomes = await flood(agent.port, FLOOD, path)
        assert sum(outcomes.values()) == FLOOD and set(outcomes) <= {"429", "closed"}, outcomes
        for client in held_clients:  # none of the held connections was dropped by the floods
            assert (await client.get("/ping")).status == 200
        rss_growth = rss_bytes() - rss_before
        assert rss_growth < 50 * 2**20, f"RSS grew by {rss_growth / 2**20:.1f} MB"
    assert flood_seconds < 10
    # Every slot comes back once the clients have left.
    await wait_for_connections(agent.port, 1)
    fresh = [await RawClient.connect(agent.port) for _ in range(MAX_CONN)]
    try:
        replies = []

        async def read_secret(client: RawClient) -> None:
            replies.append(await client.get(path))

        async with trio.open_nursery() as nursery:
            for client in fresh:
                nursery.start_soon(read_secret, client)
        assert Counter(reply.status for reply in replies) == {200: MAX_CONN}
        assert {reply.json()["SecretData"] for reply in replies} == {SECRETS["db/password"]}
        assert await flood_one(agent.port, path) in ("429", "closed")
    finally:
        for client in fresh:
            await client.aclose()
    await wait_for_connections(agent.port, 1)


def clients_that_fit() -> int:
    """Raises the soft RLIMIT_NOFILE to the hard one; how many of 1000 clients fit (2 fds each)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 4 * MANY_CLIENTS)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return max(0, min(MANY_CLIENTS, (soft - FD_SPARE) // 2))


async def test_a_thousand_keep_alive_clients_read_cached_secrets_without_errors(
    start_agent: StartAgent, quiet_logs: None
) -> None:
    """MaxConn=1000 (the maximum) and 1000 concurrent keep-alive clients, 5 GETs each.

    Each client is one raw connection (2 fds in this process: client and server side), so the
    soft RLIMIT_NOFILE is raised to the hard limit first; if 1000 clients do not fit in it, as
    many as fit are used (with a 1024 hard limit, about 400). All clients connect and make their
    first request before any makes the rest, so all are open at once. Asserts: every request gets
    200, a cache hit, with the right SecretData; after the clients leave while 10 connections are still held,
    /metrics reports exactly those 10 plus its own; after those close too, only its own.
    """
    count = clients_that_fit()
    assert count >= 100, "RLIMIT_NOFILE leaves room for fewer than 100 clients"
    agent = await start_agent(server={"max_conn": MANY_CLIENTS})
    names = list(SECRETS)
    await warm_up(agent.port, names)  # cache every secret: the clients read hits
    connected = 0
    all_connected = trio.Event()
    statuses: Counter[tuple[int, bytes | None]] = Counter()
    wrong: list[str] = []

    async def read(client: RawClient) -> None:
        name = random.choice(names)
        reply = await client.get(secret_path(name))
        statuses[reply.status, reply.headers.get(b"x-kms-agent-cache")] += 1
        if reply.status == 200 and reply.json()["SecretData"] != SECRETS[name]:
            wrong.append(name)

    kept: list[RawClient] = []

    async def keep_alive_client(keep: bool) -> None:
        nonlocal connected
        client = await RawClient.connect(agent.port)
        try:
            await read(client)
            connected += 1
            if connected == count:
                all_connected.set()
            await all_connected.wait()
            for _ in range(REQUESTS_PER_CLIENT - 1):
                await read(client)
        finally:
            if keep:
                kept.append(client)
            else:
                await client.aclose()

    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            for index in range(count):
                nursery.start_soon(keep_alive_client, index < 10)
    try:
        assert statuses == {(200, b"hit"): count * REQUESTS_PER_CLIENT}
        assert wrong == []
        assert len(kept) == 10
        await wait_for_connections(agent.port, len(kept) + 1)
    finally:
        for client in kept:
            await client.aclose()
    await wait_for_connections(agent.port, 1)


async def test_clients_that_leave_while_their_secret_loads_give_their_slots_back_at_once(
    start_agent: StartAgent, emulator: KmsEmulator, quiet_logs: None
) -> None:
    """MaxConn=2: two clients ask for an uncached secret while KMS takes 3 s, and hang up.

    Their slots must come back at once (as with Quart's ASGI connection before commit 5339fed,
    and as hypercorn does on EOF), so a third client gets a cached secret. Held slots mean a KMS
    outage plus clients that time out and reconnect fill MaxConn with ghosts and every client,
    cache hits included, gets 429 for up to the whole retry sequence (defaults: about 33 s).
    """
    agent = await start_agent(server={"max_conn": 2}, kms={"read_timeout_ms": 5000, "max_retries": 0})
    await warm_up(agent.port, ["db/password"])
    emulator.inject(Fault(delay=3.0), times=1)
    leaving = [await RawClient.connect(agent.port) for _ in range(2)]
    for client in leaving:
        await client.send(secret_path("api-key"))
    await trio.sleep(0.2)
    for client in leaving:
        await client.aclose()
    await trio.testing.wait_all_tasks_blocked(cushion=0.1)
    client = await RawClient.connect(agent.port)
    try:
        with trio.fail_after(2):
            reply = await client.get(secret_path("db/password"))
    finally:
        await client.aclose()
    assert reply.status == 200, reply


async def test_a_request_with_a_body_neither_wedges_its_connection_nor_keeps_its_slot(
    start_agent: StartAgent, emulator: KmsEmulator, quiet_logs: None
) -> None:
    """A GET with a 30-chunk body for a secret whose load takes 1.5 s: answered, slot returned.

    Each such client leaks one slot for good, so MaxConn of them lock every client out (429).
    """
    agent = await start_agent(server={"max_conn": 2}, kms={"read_timeout_ms": 5000, "max_retries": 0})
    emulator.inject(Fault(delay=1.5), times=1)
    chunks, chunk = 30, b"x" * 4096
    stream = await trio.open_tcp_stream("127.0.0.1", agent.port)
    try:
        head = (
            f"GET {secret_path('api-key')} HTTP/1.1\r\nHost: localhost\r\nX-KMS-Token: {TOKEN}\r\n"
            f"Content-Length: {chunks * len(chunk)}\r\n\r\n"
        )
        await stream.send_all(head.encode())
        for _ in range(chunks):  # one body event each: they arrive while the secret loads
            await stream.send_all(chunk)
            await trio.sleep(0.02)
        received = b""
        with trio.move_on_after(3):
            while not received.startswith(b"HTTP/1.1 200") and (data := await stream.receive_some(65536)):
                received += data
        assert received.startswith(b"HTTP/1.1 200"), received[:80]
    finally:
        await trio.aclose_forcefully(stream)
    await wait_for_connections(agent.port, 1, seconds=2)
