"""Errors that end a request with SPEC §3's status and Code.

Messages are shown to clients and written to logs, so they are built only from names, codes and
KMS's own message text: never from a secret value, a credential or the SSRF token.
"""

from __future__ import annotations


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
        """5xx and throttling: the secret may still be fine, KMS just could not answer now."""
        return self.kms_status >= 500 or self.code == "Rejected.Throttling"


class UpstreamUnavailable(AgentError):
    """KMS could not be reached, or answered with something that is not KMS's JSON."""

    def __init__(self, message: str) -> None:
        super().__init__(502, "UpstreamUnavailable", message)


class UpstreamTimeout(AgentError):
    """KMS did not answer within ReadTimeoutMs on any attempt."""

    def __init__(self, message: str) -> None:
        super().__init__(504, "UpstreamTimeout", message)


def is_transient(error: BaseException) -> bool:
    """True for failures that say nothing about the secret itself (outage, timeout, throttling)."""
    if isinstance(error, KmsError):
        return error.is_transient
    return isinstance(error, (UpstreamUnavailable, UpstreamTimeout))
