"""Operations: response types 1 and 2, /metrics, logs (rotation, leaks, redaction), signals."""

from __future__ import annotations

import base64
import json
import logging
import signal
import sys
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing
from loguru import logger
from prometheus_client.parser import text_string_to_metric_families

from conftest import (
    AK_ID,
    AK_SECRET,
    SECRET_MATERIAL,
    SECRETS,
    TOKEN,
    VAULT_BODY_KEYS,
    StartAgent,
    agent_config,
    eventually,
)
from kmsagent import redact
from kmsagent.cache import SecretCache
from kmsagent.checks import SecretQuery
from kmsagent.config import LogConfig
from kmsagent.credentials import Credentials, StaticCredentials
from kmsagent.emulator import Fault, KmsEmulator
from kmsagent.formats import response_format
from kmsagent.kms import KmsClient
from kmsagent.logs import LOG_FILE, close_logging, configure_logging
from kmsagent.metrics import Metrics
from kmsagent.store import SecretStore
from test_cli import AGENT_ENV, agent_process, stop, wait_for_text, write_config

SECRET_PATH = "/secretsmanager/get?secretId=db/password"


# --- ResponseType 1 (AWS) and 2 (Vault) ------------------------------------------------------------


async def test_aws_shape_reads_like_the_aws_agent(start_agent: StartAgent, emulator: KmsEmulator) -> None:
    emulator.put_secret("cert/der", b"\x00\x01binary\xff")
    agent = await start_agent(server={"response_type": 1})
    body = (await agent.get(SECRET_PATH)).json()
    version = next(call.version_id for call in reversed(emulator.calls) if call.secret_name == "db/password")
    assert version is None  # asked by stage, not by id
    assert set(body) == {"ARN", "Name", "VersionId", "SecretString", "VersionStages", "CreatedDate"}
    assert body["Name"] == "db/password" and body["SecretString"] == SECRETS["db/password"]
    assert body["ARN"].startswith("acs:kms:cn-hangzhou:") and body["ARN"].endswith(":secret/db/password")
    assert body["VersionStages"] == ["AWSCURRENT"] and body["VersionId"] and float(body["CreatedDate"]) > 0
    # What AWS agent users write: json.loads(response)["SecretString"], or SecretBinary for binary.
    binary = (await agent.get("/v1/cert/der")).json()
    assert "SecretString" not in binary and base64.b64decode(binary["SecretBinary"]) == b"\x00\x01binary\xff"
    error = (await agent.get("/v1/missing")).json()
    assert error == {"__type": "Forbidden.ResourceNotFound", "message": error["message"]} and error["message"]


async def test_vault_shape_reads_like_hvac(start_agent: StartAgent) -> None:
    agent = await start_agent(server={"response_type": 2}, cache={"ttl_seconds": 120})
    body = (await agent.get("/v1/app/config")).json()
    assert set(body) == VAULT_BODY_KEYS
    assert (body["lease_id"], body["renewable"], body["lease_duration"]) == ("", False, 120)
    assert (body["wrap_info"], body["warnings"], body["auth"]) == (None, None, None)
    # hvac's read_secret returns this dict: callers take response["data"]["pass"].
    assert body["data"] == json.loads(SECRETS["app/config"])
    text = (await agent.get("/v1/api-key")).json()
    assert text["data"] == {"value": SECRETS["api-key"]}
    error = await agent.get("/v1/missing")
    assert error.status_code == 404 and error.json() == {"errors": [error.json()["errors"][0]]}
    assert error.json()["errors"][0].startswith("Forbidden.ResourceNotFound: ")


