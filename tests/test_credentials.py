"""Credentials: the ECS RAM-role task against the metadata emulator (autojump_clock), the OIDC
wrapper, and the dedicated gateway's TLS. The chain, profiles, URIs and STS: test_credentials_*.py."""

from __future__ import annotations

import datetime
import ipaddress
import itertools
import json
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import AK_ID, AK_SECRET, SECRETS, StartAgent, eventually, read_for
from kmsagent.config import CredentialsConfig
from kmsagent.credentials import Credentials
from kmsagent.credentials.base import parse_expiration
from kmsagent.credentials.ecs_role import REJECTION_RENEW_INTERVAL, EcsRamRoleCredentials
from kmsagent.credentials.oidc import OidcRoleCredentials
from kmsagent.emulator import Fault, HttpResponse, KmsEmulator, MetadataEmulator
from kmsagent.errors import UpstreamUnavailable

SECRET_PATH = "/secretsmanager/get?secretId=api-key"


@pytest.fixture
async def wall_clock(autojump_clock: trio.testing.MockClock) -> Callable[[], float]:
    """Wall time that moves with trio's virtual clock, shared by the emulators and the agent."""
    offset = time.time() - trio.current_time()
    return lambda: offset + trio.current_time()


@pytest.fixture
async def metadata(nursery: trio.Nursery, emulator: KmsEmulator, wall_clock: Callable[[], float]) -> MetadataEmulator:
    service = MetadataEmulator(emulator, lifetime=20, clock=wall_clock)
    await nursery.start(service.serve)
    return service


def ecs_role(metadata: MetadataEmulator, wall_clock: Callable[[], float], **config: object) -> EcsRamRoleCredentials:
    settings: dict[str, object] = {"metadata_endpoint": metadata.endpoint, "renew_before_seconds": 15}
    settings.update(config)
    return EcsRamRoleCredentials(CredentialsConfig(**settings), clock=wall_clock)  # type: ignore[arg-type]


async def test_renewals_come_before_expiry_and_reads_never_fail(
    start_agent: StartAgent,
    metadata: MetadataEmulator,
    wall_clock: Callable[[], float],
    autojump_clock: trio.testing.MockClock,
) -> None:
    agent = await start_agent(credentials=ecs_role(metadata, wall_clock), cache={"ttl_seconds": 0})
    statuses = await read_for(lambda: agent.get(SECRET_PATH), seconds=60, every=0.5)
    assert {status for _, status in statuses} == {200}
    renewals = len(metadata.issued) - 1
    assert renewals >= 3
    # Each renewal came min(RenewBeforeSeconds = 15 s, a third of the 20 s lifetime) before expiry.
    for previous, following in itertools.pairwise(metadata.issued):
        minted_at = following.expires_at - metadata.lifetime
        assert minted_at == pytest.approx(previous.expires_at - 20 / 3, abs=1)  # Expiration has whole seconds


async def test_a_metadata_outage_keeps_old_credentials_until_expiry_then_502_then_recovers(
    start_agent: StartAgent,
    metadata: MetadataEmulator,
    wall_clock: Callable[[], float],
    autojump_clock: trio.testing.MockClock,
) -> None:
    agent = await start_agent(credentials=ecs_role(metadata, wall_clock), cache={"ttl_seconds": 0})
    assert (await agent.get(SECRET_PATH)).status_code == 200
    expires = metadata.issued[-1].expires_at - wall_clock()  # about 20 s from now
    metadata.outage = True
    during = await read_for(lambda: agent.get(SECRET_PATH), seconds=40, every=1)
    assert all(status == 200 for at, status in during if at < expires - 1.5)
    assert all(status == 502 for at, status in during if at > expires + 0.5)
    assert len(metadata.issued) == 1
    metadata.outage = False
    after = await read_for(lambda: agent.get(SECRET_PATH), seconds=40, every=1)
    assert after[-1][1] == 200 and len(metadata.issued) >= 2
    recovered_at = next(at for at, status in after if status == 200)
    assert all(status == 200 for at, status in after if at >= recovered_at)
    response = await agent.get(SECRET_PATH)
    assert response.json()["SecretData"] == SECRETS["api-key"]


async def test_a_502_before_credentials_names_the_metadata_service(
    start_agent: StartAgent,
    metadata: MetadataEmulator,
    wall_clock: Callable[[], float],
    autojump_clock: trio.testing.MockClock,
) -> None:
    metadata.outage = True
    agent = await start_agent(credentials=ecs_role(metadata, wall_clock))
    assert (await agent.get("/ping")).status_code == 200  # serving before any credentials
    response = await agent.get(SECRET_PATH)
    assert response.status_code == 502
    assert "metadata service" in response.json()["Message"]


