"""`--dev`: the agent against an embedded KMS emulator, with demo secrets, keys and token.

With `[Credentials] Type = "ecs_ram_role"` an embedded metadata service stands in for the ECS
instance's RAM role too, so the credential task renews real (emulated) STS credentials; with
`"ram_role_arn"` an embedded STS grants the config's RoleArn to the demo keys; with
`"credentials_uri"` an embedded credentials URI serves them.

The token is the environment's when one of `SSRFEnvVariables` is set (SPEC §1: a `KMS_TOKEN`
already set is the token; a value or `file://`, as in a normal run), else a fresh one. A fresh
token exists only in this process and opens nothing but its demo secrets, so the curl line prints
it; a token from the environment may be a real one, so the line names its variable or file.
"""

from __future__ import annotations

import re
import secrets
import shlex
import tomllib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import trio

from kmsagent.agent import run_agent, start_service
from kmsagent.config import Config, ConfigError, CredentialsConfig
from kmsagent.credentials import Credentials, CredentialSource, StaticCredentials
from kmsagent.credentials.ecs_role import EcsRamRoleCredentials
from kmsagent.credentials.sts import AssumeRoleSession, RoleRequest, StsEndpoint
from kmsagent.credentials.uri import UriCredentials
from kmsagent.emulator import CredentialsUriEmulator, KmsEmulator, MetadataEmulator, StsEmulator
from kmsagent.token import TokenSource

DEMO_SECRETS_FILE = "dev-secrets.toml"


@dataclass(frozen=True)
class DevSession:
    """What the CLI prints once the dev agent listens."""

    port: int
    secret_names: list[str]


def find_demo_secrets(config_path: str | None) -> Path:
    """`conf/dev-secrets.toml` beside the config file, in the working folder, or in the checkout."""
    candidates = [Path("conf") / DEMO_SECRETS_FILE, Path(__file__).parents[2] / "conf" / DEMO_SECRETS_FILE]
    if config_path:
        candidates.insert(0, Path(config_path).parent / DEMO_SECRETS_FILE)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"--dev: no {DEMO_SECRETS_FILE} found (looked in {', '.join(map(str, candidates))})")


def load_demo_secrets(path: Path) -> dict[str, str]:
    """Secret name → text, from `[[secret]]` tables with `name` and `data`."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
        demo = {str(item["name"]): str(item["data"]) for item in document["secret"]}
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError) as error:
        raise ConfigError(f"{path}: not a demo secrets file ({type(error).__name__})") from None
    if not demo:
        raise ConfigError(f"{path}: no [[secret]] entries")
    return demo


def dev_token(header: str, names: Sequence[str], env: Mapping[str, str]) -> tuple[TokenSource, str]:
    """The token source, and the curl `-H` argument (quoted for a POSIX shell) that sends its
    token in `header`."""
    for name in names:
        value = env.get(name)
        if value is None:
            continue
        source = TokenSource.from_environment(names, env)  # TokenError (exit 1) as in a normal run
        quoted = re.sub(r'([$`"\\])', r"\\\1", header)  # for inside "..."
        if value.startswith("file://"):
            return source, f'"{quoted}: $(cat {shlex.quote(value.removeprefix("file://"))})"'
        return source, f'"{quoted}: ${{{name}}}"'
    token = secrets.token_urlsafe(24)
    return TokenSource(token.encode()), shlex.quote(f"{header}: {token}")


async def run_dev(
    config: Config,
    demo_secrets: dict[str, str],
    *,
    token: TokenSource,
    shutdown: Callable[[], Awaitable[object]],
    task_status: trio.TaskStatus[DevSession] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Runs the emulator and the agent in one nursery until `shutdown()` returns."""
    emulator = KmsEmulator(region=config.kms.region)
    for name, data in demo_secrets.items():
        emulator.put_secret(name, data)
    async with trio.open_nursery() as nursery:
        kms_port = await nursery.start(emulator.serve)
        dev_config = replace(config, kms=replace(config.kms, endpoint=f"127.0.0.1:{kms_port}", protocol="http"))
        agent = partial(
            run_agent,
            dev_config,
            token=token,
            credentials=await _dev_credentials(config.credentials, emulator, nursery),
            shutdown=shutdown,
        )
        port = await start_service(nursery, agent)
        task_status.started(DevSession(port, list(demo_secrets)))


async def _dev_credentials(
    config: CredentialsConfig, emulator: KmsEmulator, nursery: trio.Nursery
) -> CredentialSource:
    """Demo keys; or the RAM role of an embedded metadata service, an embedded credentials URI, or
    an AssumeRole session of the config's role at an embedded STS, signed with the demo keys."""
    if config.type == "ecs_ram_role":
        metadata = MetadataEmulator(emulator)
        await nursery.start(metadata.serve)
        return EcsRamRoleCredentials(replace(config, metadata_endpoint=str(metadata.endpoint)))
    if config.type == "credentials_uri":
        uri = CredentialsUriEmulator(emulator)
        await nursery.start(uri.serve)
        return UriCredentials(str(uri.uri), renew_before=config.renew_before_seconds)
    credentials = Credentials(f"LTAIdev{secrets.token_hex(8)}", secrets.token_urlsafe(24))
    emulator.add_credentials(credentials.access_key_id, credentials.access_key_secret)
    demo = StaticCredentials(credentials, "static demo keys (--dev)")
    if config.type == "ram_role_arn":
        sts = StsEmulator(emulator)
        sts.add_role(config.role_arn, max_session_duration=43200)
        port = await nursery.start(sts.serve)
        request = RoleRequest(
            config.role_arn, config.role_session_name, config.duration_seconds, config.external_id, config.policy
        )
        endpoint = StsEndpoint(f"127.0.0.1:{port}", "http")
        return AssumeRoleSession(demo, request, endpoint, renew_before=config.renew_before_seconds)
    return demo
