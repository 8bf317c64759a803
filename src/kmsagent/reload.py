"""SIGHUP: read the config file again and apply what can change without a restart.

Live: `[Server]` SSRFHeaders, PathPrefix and IgnoreTransientErrors, `[Cache]` TtlSeconds and
MaxStaleSeconds, and all of `[Log]`. Anything else needs a restart (a new port, a new KMS
endpoint, new credentials) and is logged as such. A file that does not validate changes nothing.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import trio
from loguru import logger

from kmsagent.config import Config, ConfigError, differences, load_config
from kmsagent.logs import configure_logging
from kmsagent.notify import SILENT, Notifier

LIVE_KEYS = frozenset(
    {
        ("Server", "SSRFHeaders"),
        ("Server", "PathPrefix"),
        ("Server", "IgnoreTransientErrors"),
        ("Cache", "TtlSeconds"),
        ("Cache", "MaxStaleSeconds"),
    }
)


def live_part(running: Config, loaded: Config) -> Config:
    """`running` with the live keys of `loaded`."""
    server, cache = loaded.server, loaded.cache
    return replace(
        running,
        server=replace(
            running.server,
            ssrf_headers=server.ssrf_headers,
            path_prefix=server.path_prefix,
            ignore_transient_errors=server.ignore_transient_errors,
        ),
        cache=replace(running.cache, ttl_seconds=cache.ttl_seconds, max_stale_seconds=cache.max_stale_seconds),
        log=loaded.log,
    )


async def reload_on_sighup(
    path: str | Path, running: Config, apply: Callable[[Config], None], notifier: Notifier = SILENT
) -> None:
    """Runs until cancelled; `apply` receives the new effective config after each valid reload
    (logging is reconfigured here, off the trio thread). `notifier` brackets each reload with
    RELOADING=1 and READY=1 for systemd."""
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in notifier.reloads(signals):
            try:
                loaded = await trio.to_thread.run_sync(load_config, path)
            except ConfigError as error:
                logger.error("SIGHUP: {}; keeping the running config", error)
                continue
            changed = differences(running, loaded)
            if not changed:
                logger.info("SIGHUP: {} unchanged", path)
                continue
            previous_log, running = running.log, live_part(running, loaded)
            apply(running)
            if running.log != previous_log:  # re-creating sinks joins their writer threads
                await trio.to_thread.run_sync(configure_logging, running.log)
            for section, key, before, after in changed:
                if (section, key) in LIVE_KEYS or section == "Log":
                    logger.info("SIGHUP: [{}] {} {!r} -> {!r}", section, key, before, after)
                else:
                    logger.warning("SIGHUP: [{}] {} changed; it applies after a restart", section, key)