@pytest.mark.parametrize("require_token", [True, False])
async def test_hardened_mode_sends_the_token_on_every_get(
    start_agent: StartAgent,
    metadata: MetadataEmulator,
    wall_clock: Callable[[], float],
    autojump_clock: trio.testing.MockClock,
    require_token: bool,
) -> None:
    metadata.require_token = require_token
    agent = await start_agent(credentials=ecs_role(metadata, wall_clock, disable_imdsv1=True))
    assert (await agent.get(SECRET_PATH)).status_code == 200
    gets = [request for request in metadata.requests if request[0] == "GET"]
    assert len(gets) == 2 and all(valid for _, _, valid in gets)  # role discovery, credentials


async def test_without_the_token_api_imdsv1_is_the_fallback_unless_disabled(
    start_agent: StartAgent,
    metadata: MetadataEmulator,
    wall_clock: Callable[[], float],
    autojump_clock: trio.testing.MockClock,
) -> None:
    metadata.token_api = False
    agent = await start_agent(credentials=ecs_role(metadata, wall_clock))
    assert (await agent.get(SECRET_PATH)).status_code == 200
    hardened = await start_agent(credentials=ecs_role(metadata, wall_clock, disable_imdsv1=True))
    assert (await hardened.get("/secretsmanager/get?secretId=db/password")).status_code == 502
    assert [method for method, path, _ in metadata.requests if method == "GET"] == ["GET", "GET"]


async def test_an_expired_token_triggers_exactly_one_renewal_and_the_retry_succeeds(
    start_agent: StartAgent,
    emulator: KmsEmulator,
    wall_clock: Callable[[], float],
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
) -> None:
    metadata = MetadataEmulator(emulator, lifetime=3600, clock=wall_clock)
    await nursery.start(metadata.serve)
    agent = await start_agent(credentials=ecs_role(metadata, wall_clock), cache={"ttl_seconds": 0})
    assert (await agent.get(SECRET_PATH)).status_code == 200
    first = metadata.issued[-1]
    # KMS now says the security token expired, although its Expiration is an hour away.
    emulator.add_credentials(
        first.access_key_id, first.access_key_secret, first.security_token, expires_at=wall_clock() - 1
    )
    calls_before = emulator.call_count("api-key")
    response = await agent.get(SECRET_PATH)
    assert response.status_code == 200
    assert len(metadata.issued) == 2
    assert [call.status for call in emulator.calls[calls_before:]] == [400, 200]
    assert emulator.calls[-1].access_key_id == metadata.issued[-1].access_key_id


@pytest.mark.parametrize("breakage", ["malformed", "failure_code", "wrong_role"])
async def test_bad_metadata_answers_are_errors(
    start_agent: StartAgent,
    metadata: MetadataEmulator,
    wall_clock: Callable[[], float],
    autojump_clock: trio.testing.MockClock,
    breakage: str,
) -> None:
    role = "NotTheRole" if breakage == "wrong_role" else ""
    metadata.malformed = breakage == "malformed"
    metadata.failure_code = "Failed" if breakage == "failure_code" else None
    agent = await start_agent(credentials=ecs_role(metadata, wall_clock, role_name=role))
    response = await agent.get(SECRET_PATH)
    assert response.status_code == 502


async def test_no_credential_value_reaches_a_log_line_at_debug(
    start_agent: StartAgent,
    metadata: MetadataEmulator,
    wall_clock: Callable[[], float],
    autojump_clock: trio.testing.MockClock,
    captured_logs: list[str],
) -> None:
    agent = await start_agent(credentials=ecs_role(metadata, wall_clock), cache={"ttl_seconds": 0})
    await read_for(lambda: agent.get(SECRET_PATH), seconds=12, every=1)  # a renewal at ~5 s
    metadata.outage = True
    await read_for(lambda: agent.get(SECRET_PATH), seconds=12, every=1)  # failures, then expiry
    metadata.outage = False
    metadata.malformed = True
    await read_for(lambda: agent.get(SECRET_PATH), seconds=35, every=4)
    assert any("renewed" in line for line in captured_logs)
    assert any("retrying" in line for line in captured_logs)
    text = "\n".join(captured_logs)
    for issued in metadata.issued:
        for value in (issued.access_key_id, issued.access_key_secret, issued.security_token):
            assert value not in text


# --- renewal storms (issue 10, item 10) -----------------------------------------------------------

