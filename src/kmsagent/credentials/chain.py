"""Which credential source `[Credentials] Type` selects; `auto` is the SDK's default chain (SPEC §6).

`auto` takes the first source that is there, in alibabacloud-credentials'
`DefaultCredentialsProvider` order: environment AccessKey → OIDC role (all three variables set)
→ the Aliyun CLI's config.json → the SDK's credentials.ini → the ECS RAM role (only when the
metadata service answers within PROBE_WAIT) → a credentials URI. It logs which source won and
why each earlier one was passed over; none there raises CredentialsUnavailable naming them all
(exit 1), where the agent used to retry 100.100.100.200 for ever on a laptop.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import trio
from loguru import logger

from kmsagent.config import CredentialsConfig
from kmsagent.credentials.base import CredentialSource, CredentialsUnavailable, from_environment
from kmsagent.credentials.ecs_role import PROBE_WAIT, EcsRamRoleCredentials, probe
from kmsagent.credentials.oidc import ENVIRONMENT as OIDC_ENVIRONMENT
from kmsagent.credentials.oidc import OidcRoleCredentials
from kmsagent.credentials.profiles import (
    Defaults,
    EcsSpec,
    Loaded,
    OidcSpec,
    ProfileCredentials,
    ProfileError,
    RoleSpec,
    Spec,
    StaticSpec,
    load,
    parse_cli_config,
    parse_credentials_ini,
    static_source,
)
from kmsagent.credentials.sts import AssumeRoleSession, RoleRequest, StsEndpoint
from kmsagent.credentials.uri import ENVIRONMENT as URI_ENVIRONMENT
from kmsagent.credentials.uri import UriCredentials

Clock = Callable[[], float]


def _enabled(env: Mapping[str, str], name: str) -> bool:
    """The SDK's reading of its `..._DISABLED` switches: the word "true", any case."""
    return env.get(name, "").strip().lower() == "true"


@dataclass(frozen=True)
class _Chain:
    """What building any source needs: the settings, the environment, the region, the clock."""

    config: CredentialsConfig
    env: Mapping[str, str]
    region: str
    clock: Clock

    # --- the files --------------------------------------------------------------------------

    def home(self) -> Path:
        return Path(self.env.get("HOME") or os.path.expanduser("~"))

    def cli_path(self) -> Path:
        return (
            Path(self.config.cli_config_path)
            if self.config.cli_config_path
            else self.home() / ".aliyun" / "config.json"
        )

    def ini_path(self) -> Path:
        given = self.config.credentials_file or self.env.get("ALIBABA_CLOUD_CREDENTIALS_FILE", "").strip()
        return Path(given) if given else self.home() / ".alibabacloud" / "credentials.ini"

    def profile(self) -> str:
        return self.config.profile or self.env.get("ALIBABA_CLOUD_PROFILE", "").strip()

    def defaults(self) -> Defaults:
        return Defaults(self.config.role_session_name, self.config.duration_seconds)

    def parse_cli(self, raw: bytes) -> tuple[str, Spec]:
        return parse_cli_config(raw, self.cli_path(), self.profile(), self.defaults())

    def parse_ini(self, raw: bytes) -> tuple[str, Spec]:
        return parse_credentials_ini(raw, self.ini_path(), self.profile(), self.defaults())

    def load_cli(self) -> Loaded:
        return load(self.cli_path(), self.parse_cli)

    def load_ini(self) -> Loaded:
        return load(self.ini_path(), self.parse_ini)

    def cli_source(self, loaded: Loaded) -> ProfileCredentials:
        return ProfileCredentials(self.cli_path(), loaded, self.parse_cli, self.build, what="cli_profile")

    def ini_source(self, loaded: Loaded) -> ProfileCredentials:
        return ProfileCredentials(self.ini_path(), loaded, self.parse_ini, self.build, what="credentials_file")

    # --- building ---------------------------------------------------------------------------

    def sts_endpoint(self, profile_region: str = "", vpc: bool | None = None) -> StsEndpoint:
        config = self.config
        return StsEndpoint.of(
            config.sts_endpoint,
            config.sts_protocol,
            region=self.region,
            env=self.env,
            profile_region=profile_region,
            vpc=vpc,
        )

    def build(self, spec: Spec) -> CredentialSource:
        """The source a profile's spec describes."""
        if isinstance(spec, StaticSpec):
            return static_source(spec, "sts (profile)" if spec.security_token else "access_key (profile)")
        if isinstance(spec, RoleSpec):
            return self.session(self.build(spec.source), spec.request, self.sts_endpoint(spec.sts_region, spec.vpc))
        if isinstance(spec, EcsSpec):
            return self.ecs_role(spec.role_name)
        assert isinstance(spec, OidcSpec)
        return OidcRoleCredentials.from_profile(
            role_arn=spec.role_arn,
            provider_arn=spec.provider_arn,
            token_file=spec.token_file,
            session_name=spec.session_name,
            duration_seconds=spec.duration_seconds,
            policy=spec.policy,
            sts_endpoint="" if spec.sts_region else self.config.sts_endpoint,
            sts_region=spec.sts_region or self.env.get("ALIBABA_CLOUD_STS_REGION", "").strip() or self.region,
        )

    def session(self, source: CredentialSource, request: RoleRequest, endpoint: StsEndpoint) -> AssumeRoleSession:
        return AssumeRoleSession(
            source, request, endpoint, renew_before=self.config.renew_before_seconds, clock=self.clock, owns_source=True
        )

    def ecs_role(self, role_name: str = "") -> EcsRamRoleCredentials:
        role = role_name or self.config.role_name or self.env.get("ALIBABA_CLOUD_ECS_METADATA", "").strip()
        return EcsRamRoleCredentials(self.config, clock=self.clock, role_name=role)

    def oidc(self) -> OidcRoleCredentials:
        return OidcRoleCredentials.from_environment(
            self.env, sts_endpoint=self.config.sts_endpoint, sts_region=self.region
        )

    def uri(self) -> UriCredentials | None:
        if self.config.credentials_uri:
            return UriCredentials(
                self.config.credentials_uri, renew_before=self.config.renew_before_seconds, clock=self.clock
            )
        given = self.env.get(URI_ENVIRONMENT, "").strip()
        if not given:
            return None
        return UriCredentials(
            given, renew_before=self.config.renew_before_seconds, clock=self.clock, origin=URI_ENVIRONMENT
        )

    def role_request(self) -> RoleRequest:
        config = self.config
        return RoleRequest(
            config.role_arn, config.role_session_name, config.duration_seconds, config.external_id, config.policy
        )


