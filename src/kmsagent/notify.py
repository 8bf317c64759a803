"""systemd's notify protocol (SPEC §11): READY, RELOADING, STOPPING and the watchdog, with no
systemd library.

`sd_notify(3)` is one datagram of `KEY=value` lines to the AF_UNIX socket named by `NOTIFY_SOCKET`
(a path, or an abstract name written with a leading `@`). The socket here is non-blocking and
every send is fire-and-forget: a full or missing socket drops the message rather than stalling
the trio thread, because a service manager that stopped listening must never stop the agent.

The watchdog pings come from a task on the trio loop itself, not from a thread: a loop that is
stuck (a blocking call on the trio thread) stops the pings, and systemd restarts the agent after
`WatchdogSec`. Pings go out every half `WATCHDOG_USEC`, as `sd_watchdog_enabled(3)` advises.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterable, AsyncIterator, Mapping

import trio
from loguru import logger

READY = "READY=1"
STOPPING = "STOPPING=1"
WATCHDOG = "WATCHDOG=1"


class Notifier:
    """Sends notifications to the service manager; every method is a no-op without `NOTIFY_SOCKET`."""

    def __init__(self, address: str | bytes | None = None, watchdog_interval: float | None = None) -> None:
        self._address = address
        self.watchdog_interval = watchdog_interval
        self._socket: socket.socket | None = None
        self._warned = False
        if address is not None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.setblocking(False)

    @classmethod
    def from_environment(cls, env: Mapping[str, str], pid: int | None = None) -> Notifier:
        """Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` (`pid` defaults to this process).

        The watchdog is on only when `WATCHDOG_USEC` is a positive integer and `WATCHDOG_PID`,
        if set, names this process (systemd sets it so a child that inherits the variables does
        not ping for its parent).
        """
        address = socket_address(env.get("NOTIFY_SOCKET", ""))
        interval: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        watchdog_pid = env.get("WATCHDOG_PID", "")
        mine = not watchdog_pid or watchdog_pid == str(os.getpid() if pid is None else pid)
        if address is not None and usec.isdigit() and int(usec) > 0 and mine:
            interval = int(usec) / 2 / 1_000_000
        return cls(address, interval)

    def send(self, message: str) -> bool:
        """Sends one datagram without blocking; False when it was dropped (or there is no socket)."""
        sock = self._socket
        if sock is None or self._address is None:
            return False
        try:
            sock.sendto(message.encode(), self._address)
        except OSError as error:  # BlockingIOError (full), ENOENT, ECONNREFUSED: dropped
            if not self._warned:
                self._warned = True
                reason = error.strerror or error
                logger.warning("NOTIFY_SOCKET: notification dropped ({}); later failures are not logged", reason)
            return False
        return True

    def reloading(self) -> bool:
        """`RELOADING=1` with the `MONOTONIC_USEC` that systemd ≥ 253 (Type=notify-reload) expects."""
        return self.send(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    async def reloads(self, signals: AsyncIterable[int]) -> AsyncIterator[int]:
        """Yields each signal of `signals`: `RELOADING=1` before the caller handles it, `READY=1`
        once the caller asks for the next one (its handling is over, whatever the outcome).

        A caller cancelled while handling a signal sends no `READY=1`: the agent is stopping.
        """
        async for signum in signals:
            self.reloading()
            yield signum
            self.send(READY)

    async def watchdog(self) -> None:
        """Pings every half `WATCHDOG_USEC` from the trio loop; returns at once when off."""
        interval = self.watchdog_interval
        if interval is None:
            return
        while True:
            self.send(WATCHDOG)
            await trio.sleep(interval)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def socket_address(value: str) -> str | bytes | None:
    """The address `NOTIFY_SOCKET` names: a path, or an abstract name (`@name` → `\\0name`).

    Anything else (empty, relative, systemd ≥ 254's `vsock:` for virtual machines) is None: no
    notifications, as `sd_notify` does for values it does not support.
    """
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


#: The notifier of a process not started by a service manager (and of in-process tests).
SILENT = Notifier()
