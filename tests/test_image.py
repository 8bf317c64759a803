"""The container image and the Kubernetes example (SPEC §11), checked without a container engine.

No Docker or Podman engine runs where the tests run, so: the Dockerfile is parsed and its
promises checked (slim official Python in both stages, a numeric non-root user, only the built
environment and the config in the final stage, an exec-form HEALTHCHECK, STOPSIGNAL SIGTERM);
its build steps run as a script into a temporary folder; its health check command runs against
a live agent; and the Kubernetes manifests are validated against the Kubernetes schemas and
checked for the native-sidecar shape.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from conftest import StartAgent
from kmsagent.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
SIDECAR = ROOT / "conf" / "kubernetes" / "kmsagent-sidecar.yaml"
#: The kubelet's default container log rotation: containerLogMaxSize × containerLogMaxFiles.
KUBELET_LOG_BUDGET = 10 * 5 * 2**20
#: The oldest Kubernetes with native sidecars on by default (beta in 1.29).
SIDECAR_KUBERNETES = "1.29.0"


# --- Dockerfile parsing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


def instructions(text: str) -> list[Instruction]:
    """Logical lines (comments dropped, `\\` continuations joined) as (KEYWORD, arguments)."""
    result: list[Instruction] = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical = pending + line
        pending = ""
        keyword, _, arguments = logical.strip().partition(" ")
        result.append(Instruction(keyword.upper(), arguments.strip()))
    assert not pending, "a continuation line ends the file"
    return result


def stages(parsed: list[Instruction]) -> list[list[Instruction]]:
    """Instructions grouped by FROM, ARG defaults before the first FROM substituted into FROMs."""
    args: dict[str, str] = {}
    grouped: list[list[Instruction]] = []
    for instruction in parsed:
        if instruction.keyword == "ARG" and not grouped:
            name, _, default = instruction.arguments.partition("=")
            args[name] = default
        elif instruction.keyword == "FROM":
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], instruction.arguments)
            grouped.append([Instruction("FROM", image)])
        else:
            assert grouped, f"{instruction.keyword} before FROM"
            grouped[-1].append(instruction)
    return grouped


def of(stage: list[Instruction], keyword: str) -> list[str]:
    return [instruction.arguments for instruction in stage if instruction.keyword == keyword]


@pytest.fixture(scope="module")
def dockerfile() -> list[list[Instruction]]:
    return stages(instructions(DOCKERFILE.read_text()))


def healthcheck_command(final: list[Instruction]) -> list[str]:
    (healthcheck,) = of(final, "HEALTHCHECK")
    _, _, command = healthcheck.partition(" CMD ")
    argv = json.loads(command)  # exec form: a JSON array, no shell in the image's health check
    assert isinstance(argv, list) and all(isinstance(item, str) for item in argv)
    return argv


# --- the Dockerfile's promises ------------------------------------------------------------------------


def test_two_stages_on_the_official_slim_python_image(dockerfile: list[list[Instruction]]) -> None:
    assert len(dockerfile) == 2
    images = [stage[0].arguments.split()[0] for stage in dockerfile]
    assert all(re.fullmatch(r"python:3\.1[1-9]-slim(-[a-z]+)?", image) for image in images), images
    assert images[0] == images[1], "the venv's interpreter link needs the same Python in both stages"
    assert dockerfile[0][0].arguments.endswith(" AS build")


def test_the_final_stage_runs_as_a_numeric_non_root_user(dockerfile: list[list[Instruction]]) -> None:
    final = dockerfile[-1]
    (user,) = of(final, "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, "Kubernetes' runAsNonRoot can only verify a numeric user"
    assert gid.isdigit() and int(gid) != 0
    assert final.index(Instruction("USER", user)) > max(
        i for i, ins in enumerate(final) if ins.keyword in ("RUN", "COPY")
    )


def test_the_final_stage_holds_only_the_built_environment_and_the_config(dockerfile: list[list[Instruction]]) -> None:
    build, final = dockerfile
    copies = of(final, "COPY")
    assert copies == ["--from=build /opt/kmsagent /opt/kmsagent", "conf/container.toml /etc/kmsagent/kmsagent.toml"]
    assert not any("pip" in run or "apt" in run for run in of(final, "RUN")), "nothing is installed in the final stage"
    assert any("venv --without-pip /opt/kmsagent" in run for run in of(build, "RUN"))
    assert "KMSAGENT_CONFIG=/etc/kmsagent/kmsagent.toml" in " ".join(of(final, "ENV"))


def test_the_health_check_and_the_stop_signal(dockerfile: list[list[Instruction]]) -> None:
    final = dockerfile[-1]
    assert of(final, "STOPSIGNAL") == ["SIGTERM"]
    argv = healthcheck_command(final)
    assert argv[:4] == ["python", "-I", "-S", "-c"] and "/ping" in argv[4] and "127.0.0.1" in argv[4]
    assert json.loads(of(final, "ENTRYPOINT")[0]) == ["kmsagent"]
    assert "EXPOSE" not in [instruction.keyword for instruction in final], "the agent listens on loopback only"


def test_the_image_config_logs_to_stderr_only() -> None:
    document = tomllib.loads((ROOT / "conf" / "container.toml").read_text())
    assert document["Log"]["Path"] == ""
    parses(document)


def parses(document: dict[str, Any]) -> None:
    """The agent accepts the config, `[Log] Path = ""` (stderr only, SPEC §2) included."""
    parse_config(document)


# --- .dockerignore ----------------------------------------------------------------------------------------


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def sent_to_the_build(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    sent = True
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.removeprefix("!").rstrip("/")
        if any(fnmatch.fnmatchcase(candidate, glob) for candidate in candidates):
            sent = negated
    return sent


def test_dockerignore_sends_what_the_build_copies_and_nothing_else(dockerfile: list[list[Instruction]]) -> None:
    patterns = dockerignore_patterns()
    copied = [
        source
        for stage in dockerfile
        for copy in of(stage, "COPY")
        if not copy.startswith("--from=")
        for source in copy.split()[:-1]
    ]
    assert copied and all(sent_to_the_build(source.rstrip("/"), patterns) for source in copied), copied
    assert sent_to_the_build("src/kmsagent/client.py", patterns)
    for private in (".venv/bin/python", ".git/config", "tests/conftest.py", "logs/kmsagent.log", "conf/kmsagent.toml",
                    "src/kmsagent/__pycache__/cli.cpython-311.pyc", "scripts/install.sh"):
        assert not sent_to_the_build(private, patterns), private


# --- the build steps, as a script ---------------------------------------------------------------------------


def test_the_build_steps_make_an_environment_whose_client_needs_nothing_else(
    dockerfile: list[list[Instruction]], tmp_path: Path
) -> None:
    """The build stage's COPY and RUN steps, run here with the paths moved under tmp_path and pip
    kept offline (no index, no dependencies, no build isolation: the test venv's setuptools).
    The environment then holds the wheel alone, and `kmsagent get` works in it: the console
    script reaches the client without importing a single dependency. ≈5 s of CPU."""
    pytest.importorskip("setuptools", minversion="70.1")  # builds wheels without the `wheel` package
    build = dockerfile[0]
    moved = {"/src": tmp_path / "src", "/wheels": tmp_path / "wheels", "/opt/kmsagent": tmp_path / "opt" / "kmsagent"}

    def local(text: str) -> str:
        for image_path, path in moved.items():
            text = re.sub(rf"(?<![\w/.]){re.escape(image_path)}(?=[/\s]|$)", str(path), text)
        return text

    (workdir,) = of(build, "WORKDIR")
    assert workdir == "/src"
    moved["/src"].mkdir()
    for copy in of(build, "COPY"):
        *sources, destination = copy.split()
        for source in sources:
            target = moved["/src"] / destination / (Path(source).name if destination.endswith("/") else "")
            if (ROOT / source).is_dir():
                shutil.copytree(
                    ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
                )
            else:
                shutil.copy(ROOT / source, target)
    # The locked dependencies come from an index, which this offline run has not: an empty lock
    # stands in for them (tests/test_lock.py checks the real one against the tested versions).
    (moved["/src"] / "requirements-runtime.lock").write_text("# offline: no dependencies\n")
    env = {
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(tmp_path),
        "PIP_NO_INDEX": "1",
        "PIP_NO_DEPS": "1",
        "PIP_NO_BUILD_ISOLATION": "0",  # pip's inverted spelling: turns build isolation off
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    for run in of(build, "RUN"):
        step = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", local(run)],
            cwd=moved["/src"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert step.returncode == 0, f"RUN {run}\n{step.stderr[-2000:]}"

    (wheel,) = moved["/wheels"].glob("kmsagent-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert all(name.startswith(("kmsagent/", "kmsagent-")) for name in names), names
    assert "kmsagent/client.py" in names and not any("test" in name.split("/")[0] for name in names)
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "kmsagent = kmsagent.__main__:main" in entry_points

    venv = moved["/opt/kmsagent"]
    site = next(venv.glob("lib/python3.*/site-packages"))
    assert sorted(path.name for path in site.iterdir() if not path.name.startswith("_")) == sorted(
        ["kmsagent", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"]
    ), "the environment holds the wheel and its dependencies only (none here: --no-deps), no pip"
    result = subprocess.run(
        [str(venv / "bin" / "kmsagent"), "get", "some/secret", "--port", "1"],
        env={"PATH": "/usr/bin:/bin", "KMS_TOKEN": "t"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (result.returncode, result.stderr) == (
        1,
        "kmsagent get: cannot reach the agent at 127.0.0.1:1: Connection refused\n",
    )


# --- the health check command -------------------------------------------------------------------------------


def probe_argv(argv: list[str], port: int) -> list[str]:
    """The image's command with the test's interpreter and port."""
    assert "2025" in argv[4]
    return [sys.executable, *argv[1:4], argv[4].replace("2025", str(port))]


async def test_the_health_check_passes_for_a_live_agent(
    dockerfile: list[list[Instruction]], start_agent: StartAgent
) -> None:
    agent = await start_agent()
    with trio.fail_after(20):
        result = await trio.run_process(
            probe_argv(healthcheck_command(dockerfile[-1]), agent.port), capture_stdout=True, capture_stderr=True
        )
    assert (result.returncode, result.stderr) == (0, b"")


async def test_the_health_check_fails_in_one_line_without_an_agent(dockerfile: list[list[Instruction]]) -> None:
    with socket.socket() as closed:  # a port that was free a moment ago
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with trio.fail_after(20):
        result = await trio.run_process(
            probe_argv(healthcheck_command(dockerfile[-1]), port), capture_stdout=True, capture_stderr=True, check=False
        )
    assert result.returncode == 1
    assert result.stderr.decode().startswith("kmsagent unreachable: ") and len(result.stderr.splitlines()) == 1


async def test_the_health_check_fails_when_ping_is_not_200(
    dockerfile: list[list[Instruction]], nursery: trio.Nursery
) -> None:
    async def unhealthy(stream: trio.SocketStream) -> None:
        await stream.receive_some(4096)
        await stream.send_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
        await stream.aclose()

    listeners = await nursery.start(partial(trio.serve_tcp, unhealthy, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(20):
        result = await trio.run_process(
            probe_argv(healthcheck_command(dockerfile[-1]), port), capture_stdout=True, capture_stderr=True, check=False
        )
    assert (result.returncode, result.stderr) == (1, b"kmsagent not healthy\n")


# --- the Kubernetes example ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    yaml = pytest.importorskip("yaml")
    return [document for document in yaml.safe_load_all(SIDECAR.read_text()) if document]


def pod_spec(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = [document for document in manifests if document["kind"] == "Deployment"]
    return deployment["spec"]["template"]["spec"]


def test_the_manifests_match_the_kubernetes_schemas(manifests: list[dict[str, Any]]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for document in manifests:
        kubernetes_validate.validate(document, SIDECAR_KUBERNETES, strict=True)  # raises on any error


def test_the_agent_is_a_native_sidecar_probed_by_exec(
    manifests: list[dict[str, Any]], dockerfile: list[list[Instruction]]
) -> None:
    spec = pod_spec(manifests)
    init = {container["name"]: container for container in spec["initContainers"]}
    agent = init["kmsagent"]
    assert agent["restartPolicy"] == "Always"
    assert list(init)[-1] == "kmsagent", "the token writer runs to completion before the agent starts"
    assert "kmsagent" not in {container["name"] for container in spec["containers"]}
    command = healthcheck_command(dockerfile[-1])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert set(agent[probe]) & {"exec", "httpGet", "tcpSocket", "grpc"} == {"exec"}, probe
        argv = agent[probe]["exec"]["command"]
        assert [*argv[:4], argv[4].strip()] == [*command[:4], command[4].strip()], "the image's HEALTHCHECK command"
    assert "httpGet" not in SIDECAR.read_text().replace("httpGet probes", "")


def test_the_token_is_shared_through_a_memory_volume(manifests: list[dict[str, Any]]) -> None:
    spec = pod_spec(manifests)
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    agent = next(container for container in spec["initContainers"] if container["name"] == "kmsagent")
    token = {env["name"]: env["value"] for env in agent["env"]}["KMS_TOKEN"]
    assert token.startswith("file:///")
    token_path = token.removeprefix("file://")
    writers_and_readers = [*spec["initContainers"], *spec["containers"]]
    for container in writers_and_readers:
        mount = next(m for m in container["volumeMounts"] if token_path.startswith(m["mountPath"].rstrip("/") + "/"))
        assert volumes[mount["name"]]["emptyDir"]["medium"] == "Memory", container["name"]
        assert mount.get("readOnly", False) == (container["name"] != "kmsagent-token"), container["name"]


def test_resources_and_the_log_budget(manifests: list[dict[str, Any]]) -> None:
    spec = pod_spec(manifests)
    agent = next(container for container in spec["initContainers"] if container["name"] == "kmsagent")
    resources = agent["resources"]
    assert set(resources["requests"]) >= {"cpu", "memory", "ephemeral-storage"}
    assert set(resources["limits"]) >= {"memory", "ephemeral-storage"}
    assert quantity(resources["limits"]["memory"]) >= quantity("128Mi"), "≈75 MB idle, plus exec probes of ≈11 MB each"
    assert quantity(resources["limits"]["ephemeral-storage"]) >= KUBELET_LOG_BUDGET, "stderr logs the kubelet keeps"
    assert agent["securityContext"]["readOnlyRootFilesystem"] is True
    assert not any("log" in mount["mountPath"] for mount in agent["volumeMounts"]), "no log files: stderr only"
    (config_map,) = [document for document in manifests if document["kind"] == "ConfigMap"]
    document = tomllib.loads(config_map["data"]["kmsagent.toml"])
    assert document["Log"]["Path"] == "" and document["Log"].get("Level", "info") != "debug"
    parses(document)


def quantity(text: str) -> int:
    """A Kubernetes binary-suffixed quantity in bytes (the forms this example uses)."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "": 1}
    number, unit = re.fullmatch(r"(\d+)([KMG]i)?", text).groups()  # type: ignore[union-attr]
    return int(number) * units[unit or ""]
