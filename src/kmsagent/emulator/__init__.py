"""A fake KMS Secrets Manager on loopback, used by `--dev` mode and by the tests."""

from kmsagent.emulator.http import HttpRequest, HttpResponse, serve_http
from kmsagent.emulator.kms import ACS_CURRENT, ACS_PREVIOUS, CallRecord, Fault, KmsEmulator

__all__ = [
    "ACS_CURRENT",
    "ACS_PREVIOUS",
    "CallRecord",
    "Fault",
    "HttpRequest",
    "HttpResponse",
    "KmsEmulator",
    "serve_http",
]
