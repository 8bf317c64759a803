"""The KMS emulator must accept what the official SDK sends and reject what the real KMS rejects;
so must the STS AssumeRole emulator, and the credentials URI must serve what the SDK parses.

Most tests drive the emulator with the OFFICIAL SDK (in a worker thread, because it blocks); the
ones that need byte-level control (replay, tampering, virtual-time delays) sign requests with the
SDK's own signer and send them with httpx.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import ssl
import statistics
import time
import uuid
from functools import partial
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import trio
from alibabacloud_credentials.provider.uri import URLCredentialsProvider
from alibabacloud_kms20160120.client import Client
from alibabacloud_kms20160120.models import GetSecretValueRequest, GetSecretValueResponseBody
from alibabacloud_tea_openapi.exceptions import (
    ClientException,
    ServerException,
    ThrottlingException,
)
from alibabacloud_tea_openapi.models import Config
from alibabacloud_tea_openapi.utils import Utils
from darabonba.exceptions import UnretryableException
from darabonba.runtime import RuntimeOptions
from Tea.exceptions import TeaException

from kmsagent.credentials.sts import API_VERSION as STS_VERSION
from kmsagent.credentials.sts import rpc_signature
from kmsagent.emulator import (
    CredentialsUriEmulator,
    Fault,
    HttpRequest,
    HttpResponse,
    KmsEmulator,
    StsEmulator,
    serve_http,
)

AK, SK = "LTAI-static-key", "static-secret"
STS_AK, STS_SK, STS_TOKEN = "STS.temp-key", "temp-secret", "CAIS-security-token"
SECRET, VALUE = "db/password", "hunter2"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


class Clock:
    """Wall time plus an offset the test controls, so expiry is testable without sleeping."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def emulator(clock: Clock) -> KmsEmulator:
    kms = KmsEmulator(clock=clock)
    kms.add_credentials(AK, SK)
    kms.add_credentials(STS_AK, STS_SK, STS_TOKEN, expires_at=clock() + 3600)
    kms.put_secret(SECRET, VALUE)
    return kms


@pytest.fixture
async def port(emulator: KmsEmulator, nursery: trio.Nursery) -> int:
    return await nursery.start(emulator.serve)


# --- helpers -----------------------------------------------------------------------------------


def sdk_client(port: int, ak: str = AK, sk: str = SK, token: str | None = None) -> Client:
    config = Config(
        access_key_id=ak,
        access_key_secret=sk,
        security_token=token,
        endpoint=f"127.0.0.1:{port}",
        protocol="http",
        region_id="cn-hangzhou",
    )
    return Client(config)


async def sdk_get(client: Client, name: str = SECRET, **fields: Any) -> GetSecretValueResponseBody:
    request = GetSecretValueRequest(secret_name=name, **fields)
    call = partial(client.get_secret_value_with_options, request, RuntimeOptions())
    return (await trio.to_thread.run_sync(call)).body


async def sdk_error(client: Client, name: str = SECRET, **fields: Any) -> TeaException:
    with pytest.raises(TeaException) as info:
        await sdk_get(client, name, **fields)
    return info.value


