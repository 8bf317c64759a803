"""Side by side, one machine, one load generator (wrk): kmsagent vs stock QuartTrio-on-hypercorn vs nginx.

(a) kmsagent `--dev` serving a cached 4 KB secret through the real token check (Log Level info);
(b) a minimal QuartTrio app with the same route and body size on stock `hypercorn.trio.serve`;
(c) nginx serving the same bytes (when `nginx` is installed).
At 1, 50 and 800 connections: req/s, p50, p99, errors and timeouts (wrk --timeout 2s), the median
of `RUNS` runs ($BENCH_RUNS, default 3), and the ratios (a)/(b), (a)/(c). Then, for kmsagent: RSS with 1000 cached 4 KB
secrets, time from process start to the first 200, and KMS calls for 100 concurrent cold reads of
one secret. Prints a Markdown report (scripts/bench writes it to docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio

CONNECTIONS = (1, 50, 800)
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
ROUTE = "/secretsmanager/get?secretId=bench/4k"
SECRET_4K = json.dumps({"key": "k" * 4000})[:4096]
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    timeouts: int


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(url: str, headers: dict[str, str], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, headers=headers, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    raise SystemExit(f"no 200 from {url} within {seconds}s ({headers})")


def wrk(url: str, connections: int, seconds: int, token: str) -> Result:
    threads = 1 if connections < 100 else 2
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "2s", "--latency"]
    output = subprocess.run(
        [*command, "-H", f"X-KMS-Token: {token}", url], capture_output=True, text=True, check=True
    ).stdout
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return Result(
        rps=float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),  # type: ignore[union-attr]
        p50_ms=_ms(re.search(r"^\s+50%\s+(\S+)", output, re.MULTILINE).group(1)),  # type: ignore[union-attr]
        p99_ms=_ms(re.search(r"^\s+99%\s+(\S+)", output, re.MULTILINE).group(1)),  # type: ignore[union-attr]
        errors=(sum(int(n) for n in errors.groups()[:3]) if errors else 0) + (int(non_2xx.group(1)) if non_2xx else 0),
        timeouts=int(errors.group(4)) if errors else 0,
    )


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def median(results: list[Result]) -> Result:
    return Result(*(statistics.median(getattr(r, field) for r in results) for field in Result.__dataclass_fields__))


def measure(url: str, token: str, seconds: int) -> dict[int, Result]:
    print(f"measuring {url}", file=sys.stderr, flush=True)
    results: dict[int, list[Result]] = {c: [] for c in CONNECTIONS}
    for connections in CONNECTIONS:
        for _ in range(RUNS):
            results[connections].append(wrk(url, connections, seconds, token))
            time.sleep(1)  # the server closes the last run's connections before the next run opens its own
    return {c: median(runs) for c, runs in results.items()}


def measure_server(command: list[str], port: int, token: str, seconds: int) -> dict[int, Result]:
    """Starts a baseline server, measures it, and stops it."""
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(f"http://127.0.0.1:{port}{ROUTE}", {})
        return measure(f"http://127.0.0.1:{port}{ROUTE}", token, seconds)
    finally:
        server.terminate()
        server.wait(10)


def start_kmsagent(folder: Path, extra_secrets: int = 0) -> tuple[subprocess.Popen[str], str, str, float]:
    """kmsagent --dev with the 4 KB secret (and `extra_secrets` more); returns process, url, token, start time."""
    secrets_toml = "".join(
        f'[[secret]]\nname = "{name}"\ndata = {json.dumps(SECRET_4K)}\n\n'
        for name in ["bench/4k", *(f"bench/{i:04d}" for i in range(extra_secrets))]
    )
    (folder / "dev-secrets.toml").write_text(secrets_toml)
    config = folder / "kmsagent.toml"
    config.write_text(f'[Server]\nHttpPort = {free_port()}\n[Log]\nLevel = "info"\nPath = "{folder}/logs"\n')
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "kmsagent", "--dev", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    assert process.stdout is not None
    line = ""
    while "curl " not in line:
        line = process.stdout.readline()
        if not line:
            raise SystemExit("kmsagent exited before printing its curl line")
    command = shlex.split(line.strip())
    token, url = command[2].split(": ", 1)[1], command[3]
    return process, url.split("/secretsmanager")[0], token, started


BASELINE = textwrap.dedent(
    """
    import sys, trio
    from hypercorn.config import Config
    from hypercorn.trio import serve
    from quart_trio import QuartTrio
    body = open(sys.argv[2], "rb").read()
    app = QuartTrio("baseline")
    @app.route("/secretsmanager/get")
    async def get():
        return body, 200, {"content-type": "application/json"}
    config = Config()
    config.bind = [f"127.0.0.1:{sys.argv[1]}"]
    config.accesslog = None
    trio.run(serve, app, config)
    """
)

NGINX = textwrap.dedent(
    """
    worker_processes 1;
    daemon off;
    pid {folder}/nginx.pid;
    error_log {folder}/nginx-error.log;
    events {{ worker_connections 4096; }}
    http {{
        access_log off;
        client_body_temp_path {folder}/tmp; proxy_temp_path {folder}/tmp; fastcgi_temp_path {folder}/tmp;
        uwsgi_temp_path {folder}/tmp; scgi_temp_path {folder}/tmp;
        server {{
            listen 127.0.0.1:{port};
            location = /secretsmanager/get {{ default_type application/json; alias {folder}/secret.json; }}
        }}
    }}
    """
)


def kms_calls(base: str, token: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=5).text
    return sum(
        float(n) for n in re.findall(r'^kmsagent_kms_requests_total\{outcome="success"\} (\S+)', text, re.MULTILINE)
    )


async def concurrent_cold_reads(base: str, token: str, count: int) -> list[int]:
    async with httpx.AsyncClient(
        headers={"X-KMS-Token": token}, timeout=10, limits=httpx.Limits(max_connections=count)
    ) as client:
        statuses: list[int] = []

        async def read() -> None:
            statuses.append((await client.get(f"{base}/v1/bench/0007")).status_code)

        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(read)
    return statuses


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]


def main(seconds: int) -> None:
    rows: dict[str, dict[int, Result]] = {}
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        folder.chmod(0o755)  # nginx's worker runs as an unprivileged user and must read secret.json
        (folder / "tmp").mkdir()
        (folder / "secret.json").write_text(SECRET_4K)
        agent, base, token, _ = start_kmsagent(folder)
        try:
            wait_for(base + ROUTE, {"X-KMS-Token": token})
            rows["(a) kmsagent"] = measure(base + ROUTE, token, seconds)
        finally:
            agent.terminate()
            agent.wait(10)
        port = free_port()
        (folder / "baseline.py").write_text(BASELINE)
        baseline = [sys.executable, str(folder / "baseline.py"), str(port), str(folder / "secret.json")]
        rows["(b) QuartTrio on stock hypercorn"] = measure_server(baseline, port, token, seconds)
        nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
        if nginx:
            port = free_port()
            (folder / "nginx.conf").write_text(NGINX.format(folder=folder, port=port))
            command = [nginx, "-c", str(folder / "nginx.conf"), "-p", str(folder)]
            rows["(c) nginx"] = measure_server(command, port, token, seconds)
        # kmsagent's footprint, start-up and single flight.
        agent, base, token, started = start_kmsagent(folder, extra_secrets=1000)
        try:
            wait_for(base + ROUTE, {"X-KMS-Token": token})
            first_200 = time.monotonic() - started
            before = kms_calls(base, token)
            statuses = trio.run(concurrent_cold_reads, base, token, 100)
            cold_calls = kms_calls(base, token) - before
            with httpx.Client(headers={"X-KMS-Token": token}, timeout=10) as client:
                for i in range(1000):
                    assert client.get(f"{base}/v1/bench/{i:04d}").status_code == 200
            rss = rss_mb(agent.pid)
        finally:
            agent.terminate()
            agent.wait(10)
    report(rows, seconds, first_200, cold_calls, statuses, rss)


def report(
    rows: dict[str, dict[int, Result]],
    seconds: int,
    first_200: float,
    cold_calls: float,
    statuses: list[int],
    rss: float,
) -> None:
    print(
        f"Medians of {RUNS} wrk runs of {seconds}s each per cell (wrk --timeout 2s; 1 thread, 2 at 800 connections).\n"
    )
    print("| server | connections | req/s | p50 ms | p99 ms | errors | timeouts |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, results in rows.items():
        for connections, r in results.items():
            print(
                f"| {name} | {connections} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} "
                f"| {r.errors:.0f} | {r.timeouts:.0f} |"
            )
    a = rows["(a) kmsagent"]
    print()
    for other in [name for name in rows if not name.startswith("(a)")]:
        b = rows[other]
        ratios = ", ".join(
            f"{c} conn: {a[c].rps / b[c].rps:.2f}x req/s, p99 {a[c].p99_ms / b[c].p99_ms:.2f}x" for c in CONNECTIONS
        )
        print(f"- (a) / {other}: {ratios}")
    print(f"- kmsagent RSS with 1000 cached 4 KB secrets: {rss:.1f} MB (the --dev process, embedded emulator included)")
    print(f"- kmsagent start to first 200: {first_200:.2f} s (--dev: the emulator starts too)")
    print(
        f"- KMS calls for 100 concurrent cold reads of one secret: {cold_calls:.0f} (statuses: {sorted(set(statuses))})"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
