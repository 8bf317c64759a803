"""`python -m kmsagent` and the `kmsagent` console script.

Signals are held (signals.py) before the ≈0.8 s of imports that `kmsagent.cli` brings in, so a
SIGTERM, SIGINT or SIGHUP at any moment from here on is handled, never fatal.
"""

from kmsagent import signals


def main() -> int:
    signals.hold()
    from kmsagent.cli import main as run

    return run()


if __name__ == "__main__":
    raise SystemExit(main())
