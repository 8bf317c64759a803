"""An in-process fake of a credentials URI (`ALIBABA_CLOUD_CREDENTIALS_URI`, `credentials_uri`).

`GET <path>` answers `{"Code": "Success", "AccessKeyId", "AccessKeySecret", "SecurityToken",
"Expiration", "LastUpdated"}`, as a sidecar or node agent does. Like such a service (and the ECS
metadata service), it hands out the same credentials while more than half their lifetime is left,
so two clients that ask within that time get the same ones, and mints new ones after. Minted
credentials are registered with the `KmsEmulator`, which accepts them until they expire. Switches
take it down, make it answer garbage or a failure Code.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from functools import partial

import trio

from kmsagent.emulator.http import HttpRequest, HttpResponse, serve_http
from kmsagent.emulator.kms import KmsEmulator
from kmsagent.emulator.metadata import IssuedCredentials, mint

PATH = "/credentials"


class CredentialsUriEmulator:
    """A credentials URI serving STS credentials of one role."""

    def __init__(
        self,
        kms: KmsEmulator,
        *,
        lifetime: float = 3600,
        clock: Callable[[], float] = time.time,
        secrets: Iterable[str] | None = None,
        path: str = PATH,
    ) -> None:
        self.kms = kms
        self.lifetime = lifetime
        self.clock = clock
        self.path = path
        self._may_read = frozenset(secrets) if secrets is not None else None
        #: Switches: answer 503; answer credentials that are not JSON; answer this Code.
        self.outage = False
        self.malformed = False
        self.failure_code: str | None = None
        self.issued: list[IssuedCredentials] = []
        self.requests = 0
        self.uri: str | None = None

    async def serve(
        self, *, host: str = "127.0.0.1", port: int = 0, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serves until cancelled; `uri` is then the `http://127.0.0.1:<port>/credentials` to configure."""
        async with trio.open_nursery() as nursery:
            bound: int = await nursery.start(partial(serve_http, self._handle, host=host, port=port))
            self.uri = f"http://{host}:{bound}{self.path}"
            task_status.started(bound)

    async def _handle(self, request: HttpRequest) -> HttpResponse:
        self.requests += 1
        if self.outage:
            return _json(503, {"Code": "ServiceUnavailable"})
        if request.method != "GET" or request.path != self.path:
            return _json(404, {"Code": "NotFound"})
        if self.malformed:
            return HttpResponse(200, [("content-type", "application/json")], b'{"AccessKeyId": "STS.trunc')
        now = self.clock()
        if not self.issued or self.issued[-1].expires_at - now <= self.lifetime / 2:
            self.issued.append(mint(self.kms, self.lifetime, now, self._may_read))
        document = {**self.issued[-1].document(now), "Code": self.failure_code or "Success"}
        return _json(200, document)


def _json(status: int, document: dict[str, str]) -> HttpResponse:
    return HttpResponse(status, [("content-type", "application/json")], json.dumps(document).encode())
