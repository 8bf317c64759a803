"""Credentials from a URI (`credentials_uri`): `GET <uri>` answers STS credentials as JSON
(`Code: "Success"`, `AccessKeyId`, `AccessKeySecret`, `SecurityToken`, `Expiration`), renewed
like the ECS role's by `renewing.py`'s loop (SPEC §6).

The URI must be https, or http to a loopback or link-local address only (a sidecar, a node
agent): plain http anywhere else would carry the credentials in clear text. Its query string may
hold a token of its own, so logs and errors name only scheme, host and path, and the query's
values are given to the redaction guard (httpx logs each URL it requests, at INFO, which logs.py
keeps out of the sinks).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlsplit

from kmsagent import redact
from kmsagent.config import is_credentials_uri
from kmsagent.credentials.base import Credentials, CredentialsUnavailable
from kmsagent.credentials.renewing import FetchError, RenewingCredentials
from kmsagent.errors import AgentError, UpstreamUnavailable

if TYPE_CHECKING:
    import httpx

ENVIRONMENT = "ALIBABA_CLOUD_CREDENTIALS_URI"
#: Seconds for each step of a call (httpx.Timeout's).
URI_TIMEOUT = {"connect": 2.0, "read": 5.0, "write": 5.0, "pool": 2.0}
#: A credentials answer is a few hundred bytes; more is not one.
MAX_ANSWER = 64 * 1024


def shown(uri: str) -> str:
    """The URI without its query, fragment or user info: what a log line may say."""
    parts = urlsplit(uri)
    return f"{parts.scheme}://{parts.hostname}{':' + str(parts.port) if parts.port else ''}{parts.path}"


class UriCredentials(RenewingCredentials):
    """STS credentials from `GET <uri>`, kept fresh by `run` in the agent's nursery."""

    def __init__(
        self, uri: str, *, renew_before: float, clock: Callable[[], float] = time.time, origin: str = "CredentialsUri"
    ) -> None:
        if not is_credentials_uri(uri):
            raise CredentialsUnavailable(
                f"{origin} must be an https:// URL, or http:// to a loopback or link-local address"
            )
        super().__init__(renew_before=renew_before, clock=clock)
        query = urlsplit(uri).query
        redact.remember(query, *(value for _, value in parse_qsl(query)))
        self._uri = uri
        self.label = f"credentials from {shown(uri)}"
        self.kind = f"credentials_uri ({shown(uri)})"

    def _http_client(self) -> httpx.AsyncClient:
        import httpx  # on first use: an agent on static keys never loads it (≈ 35 ms of start-up)

        return httpx.AsyncClient(timeout=httpx.Timeout(**URI_TIMEOUT), trust_env=False, follow_redirects=False)

    def _unavailable(self) -> AgentError:
        return UpstreamUnavailable(
            f"no valid credentials: {shown(self._uri)} has not provided any (see the agent's log)"
        )

    async def _fetch(self, http: httpx.AsyncClient) -> Credentials:
        import httpx

        where = shown(self._uri)
        try:
            async with http.stream("GET", self._uri) as response:
                if response.status_code != 200:
                    raise FetchError(f"{where} answered HTTP {response.status_code}")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_ANSWER:
                        raise FetchError(f"{where} answered more than {MAX_ANSWER} bytes")
        except httpx.HTTPError as error:
            raise FetchError(f"cannot reach {where}: {type(error).__name__}") from None
        try:
            document = json.loads(body)
        except ValueError:
            raise FetchError(f"{where} answered credentials that are not JSON") from None
        if isinstance(document, dict) and document.get("Code") != "Success":
            raise FetchError(f"{where} answered Code {str(document.get('Code'))[:40]!r}")
        return self._checked(document, where)
