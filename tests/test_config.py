"""SPEC §2: the config file's keys, types, ranges, error messages and the `--check-config` dump."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from kmsagent.config import (
    CacheConfig,
    Config,
    ConfigError,
    CredentialsConfig,
    ExecConfig,
    KmsConfig,
    LogConfig,
    ServerConfig,
    dump_config,
    load_config,
    parse_config,
)

SHIPPED_CONFIG = Path(__file__).resolve().parents[1] / "conf" / "kmsagent.toml"
SECTIONS = ["Server", "Cache", "KMS", "Credentials", "Log", "Exec"]


def parse_one(section: str, key: str, value: Any) -> Config:
    """Parses a document that sets just one key."""
    return parse_config({section: {key: value}})


def error_for(document: dict[str, Any]) -> str:
    """The ConfigError message for `document`, checked to be the single line the CLI prints."""
    with pytest.raises(ConfigError) as caught:
        parse_config(document)
    message = str(caught.value)
    assert "\n" not in message and "\r" not in message
    return message


def dumped_value(config: Config, section: str, key: str) -> Any:
    """What `dump_config` writes for one key: checks the key-to-field mapping without private names."""
    return tomllib.loads(dump_config(config))[section][key]


# --- Defaults and the shipped file ------------------------------------------------------------------


def test_defaults() -> None:
    assert load_config(None) == Config()
    assert parse_config({}) == Config()
    assert parse_config({name: {} for name in SECTIONS}) == Config()
    config = Config()
    assert (config.server.http_port, config.server.path_prefix) == (2025, "/v1/")
    assert config.kms.effective_endpoint == "kms.cn-hangzhou.aliyuncs.com"


def test_shipped_file_is_the_defaults_with_every_key() -> None:
    assert load_config(SHIPPED_CONFIG) == Config()
    shipped = tomllib.loads(SHIPPED_CONFIG.read_text(encoding="utf-8"))
    every_key = tomllib.loads(dump_config(Config()))
    assert {s: list(keys) for s, keys in shipped.items()} == {s: list(keys) for s, keys in every_key.items()}


def test_shipped_file_comments_every_key() -> None:
    for line in SHIPPED_CONFIG.read_text(encoding="utf-8").splitlines():
        if "=" in line and not line.startswith("#"):
            assert " # " in line, line


# --- dump_config -------------------------------------------------------------------------------------

ROUND_TRIP_CASES = {
    "defaults": Config(),
    "everything changed": Config(
        server=ServerConfig(
            http_port=0,
            max_conn=1,
            ssrf_headers=("X-Token", "!#$%&'*+-.^_`|~"),
            ssrf_env_variables=("_T",),
            path_prefix="/",
            response_type=2,
            ignore_transient_errors=False,
            bind_ipv6=True,
        ),
        cache=CacheConfig(cache_size=1, ttl_seconds=0, max_stale_seconds=31_536_000, prefetch=("a", "b/c")),
        kms=KmsConfig(
            region="ap-southeast-1",
            endpoint="[::1]:9000",
            protocol="http",
            connect_timeout_ms=1,
            read_timeout_ms=300_000,
            max_retries=0,
            max_concurrent_requests=100,
        ),
        credentials=CredentialsConfig(
            type="oidc_role_arn",
            role_name="my-role",
            metadata_endpoint="https://[fd00::1]:8443",
            disable_imdsv1=True,
            renew_before_seconds=43_200,
            role_arn="acs:ram::1234567890123456:role/kms-reader",
            role_session_name="agent@host-1",
            duration_seconds=43_200,
            external_id="abc:def/ghi",
            policy='{"Version": "1", "Statement": []}',
            source_type="cli_profile",
            sts_endpoint="[::1]:9001",
            sts_protocol="http",
            profile="prod profile",
            cli_config_path="/etc/aliyun/config.json",
            credentials_file="/etc/alibabacloud/credentials.ini",
            credentials_uri="http://169.254.170.2/v1/credentials?token=x",
            allowed_role_arns=("acs:ram::1:role/a", "acs:ram::2:role/b"),
        ),
        log=LogConfig(level="error", path="/var/log/kmsagent", max_file_size_mb=10_240, backups=0, format="text"),
    ),
    "strings that need escaping": Config(
        cache=CacheConfig(prefetch=('q"uote', "back\\slash", "new\nline\ttab\r\b\f", "del\x7f\x00", "é😀")),
        log=LogConfig(path="C:\\logs\\ünïcode 😀/"),
    ),
}


@pytest.mark.parametrize("config", ROUND_TRIP_CASES.values(), ids=ROUND_TRIP_CASES.keys())
def test_dump_round_trips(config: Config) -> None:
    assert parse_config(tomllib.loads(dump_config(config))) == config


def test_dump_writes_every_field_in_spec_order() -> None:
    text = dump_config(Config())
    assert re.findall(r"^\[(\w+)\]$", text, re.MULTILINE) == SECTIONS
    document = tomllib.loads(text)
    classes = [ServerConfig, CacheConfig, KmsConfig, CredentialsConfig, LogConfig, ExecConfig]
    for name, cls in zip(SECTIONS, classes, strict=True):
        assert len(document[name]) == len(dataclasses.fields(cls)), name
    assert list(document["Server"])[:3] == ["HttpPort", "MaxConn", "SSRFHeaders"]
    assert list(document["Log"]) == ["Level", "Path", "MaxFileSizeMB", "Backups", "Format"]


# --- Ranges and formats --------------------------------------------------------------------------------

# (section, key, lowest allowed, highest allowed) for every plain integer range.
INT_RANGES = [
    ("Server", "MaxConn", 1, 1000),
    ("Server", "ResponseType", 0, 2),
    ("Cache", "CacheSize", 1, 1000),
    ("Cache", "TtlSeconds", 0, 3600),
    ("Cache", "MaxStaleSeconds", 0, 31_536_000),
    ("KMS", "ConnectTimeoutMs", 1, 60_000),
    ("KMS", "ReadTimeoutMs", 1, 300_000),
    ("KMS", "MaxRetries", 0, 10),
    ("KMS", "MaxConcurrentRequests", 1, 100),
    ("Credentials", "RenewBeforeSeconds", 1, 43_200),
    ("Credentials", "DurationSeconds", 900, 43_200),
    ("Log", "MaxFileSizeMB", 1, 10_240),
    ("Log", "Backups", 0, 100),
]

#: Every [Credentials] Type, each a SourceType too.
CREDENTIAL_TYPES = (
    "auto", "ecs_ram_role", "access_key", "sts", "oidc_role_arn", "cli_profile", "credentials_file", "credentials_uri"
)

ACCEPTED: list[tuple[str, str, Any]] = [
    *((s, k, v) for s, k, low, high in INT_RANGES for v in (low, high)),
    ("Server", "HttpPort", 0),
    ("Server", "HttpPort", 1024),
    ("Server", "HttpPort", 65535),
    ("Server", "SSRFHeaders", ["A"]),
    ("Server", "SSRFHeaders", ["X-KMS-Token", "!#$%&'*+-.^_`|~09az"]),
    ("Server", "SSRFEnvVariables", ["_"]),
    ("Server", "SSRFEnvVariables", ["KMS_TOKEN", "a1_B2"]),
    ("Server", "PathPrefix", "/"),
    ("Server", "PathPrefix", "/secrets/v1/"),
    ("Server", "IgnoreTransientErrors", False),
    ("Server", "BindIPv6", True),
    ("Cache", "Prefetch", []),
    ("Cache", "Prefetch", ["a"]),
    ("Cache", "Prefetch", ["x" * 1024, "é" * 512, "path/like name"]),
    ("KMS", "Region", "ap-southeast-1"),
    ("KMS", "Endpoint", ""),
    ("KMS", "Endpoint", "kms-vpc.cn-hangzhou.aliyuncs.com"),
    ("KMS", "Endpoint", "kst-hzz1234.cryptoservice.kms.aliyuncs.com:1"),
    ("KMS", "Endpoint", "10.0.0.1:65535"),
    ("KMS", "Endpoint", "[fd00::1]:443"),
    ("KMS", "Endpoint", "[::1]"),
    ("KMS", "Protocol", "https"),
    ("KMS", "CaFilePath", ""),
    *(("Credentials", "Type", t) for t in CREDENTIAL_TYPES),
    ("Credentials", "RoleArn", ""),
    ("Credentials", "RoleArn", "acs:ram::1234567890123456:role/KmsReader.prod_1@x-y"),
    ("Credentials", "RoleSessionName", "ab"),
    ("Credentials", "RoleSessionName", "kms.agent_1@host-2"),
    ("Credentials", "RoleSessionName", "s" * 64),
    ("Credentials", "ExternalId", ""),
    ("Credentials", "ExternalId", "ab"),
    ("Credentials", "ExternalId", "id+=,.@:/-_9" + "x" * 1212),
    ("Credentials", "Policy", ""),
    (
        "Credentials",
        "Policy",
        '{"Version": "1", "Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}]}',
    ),
    *(("Credentials", "SourceType", t) for t in CREDENTIAL_TYPES),
    ("Credentials", "StsEndpoint", ""),
    ("Credentials", "StsEndpoint", "sts-vpc.cn-shanghai.aliyuncs.com"),
    ("Credentials", "StsEndpoint", "127.0.0.1:8443"),
    ("Credentials", "StsProtocol", "https"),
    ("Credentials", "Profile", ""),
    ("Credentials", "Profile", "my profile.1"),
    ("Credentials", "CliConfigPath", ""),
    ("Credentials", "CliConfigPath", "/home/app/.aliyun/config.json"),
    ("Credentials", "CredentialsFile", "relative/credentials.ini"),
    ("Credentials", "CredentialsUri", ""),
    ("Credentials", "CredentialsUri", "https://credentials.example/v1?token=abc"),
    ("Credentials", "CredentialsUri", "http://127.0.0.1:8080/credentials"),
    ("Credentials", "CredentialsUri", "http://localhost/c"),
    ("Credentials", "CredentialsUri", "http://[::1]:9/c"),
    ("Credentials", "CredentialsUri", "http://169.254.170.2/v2/credentials"),
    ("Credentials", "CredentialsUri", "http://[fe80::1]/c"),
    ("Credentials", "AllowedRoleArns", []),
    ("Credentials", "AllowedRoleArns", ["acs:ram::1:role/a", "acs:ram::1:role/b"]),
    ("Credentials", "RoleName", ""),
    ("Credentials", "RoleName", "KmsAgent.Role_1@prod-x"),
    ("Credentials", "RoleName", "r" * 64),
    ("Credentials", "MetadataEndpoint", "http://100.100.100.200"),
    ("Credentials", "MetadataEndpoint", "https://metadata.example:8443"),
    ("Credentials", "MetadataEndpoint", "http://[fd00::1]:80"),
    ("Credentials", "DisableIMDSv1", True),
    *(("Log", "Level", level) for level in ("debug", "info", "warn", "error")),
    ("Log", "Path", "/var/log/kmsagent"),
    ("Log", "Path", ""),  # stderr only
    ("Log", "Format", "text"),
]

REJECTED: list[tuple[str, str, Any]] = [
    *((s, k, v) for s, k, low, high in INT_RANGES for v in (low - 1, high + 1)),
    ("Server", "HttpPort", -1),
    ("Server", "HttpPort", 1),
    ("Server", "HttpPort", 1023),
    ("Server", "HttpPort", 65536),
    ("Server", "SSRFHeaders", []),
    ("Server", "SSRFHeaders", [""]),
    ("Server", "SSRFHeaders", ["X KMS Token"]),
    ("Server", "SSRFHeaders", ["X-Token:"]),
    ("Server", "SSRFHeaders", ["X-Token", "x-token"]),
    ("Server", "SSRFEnvVariables", []),
    ("Server", "SSRFEnvVariables", [""]),
    ("Server", "SSRFEnvVariables", ["1TOKEN"]),
    ("Server", "SSRFEnvVariables", ["KMS-TOKEN"]),
    ("Server", "PathPrefix", ""),
    ("Server", "PathPrefix", "v1/"),
    ("Server", "PathPrefix", "/v1"),
    *(("Server", "PathPrefix", f"/v{c}1/") for c in ("?", "#", "%", " ", "\t", "\x00")),
    ("Cache", "Prefetch", [""]),
    ("Cache", "Prefetch", ["x" * 1025]),
    ("Cache", "Prefetch", ["é" * 512 + "x"]),
    ("KMS", "Region", ""),
    ("KMS", "Region", "CN-HANGZHOU"),
    ("KMS", "Region", "cn_hangzhou"),
    ("KMS", "Endpoint", "https://kms.cn-hangzhou.aliyuncs.com"),
    ("KMS", "Endpoint", "kms.cn-hangzhou.aliyuncs.com/path"),
    ("KMS", "Endpoint", "host:0"),
    ("KMS", "Endpoint", "host:65536"),
    ("KMS", "Endpoint", "host:"),
    ("KMS", "Endpoint", "::1"),
    ("KMS", "Endpoint", "[::1"),
    ("KMS", "Endpoint", "[not-ipv6]:80"),
    ("KMS", "Endpoint", "-bad.example"),
    ("KMS", "Endpoint", "999.0.0.1"),
    ("KMS", "Endpoint", "a host"),
    ("KMS", "Protocol", "HTTPS"),
    ("KMS", "Protocol", "ftp"),
    ("Credentials", "Type", "AUTO"),
    ("Credentials", "RoleName", "../../meta-data"),  # it becomes a path segment of the metadata URL
    ("Credentials", "RoleName", "role name"),
    ("Credentials", "RoleName", "r" * 65),
    ("Credentials", "Type", "RAM_ROLE_ARN"),
    ("Credentials", "RoleArn", "acs:ram::1:role/"),
    ("Credentials", "RoleArn", "acs:ram::x1:role/r"),
    ("Credentials", "RoleArn", "acs:ram:cn-hangzhou:1:role/r"),
    ("Credentials", "RoleArn", "acs:ram::1:user/r"),
    ("Credentials", "RoleArn", "acs:ram::1:role/a b"),
    ("Credentials", "RoleSessionName", ""),
    ("Credentials", "RoleSessionName", "a"),
    ("Credentials", "RoleSessionName", "s" * 65),
    ("Credentials", "RoleSessionName", "has space"),
    ("Credentials", "ExternalId", "a"),
    ("Credentials", "ExternalId", "x" * 1225),
    ("Credentials", "ExternalId", "bad id"),
    ("Credentials", "Policy", "not json"),
    ("Credentials", "Policy", "[]"),
    ("Credentials", "Policy", '{"a": "' + "x" * 8200 + '"}'),
    ("Credentials", "SourceType", "ram_role_arn"),
    ("Credentials", "SourceType", "AUTO"),
    ("Credentials", "StsEndpoint", "https://sts.aliyuncs.com"),
    ("Credentials", "StsEndpoint", "sts.aliyuncs.com/x"),
    ("Credentials", "StsProtocol", "ftp"),
    ("Credentials", "Profile", "bad\nname"),
    ("Credentials", "Profile", "p" * 129),
    ("Credentials", "CliConfigPath", "/tmp/a\x00b"),  # noqa: S108 - refused (a NUL), never opened
    ("Credentials", "CredentialsUri", "http://10.0.0.1/credentials"),
    ("Credentials", "CredentialsUri", "http://100.100.100.200/credentials"),
    ("Credentials", "CredentialsUri", "http://credentials.example/c"),
    ("Credentials", "CredentialsUri", "ftp://127.0.0.1/c"),
    ("Credentials", "CredentialsUri", "https://user:pass@credentials.example/c"),
    ("Credentials", "CredentialsUri", "https://credentials.example/c#frag"),
    ("Credentials", "CredentialsUri", "https:///c"),
    ("Credentials", "CredentialsUri", "127.0.0.1/c"),
    ("Credentials", "AllowedRoleArns", ["acs:ram::1:role/a", "acs:ram::1:role/A"]),
    ("Credentials", "AllowedRoleArns", ["arn:aws:iam::1:role/a"]),
    ("Credentials", "AllowedRoleArns", "acs:ram::1:role/a"),
    ("Credentials", "MetadataEndpoint", "100.100.100.200"),
    ("Credentials", "MetadataEndpoint", "ftp://100.100.100.200"),
    ("Credentials", "MetadataEndpoint", "http://"),
    ("Credentials", "MetadataEndpoint", "http://100.100.100.200/latest"),
    ("Credentials", "MetadataEndpoint", "http://100.100.100.200?x=1"),
    ("Credentials", "MetadataEndpoint", "http://user@100.100.100.200"),
    ("Log", "Level", "warning"),
    ("Log", "Level", "DEBUG"),
    ("Log", "Format", "yaml"),
]


def case_id(case: tuple[str, str, Any]) -> str:
    section, key, value = case
    return f"{section}.{key}={value!r}"[:60]


@pytest.mark.parametrize("case", ACCEPTED, ids=case_id)
def test_accepted(case: tuple[str, str, Any]) -> None:
    section, key, value = case
    assert dumped_value(parse_one(section, key, value), section, key) == value


@pytest.mark.parametrize("case", REJECTED, ids=case_id)
def test_rejected(case: tuple[str, str, Any]) -> None:
    section, key, value = case
    message = error_for({section: {key: value}})
    assert message.startswith(f"[{section}] {key} = ")
    assert ": must " in message


@pytest.mark.parametrize(("section", "key", "low", "high"), INT_RANGES)
def test_range_message_says_what_is_allowed(section: str, key: str, low: int, high: int) -> None:
    message = error_for({section: {key: high + 1}})
    assert message == f"[{section}] {key} = {high + 1}: must be an integer in {low}..{high}"


def test_http_port_message() -> None:
    message = error_for({"Server": {"HttpPort": 70000}})
    assert message == "[Server] HttpPort = 70000: must be 0 or an integer in 1024..65535"


def test_ram_role_arn_needs_a_role_arn() -> None:
    message = error_for({"Credentials": {"Type": "ram_role_arn"}})
    assert message.startswith('[Credentials] RoleArn = "": must be acs:ram::<account-id>:role/<name>')
    config = parse_config({"Credentials": {"Type": "ram_role_arn", "RoleArn": "acs:ram::1:role/r"}})
    assert (config.credentials.type, config.credentials.role_arn) == ("ram_role_arn", "acs:ram::1:role/r")


@pytest.mark.parametrize("endpoint", ["", "sts.aliyuncs.com", "10.0.0.1:80"])
def test_sts_protocol_http_needs_a_loopback_sts_endpoint(endpoint: str) -> None:
    message = error_for({"Credentials": {"StsProtocol": "http", "StsEndpoint": endpoint}})
    assert message.startswith("[Credentials] StsProtocol = 'http': must be \"https\" unless StsEndpoint is a loopback")


@pytest.mark.parametrize("endpoint", ["127.0.0.1:9000", "[::1]:9", "localhost:1"])
def test_sts_protocol_http_is_fine_for_a_loopback_sts_endpoint(endpoint: str) -> None:
    config = parse_config({"Credentials": {"StsProtocol": "http", "StsEndpoint": endpoint}})
    assert config.credentials.sts_protocol == "http"


def test_lists_become_tuples_and_metadata_endpoint_loses_its_slash() -> None:
    assert parse_one("Cache", "Prefetch", ["a", "b"]).cache.prefetch == ("a", "b")
    config = parse_one("Credentials", "MetadataEndpoint", "http://100.100.100.200/")
    assert config.credentials.metadata_endpoint == "http://100.100.100.200"


def test_bad_list_item_is_named() -> None:
    message = error_for({"Server": {"SSRFHeaders": ["X-Token", "x-token"]}})
    assert "duplicate: 'x-token'" in message


def test_long_values_are_truncated() -> None:
    message = error_for({"KMS": {"Region": "X" * 5000}})
    assert message.startswith("[KMS] Region = 'XXX") and "..." in message
    assert len(message) < 150


# --- Types ---------------------------------------------------------------------------------------------

WRONG_TYPES: list[tuple[str, str, Any]] = [
    ("Server", "HttpPort", True),
    ("Server", "MaxConn", 800.0),
    ("Server", "MaxConn", "800"),
    ("Cache", "TtlSeconds", False),
    ("Server", "BindIPv6", 1),
    ("Server", "IgnoreTransientErrors", "true"),
    ("Credentials", "DisableIMDSv1", 0),
    ("Server", "SSRFHeaders", "X-KMS-Token"),
    ("Server", "SSRFEnvVariables", "KMS_TOKEN"),
    ("Cache", "Prefetch", "my-secret"),
    ("Cache", "Prefetch", ["my-secret", 1]),
    ("Server", "SSRFHeaders", [["X-KMS-Token"]]),
    ("Server", "SSRFEnvVariables", ("KMS_TOKEN",)),
    ("KMS", "Region", 5),
    ("Credentials", "RoleName", ["role"]),
    ("Credentials", "DurationSeconds", "3600"),
    ("Credentials", "AllowedRoleArns", [1]),
    ("Credentials", "Policy", {"Version": "1"}),
    ("Log", "Path", {"dir": "/tmp"}),  # noqa: S108 - refused (not a string), never opened
    ("Credentials", "RoleName", "\ud800"),  # a lone surrogate: has no UTF-8 form, so no TOML form
]


@pytest.mark.parametrize("case", WRONG_TYPES, ids=case_id)
def test_wrong_type(case: tuple[str, str, Any]) -> None:
    section, key, value = case
    assert error_for({section: {key: value}}).startswith(f"[{section}] {key} = ")


# --- Unknown names -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Nope", "server", "HttpPort"])
def test_unknown_section(name: str) -> None:
    message = error_for({name: {}})
    assert message == f"[{name}]: unknown section (allowed: Server, Cache, KMS, Credentials, Log, Exec, [Files])"


def test_section_must_be_a_table() -> None:
    assert error_for({"Server": 5}) == "Server = 5: must be a [Server] table"


@pytest.mark.parametrize("key", ["Foo", "cachesize", "TTLSeconds"])
def test_unknown_key(key: str) -> None:
    message = error_for({"Cache": {"TtlSeconds": 1, key: 1}})
    assert message == (
        f"[Cache] {key}: unknown key (allowed: CacheSize, TtlSeconds, MaxStaleSeconds, Prefetch, NotFoundTtlSeconds)"
    )


def test_unknown_quoted_name_stays_on_one_line() -> None:
    assert error_for({"Cache": {"a\nb": 1}}).startswith("[Cache] 'a\\nb': unknown key")
    assert error_for({"x\ny": {}}).startswith("['x\\ny']: unknown section")


# --- Protocol "http" only for loopback -----------------------------------------------------------------


@pytest.mark.parametrize(
    "endpoint", ["127.0.0.1:8080", "[::1]:9000", "localhost", "localhost:8443", "127.1.2.3"]
)
def test_http_allowed_for_loopback_endpoint(endpoint: str) -> None:
    config = parse_config({"KMS": {"Protocol": "http", "Endpoint": endpoint}})
    assert (config.kms.protocol, config.kms.endpoint) == ("http", endpoint)


@pytest.mark.parametrize(
    "endpoint", ["kms.cn-hangzhou.aliyuncs.com", "", "10.0.0.1:8080", "[fd00::1]:80", "localhost.example"]
)
def test_http_rejected_for_other_endpoints(endpoint: str) -> None:
    message = error_for({"KMS": {"Protocol": "http", "Endpoint": endpoint}})
    assert message.startswith("[KMS] Protocol = 'http': ")
    assert "loopback" in message


@pytest.mark.parametrize("endpoint", ["kms.cn-hangzhou.aliyuncs.com", "", "127.0.0.1:8080", "[::1]:9000"])
def test_https_allowed_for_any_endpoint(endpoint: str) -> None:
    assert parse_config({"KMS": {"Protocol": "https", "Endpoint": endpoint}}).kms.endpoint == endpoint


# --- CaFilePath ----------------------------------------------------------------------------------------


def test_ca_file_path_existing_file_accepted(tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    assert parse_one("KMS", "CaFilePath", str(bundle)).kms.ca_file_path == str(bundle)


@pytest.mark.parametrize("name", ["missing.pem", "."])
def test_ca_file_path_missing_file_or_directory_rejected(tmp_path: Path, name: str) -> None:
    path = str(tmp_path / name)
    message = error_for({"KMS": {"CaFilePath": path}})
    assert message.startswith("[KMS] CaFilePath = ") and "existing, readable file" in message


# --- load_config ---------------------------------------------------------------------------------------


def write(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "kmsagent.toml"
    path.write_bytes(content)
    return path


def load_error(path: Path) -> str:
    """The ConfigError message of `load_config(path)`, checked to be one line."""
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_load_valid_file(tmp_path: Path) -> None:
    path = write(tmp_path, b'[Server]\nHttpPort = 0\n[KMS]\nEndpoint = "127.0.0.1:1"\nProtocol = "http"\n')
    config = load_config(str(path))
    assert (config.server.http_port, config.kms.protocol) == (0, "http")
    assert load_config(path) == config


@pytest.mark.parametrize("content", [b"[Server\nHttpPort = 1\n", b"HttpPort = = 1\n", b'a = "x\n"\n'])
def test_bad_toml_is_one_line_naming_the_file(tmp_path: Path, content: bytes) -> None:
    path = write(tmp_path, content)
    assert load_error(path).startswith(f"{path}: invalid TOML: ")


def test_non_utf8_file(tmp_path: Path) -> None:
    path = write(tmp_path, b'[Log]\nPath = "\xff"\n')
    assert load_error(path).startswith(f"{path}: invalid TOML: not UTF-8")


def test_missing_or_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert load_error(missing) == f"{missing}: cannot read config file: No such file or directory"
    assert load_error(tmp_path).startswith(f"{tmp_path}: cannot read config file: ")


def test_load_reports_validation_errors_unchanged(tmp_path: Path) -> None:
    path = write(tmp_path, b"[Server]\nHttpPort = 70000\n")
    assert load_error(path) == "[Server] HttpPort = 70000: must be 0 or an integer in 1024..65535"