# --- the explicit types -----------------------------------------------------------------------------


def _from_environment(kind: str, env: Mapping[str, str]) -> CredentialSource:
    source = from_environment(env)
    if kind == "sts" and (source is None or not source.kind.startswith("sts")):
        raise CredentialsUnavailable(
            'Type = "sts" needs ALIBABA_CLOUD_ACCESS_KEY_ID, ALIBABA_CLOUD_ACCESS_KEY_SECRET '
            "and ALIBABA_CLOUD_SECURITY_TOKEN in the environment"
        )
    if source is None:
        raise CredentialsUnavailable(
            'Type = "access_key" needs ALIBABA_CLOUD_ACCESS_KEY_ID and ALIBABA_CLOUD_ACCESS_KEY_SECRET '
            "in the environment"
        )
    return source


def _loaded(kind: str, loader: Callable[[], Loaded]) -> Loaded:
    try:
        return loader()
    except ProfileError as error:
        raise CredentialsUnavailable(f'Type = "{kind}": {error}') from None


def check_credentials(config: CredentialsConfig, env: Mapping[str, str], *, region: str = "cn-hangzhou") -> None:
    """The checks `--check-config` can make without the network: variables, files, profiles.

    Blocking (files are read); raises CredentialsUnavailable. `auto` passes: a missing source
    only moves it on to the next one.
    """
    chain = _Chain(config, env, region, time.time)
    _check(chain, config.type)


def _check(chain: _Chain, kind: str) -> None:
    if kind in ("access_key", "sts"):
        _from_environment(kind, chain.env)
    elif kind == "oidc_role_arn" and not all(chain.env.get(name) for name in OIDC_ENVIRONMENT):
        raise CredentialsUnavailable(f"Type = \"oidc_role_arn\" needs {', '.join(OIDC_ENVIRONMENT)}")
    elif kind == "cli_profile":
        _loaded(kind, chain.load_cli)
    elif kind == "credentials_file":
        _loaded(kind, chain.load_ini)
    elif kind == "credentials_uri" and chain.uri() is None:
        raise CredentialsUnavailable(f'Type = "credentials_uri" needs CredentialsUri or {URI_ENVIRONMENT}')
    elif kind == "ram_role_arn":
        _check(chain, chain.config.source_type)