TOKEN_EXPIRED = Fault(status=400, code="InvalidSecurityToken.Expired", message="The security token has expired.")


async def test_kms_rejecting_every_call_renews_at_most_once_per_5_seconds(
    start_agent: StartAgent,
    emulator: KmsEmulator,
    wall_clock: Callable[[], float],
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
) -> None:
    """It made 286 metadata fetches for 300 reads (150 here); the lifetime is long: no renewal is due."""
    metadata = MetadataEmulator(emulator, lifetime=3600, clock=wall_clock)
    await nursery.start(metadata.serve)
    agent = await start_agent(credentials=ecs_role(metadata, wall_clock), cache={"ttl_seconds": 0})
    assert (await agent.get(SECRET_PATH)).status_code == 200
    emulator.inject(TOKEN_EXPIRED)  # every call from now on
    before, started = len(metadata.issued), trio.current_time()
    statuses = await read_for(lambda: agent.get(SECRET_PATH), seconds=30, every=0.2)
    elapsed = trio.current_time() - started
    assert len(statuses) >= 145 and {status for _, status in statuses} == {400}
    renewals = len(metadata.issued) - before
    assert 1 <= renewals <= elapsed / REJECTION_RENEW_INTERVAL + 1, renewals
    # KMS recovers: the next rejection-free read works with the credentials in hand.
    emulator.clear_faults()
    assert (await agent.get(SECRET_PATH)).status_code == 200


async def test_concurrent_rejections_share_one_renewal_and_later_ones_wait_5_seconds(
    nursery: trio.Nursery,
    metadata: MetadataEmulator,
    wall_clock: Callable[[], float],
    autojump_clock: trio.testing.MockClock,
) -> None:
    source = ecs_role(metadata, wall_clock, renew_before_seconds=5)
    metadata.lifetime = 3600
    await nursery.start(source.run)
    first = await source.current()
    answers: list[bool] = []

    async def reject(credentials: Credentials) -> None:
        answers.append(await source.rejected(credentials))

    async with trio.open_nursery() as rejections:
        for _ in range(300):
            rejections.start_soon(reject, first)
    assert answers == [True] * 300 and len(metadata.issued) == 2  # the first fetch and one renewal
    second = await source.current()
    assert second is not first
    answers.clear()
    async with trio.open_nursery() as rejections:  # too soon after that renewal: none, at once
        for _ in range(300):
            rejections.start_soon(reject, second)
    assert answers == [False] * 300 and len(metadata.issued) == 2
    assert await source.rejected(first)  # a stale rejection: newer credentials exist
    await trio.sleep(REJECTION_RENEW_INTERVAL)
    assert await source.rejected(second) and len(metadata.issued) == 3


# --- Expiration in any ISO 8601 form (issue 10, item 11) ------------------------------------------

EXPIRATION_FORMS = {
    "Z": lambda moment: moment.strftime("%Y-%m-%dT%H:%M:%SZ"),
    "milliseconds Z": lambda moment: moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    "+08:00": lambda moment: moment.astimezone(EAST_8).isoformat(timespec="seconds"),
    "microseconds +08:00": lambda moment: moment.astimezone(EAST_8).isoformat(timespec="microseconds"),
    "naive (UTC)": lambda moment: moment.replace(tzinfo=None).isoformat(timespec="seconds"),
}
EAST_8 = datetime.timezone(datetime.timedelta(hours=8))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-01-01T00:00:00Z", 1767225600.0),
        ("2026-01-01T00:00:00.123Z", 1767225600.123),
        ("2026-01-01T08:00:00+08:00", 1767225600.0),
        ("2026-01-01T08:00:00.123456+08:00", 1767225600.123456),
        ("2026-01-01T00:00:00", 1767225600.0),
        (" 2026-01-01T00:00:00Z\n", 1767225600.0),
    ],
)
def test_an_expiration_is_parsed_in_every_iso_8601_form(text: str, expected: float) -> None:
    assert parse_expiration(text) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("text", ["", "tomorrow", "2026-13-01T00:00:00Z", "1767225600"])
