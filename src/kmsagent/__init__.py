"""kmsagent: a local secret-caching agent for Alibaba Cloud KMS Secrets Manager, on trio.

Importing the package imports nothing: `python -m kmsagent` runs this file before `__main__`
can hold signals, and `importlib.metadata` alone took 90 ms, so `__version__` is looked up on
first use.
"""

from __future__ import annotations


def __getattr__(name: str) -> str:
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("kmsagent")
    except PackageNotFoundError:  # running from a source tree that was never installed
        found = "0.0.0+unknown"
    globals()["__version__"] = found
    return found
