"""Starts `kmsagent --dev` on a free port, warms one secret, and runs wrk against it."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx


def main(seconds: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "bench.toml"
        config.write_text(f'[Server]\nHttpPort = 0\n[Log]\nLevel = "info"\nPath = "{folder}/logs"\n')
        root = Path(__file__).resolve().parents[1]
        (Path(folder) / "dev-secrets.toml").write_text((root / "conf" / "dev-secrets.toml").read_text())
        agent = subprocess.Popen(
            [sys.executable, "-m", "kmsagent", "--dev", "--config", str(config)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        try:
            assert agent.stdout is not None
            line = ""
            while "curl " not in line:
                line = agent.stdout.readline()
                if not line:
                    raise SystemExit("agent exited before printing its curl line")
            command = shlex.split(line.strip())
            token, url = command[2].split(": ", 1)[1], command[3]
            assert httpx.get(url, headers={"X-KMS-Token": token}).status_code == 200  # warm the cache
            print(f"kmsagent --dev, cache hits on {url.split('?')[0]}, wrk {seconds}s, 1 thread")
            for connections in (1, 50):
                result = subprocess.run(
                    ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-H", f"X-KMS-Token: {token}", url],
                    capture_output=True, text=True, check=True,
                ).stdout
                rps = re.search(r"Requests/sec:\s+([\d.]+)", result)
                p50 = re.search(r"50%\s+(\S+)", result)
                p99 = re.search(r"99%\s+(\S+)", result)
                errors = re.search(r"Non-2xx or 3xx responses: (\d+)", result)
                print(
                    f"  {connections:>3} connections: {rps.group(1) if rps else '?'} req/s, "
                    f"p50 {p50.group(1) if p50 else '?'}, p99 {p99.group(1) if p99 else '?'}, "
                    f"non-2xx {errors.group(1) if errors else 0}"
                )
        finally:
            agent.terminate()
            agent.wait(timeout=10)


if __name__ == "__main__":
    main(int(sys.argv[1]))