def test_an_expiration_that_is_not_a_time_is_refused(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the promise is the type; the text is datetime's
        parse_expiration(text)


class ExpirationFormMetadata(MetadataEmulator):
    """The metadata emulator, writing `Expiration` in another ISO 8601 form."""

    def __init__(self, *args: object, form: Callable[[datetime.datetime], str], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.form = form

    def _credentials(self) -> HttpResponse:
        response = super()._credentials()
        document = json.loads(response.body)
        moment = datetime.datetime.fromtimestamp(self.issued[-1].expires_at, datetime.UTC)
        document["Expiration"] = self.form(moment)
        return HttpResponse(response.status, response.headers, json.dumps(document).encode())


@pytest.mark.parametrize("form", EXPIRATION_FORMS, ids=list(EXPIRATION_FORMS))
async def test_the_renewal_schedule_follows_every_expiration_form(
    nursery: trio.Nursery,
    emulator: KmsEmulator,
    wall_clock: Callable[[], float],
    autojump_clock: trio.testing.MockClock,
    form: str,
) -> None:
    metadata = ExpirationFormMetadata(emulator, lifetime=3600, clock=wall_clock, form=EXPIRATION_FORMS[form])
    await nursery.start(metadata.serve)
    source = ecs_role(metadata, wall_clock, renew_before_seconds=900)
    await nursery.start(source.run)
    credentials = await source.current()  # a refused Expiration leaves none: UpstreamUnavailable
    precision = 1.0 if form in ("Z", "+08:00", "naive (UTC)") else 0.001  # whole seconds, or finer
    assert credentials.expiration == pytest.approx(metadata.issued[0].expires_at, abs=precision)
    # Renewed before the first credentials expire (virtual time: a look a minute costs nothing).
    await eventually(lambda: len(metadata.issued) >= 2, seconds=3600, interval=60)
    minted = [issued.expires_at - metadata.lifetime for issued in metadata.issued]
    assert minted[1] - minted[0] == pytest.approx(3600 - 900, abs=precision + 0.1)


# --- the OIDC wrapper (the chain itself: test_credentials_chain.py) ---------------------------


class FakeOidcProvider:
    """Stands in for the SDK provider: its errors quote STS's answer, secrets included."""

    def __init__(self, fail: bool) -> None:
        self.fail = fail

    def get_credentials(self) -> object:
        from alibabacloud_credentials.provider.refreshable import Credentials as SdkCredentials

        if self.fail:
            raise RuntimeError(f"error retrieving credentials result: {{'AccessKeySecret': '{AK_SECRET}'}}")
        return SdkCredentials(
            access_key_id="STS.oidc", access_key_secret=AK_SECRET, security_token="tok", expiration=2_000_000_000
        )


async def test_the_oidc_wrapper_converts_and_never_quotes_errors() -> None:
    credentials = await OidcRoleCredentials(FakeOidcProvider(fail=False)).current()
    assert credentials == Credentials("STS.oidc", AK_SECRET, "tok", 2_000_000_000.0)
    with pytest.raises(UpstreamUnavailable) as caught:
        await OidcRoleCredentials(FakeOidcProvider(fail=True)).current()
    assert AK_SECRET not in str(caught.value) and "RuntimeError" in caught.value.message


# --- a dedicated gateway over HTTPS with its own CA -----------------------------------------------


def make_ca_and_server_cert(folder: Path) -> tuple[Path, ssl.SSLContext]:
    """A self-signed CA (written as PEM) and a server context for 127.0.0.1 signed by it."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kmsagent test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kst-test.cryptoservice.kms.aliyuncs.com")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    return ca_path, context


class TestDedicatedGateway:
    """Real sockets and TLS handshakes: these tests run on the real clock."""

    @pytest.fixture
    def wall_clock(self) -> Callable[[], float]:
        return time.time

    async def test_https_with_the_gateway_ca_works_and_without_it_fails_clearly(
        self, tmp_path: Path, nursery: trio.Nursery, start_agent: StartAgent, captured_logs: list[str]
    ) -> None:
        ca_path, server_context = make_ca_and_server_cert(tmp_path)
        gateway = KmsEmulator()
        gateway.add_credentials(AK_ID, AK_SECRET)
        gateway.put_secret("gw-secret", "value-of-gw-secret-Tz6")
        port = await nursery.start(
            lambda task_status: gateway.serve(ssl_context=server_context, task_status=task_status)
        )
        kms = {"endpoint": f"127.0.0.1:{port}", "protocol": "https", "max_retries": 0}
        trusted = await start_agent(kms={**kms, "ca_file_path": str(ca_path)})
        response = await trusted.get("/v1/gw-secret")
        assert response.status_code == 200 and response.json()["SecretData"] == "value-of-gw-secret-Tz6"
        untrusted = await start_agent(kms=kms)
        response = await untrusted.get("/v1/gw-secret")
        assert (response.status_code, response.json()["Code"]) == (502, "UpstreamUnavailable")
        assert any("CERTIFICATE_VERIFY_FAILED" in line for line in captured_logs)
