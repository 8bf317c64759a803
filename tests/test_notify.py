"""systemd notifications (SPEC §11): the datagram sender, the watchdog, and the agent's states."""

from __future__ import annotations

import os
import signal
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from kmsagent.emulator import KmsEmulator
from kmsagent.notify import READY, STOPPING, WATCHDOG, Notifier, socket_address
from test_cli import AGENT_ENV, agent_process, stop, write_config


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A folder whose socket paths fit sockaddr_un's 108 bytes whatever the test's name."""
    with tempfile.TemporaryDirectory(prefix="kmsn", dir="/tmp") as folder:
        yield Path(folder)


@pytest.fixture
def listener(short_dir: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's notify socket, and its NOTIFY_SOCKET value."""
    path = short_dir / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    yield sock, str(path)
    sock.close()


def drain(sock: socket.socket) -> list[str]:
    """Every datagram queued now, without waiting."""
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except BlockingIOError:
            return messages


async def receive(sock: socket.socket, seconds: float = 10) -> str:
    with trio.fail_after(seconds):
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                return sock.recv(4096).decode()
            except BlockingIOError:
                continue


async def receive_state(sock: socket.socket, seconds: float = 10) -> str:
    """The next datagram that is not a watchdog ping."""
    with trio.fail_after(seconds):
        while (message := await receive(sock)) == WATCHDOG:
            pass
    return message


# --- the sender ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "address"),
    [("/run/systemd/notify", "/run/systemd/notify"), ("@abstract/name", b"\0abstract/name"), ("", None), ("@", None),
     ("relative/path", None), ("vsock:2:1234", None)],
)
def test_socket_address(value: str, address: str | bytes | None) -> None:
    assert socket_address(value) == address


def test_a_datagram_reaches_a_path_socket(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path})
    assert notifier.send(READY)
    assert drain(sock) == ["READY=1"]


def test_a_datagram_reaches_an_abstract_socket() -> None:
    name = f"kmsagent-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.setblocking(False)
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": f"@{name}"})
        assert notifier.send(STOPPING)
        assert drain(sock) == ["STOPPING=1"]


def test_a_missing_socket_drops_the_message(short_dir: Path) -> None:
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": str(short_dir / "nobody")})
    assert notifier.send(READY) is False
    assert notifier.send(READY) is False


def test_a_full_socket_drops_the_message_without_blocking(listener: tuple[socket.socket, str]) -> None:
    """Nobody reads the socket (a hung service manager): sends fail at once instead of stalling."""
    sock, path = listener
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path})
    started = time.monotonic()
    sent = 0
    while notifier.send(WATCHDOG):
        sent += 1
        assert sent < 100_000, "the socket never filled"
    assert time.monotonic() - started < 5
    assert len(drain(sock)) == sent


def test_without_notify_socket_nothing_is_sent_and_no_watchdog() -> None:
    notifier = Notifier.from_environment({"WATCHDOG_USEC": "200000"})
    assert notifier.send(READY) is False and notifier.watchdog_interval is None


@pytest.mark.parametrize(
    ("usec", "pid", "interval"),
    [
        ("200000", None, 0.1),
        ("200000", "mine", 0.1),
        ("200000", "other", None),
        ("0", None, None),
        ("x", None, None),
        ("", None, None),
    ],
)
def test_watchdog_interval(
    listener: tuple[socket.socket, str], usec: str, pid: str | None, interval: float | None
) -> None:
    env = {"NOTIFY_SOCKET": listener[1], "WATCHDOG_USEC": usec}
    if pid is not None:
        env["WATCHDOG_PID"] = str(os.getpid() if pid == "mine" else os.getpid() + 1)
    assert Notifier.from_environment(env).watchdog_interval == interval


async def test_reloads_brackets_each_signal_with_reloading_and_ready(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path})
    send, signals = trio.open_memory_channel[int](3)
    for signum in (1, 2, 3):
        send.send_nowait(signum)
    send.close()
    seen = []
    async for signum in notifier.reloads(signals):
        seen.append((signum, drain(sock)))
        if signum == 1:
            continue  # a reload that keeps the running config still ends with READY=1
    told = [[message.split("\n")[0] for message in messages] for _, messages in seen]
    assert told == [["RELOADING=1"], [READY, "RELOADING=1"], [READY, "RELOADING=1"]]
    assert drain(sock) == [READY]


async def test_the_watchdog_pings_from_the_loop_and_stops_when_the_loop_is_stuck(
    listener: tuple[socket.socket, str],
) -> None:
    sock, path = listener
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "40000"})  # a ping every 20 ms
    async with trio.open_nursery() as nursery:
        nursery.start_soon(notifier.watchdog)
        assert await receive(sock) == WATCHDOG
        drain(sock)
        time.sleep(0.3)  # noqa: ASYNC251 - the test's hook: a blocking call on the trio thread, ~15 intervals long
        assert drain(sock) == [], "pings went on while the trio loop was blocked"
        assert await receive(sock, seconds=2) == WATCHDOG  # the loop runs again: so do the pings
        nursery.cancel_scope.cancel()


# --- the agent under a service manager ----------------------------------------------------------------


async def test_the_agent_tells_ready_reloading_stopping_and_pings(
    tmp_path: Path, emulator: KmsEmulator, listener: tuple[socket.socket, str]
) -> None:
    sock, path = listener
    env = {**AGENT_ENV, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"}
    async with agent_process(["--config", str(write_config(tmp_path, emulator.endpoint))], env, tmp_path) as agent:
        assert await receive_state(sock) == READY
        drain(sock)
        pings = 0
        with trio.move_on_after(1.0):
            while True:
                pings += await receive(sock) == WATCHDOG
        assert 4 <= pings <= 15, pings  # every 0.1 s, with room for a loaded machine

        agent.process.send_signal(signal.SIGHUP)
        reloading = await receive_state(sock)
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        first, monotonic = reloading.split("\n")
        assert first == "RELOADING=1" and monotonic.startswith("MONOTONIC_USEC=")
        assert 0 <= now_usec - int(monotonic.removeprefix("MONOTONIC_USEC=")) < 10_000_000
        assert await receive_state(sock) == READY

        assert await stop(agent) == 0
        assert STOPPING in [message for message in drain(sock) if message != WATCHDOG]


async def test_no_pings_when_watchdog_pid_is_another_process(
    tmp_path: Path, emulator: KmsEmulator, listener: tuple[socket.socket, str]
) -> None:
    sock, path = listener
    env = {**AGENT_ENV, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}
    async with agent_process(["--config", str(write_config(tmp_path, emulator.endpoint))], env, tmp_path) as agent:
        assert await receive(sock) == READY  # the first datagram: no ping came before it
        with trio.move_on_after(0.5):
            assert await receive(sock) != WATCHDOG
        assert await stop(agent) == 0
    assert WATCHDOG not in drain(sock)
