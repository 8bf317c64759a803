"""SPEC §2's keys of issue 15: [KMS] FallbackEndpoints and BatchRefresh, [Cache] NotFoundTtlSeconds,
[Server] RequestTimeoutMs; and SPEC §5's one list of transient failures."""

from __future__ import annotations

from typing import Any

import pytest

from kmsagent.config import Config, ConfigError, parse_config
from kmsagent.errors import KmsError, UpstreamTimeout, UpstreamUnavailable, is_transient


def error_for(document: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(document)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_defaults() -> None:
    config = Config()
    assert config.server.request_timeout_ms == 30000
    assert config.cache.not_found_ttl_seconds == 5
    assert (config.kms.fallback_endpoints, config.kms.batch_refresh) == ((), True)
    assert config.kms.endpoints == ("kms.cn-hangzhou.aliyuncs.com",)


def test_values_in_range_are_taken() -> None:
    config = parse_config(
        {
            "Server": {"RequestTimeoutMs": 1000},
            "Cache": {"NotFoundTtlSeconds": 0},
            "KMS": {
                "Region": "cn-shanghai",
                "FallbackEndpoints": ["kms.cn-beijing.aliyuncs.com", "kst-sha.cryptoservice.kms.aliyuncs.com:8443"],
                "BatchRefresh": False,
            },
        }
    )
    assert (config.server.request_timeout_ms, config.cache.not_found_ttl_seconds, config.kms.batch_refresh) == (
        1000,
        0,
        False,
    )
    assert config.kms.endpoints == (
        "kms.cn-shanghai.aliyuncs.com",
        "kms.cn-beijing.aliyuncs.com",
        "kst-sha.cryptoservice.kms.aliyuncs.com:8443",
    )


@pytest.mark.parametrize(
    ("section", "key", "value", "allowed"),
    [
        ("Server", "RequestTimeoutMs", 999, "must be an integer in 1000..120000"),
        ("Server", "RequestTimeoutMs", 120_001, "must be an integer in 1000..120000"),
        ("Cache", "NotFoundTtlSeconds", 301, "must be an integer in 0..300"),
        ("Cache", "NotFoundTtlSeconds", True, "must be an integer in 0..300"),
        ("KMS", "BatchRefresh", 1, "must be true or false"),
        ("KMS", "FallbackEndpoints", "kms.cn-beijing.aliyuncs.com", "must be a list of at most 5 distinct host[:port]"),
        ("KMS", "FallbackEndpoints", ["https://kms.cn-beijing.aliyuncs.com"], "must be a list of at most 5 distinct"),
        ("KMS", "FallbackEndpoints", ["a.example", "A.example"], "duplicate: 'A.example'"),
        ("KMS", "FallbackEndpoints", [f"r{i}.example" for i in range(6)], "must be a list of at most 5 distinct"),
    ],
)
def test_values_out_of_range_name_key_value_and_what_is_allowed(
    section: str, key: str, value: Any, allowed: str
) -> None:
    message = error_for({section: {key: value}})
    assert message.startswith(f"[{section}] {key} = ") and allowed in message


def test_a_fallback_must_not_repeat_the_primary_and_plain_http_stays_on_loopback() -> None:
    message = error_for({"KMS": {"FallbackEndpoints": ["kms.cn-hangzhou.aliyuncs.com"]}})
    assert "must not repeat the primary endpoint 'kms.cn-hangzhou.aliyuncs.com'" in message
    message = error_for(
        {"KMS": {"Endpoint": "127.0.0.1:8000", "Protocol": "http", "FallbackEndpoints": ["10.0.0.1:8000"]}}
    )
    assert message.startswith("[KMS] FallbackEndpoints = ['10.0.0.1:8000']: with Protocol = \"http\"")
    parse_config({"KMS": {"Endpoint": "127.0.0.1:8000", "Protocol": "http", "FallbackEndpoints": ["127.0.0.2:8000"]}})


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (UpstreamUnavailable("connection refused"), True),
        (UpstreamTimeout("no answer"), True),
        (KmsError(500, "InternalFailure", ""), True),
        (KmsError(503, "ServiceUnavailableTemporary", ""), True),
        (KmsError(429, "Rejected.Throttling", ""), True),
        (KmsError(404, "Forbidden.ResourceNotFound", ""), False),
        (KmsError(403, "Forbidden.NoPermission", ""), False),
        (KmsError(400, "InvalidSecurityToken.Expired", ""), False),
        (KmsError(429, "SomethingElse", ""), False),
        (ValueError("not an agent error"), False),
    ],
)
def test_one_list_of_transient_failures(error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient
    if isinstance(error, KmsError):
        assert error.is_transient is transient
