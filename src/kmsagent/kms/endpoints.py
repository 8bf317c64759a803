"""Which KMS endpoint a call goes to: the primary, or a replica while the primary fails.

SPEC §5: a call that fails transiently on one endpoint is tried on the next; an endpoint that
failed is avoided for 30 s, then tried again first. The order is the config's (`Endpoint`, then
`FallbackEndpoints`), so the primary wins back its traffic as soon as its 30 s are over and one
call there succeeds; an endpoint that fails again is avoided for another 30 s, at the cost of one
failed try every 30 s, not one per call.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import trio
from loguru import logger

#: Seconds an endpoint that failed transiently is passed over.
AVOID_SECONDS = 30.0


class Endpoints:
    """The endpoints of one client in preference order, and which of them to avoid now."""

    def __init__(self, hosts: Sequence[str]) -> None:
        if not hosts:
            raise ValueError("at least one endpoint")
        self.hosts = tuple(hosts)
        self._avoid_until: dict[str, float] = {}

    def pick(self, exclude: Collection[str] = ()) -> str | None:
        """The endpoint for the next try, not one of `exclude`; None when every one is excluded.

        Endpoints not avoided come first, in config order; then avoided ones, the one that failed
        longest ago first (when every endpoint fails, tries go round them).
        """
        now = trio.current_time()
        candidates = [host for host in self.hosts if host not in exclude]
        for host in candidates:
            if self._avoid_until.get(host, 0.0) <= now:
                return host
        if not candidates:
            return None
        return min(candidates, key=lambda host: self._avoid_until[host])

    def failed(self, host: str, code: str) -> None:
        """`host` failed transiently: avoid it for AVOID_SECONDS from now."""
        now = trio.current_time()
        was_avoided = self._avoid_until.get(host, 0.0) > now
        self._avoid_until[host] = now + AVOID_SECONDS
        if len(self.hosts) > 1 and not was_avoided:
            logger.warning("KMS endpoint {} failed ({}); other endpoints first for {:.0f}s", host, code, AVOID_SECONDS)

    def succeeded(self, host: str) -> None:
        """`host` answered: it is good again (it may have been tried while avoided)."""
        if self._avoid_until.pop(host, None) is not None and len(self.hosts) > 1:
            logger.info("KMS endpoint {} answers again", host)

    def avoided(self, host: str) -> bool:
        return self._avoid_until.get(host, 0.0) > trio.current_time()
