"""`python -m kmsagent` and the `kmsagent` console script.

`kmsagent get ...` goes to the client before the agent's modules are imported: they cost ≈1.5 s
and ≈74 MB, too much for a command that health checks run every few seconds.
"""

import sys


def main() -> int:
    if sys.argv[1:2] == ["get"]:
        from kmsagent.client import main as get

        return get(sys.argv[2:])
    from kmsagent.cli import main as agent

    return agent()


if __name__ == "__main__":
    raise SystemExit(main())