# --- /metrics --------------------------------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_parse_and_move_without_naming_secrets(start_agent: StartAgent, emulator: KmsEmulator) -> None:
    agent = await start_agent()
    before = samples((await agent.get("/metrics", token=None)).text)
    await agent.get(SECRET_PATH)
    await agent.get(SECRET_PATH)
    await agent.get("/secretsmanager/get?secretId=missing")
    await agent.get("/nowhere")
    response = await agent.get("/metrics", token=None)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    after = samples(response.text)

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert moved("kmsagent_requests_total", route="secret", status="200") == 2
    assert moved("kmsagent_requests_total", route="secret", status="404") == 1
    assert moved("kmsagent_requests_total", route="other", status="404") == 1
    assert moved("kmsagent_cache_results_total", outcome="miss") == 1
    assert moved("kmsagent_cache_results_total", outcome="hit") == 1
    assert moved("kmsagent_kms_requests_total", outcome="success") == 1
    assert moved("kmsagent_kms_requests_total", outcome="client_error") == 1
    assert moved("kmsagent_kms_request_duration_seconds_count") == 2
    assert after[("kmsagent_cache_entries", ())] == 1
    assert after[("kmsagent_connections_open", ())] >= 1
    for name in ("db/password", "missing", *SECRET_MATERIAL):
        assert name not in response.text


# --- logs ------------------------------------------------------------------------------------------


@pytest.fixture
def file_logging(tmp_path: Path):  # noqa: ANN201 - yields a configure function
    """Configures the agent's real sinks in tmp_path; restores pytest's logging afterwards."""
    root_handlers = logging.getLogger().handlers[:]

    def configure(**fields: object) -> Path:
        configure_logging(LogConfig(path=str(tmp_path / "logs"), **fields))  # type: ignore[arg-type]
        return tmp_path / "logs"

    yield configure
    close_logging()
    logger.add(sys.stderr)
    logging.getLogger().handlers[:] = root_handlers


def test_rotation_keeps_exactly_backups_old_files(file_logging) -> None:  # noqa: ANN001
    folder = file_logging(max_file_size_mb=1, backups=2, format="text", level="info")
    line = "x" * 1000
    for _ in range(5000):  # about 5 MB: four rotations
        logger.info(line)
    close_logging()
    files = sorted(path.name for path in folder.iterdir())
    assert LOG_FILE in files and len(files) == 3, files
    assert all((folder / name).stat().st_size <= 1024 * 1024 + 2000 for name in files)


def test_json_format_writes_one_json_record_per_line(file_logging) -> None:  # noqa: ANN001
    folder = file_logging(format="json")
    logger.info("hello {}", "world")
    close_logging()
    records = [json.loads(line) for line in (folder / LOG_FILE).read_text().splitlines()]
    assert records[-1]["message"] == "hello world" and list(records[-1])[:3] == ["time", "level", "message"]


def test_the_redaction_guard_masks_known_secrets_even_when_logged_by_mistake(captured_logs: list[str]) -> None:
    redact.remember_secret('{"user": "svc", "password": "hunter2-but-longer"}')
    redact.remember("an-access-key-secret-1234")
    logger.error("oops: {} and {}", "hunter2-but-longer", "an-access-key-secret-1234 leaked")
    line = next(line for line in captured_logs if "oops" in line)
    assert "hunter2" not in line and "an-access-key" not in line and line.count(redact.MARK) == 2
    assert redact.scrub("short") == "short"


async def test_no_secret_material_in_logs_on_any_request_path(
    start_agent: StartAgent, emulator: KmsEmulator, captured_logs: list[str]
) -> None:
    agent = await start_agent(kms={"max_retries": 0})
    for name in SECRETS:
        await agent.get(f"/v1/{name}")  # miss
        await agent.get(f"/v1/{name}")  # hit
    emulator.inject(Fault.unavailable())
    await agent.get("/v1/api-key?refreshNow=true")  # stale
    emulator.clear_faults()
    await agent.get("/v1/missing")  # KMS error
    await agent.get("/v1/api-key", token="wrong-token-value-123")  # bad token
    text = "\n".join(captured_logs)
    assert "cache=stale" in text and "cache=hit" in text
    for material in SECRET_MATERIAL:
        assert material not in text


# --- signals ---------------------------------------------------------------------------------------