def sign(
    port: int,
    query: dict[str, str],
    *,
    ak: str = AK,
    sk: str = SK,
    token: str | None = None,
    date: dt.datetime | None = None,
    action: str = "GetSecretValue",
) -> dict[str, str]:
    """Headers for `POST /?query`, signed the way the SDK signs them."""
    headers = {
        "host": f"127.0.0.1:{port}",
        "x-acs-version": "2016-01-20",
        "x-acs-action": action,
        "x-acs-date": (date or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "x-acs-signature-nonce": uuid.uuid4().hex,
        "accept": "application/json",
        "x-acs-content-sha256": EMPTY_SHA256,
    }
    if token is not None:
        headers |= {"x-acs-accesskey-id": ak, "x-acs-security-token": token}
    request = SimpleNamespace(method="POST", pathname="/", query=query, headers=headers)
    authorization = Utils.get_authorization(request, "ACS3-HMAC-SHA256", EMPTY_SHA256, ak, sk)
    return headers | {"authorization": authorization}


async def post(
    port: int, headers: dict[str, str], query: dict[str, str], content: bytes = b""
) -> httpx.Response:
    """One request on a fresh connection; the 5 s timeout runs on trio's (maybe virtual) clock."""
    async with httpx.AsyncClient(timeout=5) as http:
        return await http.post(
            f"http://127.0.0.1:{port}/", params=query, headers=headers, content=content
        )


async def signed_post(port: int, query: dict[str, str] | None = None, **kw: Any) -> httpx.Response:
    query = {"SecretName": SECRET} if query is None else query
    return await post(port, sign(port, query, **kw), query)


def code_of(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json()["Code"]


# --- the official SDK against the emulator -----------------------------------------------------


async def test_sdk_with_access_key_reads_the_secret(emulator: KmsEmulator, port: int) -> None:
    body = await sdk_get(sdk_client(port))
    assert (body.secret_name, body.secret_data, body.secret_data_type) == (SECRET, VALUE, "text")
    assert body.secret_type == "Generic"
    assert body.version_stages.version_stage == ["ACSCurrent"]
    assert dt.datetime.strptime(body.create_time, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    assert body.request_id and body.next_rotation_date is None
    (call,) = emulator.calls
    assert (call.action, call.secret_name, call.access_key_id, call.status) == (
        "GetSecretValue", SECRET, AK, 200,
    )


async def test_sdk_with_sts_token_reads_the_secret(port: int) -> None:
    body = await sdk_get(sdk_client(port, STS_AK, STS_SK, STS_TOKEN))
    assert body.secret_data == VALUE


async def test_wrong_access_key_secret_is_signature_mismatch(port: int) -> None:
    error = await sdk_error(sdk_client(port, sk="not-the-secret"))
    assert isinstance(error, ClientException)
    assert (error.status_code, error.code) == (400, "SignatureDoesNotMatch")


async def test_unknown_and_revoked_access_keys_are_not_found(
    emulator: KmsEmulator, port: int
) -> None:
    error = await sdk_error(sdk_client(port, ak="LTAI-nobody"))
    assert isinstance(error, ClientException)
    assert (error.status_code, error.code) == (404, "InvalidAccessKeyId.NotFound")
    emulator.revoke_credentials(AK)
    error = await sdk_error(sdk_client(port))
    assert (error.status_code, error.code) == (404, "InvalidAccessKeyId.NotFound")


@pytest.mark.parametrize(
    ("ak", "sk", "token", "code"),
    [
        (STS_AK, STS_SK, "CAIS-someone-elses-token", "InvalidSecurityToken.MismatchWithAccessKey"),
        (STS_AK, STS_SK, None, "InvalidSecurityToken.MismatchWithAccessKey"),
        (AK, SK, "CAIS-token-for-a-permanent-key", "InvalidSecurityToken.Malformed"),
    ],
)
async def test_security_token_must_match_the_key(
    port: int, ak: str, sk: str, token: str | None, code: str
) -> None:
    error = await sdk_error(sdk_client(port, ak, sk, token))
    assert isinstance(error, ClientException)
    assert (error.status_code, error.code) == (400, code)


async def test_expired_credentials_are_rejected(
    emulator: KmsEmulator, clock: Clock, port: int
) -> None:
    emulator.add_credentials("STS.short", "short-secret", "CAIS-short", expires_at=clock() + 60)
    client = sdk_client(port, "STS.short", "short-secret", "CAIS-short")
    assert (await sdk_get(client)).secret_data == VALUE
    clock.offset = 120  # past expires_at, yet well inside the 15 min x-acs-date window
    error = await sdk_error(client)
    assert isinstance(error, ClientException)
    assert (error.status_code, error.code) == (400, "InvalidSecurityToken.Expired")


async def test_rotation_moves_stages_and_keeps_old_versions(
    emulator: KmsEmulator, port: int
) -> None:
    v1 = emulator.put_secret("rotating", "one", version_id="v1")
    v2 = emulator.rotate("rotating", "two")
    v3 = emulator.put_secret("rotating", "three", version_id="v3")
    client = sdk_client(port)

    current = await sdk_get(client, "rotating")
    assert (current.version_id, current.secret_data) == (v3, "three")
    assert current.version_stages.version_stage == ["ACSCurrent"]
    previous = await sdk_get(client, "rotating", version_stage="ACSPrevious")
    assert (previous.version_id, previous.secret_data) == (v2, "two")
    oldest = await sdk_get(client, "rotating", version_id=v1)
    assert (oldest.secret_data, oldest.version_stages.version_stage) == ("one", [])
    pair = await sdk_get(client, "rotating", version_id=v2, version_stage="ACSPrevious")
    assert pair.secret_data == "two"

    for fields in ({"version_id": v1, "version_stage": "ACSCurrent"}, {"version_id": "v9"},
                   {"version_stage": "ACSPending"}):
        error = await sdk_error(client, "rotating", **fields)
        assert (error.status_code, error.code) == (404, "Forbidden.ResourceNotFound"), fields
    with pytest.raises(KeyError):
        emulator.rotate("never-created", "x")
    with pytest.raises(ValueError, match="already has version"):
        emulator.rotate("rotating", "again", version_id=v1)


async def test_unknown_deleted_and_foreign_secrets_are_not_found(
    emulator: KmsEmulator, port: int
) -> None:
    client = sdk_client(port)
    error = await sdk_error(client, "no-such-secret")
    assert isinstance(error, ClientException)
    assert (error.status_code, error.code) == (404, "Forbidden.ResourceNotFound")
    assert error.data["Message"] == "The resource not exists."
    assert {"RequestId", "HostId", "Code", "Message", "HttpStatus"} <= set(error.data)

    arn = f"acs:kms:cn-hangzhou:{emulator.account_id}:secret/{SECRET}"
    assert (await sdk_get(client, arn)).secret_name == SECRET
    error = await sdk_error(client, f"acs:kms:cn-beijing:{emulator.account_id}:secret/{SECRET}")
    assert error.code == "Forbidden.ResourceNotFound"

    emulator.delete_secret(SECRET)
    assert (await sdk_error(client)).code == "Forbidden.ResourceNotFound"


async def test_missing_secret_name(port: int) -> None:
    response = await signed_post(port, {})
    assert code_of(response) == (400, "MissingSecretName")


async def test_binary_secret_is_base64(emulator: KmsEmulator, port: int) -> None:
    emulator.put_secret("tls/key", b"\x00\xffkey", secret_type="Generic")
    body = await sdk_get(sdk_client(port), "tls/key")
    assert body.secret_data_type == "binary"
    assert base64.b64decode(body.secret_data) == b"\x00\xffkey"


async def test_rotation_metadata_only_when_set(emulator: KmsEmulator, port: int) -> None:
    emulator.put_secret(
        "rds/app",
        '{"AccountName":"app","AccountPassword":"pw"}',
        secret_type="Rds",
        next_rotation_date="2026-12-01T00:00:00Z",
        rotation_interval="86400s",
        automatic_rotation="Enabled",
        last_rotation_date="2026-11-30T00:00:00Z",
    )
    body = await sdk_get(sdk_client(port), "rds/app")
    assert body.secret_type == "Rds"
    assert (body.next_rotation_date, body.rotation_interval) == ("2026-12-01T00:00:00Z", "86400s")
    assert (body.automatic_rotation, body.last_rotation_date) == ("Enabled", "2026-11-30T00:00:00Z")


# --- faults ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "exception", "status", "code"),
    [
        (Fault.server_error(), ServerException, 500, "InternalFailure"),
        (Fault.unavailable(), ServerException, 503, "ServiceUnavailableTemporary"),
        (Fault.throttling(), ClientException, 429, "Rejected.Throttling"),
        (Fault(status=403, code="Forbidden.NoPermission", message="no"), ClientException, 403,
         "Forbidden.NoPermission"),
    ],
)
async def test_status_faults_reach_the_sdk(
    emulator: KmsEmulator, port: int, fault: Fault, exception: type, status: int, code: str
) -> None:
    emulator.inject(fault)
    error = await sdk_error(sdk_client(port))
    assert type(error) is exception
    assert (error.status_code, error.code) == (status, code)
    assert emulator.calls[-1].status == status


async def test_throttling_with_retry_after_header(emulator: KmsEmulator, port: int) -> None:
    emulator.inject(Fault.throttling(retry_after_ms=1500))
    error = await sdk_error(sdk_client(port))
    assert isinstance(error, ThrottlingException)
    assert (error.status_code, error.code, error.retry_after) == (429, "Rejected.Throttling", 1500)
    assert error.data["Message"] == "QPS Limit Exceeded"


async def test_delay_fault_in_virtual_time(
    emulator: KmsEmulator, port: int, autojump_clock: trio.testing.MockClock
) -> None:
    emulator.inject(Fault(delay=30), times=1)
    with pytest.raises(httpx.ReadTimeout):
        await signed_post(port)
    emulator.inject(Fault(delay=2), times=1)
    start = trio.current_time()
    response = await signed_post(port)
    assert response.status_code == 200  # a delay-only fault then answers normally
    assert 2 <= trio.current_time() - start < 5


async def test_drop_fault_closes_without_answer(emulator: KmsEmulator, port: int) -> None:
    emulator.inject(Fault(drop=True))
    assert isinstance(await sdk_error(sdk_client(port)), UnretryableException)
    with pytest.raises(httpx.RemoteProtocolError):
        await signed_post(port)
    assert [call.status for call in emulator.calls] == [None, None]


async def test_malformed_fault_truncates_json(emulator: KmsEmulator, port: int) -> None:
    emulator.inject(Fault(malformed=True))
    assert isinstance(await sdk_error(sdk_client(port)), UnretryableException)
    response = await signed_post(port)
    assert response.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        response.json()


async def test_fault_times_and_queue(emulator: KmsEmulator, port: int) -> None:
    emulator.inject(Fault.unavailable(), times=2)
    emulator.inject(Fault.throttling(), times=1)
    statuses = [(await signed_post(port)).status_code for _ in range(4)]
    assert statuses == [503, 503, 429, 200]
    emulator.inject(Fault.server_error())
    assert [(await signed_post(port)).status_code for _ in range(3)] == [500, 500, 500]
    emulator.clear_faults()
    assert (await signed_post(port)).status_code == 200
    assert emulator.call_count() == 8
    with pytest.raises(ValueError, match="times must be at least 1"):
        emulator.inject(Fault.server_error(), times=0)


async def test_call_counter(emulator: KmsEmulator, port: int) -> None:
    client = sdk_client(port)
    emulator.put_secret("other", "x")
    await sdk_get(client)
    await sdk_get(client, f"acs:kms:cn-hangzhou:{emulator.account_id}:secret/{SECRET}")
    await sdk_get(client, "other")
    await sdk_error(sdk_client(port, sk="wrong"))  # rejected requests count too
    assert emulator.call_count() == 4
    assert emulator.call_count(SECRET) == 3
    assert emulator.call_count("other") == 1
    emulator.reset_calls()
    assert emulator.call_count() == 0


# --- request verification, byte by byte --------------------------------------------------------


async def test_nonce_replay_is_rejected(port: int) -> None:
    query = {"SecretName": SECRET}
    headers = sign(port, query)
    assert (await post(port, headers, query)).status_code == 200
    assert code_of(await post(port, headers, query)) == (400, "SignatureNonceUsed")


async def test_tampering_after_signing_is_rejected(port: int) -> None:
    query = {"SecretName": SECRET}
    headers = sign(port, query)
    tampered = headers | {"accept": "application/xml"}
    assert code_of(await post(port, tampered, query)) == (400, "SignatureDoesNotMatch")
    other_query = {"SecretName": "someone/else"}
    assert code_of(await post(port, headers, other_query)) == (400, "SignatureDoesNotMatch")
    body = b"Recipient=x"
    assert code_of(await post(port, headers, query, body)) == (400, "SignatureDoesNotMatch")
    unsigned = headers | {"x-acs-extra": "1"}
    assert code_of(await post(port, unsigned, query)) == (400, "IncompleteSignature")
    # the untampered request still works: failed attempts do not burn the nonce
    assert (await post(port, headers, query)).status_code == 200


async def test_request_without_authorization(port: int) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"http://127.0.0.1:{port}/",
            params={"SecretName": SECRET},
            headers={"x-acs-action": "GetSecretValue", "x-acs-version": "2016-01-20"},
        )
    assert code_of(response) == (400, "IncompleteSignature")


async def test_stale_or_bad_date(port: int) -> None:
    stale = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=16)
    assert code_of(await signed_post(port, date=stale)) == (400, "InvalidTimeStamp.Expired")
    query = {"SecretName": SECRET}
    headers = sign(port, query) | {"x-acs-date": "yesterday"}
    assert code_of(await post(port, headers, query)) == (400, "InvalidTimeStamp.Format")


