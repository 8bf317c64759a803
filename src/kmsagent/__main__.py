"""`python -m kmsagent` and the `kmsagent` console script.

Signals are held (signals.py) before the ≈0.8 s of imports that `kmsagent.cli` brings in, so a
SIGTERM, SIGINT or SIGHUP at any moment from here on is handled, never fatal. `kmsagent get ...`
goes to the client before any of that: the agent's modules cost ≈1.5 s and ≈74 MB, too much for
a command that health checks run every few seconds, and a client keeps the default signals.
"""

import sys


def main() -> int:
    if sys.argv[1:2] == ["get"]:
        from kmsagent.client import main as get

        return get(sys.argv[2:])
    from kmsagent import signals

    signals.hold()
    from kmsagent.cli import main as run

    return run()


if __name__ == "__main__":
    raise SystemExit(main())