async def test_sigterm_with_a_request_stuck_on_a_hanging_kms_exits_0_within_5_s(
    tmp_path: Path, emulator: KmsEmulator
) -> None:
    config = write_config(tmp_path, emulator.endpoint).read_text().replace("MaxRetries = 0", "ReadTimeoutMs = 60000")
    (tmp_path / "slow.toml").write_text(config)
    emulator.inject(Fault(delay=120))
    async with (
        agent_process(["--config", str(tmp_path / "slow.toml")], AGENT_ENV, tmp_path) as agent,
        httpx.AsyncClient(headers={"X-KMS-Token": TOKEN}, timeout=30) as client,
        trio.open_nursery() as nursery,
    ):
        errors: list[BaseException] = []

        async def stuck_request() -> None:
            try:
                await client.get(agent.url(SECRET_PATH))
            except httpx.HTTPError as error:
                errors.append(error)

        nursery.start_soon(stuck_request)
        await eventually(lambda: emulator.call_count("db/password") > 0, seconds=5, interval=0.05)
        started = trio.current_time()
        assert await stop(agent) == 0
        assert trio.current_time() - started < 5
    emulator.clear_faults()


async def test_sighup_applies_a_new_ttl_and_survives_a_broken_file(tmp_path: Path, emulator: KmsEmulator) -> None:
    config_path = write_config(tmp_path, emulator.endpoint)
    original = config_path.read_text()
    async with agent_process(["--config", str(config_path)], AGENT_ENV, tmp_path) as agent:
        async with httpx.AsyncClient(headers={"X-KMS-Token": TOKEN}, timeout=10) as client:

            async def outcome() -> str:
                return (await client.get(agent.url(SECRET_PATH))).headers["x-kms-agent-cache"]

            async def reloaded(marker: str) -> None:
                await wait_for_text(agent.stderr_path, marker, seconds=5)

            assert [await outcome(), await outcome()] == ["miss", "hit"]
            config_path.write_text(original.replace("[Log]", "[Cache]\nTtlSeconds = 0\n[Log]"))
            agent.process.send_signal(signal.SIGHUP)
            await reloaded("TtlSeconds 300 -> 0")
            assert [await outcome(), await outcome()] == ["miss", "miss"]
            config_path.write_text("[Cache\nbroken")
            agent.process.send_signal(signal.SIGHUP)
            await reloaded("keeping the running config")
            assert await outcome() == "miss"  # still TTL 0, still serving
        assert await stop(agent) == 0
    assert AK_SECRET not in agent.stderr_path.read_text()


@pytest.mark.parametrize("where", ["a regular file", "a folder under a regular file"])
async def test_a_reload_whose_log_path_is_unusable_keeps_the_running_config(
    tmp_path: Path, emulator: KmsEmulator, where: str
) -> None:
    config_path = write_config(tmp_path, emulator.endpoint)
    original = config_path.read_text()
    (tmp_path / "not-a-folder").write_text("")
    log_path = tmp_path / "not-a-folder" if where == "a regular file" else tmp_path / "not-a-folder" / "logs"
    async with agent_process(["--config", str(config_path)], AGENT_ENV, tmp_path) as agent:
        async with httpx.AsyncClient(headers={"X-KMS-Token": TOKEN}, timeout=10) as client:

            async def outcome() -> str:
                return (await client.get(agent.url(SECRET_PATH))).headers["x-kms-agent-cache"]

            assert [await outcome(), await outcome()] == ["miss", "hit"]
            broken = original.replace(f'Path = "{tmp_path / "logs"}"', f'Path = "{log_path}"')
            config_path.write_text(broken.replace("[Log]", "[Cache]\nTtlSeconds = 0\n[Log]"))
            agent.process.send_signal(signal.SIGHUP)
            await wait_for_text(agent.stderr_path, "keeping the running config", seconds=5)
            assert await outcome() == "hit"  # TtlSeconds = 0 was not applied either
            assert agent.process.returncode is None
            logged = (tmp_path / "logs" / "kmsagent.log").read_text()
            assert "keeping the running config" in logged  # the old sinks still write
        assert await stop(agent) == 0