async def test_action_and_version_are_checked(port: int) -> None:
    response = await signed_post(port, action="Decrypt")
    assert code_of(response) == (404, "InvalidAction.NotFound")
    query = {"SecretName": SECRET}
    headers = sign(port, query) | {"x-acs-version": "2014-05-26"}
    assert code_of(await post(port, headers, query)) == (400, "InvalidVersion")


async def test_sts_via_httpx_and_mismatched_key_header(port: int) -> None:
    assert (await signed_post(port, ak=STS_AK, sk=STS_SK, token=STS_TOKEN)).status_code == 200
    query = {"SecretName": SECRET}
    headers = sign(port, query, ak=STS_AK, sk=STS_SK, token=STS_TOKEN)
    headers["x-acs-accesskey-id"] = AK
    assert code_of(await post(port, headers, query)) == (400, "IncompleteSignature")


async def test_keep_alive_answers_are_fast(port: int) -> None:
    """One write per answer + TCP_NODELAY: no 40 ms Nagle/delayed-ACK stalls on keep-alive."""
    latencies = []
    async with httpx.AsyncClient() as http:
        for _ in range(10):
            query = {"SecretName": SECRET}
            start = time.perf_counter()
            response = await http.post(
                f"http://127.0.0.1:{port}/", params=query, headers=sign(port, query)
            )
            latencies.append(time.perf_counter() - start)
            assert response.status_code == 200
    assert statistics.median(latencies) < 0.02


