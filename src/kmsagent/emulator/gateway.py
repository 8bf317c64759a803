"""What Alibaba Cloud's API gateways check of every signed request, whatever its signature scheme:
the clock skew of its timestamp, its security token, and nonce replay.

The KMS emulator (ACS3-HMAC-SHA256 in headers) and the STS emulator (the legacy RPC HMAC-SHA1 in
the query) both make these checks, in the same way and with the same error codes; each words and
shapes a refusal as its own service does, so each passes `refuse`, which turns a code into the
exception it raises.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from datetime import UTC, datetime

#: Both the clock-skew allowance and how long the real gateways remember a nonce.
WINDOW_SECONDS = 15 * 60
#: `x-acs-date` (KMS) and `Timestamp` (STS): UTC, whole seconds.
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

#: Turns an error code into the exception the emulator raises for it.
Refuse = Callable[[str], Exception]


def same(received: str, expected: str) -> bool:
    """Constant-time equality, so probing a signature or token leaks nothing through timing."""
    return hmac.compare_digest(received.encode(), expected.encode())


def check_timestamp(text: str, now: float, refuse: Refuse) -> None:
    """`InvalidTimeStamp.Format` unless `text` is a TIME_FORMAT time; `InvalidTimeStamp.Expired`
    when it is more than WINDOW_SECONDS away from `now`, either way."""
    try:
        sent = datetime.strptime(text, TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        raise refuse("InvalidTimeStamp.Format") from None
    if abs(sent.timestamp() - now) > WINDOW_SECONDS:
        raise refuse("InvalidTimeStamp.Expired")


def check_security_token(
    sent: str | None, registered: str | None, expires_at: float | None, now: float, refuse: Refuse
) -> None:
    """A key registered with a security token needs exactly it (`...MismatchWithAccessKey`), a
    permanent key must send none (`...Malformed`), and an expired key is refused (`...Expired`)."""
    if registered is None:
        if sent is not None:
            raise refuse("InvalidSecurityToken.Malformed")
    elif sent is None or not same(sent, registered):
        raise refuse("InvalidSecurityToken.MismatchWithAccessKey")
    if expires_at is not None and now >= expires_at:
        raise refuse("InvalidSecurityToken.Expired")


class Nonces:
    """The signature nonces seen in the last WINDOW_SECONDS, which a request may not use again."""

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}  # insertion order == time order, so pruning is cheap

    def check(self, nonce: str, now: float, refuse: Refuse) -> None:
        """`MissingSignatureNonce` for none, `SignatureNonceUsed` for one seen; else remembers it."""
        if not nonce:
            raise refuse("MissingSignatureNonce")
        while self._seen:
            oldest, seen_at = next(iter(self._seen.items()))
            if seen_at > now - WINDOW_SECONDS:
                break
            del self._seen[oldest]
        if nonce in self._seen:
            raise refuse("SignatureNonceUsed")
        self._seen[nonce] = now
