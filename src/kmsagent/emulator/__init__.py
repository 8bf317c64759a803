"""Fakes of KMS Secrets Manager and of the ECS metadata service on loopback, for `--dev` and tests."""

from kmsagent.emulator.http import HttpRequest, HttpResponse, serve_http
from kmsagent.emulator.kms import (
    ACS_CURRENT,
    ACS_PREVIOUS,
    BATCH_GET_SECRET_VALUE,
    BATCH_LIMIT,
    GET_SECRET_VALUE,
    CallRecord,
    Fault,
    KmsEmulator,
)
from kmsagent.emulator.metadata import IssuedCredentials, MetadataEmulator

__all__ = [
    "ACS_CURRENT",
    "ACS_PREVIOUS",
    "BATCH_GET_SECRET_VALUE",
    "BATCH_LIMIT",
    "GET_SECRET_VALUE",
    "CallRecord",
    "Fault",
    "HttpRequest",
    "HttpResponse",
    "IssuedCredentials",
    "KmsEmulator",
    "MetadataEmulator",
    "serve_http",
]
