"""wire.py reads KMS's answers as the SDK's response models do (the SDK is the reference).

The agent no longer imports `alibabacloud_kms20160120.models` (its `__init__` imports ≈280 model
modules); these tests feed the same random answers to wire.py and to the SDK's
`GetSecretValueResponseBody` / `BatchGetSecretValueResponseBody` and compare what comes out:
the same fields in the same order, or the same refusal.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from alibabacloud_kms20160120.models import BatchGetSecretValueResponseBody, GetSecretValueResponseBody
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kmsagent.credentials import Credentials
from kmsagent.errors import KmsError, UpstreamUnavailable
from kmsagent.kms import wire

EXAMPLES = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=12))
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
STAGES = st.one_of(
    JSON,
    st.fixed_dictionaries({}, optional={"VersionStage": st.one_of(st.lists(st.text(max_size=12), max_size=3), JSON)}),
)


def answers(fields: Sequence[str]) -> st.SearchStrategy[Any]:
    """Mostly answers with some of `fields` (any JSON values, strings most often), and anything else."""
    value = st.one_of(st.text(max_size=20), JSON)
    known = st.fixed_dictionaries({}, optional={name: STAGES if name == "VersionStages" else value for name in fields})
    extra = st.dictionaries(st.text(max_size=8), JSON, max_size=3)
    return st.one_of(st.tuples(known, extra).map(lambda both: {**both[1], **both[0]}), known, JSON)


def sdk_map(model: Any, document: Any) -> dict[str, Any] | type[Exception]:
    try:
        return model().from_map(document).to_map()  # type: ignore[no-any-return]
    except wire.NOT_AN_ANSWER as error:
        return type(error)


def ours(document: Any, fields: Sequence[str]) -> dict[str, Any] | type[Exception]:
    try:
        return wire.model_map(document, fields)
    except wire.NOT_AN_ANSWER as error:
        return type(error)


@EXAMPLES
@given(document=answers(wire.SECRET_FIELDS))
def test_a_get_secret_value_answer_maps_as_the_sdk_model_maps_it(document: Any) -> None:
    expected = sdk_map(GetSecretValueResponseBody, document)
    mapped = ours(document, wire.SECRET_FIELDS)
    assert mapped == expected
    if isinstance(expected, dict) and isinstance(mapped, dict):
        assert list(mapped) == list(expected)  # the order too: ResponseType 0's body keeps it


def sdk_parse_batch(body: bytes, names: Sequence[str]) -> dict[str, Any]:
    """wire.parse_batch as it was written on the SDK's models (before this change), for reference."""
    try:
        parsed = BatchGetSecretValueResponseBody().from_map(json.loads(body))
    except (ValueError, TypeError, AttributeError, RecursionError):
        raise UpstreamUnavailable("not BatchGetSecretValue JSON") from None
    answers: dict[str, Any] = {}
    for entry in parsed.secret_values:
        try:
            fields = GetSecretValueResponseBody().from_map(entry.to_map()).to_map()
        except (ValueError, TypeError, AttributeError, RecursionError):
            continue
        fields.pop("RequestId", None)
        if not isinstance(fields.get("SecretName"), str) or not isinstance(fields.get("VersionId"), str):
            continue
        if "SecretData" in fields:
            for name in wire._asked_as(fields["SecretName"], names):
                answers.setdefault(name, fields)
    for error in parsed.errors:
        if not isinstance(error.secret_name, str) or not isinstance(error.code, str):
            continue
        try:
            status = int(error.http_status)
        except (TypeError, ValueError):
            status = 500
        for name in wire._asked_as(error.secret_name, names):
            answers.setdefault(name, (status, error.code, str(error.message or "")))
    return answers


def comparable(answers: dict[str, wire.SecretValue | KmsError]) -> dict[str, Any]:
    return {
        name: answer.fields
        if isinstance(answer, wire.SecretValue)
        else (answer.kms_status, answer.code, answer.message)
        for name, answer in answers.items()
    }


