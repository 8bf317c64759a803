"""kmsagent: a local secret-caching agent for Alibaba Cloud KMS Secrets Manager, on trio."""

from __future__ import annotations


def __getattr__(name: str) -> str:
    """`__version__`, read on first use: importlib.metadata costs `kmsagent get` more than all of its
    own imports (measured with -X importtime: ≈0.1-0.2 s of a ≈0.3 s run)."""
    if name != "__version__":
        raise AttributeError(f"module 'kmsagent' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("kmsagent")
    except PackageNotFoundError:  # running from a source tree that was never installed
        found = "0.0.0+unknown"
    globals()["__version__"] = found
    return found
