"""kmsagent: a local secret-caching agent for Alibaba Cloud KMS Secrets Manager, on trio."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kmsagent")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