async def credential_source(
    config: CredentialsConfig,
    env: Mapping[str, str],
    *,
    region: str = "cn-hangzhou",
    clock: Clock = time.time,
    probe_wait: float = PROBE_WAIT,
) -> CredentialSource:
    """The source `config.type` names, set up (files read, `auto` probed); not yet running.

    `region` is the [KMS] Region, the default STS region. Raises CredentialsUnavailable.
    """
    chain = _Chain(config, env, region, clock)
    kind = config.type
    if kind == "ram_role_arn":
        source = await _source(chain, config.source_type, probe_wait)
        session = chain.session(source, chain.role_request(), chain.sts_endpoint())
        logger.info("credentials: {}", session.kind)
        return session
    return await _source(chain, kind, probe_wait)


async def _source(chain: _Chain, kind: str, probe_wait: float) -> CredentialSource:
    if kind == "auto":
        return await _auto(chain, probe_wait)
    if kind in ("access_key", "sts"):
        return _from_environment(kind, chain.env)
    if kind == "oidc_role_arn":
        return chain.oidc()
    if kind == "ecs_ram_role":
        return chain.ecs_role()
    if kind == "cli_profile":
        return chain.cli_source(await _load(kind, chain.load_cli))
    if kind == "credentials_file":
        return chain.ini_source(await _load(kind, chain.load_ini))
    if kind == "credentials_uri":
        source = chain.uri()
        if source is None:
            raise CredentialsUnavailable(f'Type = "credentials_uri" needs CredentialsUri or {URI_ENVIRONMENT}')
        return source
    raise CredentialsUnavailable(f"Type = {kind!r} is not a credential source")


async def _load(kind: str, loader: Callable[[], Loaded]) -> Loaded:
    """`loader` run in a worker thread (it reads a file)."""
    try:
        return await trio.to_thread.run_sync(loader)
    except ProfileError as error:
        raise CredentialsUnavailable(f'Type = "{kind}": {error}') from None


async def _auto(chain: _Chain, probe_wait: float) -> CredentialSource:
    """The SDK's default chain; each source passed over is named with the reason."""
    env = chain.env
    passed: list[str] = []

    def chosen(source: CredentialSource) -> CredentialSource:
        skipped = f"; passed over: {'; '.join(passed)}" if passed else ""
        logger.info("credentials: auto chose {}{}", source.kind, skipped)
        return source

    source = from_environment(env)
    if source is not None:
        return chosen(source)
    passed.append("environment (ALIBABA_CLOUD_ACCESS_KEY_ID and ALIBABA_CLOUD_ACCESS_KEY_SECRET not set)")

    if all(env.get(name) for name in OIDC_ENVIRONMENT):
        return chosen(chain.oidc())
    passed.append(f"oidc_role_arn ({', '.join(OIDC_ENVIRONMENT)} not all set)")

    if _enabled(env, "ALIBABA_CLOUD_CLI_PROFILE_DISABLED"):
        passed.append("cli_profile (ALIBABA_CLOUD_CLI_PROFILE_DISABLED=true)")
    else:
        try:
            return chosen(chain.cli_source(await trio.to_thread.run_sync(chain.load_cli)))
        except ProfileError as error:
            passed.append(f"cli_profile ({error})")

    try:
        return chosen(chain.ini_source(await trio.to_thread.run_sync(chain.load_ini)))
    except ProfileError as error:
        passed.append(f"credentials_file ({error})")

    if _enabled(env, "ALIBABA_CLOUD_ECS_METADATA_DISABLED"):
        passed.append("ecs_ram_role (ALIBABA_CLOUD_ECS_METADATA_DISABLED=true)")
    else:
        ecs = chain.ecs_role()
        role_name = chain.config.role_name or env.get("ALIBABA_CLOUD_ECS_METADATA", "").strip()
        absent, role = await probe(chain.config, role_name=role_name, wait=probe_wait)
        if absent is None:
            ecs.kind = f"ecs_ram_role ({role} via {chain.config.metadata_endpoint})"
            return chosen(ecs)
        passed.append(f"ecs_ram_role ({absent})")

    try:
        uri = chain.uri()
    except CredentialsUnavailable as error:
        passed.append(f"credentials_uri ({error})")
    else:
        if uri is not None:
            return chosen(uri)
        passed.append(f"credentials_uri (neither CredentialsUri nor {URI_ENVIRONMENT} set)")

    raise CredentialsUnavailable(f"no credentials found; tried: {'; '.join(passed)}")
