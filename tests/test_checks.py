"""SPEC §3's check table, row by row and in order, on `check_request` alone."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from kmsagent.checks import Route, SecretQuery, check_request
from kmsagent.config import ServerConfig
from kmsagent.errors import AgentError

TOKEN = b"tok"
GOOD = [(b"host", b"127.0.0.1:2025"), (b"x-kms-token", TOKEN)]


def run(
    path: bytes = b"/secretsmanager/get",
    query: bytes = b"secretId=s",
    headers: Sequence[tuple[bytes, bytes]] = GOOD,
    method: str = "GET",
    over_limit: bool = False,
    config: ServerConfig = ServerConfig(),
) -> Route | SecretQuery:
    return check_request(
        method=method,
        path=path,
        query_string=query,
        headers=headers,
        over_limit=over_limit,
        config=config,
        token_matches=lambda values: TOKEN in values,
    )


def fails(status: int, code: str, **kwargs: object) -> None:
    with pytest.raises(AgentError) as caught:
        run(**kwargs)  # type: ignore[arg-type]
    assert (caught.value.status, caught.value.code) == (status, code)


def test_a_good_request_yields_the_query_with_defaults() -> None:
    assert run() == SecretQuery("s", "", "ACSCurrent", False)


def test_over_limit_is_429_before_anything_else_but_ping_still_answers() -> None:
    fails(429, "ConnectionLimitExceeded", over_limit=True, headers=[(b"x-forwarded-for", b"1.2.3.4")], method="POST")
    assert run(path=b"/ping", over_limit=True) is Route.PING


@pytest.mark.parametrize("name", [b"x-forwarded-for", b"forwarded"])
def test_forwarded_headers_are_400_before_host_and_token(name: bytes) -> None:
    fails(400, "Forwarded", headers=[(b"host", b"evil.example"), (name, b"for=1.2.3.4")])


@pytest.mark.parametrize(
    "host", [b"evil.example", b"127.0.0.2", b"localhost.evil", b"[::2]", b"localhost:abc", b"127.0.0.1:", b""]
)
def test_a_foreign_host_is_403_before_the_token(host: bytes) -> None:
    fails(403, "BadHost", headers=[(b"host", host)])


def test_a_missing_or_doubled_host_is_403() -> None:
    fails(403, "BadHost", headers=[(b"x-kms-token", TOKEN)])
    fails(403, "BadHost", headers=[(b"host", b"localhost"), (b"host", b"localhost"), (b"x-kms-token", TOKEN)])


@pytest.mark.parametrize(
    "host", [b"localhost", b"LOCALHOST:80", b"127.0.0.1", b"127.0.0.1:2025", b"[::1]", b"[::1]:2025"]
)
def test_loopback_hosts_pass(host: bytes) -> None:
    assert isinstance(run(headers=[(b"host", host), (b"x-kms-token", TOKEN)]), SecretQuery)


def test_token_is_403_before_method_and_path() -> None:
    fails(403, "BadToken", headers=[(b"host", b"localhost")], method="POST", path=b"/nowhere")
    fails(403, "BadToken", headers=[(b"host", b"localhost"), (b"x-kms-token", b"wrong")])


def test_any_configured_header_may_carry_the_token() -> None:
    headers = [(b"host", b"localhost"), (b"x-vault-token", TOKEN)]
    assert isinstance(run(headers=headers), SecretQuery)
    only_custom = ServerConfig(ssrf_headers=("X-Custom",))
    fails(403, "BadToken", headers=headers, config=only_custom)
    assert isinstance(run(headers=[(b"host", b"localhost"), (b"x-custom", TOKEN)], config=only_custom), SecretQuery)


def test_ping_and_metrics_need_no_token() -> None:
    assert run(path=b"/ping", headers=[(b"host", b"localhost")]) is Route.PING
    assert run(path=b"/metrics", headers=[(b"host", b"localhost")]) is Route.METRICS


def test_method_is_405_before_path() -> None:
    fails(405, "MethodNotAllowed", method="POST", path=b"/nowhere")
    fails(405, "MethodNotAllowed", method="HEAD", path=b"/ping", headers=[(b"host", b"localhost")])


@pytest.mark.parametrize("path", [b"/nowhere", b"/secretsmanager/get/x", b"/v1", b"/", b"/V1/x"])
def test_unknown_path_is_404(path: bytes) -> None:
    fails(404, "NotFound", path=path)


@pytest.mark.parametrize(
    ("query", "code"),
    [
        (b"secretId=s&foo=1", "UnknownParameter"),
        (b"SecretId=s", "UnknownParameter"),
        (b"secretId=s&secretId=t", "InvalidParameter"),
        (b"", "MissingParameter"),
        (b"secretId=", "MissingParameter"),
        (b"versionId=v", "MissingParameter"),
        (b"secretId=s&refreshNow=yes", "InvalidParameter"),
        (b"secretId=s&refreshNow=TRUE", "InvalidParameter"),
        (b"secretId=" + b"a" * 1025, "InvalidParameter"),
        (b"secretId=%FF", "InvalidParameter"),
        (b"secretId=a%00b", "InvalidParameter"),
        (b"secretId=s&versionStage=", "InvalidParameter"),
    ],
)
def test_bad_parameters_are_400(query: bytes, code: str) -> None:
    fails(400, code, query=query)


def test_an_id_of_exactly_1024_bytes_passes() -> None:
    assert run(query=b"secretId=" + b"a" * 1024) == SecretQuery("a" * 1024)
    assert run(query=b"secretId=" + "é".encode().replace(b"\xc3", b"%C3") * 512) == SecretQuery("é" * 512)


@pytest.mark.parametrize(("text", "value"), [(b"true", True), (b"1", True), (b"false", False), (b"0", False)])
def test_refresh_now_values(text: bytes, value: bool) -> None:
    assert run(query=b"secretId=s&refreshNow=" + text) == SecretQuery("s", refresh=value)


def test_version_id_goes_without_the_default_stage() -> None:
    assert run(query=b"secretId=s&versionId=v1") == SecretQuery("s", "v1", "")
    assert run(query=b"secretId=s&versionId=v1&versionStage=ACSPrevious") == SecretQuery("s", "v1", "ACSPrevious")
    assert run(query=b"secretId=s&versionStage=ACSPrevious") == SecretQuery("s", "", "ACSPrevious")


def test_path_prefix_route_percent_decodes_ids_with_slashes() -> None:
    assert run(path=b"/v1/db/pass%20word", query=b"") == SecretQuery("db/pass word")
    assert run(path=b"/v1/a%2Fb", query=b"versionStage=ACSPrevious") == SecretQuery("a/b", "", "ACSPrevious")
    fails(400, "UnknownParameter", path=b"/v1/a", query=b"secretId=b")
    fails(400, "MissingParameter", path=b"/v1/", query=b"")
    custom = ServerConfig(path_prefix="/secrets/")
    assert run(path=b"/secrets/x", query=b"", config=custom) == SecretQuery("x")
    fails(404, "NotFound", path=b"/v1/x", query=b"", config=custom)