NAMES = ["a", "b", "acs:kms:cn-hangzhou:123:secret/a"]
BATCH = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "RequestId": st.text(max_size=8),
            "SecretValues": st.one_of(
                st.lists(
                    answers(wire.BATCH_SECRET_FIELDS)
                    | st.fixed_dictionaries(
                        {
                            "SecretName": st.sampled_from(["a", "b", "c"]),
                            "SecretData": st.text(max_size=8),
                            "VersionId": st.just("v1"),
                        }
                    ),
                    max_size=4,
                ),
                JSON,
            ),
            "Errors": st.one_of(
                st.lists(
                    answers(wire.BATCH_ERROR_FIELDS)
                    | st.fixed_dictionaries(
                        {"SecretName": st.sampled_from(["a", "b"]), "Code": st.text(max_size=8)},
                        optional={"HttpStatus": st.one_of(st.integers(100, 599), JSON), "Message": JSON},
                    ),
                    max_size=3,
                ),
                JSON,
            ),
        },
    ),
    JSON,
)


@EXAMPLES
@given(document=BATCH)
def test_a_batch_answer_reads_as_it_did_through_the_sdk_models(document: Any) -> None:
    body = json.dumps(document).encode()
    try:
        expected: dict[str, Any] | type[Exception] = sdk_parse_batch(body, NAMES)
    except UpstreamUnavailable:
        expected = UpstreamUnavailable
    try:
        parsed: dict[str, Any] | type[Exception] = comparable(wire.parse_batch(body, NAMES))
    except UpstreamUnavailable:
        parsed = UpstreamUnavailable
    assert parsed == expected


def test_a_real_answer_keeps_every_field_but_the_request_id_in_the_sdk_order() -> None:
    answer = {
        "VersionStages": {"VersionStage": ["ACSCurrent"]},
        "SecretName": "db",
        "RequestId": "r-1",
        "SecretData": "s3cr3t",
        "VersionId": "v1",
        "CreateTime": "2024-07-06T08:22:03Z",
        "SecretType": "Generic",
        "SecretDataType": "text",
        "Unknown": "dropped",
    }
    secret = wire.parse_secret(json.dumps(answer).encode())
    assert list(secret.fields) == [
        "CreateTime",
        "SecretData",
        "SecretDataType",
        "SecretName",
        "SecretType",
        "VersionId",
        "VersionStages",
    ]
    assert (secret.name, secret.data, secret.version_id, secret.version_stages) == (
        "db",
        "s3cr3t",
        "v1",
        ["ACSCurrent"],
    )


TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30)


@EXAMPLES
@given(
    host=st.sampled_from(
        ["kms.cn-hangzhou.aliyuncs.com", "127.0.0.1:8443", "[::1]:443", "kst-abc.cryptoservice.kms.aliyuncs.com"]
    ),
    action=st.sampled_from([wire.GET_SECRET_VALUE, wire.BATCH_GET_SECRET_VALUE]),
    query=st.dictionaries(
        st.sampled_from(["SecretName", "VersionId", "VersionStage", "SecretsList"]), TEXT, min_size=1
    ),
    access_key_id=TEXT,
    secret=TEXT,
    token=st.one_of(st.none(), TEXT),
    now=st.floats(min_value=0, max_value=4e9),
)
def test_a_request_is_signed_as_the_sdk_signs_it(
    host: str, action: str, query: dict[str, str], access_key_id: str, secret: str, token: str | None, now: float
) -> None:
    """wire.signed_request builds the canonical request for its own headers directly; the SDK's
    `Utils.get_authorization`, given the same headers, must give the same Authorization."""
    from alibabacloud_tea_openapi.utils import Utils  # heavy: the tests only

    target, headers = wire.signed_request(host, action, query, Credentials(access_key_id, secret, token), now)
    sent = dict(headers)
    authorization = sent.pop("Authorization")
    request = SimpleNamespace(method="POST", pathname="/", query=query, headers=sent)
    assert authorization == Utils.get_authorization(
        request, wire.SIGNATURE_ALGORITHM, wire.EMPTY_BODY_SHA256, access_key_id, secret
    )
    assert target == f"/?{wire.canonical_query(query)}"
    assert ("x-acs-security-token" in sent) == bool(token) and sent["x-acs-action"] == action and sent["host"] == host