async def test_vault_lease_duration_is_the_ttl_in_force_after_a_reload(tmp_path: Path, emulator: KmsEmulator) -> None:
    config_path = write_config(tmp_path, emulator.endpoint)
    original = config_path.read_text().replace("HttpPort = 0", "HttpPort = 0\nResponseType = 2")
    config_path.write_text(original)
    async with agent_process(["--config", str(config_path)], AGENT_ENV, tmp_path) as agent:
        async with httpx.AsyncClient(headers={"X-KMS-Token": TOKEN}, timeout=10) as client:

            async def read() -> tuple[str, dict[str, object]]:
                response = await client.get(agent.url("/v1/app/config"))
                return response.headers["x-kms-agent-cache"], response.json()

            (miss, first), (hit, second) = await read(), await read()
            assert (miss, hit) == ("miss", "hit") and first["request_id"] != second["request_id"]
            assert first["lease_duration"] == second["lease_duration"] == 300
            config_path.write_text(original.replace("[Log]", "[Cache]\nTtlSeconds = 60\n[Log]"))
            agent.process.send_signal(signal.SIGHUP)
            await wait_for_text(agent.stderr_path, "TtlSeconds 300 -> 60", seconds=5)
            outcome, third = await read()
            assert (outcome, third["lease_duration"]) == ("hit", 60)
        assert await stop(agent) == 0


async def test_kms_duration_is_the_call_alone_and_the_wait_for_a_slot_is_its_own_metric(
    emulator: KmsEmulator, autojump_clock: trio.testing.MockClock
) -> None:
    """100 loads at once through 8 slots from a KMS at 50 ms: the calls took 100 × 50 ms, and the
    queue, where the last ones waited 12 rounds, is the queue-wait histogram's (issue 17). The
    refresher plans with the call time too: none of the entries counts its wait."""
    names = [f"load/{i:03d}" for i in range(100)]
    for name in names:
        emulator.put_secret(name, f"value-of-{name}-Wq3v")
    emulator.inject(Fault(delay=0.05))
    metrics = Metrics()
    config = agent_config(emulator.endpoint)
    credentials = StaticCredentials(Credentials(AK_ID, AK_SECRET), "test")
    observers = {"observe": metrics.observe_kms, "observe_wait": metrics.observe_kms_wait}
    async with KmsClient.open(config.kms, credentials, **observers) as kms, trio.open_nursery() as nursery:
        cache: SecretCache = SecretCache(max_entries=1000, ttl=300, loads=nursery)
        store = SecretStore(cache, kms, response_format(0, region="cn-hangzhou", lease_seconds=lambda: 300))
        async with trio.open_nursery() as readers:
            for name in names:
                readers.start_soon(store.get, SecretQuery(name, "", "ACSCurrent"))
        entries = [cache.peek(SecretQuery(name, "", "ACSCurrent").cache_key) for name in names]
        load_seconds = [entry.load_seconds for entry in entries if entry is not None]
        nursery.cancel_scope.cancel()
    after = samples(metrics.render().decode())
    assert after[("kmsagent_kms_request_duration_seconds_count", ())] == 100
    assert 4.99 < after[("kmsagent_kms_request_duration_seconds_sum", ())] < 5.5  # 100 × 50 ms
    # Rounds of 8: the k-th waited k × 50 ms; 8 × 50 ms × (0 + 1 + … + 11) + 4 × 12 × 50 ms = 28.8 s.
    assert after[("kmsagent_kms_queue_wait_seconds_count", ())] == 100
    assert 28.79 < after[("kmsagent_kms_queue_wait_seconds_sum", ())] < 30
    assert len(load_seconds) == 100 and max(load_seconds) < 0.06
    emulator.clear_faults()
