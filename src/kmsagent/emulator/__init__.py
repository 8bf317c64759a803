"""Fakes of KMS Secrets Manager, the ECS metadata service, STS AssumeRole and a credentials URI on
loopback, for `--dev` and tests."""

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
from kmsagent.emulator.sts import AssumeRoleCall, StsEmulator
from kmsagent.emulator.uri import CredentialsUriEmulator

__all__ = [
    "ACS_CURRENT",
    "ACS_PREVIOUS",
    "BATCH_GET_SECRET_VALUE",
    "BATCH_LIMIT",
    "GET_SECRET_VALUE",
    "AssumeRoleCall",
    "CallRecord",
    "CredentialsUriEmulator",
    "Fault",
    "HttpRequest",
    "HttpResponse",
    "IssuedCredentials",
    "KmsEmulator",
    "MetadataEmulator",
    "StsEmulator",
    "serve_http",
]
