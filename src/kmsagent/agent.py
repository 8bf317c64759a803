"""The nursery wiring: one nursery owns the HTTP server, the loads and the background tasks."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio
from loguru import logger

from kmsagent import errors
from kmsagent.app import AgentApp
from kmsagent.cache import SecretCache
from kmsagent.checks import CacheKey
from kmsagent.config import Config
from kmsagent.credentials import CredentialSource
from kmsagent.files import FileSet
from kmsagent.formats import response_format
from kmsagent.kms import KmsClient
from kmsagent.log_sinks import dropped_lines
from kmsagent.metrics import Metrics
from kmsagent.notify import READY, SILENT, STOPPING, Notifier
from kmsagent.processes import child_environment
from kmsagent.refresher import Refresher
from kmsagent.reload import reload_on_sighup
from kmsagent.roles import RoleSessions
from kmsagent.server import HttpServer
from kmsagent.store import CachedSecret, SecretStore
from kmsagent.supervisor import Supervisor, first
from kmsagent.token import TokenSource

#: How long start-up waits for `Prefetch` before opening the port anyway.
PREFETCH_WAIT = 15.0


async def run_agent(
    config: Config,
    *,
    token: TokenSource,
    credentials: CredentialSource,
    shutdown: Callable[[], Awaitable[object]],
    clock: Callable[[], float] = time.time,
    config_path: str | Path | None = None,
    notifier: Notifier = SILENT,
    overrides: Callable[[Config], Config] | None = None,
    on_exit_status: Callable[[int], None] = lambda status: None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serves until `shutdown()` returns, then drains requests and cancels background work.

    `task_status.started` receives the bound port once connections are accepted, which does not
    wait for the first credentials: a request that needs KMS before then waits a bounded time.
    `clock` is the wall clock that signs requests (tests pass a virtual one). With `config_path`,
    SIGHUP reloads that file, changed by `overrides` (the command line's `--port`) as at start.
    `notifier` tells a service manager (systemd) of each state (SPEC §11).
    With an `[Exec]` child, the agent also stops when the child ends,
    and `on_exit_status` receives the child's status (the agent's exit status, SPEC §9).
    """
    logger.info("credentials: {}; KMS endpoint {}", credentials.kind, ", then ".join(config.kms.endpoints))
    metrics = Metrics()
    kms_client = KmsClient.open(
        config.kms, credentials, clock=clock, observe=metrics.observe_kms, observe_wait=metrics.observe_kms_wait
    )
    async with kms_client as kms, trio.open_nursery() as nursery:
        nursery.start_soon(notifier.watchdog)  # first, so a long Prefetch does not miss a ping
        cache: SecretCache[CacheKey, CachedSecret] = SecretCache(
            max_entries=config.cache.cache_size,
            ttl=config.cache.ttl_seconds,
            loads=nursery,
            is_transient=errors.is_transient,
            serve_stale=config.server.ignore_transient_errors,
            max_stale=config.cache.max_stale_seconds or None,
        )
        # Vault's lease_duration is the TtlSeconds in force: the cache's, which a reload changes.
        formatter = response_format(
            config.server.response_type, region=config.kms.region, lease_seconds=lambda: cache.ttl
        )
        roles = RoleSessions.from_config(
            config.credentials,
            credentials,
            region=config.kms.region,
            cache=cache,
            tasks=nursery,
            refusal_ttl=config.cache.not_found_ttl_seconds,
            clock=clock,
        )
        store = SecretStore(
            cache,
            kms,
            formatter,
            clock=clock,
            request_timeout=config.server.request_timeout_ms / 1000,
            not_found_ttl=config.cache.not_found_ttl_seconds,
            roles=roles.session,
        )
        refresher = Refresher(
            cache,
            max_in_flight=config.kms.max_concurrent_requests,
            rotation_due=store.rotation_due,
            batch_group=store.batch_group,
            load_batch=store.load_batch,
        )
        app = AgentApp(config=config.server, token=token, store=store, response_format=formatter, metrics=metrics)
        server = HttpServer(
            app,
            port=config.server.http_port,
            ipv6=config.server.bind_ipv6,
            max_conn=config.server.max_conn,
            error_body=formatter.error,
            unix=config.server,
        )
        metrics.watch("kmsagent_cache_entries", "Secrets in the cache.", lambda: len(cache))
        metrics.watch("kmsagent_cache_evictions", "Entries evicted by LRU.", lambda: cache.evictions, counter=True)
        metrics.watch("kmsagent_refreshes", "Background refreshes started.", lambda: refresher.started, counter=True)
        metrics.watch(
            "kmsagent_refresh_batches",
            "Batched refreshes started (BatchGetSecretValue).",
            lambda: refresher.batches,
            counter=True,
        )
        metrics.watch("kmsagent_connections_open", "HTTP connections open.", lambda: server.slots.open)
        metrics.watch(
            "kmsagent_active_roles", "Per-request roles with an STS session now (at most 20).", lambda: len(roles)
        )
        metrics.watch(
            "kmsagent_log_lines_dropped", "Log lines a sink dropped: it could not keep up.", dropped_lines, counter=True
        )
        metrics.watch(
            "kmsagent_credentials_expiry_timestamp_seconds", "When the KMS credentials expire.", credentials.expiration
        )

        def apply(reloaded: Config) -> None:
            app.agent_config = reloaded.server
            cache.configure(
                ttl=reloaded.cache.ttl_seconds,
                serve_stale=reloaded.server.ignore_transient_errors,
                max_stale=reloaded.cache.max_stale_seconds or None,
            )
            roles.refusal_ttl = reloaded.cache.not_found_ttl_seconds

        nursery.start_soon(token.watch)
        nursery.start_soon(credentials.run)
        nursery.start_soon(refresher.run)
        if config_path is not None:
            reloads = partial(reload_on_sighup, overrides=overrides, notifier=notifier)
            nursery.start_soon(reloads, config_path, config, apply)
        child_env = child_environment(os.environ, config.server.ssrf_env_variables)
        files = FileSet.build(
            config.files,
            store,
            env=child_env,
            observe_write=metrics.observe_file_write,
            observe_run=metrics.observe_on_change,
        )
        supervisor = Supervisor(config.exec, store, environment=child_env) if config.exec.command else None
        metrics.watch(
            "kmsagent_exec_restarts",
            "[Exec] child restarts after Env changed.",
            lambda: supervisor.restarts if supervisor else 0,
            counter=True,
        )
        metrics.watch(
            "kmsagent_exec_child_running",
            "1 while the [Exec] child runs.",
            lambda: int(bool(supervisor and supervisor.running)),
        )
        listening = trio.Event()
        stop_serving = shutdown
        if supervisor is not None:
            nursery.start_soon(supervisor.run, shutdown, listening)
            stop_serving = partial(first, shutdown, supervisor.finished.wait)
        async with trio.open_nursery() as startup:  # both within the same 15 s (SPEC §8)
            startup.start_soon(partial(store.prefetch, config.cache.prefetch, wait=PREFETCH_WAIT))
            if files.files:
                startup.start_soon(nursery.start, partial(files.run, wait=PREFETCH_WAIT))

        async def stop_then_notify() -> None:
            await stop_serving()
            notifier.send(STOPPING)

        async def serve(task_status: trio.TaskStatus[int]) -> None:
            await server.run(stop_then_notify, task_status=task_status)
            if supervisor is not None:  # the child is stopped (or ended) before the rest is cancelled
                await supervisor.finished.wait()
                on_exit_status(supervisor.exit_status)

        port = await start_service(nursery, serve)
        notifier.send(READY)
        task_status.started(port)
        listening.set()


