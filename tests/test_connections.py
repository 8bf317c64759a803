"""The connection cap of SPEC §3: MaxConn, the 429, the /ping reserve, and slots coming back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import httpx
import trio
import trio.testing

from conftest import TOKEN, StartAgent

SECRET_PATH = "/secretsmanager/get?secretId=db/password"


@asynccontextmanager
async def held_connections(port: int, count: int) -> AsyncIterator[list[httpx.AsyncClient]]:
    """`count` keep-alive connections, each opened by one request and then left idle."""
    async with AsyncExitStack() as stack:
        clients = []
        for _ in range(count):
            client = await stack.enter_async_context(
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=httpx.Limits(max_connections=1))
            )
            assert (await client.get("/ping")).status_code == 200
            clients.append(client)
        yield clients


async def one_request(port: int, path: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        return await client.get(path, headers={"X-KMS-Token": TOKEN})


async def raw_exchange(port: int, request: bytes) -> bytes:
    """Sends `request` on a fresh connection and reads until the server closes it."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        received = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                received += chunk
    return received


async def test_beyond_max_conn_requests_get_429_but_ping_answers(start_agent: StartAgent) -> None:
    agent = await start_agent(server={"max_conn": 3})
    async with held_connections(agent.port, 3):
        refused = await one_request(agent.port, SECRET_PATH)
        assert refused.status_code == 429
        assert refused.json()["Code"] == "ConnectionLimitExceeded"
        assert refused.headers["connection"] == "close"
        async with held_connections(agent.port, 2):  # the reserve: MaxConn + 2 answer /ping
            beyond = await raw_exchange(
                agent.port, b"GET /ping HTTP/1.1\r\nHost: localhost\r\nX-KMS-Token: " + TOKEN.encode() + b"\r\n\r\n"
            )
            assert beyond.startswith(b"HTTP/1.1 429 ")
            assert b'"Code":"ConnectionLimitExceeded"' in beyond
    # Every slot is back once the clients have left.
    await trio.testing.wait_all_tasks_blocked(cushion=0.05)
    assert (await one_request(agent.port, SECRET_PATH)).status_code == 200


async def test_a_client_closing_an_idle_connection_frees_its_slot_at_once(start_agent: StartAgent) -> None:
    agent = await start_agent(server={"max_conn": 1})
    async with held_connections(agent.port, 1):
        assert (await one_request(agent.port, SECRET_PATH)).status_code == 429
    # Hypercorn alone would keep the closed connection's slot for keep_alive_timeout (5 s).
    await trio.testing.wait_all_tasks_blocked(cushion=0.05)
    assert (await one_request(agent.port, SECRET_PATH)).status_code == 200


async def test_a_client_leaving_with_pipelined_requests_frees_its_slot(start_agent: StartAgent) -> None:
    agent = await start_agent(server={"max_conn": 1})
    request = b"GET /secretsmanager/get?secretId=db/password HTTP/1.1\r\nHost: localhost\r\nX-KMS-Token: " + TOKEN.encode() + b"\r\n\r\n"
    stream = await trio.open_tcp_stream("127.0.0.1", agent.port)
    await stream.send_all(request)
    assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 200")
    await stream.send_all(request * 3)  # h11 parks the read loop behind the second request
    await stream.aclose()
    # Hypercorn alone would wait forever for the parked reader, holding the only slot.
    await trio.testing.wait_all_tasks_blocked(cushion=0.05)
    assert (await one_request(agent.port, SECRET_PATH)).status_code == 200


async def test_connections_within_the_cap_are_all_served(start_agent: StartAgent) -> None:
    agent = await start_agent(server={"max_conn": 5})
    async with held_connections(agent.port, 4) as clients:
        for client in clients:
            response = await client.get(SECRET_PATH, headers={"X-KMS-Token": TOKEN})
            assert response.status_code == 200
        assert (await one_request(agent.port, SECRET_PATH)).status_code == 200