# --- the HTTP layer on its own -----------------------------------------------------------------


async def _echo_or_fail(request: HttpRequest) -> HttpResponse | None:
    if request.path == "/boom":
        raise RuntimeError("handler bug")
    if request.path == "/drop":
        return None
    text = f"{request.method} {request.path} {sorted(request.query.items())} {request.raw_query}"
    return HttpResponse(200, [("content-type", "text/plain")], text.encode() + b"|" + request.body)


@pytest.fixture
async def echo_port(nursery: trio.Nursery) -> int:
    return await nursery.start(serve_http, _echo_or_fail)


async def test_http_request_decoding_and_keep_alive(echo_port: int) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{echo_port}") as http:
        first = await http.post("/a%20b/c?x=1&x=2&y=h%C3%A9+llo", content=b"payload")
        second = await http.get("/boom")  # 500, and the server lives on
        third = await http.get("/again")
    assert first.text == "POST /a b/c [('x', '1'), ('y', 'hé llo')] x=1&x=2&y=h%C3%A9+llo|payload"
    assert second.status_code == 500
    assert third.status_code == 200
    with pytest.raises(httpx.RemoteProtocolError):
        async with httpx.AsyncClient() as http:
            await http.get(f"http://127.0.0.1:{echo_port}/drop")


async def test_http_malformed_request_gets_400(echo_port: int) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", echo_port)
    async with stream:
        await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
        reply = b""
        while chunk := await stream.receive_some():
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400 ")
    # a client that vanishes mid-request does not hurt the server either
    stream = await trio.open_tcp_stream("127.0.0.1", echo_port)
    await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    await stream.aclose()
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"http://127.0.0.1:{echo_port}/ok")).status_code == 200


