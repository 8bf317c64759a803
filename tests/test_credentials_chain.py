"""`auto`: the SDK's default chain in order (an earlier source wins), its switches, the metadata
probe, and exit 1 naming every source tried when none is there (issue 11: a laptop retried
100.100.100.200 for ever). Explicit types without their variables or files, `--check-config`."""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from conftest import AK_ID, AK_SECRET, SECRETS, TOKEN
from kmsagent.config import CredentialsConfig
from kmsagent.credentials import CredentialsUnavailable, check_credentials, credential_source
from kmsagent.credentials.oidc import OidcRoleCredentials
from kmsagent.emulator import CredentialsUriEmulator, KmsEmulator, MetadataEmulator
from test_cli import BASE_ENV, ROOT, agent_process, stop, write_config

OIDC_ENV = {
    "ALIBABA_CLOUD_ROLE_ARN": "acs:ram::1:role/r",
    "ALIBABA_CLOUD_OIDC_PROVIDER_ARN": "acs:ram::1:oidc-provider/p",
    "ALIBABA_CLOUD_OIDC_TOKEN_FILE": "/var/run/secrets/token",
}
AK_ENV = {"ALIBABA_CLOUD_ACCESS_KEY_ID": AK_ID, "ALIBABA_CLOUD_ACCESS_KEY_SECRET": AK_SECRET}
SOURCES = [
    "access_key (environment)",
    "oidc_role_arn",
    "cli_profile",
    "credentials_file",
    "ecs_ram_role",
    "credentials_uri",
]


