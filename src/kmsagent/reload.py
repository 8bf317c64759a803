"""SIGHUP: read the config file again and apply what can change without a restart.

Live: `[Server]` SSRFHeaders, PathPrefix and IgnoreTransientErrors, `[Cache]` TtlSeconds and
MaxStaleSeconds, and all of `[Log]`. Anything else needs a restart (a new port, a new KMS
endpoint, new credentials) and is logged as such. A reload is all or nothing: a file that does
not validate, or log sinks that cannot be opened, change nothing and the agent keeps running.

A SIGHUP that arrived before this task listened (during start-up, held by signals.py) is
handled as soon as it does.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import trio
from loguru import logger

from kmsagent import signals
from kmsagent.config import Config, ConfigError, differences, load_config
from kmsagent.logs import LogSetupError, configure_logging
from kmsagent.notify import READY, SILENT, Notifier

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
    path: str | Path,
    running: Config,
    apply: Callable[[Config], None],
    *,
    overrides: Callable[[Config], Config] | None = None,
    notifier: Notifier = SILENT,
) -> None:
    """Runs until cancelled; `apply` receives the new effective config after each valid reload
    (logging is reconfigured here, off the trio thread, before `apply`). `overrides` are the
    command line's changes (`--port`), made to every file read, as they were at start. `notifier`
    brackets each reload with RELOADING=1 and READY=1 for systemd."""
    with trio.open_signal_receiver(signal.SIGHUP) as receiver:
        if signals.take(signal.SIGHUP):  # taken after opening: a SIGHUP is held or received
            logger.info("SIGHUP during start-up: reloading now")
            notifier.reloading()
            running = await reload(path, running, apply, overrides)
            notifier.send(READY)
        async for _ in notifier.reloads(receiver):
            running = await reload(path, running, apply, overrides)


async def reload(
    path: str | Path,
    running: Config,
    apply: Callable[[Config], None],
    overrides: Callable[[Config], Config] | None = None,
) -> Config:
    """Reads `path` and applies its live part; returns the config now in force."""
    try:
        # A thread that may be abandoned: a config path that blocks (a FIFO) must not hold a stop.
        loaded = await trio.to_thread.run_sync(load_config, path, abandon_on_cancel=True)
    except ConfigError as error:
        logger.error("SIGHUP: {}; keeping the running config", error)
        return running
    if overrides is not None:
        loaded = overrides(loaded)
    changed = differences(running, loaded)
    if not changed:
        logger.info("SIGHUP: {} unchanged", path)
        return running
    updated = live_part(running, loaded)
    if updated.log != running.log:  # first: when the sinks cannot be opened, nothing changes
        try:
            await trio.to_thread.run_sync(configure_logging, updated.log)  # joins the old writer threads
        except (LogSetupError, OSError) as error:
            logger.error("SIGHUP: {}; keeping the running config", error)
            return running
    apply(updated)
    for section, key, before, after in changed:
        if (section, key) in LIVE_KEYS or section == "Log":
            logger.info("SIGHUP: [{}] {} {!r} -> {!r}", section, key, before, after)
        else:
            logger.warning("SIGHUP: [{}] {} changed; it applies after a restart", section, key)
    return updated