async def test_emulator_over_tls(emulator: KmsEmulator, nursery: trio.Nursery) -> None:
    server_context, client_context = _self_signed_contexts()
    port = await nursery.start(partial(emulator.serve, ssl_context=server_context))
    assert emulator.endpoint == f"127.0.0.1:{port}"
    query = {"SecretName": SECRET}
    async with httpx.AsyncClient(verify=client_context) as http:
        response = await http.post(
            f"https://127.0.0.1:{port}/", params=query, headers=sign(port, query)
        )
    assert response.json()["SecretData"] == VALUE


def _self_signed_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A throwaway certificate for 127.0.0.1, built in memory with `cryptography`."""
    import ipaddress
    import tempfile

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with tempfile.NamedTemporaryFile() as cert_file, tempfile.NamedTemporaryFile() as key_file:
        cert_file.write(cert_pem)
        key_file.write(key_pem)
        cert_file.flush()
        key_file.flush()
        server.load_cert_chain(cert_file.name, key_file.name)
    client = ssl.create_default_context(cadata=cert_pem.decode())
    return server, client


# --- STS AssumeRole and the credentials URI --------------------------------------------------------

@pytest.fixture
async def sts(emulator: KmsEmulator, nursery: trio.Nursery, clock: Clock) -> StsEmulator:
    service = StsEmulator(emulator, clock=clock)
    await nursery.start(service.serve)
    return service


def assume_role(
    role_arn: str,
    *,
    ak: str = AK,
    sk: str = SK,
    token: str | None = None,
    timestamp: dt.datetime | None = None,
    method: str = "POST",
    **extra: str,
) -> dict[str, str]:
    """AssumeRole parameters signed as the RPC signature documentation says."""
    params = {
        "Action": "AssumeRole",
        "Format": "JSON",
        "Version": STS_VERSION,
        "RoleArn": role_arn,
        "RoleSessionName": "tests",
        "DurationSeconds": "900",
        "SignatureMethod": "HMAC-SHA1",
        "SignatureVersion": "1.0",
        "SignatureNonce": uuid.uuid4().hex,
        "Timestamp": (timestamp or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "AccessKeyId": ak,
        **extra,
    }
    if token is not None:
        params["SecurityToken"] = token
    return params | {"Signature": rpc_signature(params, sk, method)}


async def call_sts(sts: StsEmulator, params: dict[str, str], method: str = "POST") -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://{sts.endpoint}", timeout=5) as http:
        if method == "GET":
            return await http.get("/", params=params)
        return await http.post("/", data=params)


async def test_sts_mints_credentials_kms_accepts_for_the_roles_secrets_until_they_expire(
    sts: StsEmulator, emulator: KmsEmulator, port: int, clock: Clock
) -> None:
    emulator.put_secret("other", "other-value")
    role = sts.add_role("reader", secrets=[SECRET])
    clock.offset = -10  # minted 10 s "ago", so they expire within the 15 min signing window below
    response = await call_sts(sts, assume_role(role))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["AssumedRoleUser"]["Arn"] == f"{role}/tests"
    minted = body["Credentials"]
    assert minted["AccessKeyId"].startswith("STS.") and minted["Expiration"].endswith("Z")
    client = sdk_client(port, minted["AccessKeyId"], minted["AccessKeySecret"], minted["SecurityToken"])
    assert (await sdk_get(client)).secret_data == VALUE
    denied = await sdk_error(client, "other")
    assert (denied.code, denied.statusCode) == ("Forbidden.NoPermission", 403)  # type: ignore[attr-defined]
    clock.offset = 891
    expired = await sdk_error(client)
    assert expired.code == "InvalidSecurityToken.Expired"  # type: ignore[attr-defined]


async def test_sts_accepts_get_and_post_and_sts_callers(sts: StsEmulator) -> None:
    role = sts.add_role("reader")
    assert (await call_sts(sts, assume_role(role, method="GET"), method="GET")).status_code == 200
    assert (await call_sts(sts, assume_role(role, ak=STS_AK, sk=STS_SK, token=STS_TOKEN))).status_code == 200
    minted = sts.issued[-1]  # a role session may assume another role (a chain)
    chained = assume_role(role, ak=minted.access_key_id, sk=minted.access_key_secret, token=minted.security_token)
    assert (await call_sts(sts, chained)).status_code == 200
    assert [call.status for call in sts.calls] == [200, 200, 200]


def sts_code(response: httpx.Response) -> tuple[int, str]:
    body = response.json()
    assert set(body) >= {"RequestId", "HostId", "Code", "Message", "Recommend"}
    return response.status_code, body["Code"]


async def test_sts_checks_like_the_gateway(sts: StsEmulator, clock: Clock) -> None:
    role = sts.add_role("reader", max_session_duration=3600, trusted=[AK, STS_AK], external_id="ext-1")
    ok = {"ExternalId": "ext-1"}
    params = assume_role(role, **ok)
    assert (await call_sts(sts, params)).status_code == 200
    assert sts_code(await call_sts(sts, params)) == (400, "SignatureNonceUsed")
    tampered = params | {"SignatureNonce": "other", "DurationSeconds": "1800"}
    assert sts_code(await call_sts(sts, tampered)) == (400, "SignatureDoesNotMatch")
    assert sts_code(await call_sts(sts, assume_role(role, method="GET", **ok))) == (400, "SignatureDoesNotMatch")
    assert sts_code(await call_sts(sts, assume_role(role, sk="wrong", **ok))) == (400, "SignatureDoesNotMatch")
    assert sts_code(await call_sts(sts, assume_role(role, ak="LTAInobody", **ok))) == (
        404,
        "InvalidAccessKeyId.NotFound",
    )
    stale = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=16)
    assert sts_code(await call_sts(sts, assume_role(role, timestamp=stale, **ok))) == (400, "InvalidTimeStamp.Expired")
    assert sts_code(await call_sts(sts, assume_role(role, ak=STS_AK, sk=STS_SK, **ok))) == (
        400,
        "InvalidSecurityToken.MismatchWithAccessKey",
    )
    assert sts_code(await call_sts(sts, assume_role(role, token="t", **ok))) == (400, "InvalidSecurityToken.Malformed")
    assert sts_code(await call_sts(sts, assume_role(role, DurationSeconds="3601", **ok))) == (
        400,
        "InvalidParameter.DurationSeconds",
    )
    assert sts_code(await call_sts(sts, assume_role(role, RoleSessionName="a b", **ok))) == (
        400,
        "InvalidParameter.RoleSessionName",
    )
    assert sts_code(await call_sts(sts, assume_role(role, Policy="{not json", **ok))) == (
        400,
        "InvalidParameter.PolicyGrammar",
    )
    assert sts_code(await call_sts(sts, assume_role(role + "x", **ok))) == (404, "EntityNotExist.Role")
    assert sts_code(await call_sts(sts, assume_role(role))) == (403, "NoPermission")  # no ExternalId
    emulator_key = "LTAIuntrusted"
    sts.kms.add_credentials(emulator_key, "untrusted-secret")
    assert sts_code(await call_sts(sts, assume_role(role, ak=emulator_key, sk="untrusted-secret", **ok))) == (
        403,
        "NoPermission",
    )
    sts.kms.add_credentials("STS.expired", "expired-sk", "expired-token", expires_at=clock() - 1)
    sts.roles[role.lower()].trusted = None
    assert sts_code(
        await call_sts(sts, assume_role(role, ak="STS.expired", sk="expired-sk", token="expired-token", **ok))
    ) == (
        400,
        "InvalidSecurityToken.Expired",
    )
    sts.outage = True
    assert sts_code(await call_sts(sts, assume_role(role, **ok))) == (503, "ServiceUnavailable")
    assert len(sts.issued) == 1


async def test_sts_signature_mismatch_quotes_the_string_to_sign_as_the_gateway_does(sts: StsEmulator) -> None:
    """Why the agent never logs STS's Message: it carries the caller's security token."""
    role = sts.add_role("reader")
    response = await call_sts(sts, assume_role(role, ak=STS_AK, sk="wrong", token=STS_TOKEN))
    assert sts_code(response) == (400, "SignatureDoesNotMatch")
    assert STS_TOKEN in response.json()["Message"]


async def test_the_credentials_uri_serves_the_same_credentials_for_half_their_lifetime(
    emulator: KmsEmulator, nursery: trio.Nursery, port: int, clock: Clock
) -> None:
    uri = CredentialsUriEmulator(emulator, lifetime=600, clock=clock)
    await nursery.start(uri.serve)
    provider = URLCredentialsProvider(uri=uri.uri)
    first = await trio.to_thread.run_sync(provider.get_credentials)  # the SDK parses its answer
    async with httpx.AsyncClient(timeout=5) as http:
        assert (await http.get(str(uri.uri))).json()["AccessKeyId"] == first.get_access_key_id()
        clock.offset = 301
        renewed = (await http.get(str(uri.uri))).json()
        assert renewed["AccessKeyId"] != first.get_access_key_id() and len(uri.issued) == 2
        client = sdk_client(port, renewed["AccessKeyId"], renewed["AccessKeySecret"], renewed["SecurityToken"])
        assert (await sdk_get(client)).secret_data == VALUE
        uri.outage = True
        assert (await http.get(str(uri.uri))).status_code == 503
        uri.outage, uri.failure_code = False, "Failed"
        assert (await http.get(str(uri.uri))).json()["Code"] == "Failed"
        assert (await http.get(str(uri.uri).replace("/credentials", "/other"))).status_code == 404
