"""signing.py against the SDK's own signers, byte for byte (the SDK is the reference).

The tests import `alibabacloud_tea_openapi.utils` (heavy); the agent does not (test_footprint.py).
"""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest
from alibabacloud_tea_openapi.utils import Utils
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kmsagent import signing
from kmsagent.credentials.sts import rpc_signature as sts_rpc_signature

ACS3 = "ACS3-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
#: Any Unicode but lone surrogates (neither signer can encode those in UTF-8), with the characters
#: whose encoding differs between rules (space, ~, /, +, *, %, =, &) well represented.
TEXT = st.text(
    alphabet=st.one_of(
        st.characters(blacklist_categories=("Cs",)),
        st.sampled_from(list(" ~/+*%=&?#:;,._-!'()$@\t\n\r\x00ü中\U0001f511")),
    ),
    max_size=40,
)
NAMES = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20)
EXAMPLES = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _kms_headers() -> st.SearchStrategy[dict[str, str | bytes | None]]:
    """KMS's real headers with random values, plus random extra ones: mixed case, names differing
    only in case (joined by the signers), None (left out) and bytes values, padded values."""
    real = st.fixed_dictionaries(
        {
            "host": TEXT,
            "x-acs-version": st.just("2016-01-20"),
            "x-acs-action": st.sampled_from(["GetSecretValue", "BatchGetSecretValue"]),
            "x-acs-date": TEXT,
            "x-acs-signature-nonce": TEXT,
            "x-acs-content-sha256": st.just(EMPTY_SHA256),
        },
        optional={"x-acs-security-token": TEXT, "x-acs-accesskey-id": TEXT, "user-agent": TEXT},
    )
    extra_value = st.one_of(
        TEXT, st.none(), TEXT.map(lambda text: text.encode("utf-8")), TEXT.map(lambda text: f"  {text}\t ")
    )
    extra_name = st.sampled_from(["X-Acs-Extra", "x-acs-extra", "X-ACS-EXTRA", "Accept", "content-type"]) | NAMES
    extra = st.dictionaries(extra_name, extra_value, max_size=6)
    return st.tuples(real, extra).map(lambda both: {**both[0], **both[1]})


@EXAMPLES
@given(
    method=st.sampled_from(["POST", "GET", "PUT", "DELETE"]),
    pathname=st.one_of(st.just("/"), st.just(""), TEXT.map(lambda text: "/" + text)),
    query=st.one_of(st.none(), st.dictionaries(NAMES, st.one_of(TEXT, st.none()), max_size=8)),
    headers=_kms_headers(),
    payload=st.one_of(st.just(EMPTY_SHA256), st.binary(max_size=64).map(lambda body: hashlib.sha256(body).hexdigest())),
    access_key_id=TEXT,
    secret=TEXT,
)
def test_acs3_authorization_is_the_sdks_byte_for_byte(
    method: str, pathname: str, query: dict[str, str | None] | None, headers: dict[str, str | bytes | None],
    payload: str, access_key_id: str, secret: str,
) -> None:
    request = SimpleNamespace(method=method, pathname=pathname, query=query, headers=headers)
    expected = Utils.get_authorization(request, ACS3, payload, access_key_id, secret)
    assert signing.acs3_authorization(request, ACS3, payload, access_key_id, secret) == expected


@EXAMPLES
@given(
    params=st.dictionaries(NAMES, st.one_of(TEXT, st.none()), max_size=12),
    method=st.sampled_from(["POST", "GET"]),
    secret=TEXT,
)
def test_rpc_signature_is_the_sdks_byte_for_byte(params: dict[str, str | None], method: str, secret: str) -> None:
    expected = Utils.get_rpcsignature(params, method, secret)
    assert signing.rpc_signature(params, method, secret) == expected
    if all(value is not None for value in params.values()):
        assert sts_rpc_signature(params, secret, method) == expected  # what sts.py signs AssumeRole with


def test_a_kms_request_as_the_agent_signs_it() -> None:
    """A fixed GetSecretValue request: the value pins the algorithm even without the SDK at hand."""
    headers = {
        "host": "kms.cn-hangzhou.aliyuncs.com",
        "x-acs-version": "2016-01-20",
        "x-acs-action": "GetSecretValue",
        "x-acs-date": "2026-11-30T12:00:00Z",
        "x-acs-signature-nonce": "0123456789abcdef0123456789abcdef",
        "x-acs-content-sha256": EMPTY_SHA256,
        "x-acs-security-token": "token/with spaces+plus",
    }
    request = SimpleNamespace(method="POST", pathname="/", query={"SecretName": "prod/db password~ü"}, headers=headers)
    ours = signing.acs3_authorization(request, ACS3, EMPTY_SHA256, "LTAIexample", "secret")
    assert ours == Utils.get_authorization(request, ACS3, EMPTY_SHA256, "LTAIexample", "secret")
    assert ours.startswith(
        "ACS3-HMAC-SHA256 Credential=LTAIexample,SignedHeaders=host;x-acs-action;x-acs-content-sha256;x-acs-date;"
        "x-acs-security-token;x-acs-signature-nonce;x-acs-version,Signature="
    )
    assert signing.canonical_query(request.query) == "SecretName=prod%2Fdb%20password~%C3%BC"


def test_other_algorithms_are_refused_not_signed_wrongly() -> None:
    request = SimpleNamespace(method="POST", pathname="/", query={}, headers={})
    with pytest.raises(ValueError, match="ACS3-HMAC-SM3"):
        signing.acs3_authorization(request, "ACS3-HMAC-SM3", EMPTY_SHA256, "ak", "sk")