@pytest.fixture
async def silent_endpoint(nursery: trio.Nursery) -> str:
    """An http:// endpoint that accepts connections and never answers (a metadata service that is not there)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    held: list[trio.SocketStream] = []

    async def hold(stream: trio.SocketStream) -> None:
        held.append(stream)
        await trio.sleep_forever()

    nursery.start_soon(trio.serve_listeners, hold, listeners)
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"


@pytest.fixture
async def everything(
    tmp_path: Path, nursery: trio.Nursery, emulator: KmsEmulator
) -> tuple[dict[str, str], CredentialsConfig]:
    """Every source of the chain there at once: an environment and a config."""
    home = tmp_path / "home"
    (home / ".aliyun").mkdir(parents=True)
    (home / ".aliyun" / "config.json").write_text(
        json.dumps(
            {
                "current": "default",
                "profiles": [
                    {"name": "default", "mode": "AK", "access_key_id": "LTAIcli", "access_key_secret": "cli-sk"}
                ],
            }
        )
    )
    (home / ".alibabacloud").mkdir()
    (home / ".alibabacloud" / "credentials.ini").write_text(
        "[default]\ntype = access_key\naccess_key_id = LTAIini\naccess_key_secret = ini-sk\n"
    )
    metadata = MetadataEmulator(emulator)
    await nursery.start(metadata.serve)
    uri = CredentialsUriEmulator(emulator)
    await nursery.start(uri.serve)
    env = {"HOME": str(home), **AK_ENV, **OIDC_ENV, "ALIBABA_CLOUD_CREDENTIALS_URI": str(uri.uri)}
    return env, CredentialsConfig(metadata_endpoint=str(metadata.endpoint))


def take_away(env: dict[str, str], count: int) -> dict[str, str]:
    """`env` without the first `count` sources of the chain."""
    env = dict(env)
    home = Path(env["HOME"])
    if count > 0:
        for name in AK_ENV:
            env.pop(name, None)
    if count > 1:
        env.pop("ALIBABA_CLOUD_OIDC_TOKEN_FILE", None)  # two of three set is not OIDC
    if count > 2:
        env["ALIBABA_CLOUD_CLI_PROFILE_DISABLED"] = "TRUE"
    if count > 3:
        (home / ".alibabacloud" / "credentials.ini").unlink(missing_ok=True)
    if count > 4:
        env["ALIBABA_CLOUD_ECS_METADATA_DISABLED"] = "true"
    if count > 5:
        del env["ALIBABA_CLOUD_CREDENTIALS_URI"]
    return env


@pytest.mark.parametrize("taken", range(len(SOURCES)), ids=SOURCES)
async def test_an_earlier_source_wins(
    everything: tuple[dict[str, str], CredentialsConfig], captured_logs: list[str], taken: int
) -> None:
    env, config = everything
    source = await credential_source(config, take_away(env, taken))
    assert source.kind.startswith(SOURCES[taken]), source.kind
    chosen = [line for line in captured_logs if "credentials: auto chose" in line]
    assert len(chosen) == 1 and SOURCES[taken] in chosen[0]
    passed_over = chosen[0].split("passed over:", 1)[1] if taken else ""
    for passed in ["environment", *SOURCES[1:]][:taken]:
        assert f"{passed} (" in passed_over


async def test_the_cli_file_can_be_named_and_the_ini_file_comes_from_its_variable(
    everything: tuple[dict[str, str], CredentialsConfig], tmp_path: Path
) -> None:
    env, config = everything
    env = take_away(env, 2)
    moved = tmp_path / "elsewhere.json"
    shutil.move(Path(env["HOME"]) / ".aliyun" / "config.json", moved)
    assert (await credential_source(config, env)).kind.startswith("credentials_file")  # no CLI file at home
    assert (await credential_source(replace(config, cli_config_path=str(moved)), env)).kind.startswith("cli_profile")
    ini = tmp_path / "named.ini"
    ini.write_text("[prod]\ntype = access_key\naccess_key_id = LTAIprod\naccess_key_secret = prod-sk\n")
    named = {**take_away(env, 3), "ALIBABA_CLOUD_CREDENTIALS_FILE": str(ini), "ALIBABA_CLOUD_PROFILE": "prod"}
    source = await credential_source(config, named)
    assert source.kind.startswith(f"credentials_file (profile 'prod' of {ini}")
    assert (await source.current()).access_key_id == "LTAIprod"


async def test_the_probe_names_the_role_the_metadata_service_listed(
    everything: tuple[dict[str, str], CredentialsConfig],
) -> None:
    env, config = everything
    source = await credential_source(config, take_away(env, 4))
    assert source.kind == f"ecs_ram_role (KmsAgentRole via {config.metadata_endpoint})"


async def test_no_source_there_names_every_source_tried(
    tmp_path: Path, silent_endpoint: str, autojump_clock: trio.testing.MockClock
) -> None:
    config = CredentialsConfig(metadata_endpoint=silent_endpoint)
    started = trio.current_time()
    with pytest.raises(CredentialsUnavailable) as caught:
        await credential_source(config, {"HOME": str(tmp_path)})
    assert trio.current_time() - started == pytest.approx(2.0, abs=0.1)  # the probe's bound, not for ever
    message = str(caught.value)
    assert "\n" not in message and message.startswith("no credentials found; tried: ")
    for part in (
        "environment (ALIBABA_CLOUD_ACCESS_KEY_ID and ALIBABA_CLOUD_ACCESS_KEY_SECRET not set)",
        (
            "oidc_role_arn (ALIBABA_CLOUD_ROLE_ARN, ALIBABA_CLOUD_OIDC_PROVIDER_ARN, ALIBABA_CLOUD_OIDC_TOKEN_FILE "
            "not all set)"
        ),
        f"cli_profile ({tmp_path}/.aliyun/config.json: not found)",
        f"credentials_file ({tmp_path}/.alibabacloud/credentials.ini: not found)",
        f"ecs_ram_role ({silent_endpoint} did not answer within 2 s (not an ECS instance))",
        "credentials_uri (neither CredentialsUri nor ALIBABA_CLOUD_CREDENTIALS_URI set)",
    ):
        assert part in message


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"ALIBABA_CLOUD_CLI_PROFILE_DISABLED": "true", "ALIBABA_CLOUD_ECS_METADATA_DISABLED": "true"}, "=true"),
        (
            {"ALIBABA_CLOUD_CREDENTIALS_URI": "http://10.1.1.1/c"},
            "ALIBABA_CLOUD_CREDENTIALS_URI must be an https:// URL",
        ),
    ],
)
async def test_switches_and_a_bad_uri_are_named(tmp_path: Path, env: dict[str, str], reason: str) -> None:
    config = CredentialsConfig(metadata_endpoint="http://127.0.0.1:9")
    with pytest.raises(CredentialsUnavailable) as caught:
        await credential_source(config, {"HOME": str(tmp_path), "ALIBABA_CLOUD_ECS_METADATA_DISABLED": "true", **env})
    assert reason in str(caught.value)
    if "ALIBABA_CLOUD_CLI_PROFILE_DISABLED" in env:
        assert "cli_profile (ALIBABA_CLOUD_CLI_PROFILE_DISABLED=true)" in str(caught.value)
        assert "ecs_ram_role (ALIBABA_CLOUD_ECS_METADATA_DISABLED=true)" in str(caught.value)


async def test_a_refused_metadata_endpoint_is_not_there(tmp_path: Path) -> None:
    config = CredentialsConfig(metadata_endpoint="http://127.0.0.1:9")
    with pytest.raises(
        CredentialsUnavailable, match=r"ecs_ram_role \(http://127.0.0.1:9 cannot be reached \(ConnectError\)\)"
    ):
        await credential_source(config, {"HOME": str(tmp_path)})


async def test_a_metadata_service_without_a_role_is_not_there(
    tmp_path: Path, emulator: KmsEmulator, nursery: trio.Nursery
) -> None:
    metadata = MetadataEmulator(emulator, role="")
    await nursery.start(metadata.serve)
    config = CredentialsConfig(metadata_endpoint=str(metadata.endpoint))
    with pytest.raises(CredentialsUnavailable, match="no RAM role is attached to this instance"):
        await credential_source(config, {"HOME": str(tmp_path)})


# --- explicit types ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "env", "expected"),
    [
        ("access_key", AK_ENV, "access_key (environment)"),
        ("sts", {**AK_ENV, "ALIBABA_CLOUD_SECURITY_TOKEN": "t"}, "sts (environment)"),
        ("ecs_ram_role", AK_ENV, "ecs_ram_role (role to be discovered via"),
        ("ecs_ram_role", {"ALIBABA_CLOUD_ECS_METADATA": "EnvRole"}, "ecs_ram_role (EnvRole via"),
        ("oidc_role_arn", {**AK_ENV, **OIDC_ENV}, OidcRoleCredentials.kind),
    ],
)
async def test_an_explicit_type_is_that_source(kind: str, env: dict[str, str], expected: str) -> None:
    source = await credential_source(CredentialsConfig(type=kind, metadata_endpoint="http://127.0.0.1:9"), env)
    assert source.kind.startswith(expected)


@pytest.mark.parametrize(
    ("kind", "env", "named"),
    [
        ("access_key", {}, "ALIBABA_CLOUD_ACCESS_KEY_ID"),
        ("sts", AK_ENV, "ALIBABA_CLOUD_SECURITY_TOKEN"),
        ("oidc_role_arn", {"ALIBABA_CLOUD_ROLE_ARN": "r"}, "ALIBABA_CLOUD_OIDC_TOKEN_FILE"),
        ("credentials_uri", {}, "ALIBABA_CLOUD_CREDENTIALS_URI"),
    ],
)
async def test_an_explicit_type_without_its_variables_is_a_start_error(
    kind: str, env: dict[str, str], named: str
) -> None:
    config = CredentialsConfig(type=kind)
    with pytest.raises(CredentialsUnavailable, match=named):
        await credential_source(config, env)
    with pytest.raises(CredentialsUnavailable, match=named):
        check_credentials(config, env)


def test_check_credentials_follows_the_source_type_and_lets_auto_pass(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path)}
    check_credentials(CredentialsConfig(), env)
    check_credentials(CredentialsConfig(type="ecs_ram_role"), env)
    role = CredentialsConfig(type="ram_role_arn", role_arn="acs:ram::1:role/r", source_type="cli_profile")
    with pytest.raises(CredentialsUnavailable, match=r'Type = "cli_profile".*config\.json: not found'):
        check_credentials(role, env)


# --- the agent process ---------------------------------------------------------------------------


async def test_on_a_laptop_auto_exits_1_naming_every_source_within_seconds(
    tmp_path: Path, silent_endpoint: str
) -> None:
    """Issue 11: the agent retried 100.100.100.200 for ever and logged a role "discovered" before
    anything answered; the README promises exit 1."""
    config = write_config(tmp_path, "127.0.0.1:1").read_text().replace("http://127.0.0.1:9", silent_endpoint)
    (tmp_path / "laptop.toml").write_text(config)
    env = {**BASE_ENV, "HOME": str(tmp_path), "KMS_TOKEN": TOKEN}
    started = time.monotonic()
    with trio.fail_after(15):
        result = await trio.run_process(
            [sys.executable, "-m", "kmsagent", "--config", str(tmp_path / "laptop.toml")],
            env=env,
            cwd=tmp_path,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 1
    assert time.monotonic() - started < 10
    stderr = result.stderr.decode()
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("kmsagent: no credentials found; tried: environment (") and "Traceback" not in stderr
    for source in (
        "oidc_role_arn (",
        "cli_profile (",
        "credentials_file (",
        f"ecs_ram_role ({silent_endpoint} did not answer",
        "credentials_uri (",
    ):
        assert source in last
    assert b"listening" not in result.stdout and "role via" not in stderr


async def test_the_agent_serves_with_a_cli_profile(tmp_path: Path, emulator: KmsEmulator) -> None:
    home = tmp_path / "home"
    (home / ".aliyun").mkdir(parents=True)
    profile = {"name": "work", "mode": "AK", "access_key_id": AK_ID, "access_key_secret": AK_SECRET}
    (home / ".aliyun" / "config.json").write_text(json.dumps({"current": "work", "profiles": [profile]}))
    config = write_config(tmp_path, str(emulator.endpoint))
    env = {**BASE_ENV, "HOME": str(home), "KMS_TOKEN": TOKEN}
    async with agent_process(["--config", str(config)], env, tmp_path) as agent:
        async with httpx.AsyncClient(headers={"X-KMS-Token": TOKEN}, timeout=10) as client:
            response = await client.get(agent.url("/v1/api-key"))
        assert response.status_code == 200 and response.json()["SecretData"] == SECRETS["api-key"]
        assert await stop(agent) == 0
    stderr = agent.stderr_path.read_text()
    assert f"auto chose cli_profile (profile 'work' of {home}/.aliyun/config.json" in stderr
    assert AK_SECRET not in stderr


@pytest.mark.parametrize("kind", ["ram_role_arn", "credentials_uri"])
async def test_dev_mode_emulates_sts_and_the_credentials_uri(tmp_path: Path, kind: str) -> None:
    role = 'RoleArn = "acs:ram::1234567890123456:role/dev-reader"\n' if kind == "ram_role_arn" else ""
    (tmp_path / "dev.toml").write_text(
        f'[Server]\nHttpPort = 0\n[Credentials]\nType = "{kind}"\n{role}[Log]\nPath = "{tmp_path / "logs"}"\n'
    )
    shutil.copy(ROOT / "conf" / "dev-secrets.toml", tmp_path / "dev-secrets.toml")
    async with agent_process(["--dev", "--config", str(tmp_path / "dev.toml")], BASE_ENV, tmp_path, "curl ") as agent:
        curl_line = next(line for line in agent.stdout if "curl " in line)
        token = curl_line.split("X-KMS-Token: ", 1)[1].split("'", 1)[0]
        url = curl_line.rsplit(" ", 1)[1].strip("'")
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(url, headers={"X-KMS-Token": token})
        assert response.status_code == 200, response.text
        assert await stop(agent, signal.SIGINT) == 0
    assert f"credentials: {kind} (" in agent.stderr_path.read_text()

