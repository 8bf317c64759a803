"""Errors that end a request with SPEC §3's status and Code, and the one rule of what is transient.

Messages are shown to clients and written to logs, so they are built only from names, codes and
KMS's own message text: never from a secret value, a credential or the SSRF token.
"""

from __future__ import annotations

THROTTLING = "Rejected.Throttling"
NOT_FOUND = "Forbidden.ResourceNotFound"


class AgentError(Exception):
    """A request failure with the HTTP status and Code that the client receives."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class KmsError(AgentError):
    """KMS answered with an error: its Code and Message; its 4xx status, or 502 for its 5xx."""

    def __init__(self, kms_status: int, code: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(502 if kms_status >= 500 else kms_status, code, message)
        self.kms_status = kms_status
        self.retry_after = retry_after  # seconds, from x-acs-retry-after

    @property
    def is_transient(self) -> bool:
        return is_transient(self)


class UpstreamUnavailable(AgentError):
    """KMS could not be reached, or answered with something that is not KMS's JSON."""

    def __init__(self, message: str) -> None:
        super().__init__(502, "UpstreamUnavailable", message)


class UpstreamTimeout(AgentError):
    """KMS did not answer within ReadTimeoutMs on any attempt, or within the request's RequestTimeoutMs."""

    def __init__(self, message: str) -> None:
        super().__init__(504, "UpstreamTimeout", message)


def is_transient(error: BaseException) -> bool:
    """SPEC §5's one list, used by retries, stale serving, endpoint fallback and batching.

    Transient: connection refused or reset, name resolution and TLS failures, timeouts, malformed
    answers and HTTP 3xx (all `UpstreamUnavailable` or `UpstreamTimeout`), KMS 5xx and
    `Rejected.Throttling`: the secret may be fine, KMS (or this endpoint) could not answer now.
    Every other KMS 4xx is final: it is the secret's answer (deleted, no permission).
    """
    if isinstance(error, KmsError):
        return error.kms_status >= 500 or not 400 <= error.kms_status < 500 or error.code == THROTTLING
    return isinstance(error, (UpstreamUnavailable, UpstreamTimeout))