async def start_service(nursery: trio.Nursery, service: Callable[..., Awaitable[None]]) -> Any:
    """Starts `service(task_status=...)` in `nursery` and returns what it reports as started.

    When the service returns (it was asked to shut down), the rest of the nursery — background
    tasks that would otherwise run forever — is cancelled.
    """

    async def run(task_status: trio.TaskStatus[Any]) -> None:
        await service(task_status=task_status)
        nursery.cancel_scope.cancel()

    return await nursery.start(run)


async def write_files_once(
    config: Config, *, credentials: CredentialSource, clock: Callable[[], float] = time.time
) -> list[str]:
    """`--once` (SPEC §1): writes every `[[Files]]` table once, trying for at most the Prefetch
    wait, and returns one line per file not written. No port is opened."""
    formatter = response_format(
        config.server.response_type, region=config.kms.region, lease_seconds=lambda: config.cache.ttl_seconds
    )
    async with KmsClient.open(config.kms, credentials, clock=clock) as kms, trio.open_nursery() as nursery:
        cache: SecretCache[CacheKey, CachedSecret] = SecretCache(
            max_entries=config.cache.cache_size,
            ttl=config.cache.ttl_seconds,
            loads=nursery,
            is_transient=errors.is_transient,
            serve_stale=False,
        )
        store = SecretStore(cache, kms, formatter, clock=clock)
        nursery.start_soon(credentials.run)
        env = child_environment(os.environ, config.server.ssrf_env_variables)
        failures = await FileSet.build(config.files, store, env=env).write_once(wait=PREFETCH_WAIT)
        nursery.cancel_scope.cancel()
    return failures
