"""Response bodies (SPEC §4): every value KMS can store is served in every ResponseType.

Vault's `data` is the secret's JSON text exactly as written (numbers, duplicate keys, spacing),
or `{"value": text}`; its `request_id` is fresh per answer and `lease_duration` the TtlSeconds
in force.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import sys
import time
import uuid
from typing import Any

import pytest

from conftest import VAULT_BODY_KEYS, StartAgent
from kmsagent import redact
from kmsagent.emulator import KmsEmulator
from kmsagent.formats import AwsFormat, KmsFormat, VaultFormat, is_json_object
from kmsagent.kms import SecretValue
from kmsagent.store import CachedSecret

DEEP_ARRAY = "[" * 1500 + "]" * 1500
DEEP_OBJECT = '{"a":' * 1500 + "1" + "}" * 1500
#: name → (secret text, whether Vault's data is the text itself)
VALUES: dict[str, tuple[str, bool]] = {
    "deep-array": (DEEP_ARRAY, False),
    "deep-object": (DEEP_OBJECT, False),  # deeper than clients' parsers read: served as text
    "huge-float": ('{"a": 1e400}', True),
    "trailing-zero": ('{"a": 1.10, "b": -0.0, "c": 100000000000000000000000000001}', True),
    "duplicate-keys": ('{"a": 1, "a": 2}', True),
    "long-integer": ('{"n": ' + "7" * 5000 + "}", True),
    "escaped-surrogate": ('{"a": "\\ud800"}', True),
    "lone-surrogate-in-json": ('{"a": "\ud800x"}', True),
    "lone-surrogate": ("\udfff text", False),
    "spaced-object": (' \n{ "k" :\t[ 1 , {} ] }\r\n', True),
    "unicode": ('{"name": "café ☕ \U0001f600"}', True),
    "nan": ('{"a": NaN}', False),
    "infinity": ('{"a": -Infinity}', False),
    "array": ("[1, 2]", False),
    "string": ('"quoted"', False),
    "number": ("42", False),
    "two-objects": ('{"a": 1} {"b": 2}', False),
    "trailing-comma": ('{"a": 1,}', False),
    "control-character": ('{"a": "x\ty"}', False),
    "byte-order-mark": ('\ufeff{"a": 1}', False),
    "plain": ("hunter2-but-longer", False),
    "empty": ("", False),
}


def strict_json(body: bytes) -> Any:
    """What a strict client sees: UTF-8 (no surrogates), RFC 8259 JSON (no NaN or Infinity);
    numbers are kept as text (Python refuses integers over 4300 digits)."""

    def reject(constant: str) -> None:
        raise ValueError(constant)

    return json.loads(body.decode("utf-8", "strict"), parse_constant=reject, parse_int=str, parse_float=str)


def secret_value(data: str, *, binary: bool = False) -> SecretValue:
    return SecretValue(
        {
            "SecretName": "s",
            "SecretType": "Generic",
            "SecretData": data,
            "SecretDataType": "binary" if binary else "text",
            "VersionId": "v1",
            "VersionStages": {"VersionStage": ["ACSCurrent"]},
            "CreateTime": "2024-07-06T08:22:03Z",
        }
    )


def assert_vault_data(body: bytes, text: str, verbatim: bool) -> None:
    document = strict_json(body)
    if verbatim:  # the text itself, byte for byte (a raw lone surrogate as its JSON escape)
        encoded = text.encode("utf-8", "backslashreplace")
        assert b',"data":' + encoded + b',"wrap_info":null,' in body
    else:
        assert document["data"] == {"value": text}


@pytest.mark.parametrize("name", VALUES)
def test_every_value_in_every_format(name: str) -> None:
    text, verbatim = VALUES[name]
    secret = secret_value(text)
    kms, aws, vault = KmsFormat(), AwsFormat("cn-hangzhou"), VaultFormat(lambda: 300)
    assert strict_json(kms.finish(kms.secret(secret)))["SecretData"] == text
    assert strict_json(aws.finish(aws.secret(secret)))["SecretString"] == text
    assert is_json_object(text) is verbatim
    assert_vault_data(vault.finish(vault.secret(secret)), text, verbatim)


def test_binary_secrets_are_values_even_when_they_decode_to_json() -> None:
    data = base64.b64encode(b'{"a": 1}\x00\xff').decode()
    secret = secret_value(data, binary=True)
    vault = VaultFormat(lambda: 300)
    assert strict_json(vault.finish(vault.secret(secret)))["data"] == {"value": data}
    aws = strict_json(AwsFormat("r").secret(secret))
    assert "SecretString" not in aws and base64.b64decode(aws["SecretBinary"]) == b'{"a": 1}\x00\xff'
    assert strict_json(KmsFormat().secret(secret))["SecretData"] == data


def test_vault_request_id_is_fresh_and_lease_follows_the_ttl_in_force() -> None:
    ttl = [300]
    vault = VaultFormat(lambda: ttl[0])
    rendered = vault.secret(secret_value('{"a": 1}'))
    first, second = strict_json(vault.finish(rendered)), strict_json(vault.finish(rendered))
    assert first["request_id"] != second["request_id"]
    for body in (first, second):
        assert uuid.UUID(body["request_id"]).version == 4 and len(body["request_id"]) == 36
    assert first["lease_duration"] == "300"
    ttl[0] = 60
    assert strict_json(vault.finish(rendered))["lease_duration"] == "60"
    assert set(first) == VAULT_BODY_KEYS


# --- through the agent: KMS's JSON answer, the cache, a miss and a hit -----------------------------

#: Every value, the deeply nested ones included (the redaction guard once raised RecursionError).
SERVED = VALUES


@pytest.mark.parametrize("response_type", [0, 1, 2])
async def test_the_agent_serves_every_value(start_agent: StartAgent, emulator: KmsEmulator, response_type: int) -> None:
    for name, (text, _) in SERVED.items():
        emulator.put_secret(f"odd/{name}", text)
    emulator.put_secret("odd/binary", b"\x00\x01binary\xff")
    agent = await start_agent(server={"response_type": response_type})
    for name, (text, verbatim) in SERVED.items():
        for outcome in ("miss", "hit"):
            response = await agent.get(f"/v1/odd/{name}")
            assert (response.status_code, response.headers["x-kms-agent-cache"]) == (200, outcome), name
            if response_type == 0:
                assert strict_json(response.content)["SecretData"] == text, name
            elif response_type == 1:
                assert strict_json(response.content)["SecretString"] == text, name
            else:
                assert_vault_data(response.content, text, verbatim)
    binary = strict_json((await agent.get("/v1/odd/binary")).content)
    encoded = base64.b64encode(b"\x00\x01binary\xff").decode()
    expected = {0: ("SecretData", encoded), 1: ("SecretBinary", encoded), 2: ("data", {"value": encoded})}
    key, value = expected[response_type]
    assert binary[key] == value


async def test_vault_answers_carry_a_fresh_request_id_on_every_hit(start_agent: StartAgent) -> None:
    agent = await start_agent(server={"response_type": 2}, cache={"ttl_seconds": 120})
    bodies = [(await agent.get("/v1/app/config")).json() for _ in range(3)]
    assert len({body["request_id"] for body in bodies}) == 3
    assert all(body["lease_duration"] == 120 for body in bodies)


# --- ResponseType 1 as the AWS agent writes it: epoch CreatedDate, AWS stage names ----------------


@pytest.mark.parametrize(
    ("create_time", "created_date"),
    [
        ("2024-07-06T08:22:03Z", "1720254123.000"),  # what KMS writes
        ("2024-07-06T08:22:03.046Z", "1720254123.046"),
        ("2024-07-06T08:22:03.0465123Z", "1720254123.047"),
        ("2024-07-06T16:22:03+08:00", "1720254123.000"),
        ("2024-07-06 08:22:03", "1720254123.000"),  # no offset: UTC, as KMS's times are
        ("2024-07-06t08:22:03z", "1720254123.000"),
        (" 2024-07-06T08:22:03Z\n", "1720254123.000"),
        ("1969-12-31T23:59:59Z", "-1.000"),
        ("not a date", "0.000"),  # the epoch, rather than text a client's float() would raise on
        ("", "0.000"),
        ("2024-13-01T00:00:00Z", "0.000"),  # no 13th month
        (None, "0.000"),
        (1720254123, "0.000"),
    ],
)
def test_created_date_is_epoch_seconds_in_a_string_with_three_decimals(create_time: object, created_date: str) -> None:
    secret = secret_value("x")
    fields = {key: value for key, value in secret.fields.items() if key != "CreateTime"}
    if create_time is not None:
        fields["CreateTime"] = create_time
    body = json.loads(AwsFormat("cn-hangzhou").secret(SecretValue(fields)))
    assert body["CreatedDate"] == created_date
    assert isinstance(float(body["CreatedDate"]), float)


def test_aws_stage_names_in_answers_and_requests() -> None:
    secret = secret_value("x")
    secret.fields["VersionStages"] = {
        "VersionStage": ["ACSCurrent", "ACSPrevious", "ACSPending", "Custom", "AWSCURRENT"]
    }
    aws = AwsFormat("cn-hangzhou")
    assert json.loads(aws.secret(secret))["VersionStages"] == [
        "AWSCURRENT",
        "AWSPREVIOUS",
        "AWSPENDING",
        "Custom",
        "AWSCURRENT",
    ]
    asked = ["AWSCURRENT", "AWSPREVIOUS", "AWSPENDING", "ACSCurrent", "Custom", "awscurrent"]
    assert [aws.kms_stage(stage) for stage in asked] == [
        "ACSCurrent", "ACSPrevious", "ACSPending", "ACSCurrent", "Custom", "awscurrent"
    ]
    for other in (KmsFormat(), VaultFormat(lambda: 300)):
        assert [other.kms_stage(stage) for stage in asked] == asked
    assert json.loads(KmsFormat().secret(secret))["VersionStages"] == secret.fields["VersionStages"]


async def test_aws_answers_name_aws_stages_and_take_them(start_agent: StartAgent, emulator: KmsEmulator) -> None:
    first = emulator.put_secret("rotated", "first-value")
    second = emulator.rotate("rotated", "second-value")
    agent = await start_agent(server={"response_type": 1})

    current = await agent.get("/secretsmanager/get?secretId=rotated")
    body = current.json()
    assert (body["VersionId"], body["SecretString"], body["VersionStages"]) == (second, "second-value", ["AWSCURRENT"])
    assert re.fullmatch(r"\d+\.\d{3}", body["CreatedDate"])
    assert abs(float(body["CreatedDate"]) - time.time()) < 60

    # AWSCURRENT is KMS's ACSCurrent: the same cache entry, under both routes.
    for path in ("/secretsmanager/get?secretId=rotated&versionStage=AWSCURRENT", "/v1/rotated?versionStage=AWSCURRENT"):
        response = await agent.get(path)
        assert (response.status_code, response.headers["x-kms-agent-cache"]) == (200, "hit"), path
        assert response.json()["VersionId"] == second

    previous = await agent.get("/v1/rotated?versionStage=AWSPREVIOUS")
    assert previous.status_code == 200, previous.text
    body = previous.json()
    assert (body["VersionId"], body["SecretString"], body["VersionStages"]) == (first, "first-value", ["AWSPREVIOUS"])
    assert emulator.calls[-1].version_stage == "ACSPrevious"
    assert (await agent.get("/v1/rotated?versionStage=ACSPrevious")).headers["x-kms-agent-cache"] == "hit"


@pytest.mark.parametrize("response_type", [0, 2])
async def test_other_formats_send_aws_stage_names_to_kms_as_they_are(
    start_agent: StartAgent, emulator: KmsEmulator, response_type: int
) -> None:
    agent = await start_agent(server={"response_type": response_type})
    response = await agent.get("/v1/api-key?versionStage=AWSCURRENT")
    assert response.status_code == 404
    assert emulator.calls[-1].version_stage == "AWSCURRENT"
    if response_type == 0:
        ok = (await agent.get("/v1/api-key")).json()
        assert ok["VersionStages"] == {"VersionStage": ["ACSCurrent"]} and ok["CreateTime"].endswith("Z")


# --- the cached body as the one copy of the value (issue 17) ------------------------------------

FORMATS = {0: KmsFormat(), 1: AwsFormat("cn-hangzhou"), 2: VaultFormat(lambda: 300)}


def test_a_cached_body_gives_every_value_back_and_is_its_one_copy() -> None:
    """The cache keeps a secret's body, not its text: `CachedSecret.secret` reads the answer back
    from the body. Only a value a body cannot give back exactly keeps its text beside it (a Vault
    body of a JSON object with a lone surrogate, or of the object `{"value": "..."}`)."""
    values = {**{name: text for name, (text, _) in VALUES.items()}, "value-object": '{"value": "inner-text"}'}
    kept: set[tuple[str, int, bool]] = set()
    for (name, text), (response_type, response_format), binary in itertools.product(
        values.items(), FORMATS.items(), (False, True)
    ):
        data = text[:1] + text[1:]  # our own object, to count references to
        secret = secret_value(data, binary=binary)
        fields = dict(secret.fields)
        cached = CachedSecret(secret, response_format.secret(secret), response_format, redact.Guard().hold_secret(data))
        del secret
        assert cached.secret.fields == fields, (name, response_type, binary)
        if response_type == 0:
            assert list(cached.secret.fields) == list(fields)
        del fields
        # Ours and getrefcount's: the entry holds none (the guard files a value by its first
        # MIN_LENGTH characters, which for a value that short are the value).
        if len(data) > redact.MIN_LENGTH and sys.getrefcount(data) > 2:
            kept.add((name, response_type, binary))
    assert kept == {("lone-surrogate-in-json", 2, False), ("value-object", 2, False)}


def test_rotation_dates_and_etags_survive_the_read_back() -> None:
    secret = SecretValue({**secret_value("x" * 20).fields, "NextRotationDate": "2030-01-01T00:00:00Z"})
    for response_format in FORMATS.values():
        held = redact.Guard().hold_secret("x" * 20)
        cached = CachedSecret(secret, response_format.secret(secret), response_format, held)
        assert (cached.next_rotation, cached.etag) == ("2030-01-01T00:00:00Z", b'"v1"')
        assert cached.secret.fields["NextRotationDate"] == "2030-01-01T00:00:00Z"
