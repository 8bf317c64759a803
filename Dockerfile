# kmsagent container image (SPEC §11): docker build -t kmsagent:0.1.0 .
#
# Two stages on the official slim Python image: the first builds the wheel and installs it with
# its dependencies into a virtual environment without pip; the final stage receives only that
# environment and the config, and runs as a non-root user. Logs go to stderr only.
#
# The agent listens on 127.0.0.1 only, so health is checked from inside the container: a kubelet
# httpGet probe would connect to the pod IP, where nothing listens. With podman, build with
# `--format docker` to keep HEALTHCHECK (the OCI image format has no such field).

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md NOTICE requirements-runtime.lock ./
COPY src ./src
RUN python -m pip wheel --no-deps --wheel-dir /wheels .
# --without-pip, and pip run from outside: the final environment holds the wheel and its
# dependencies, nothing else. The dependencies are requirements-runtime.lock's, the versions
# the tests ran against, each file checked against its hash; the wheel adds none of its own.
RUN python -m venv --without-pip /opt/kmsagent \
 && python -m pip --python /opt/kmsagent/bin/python install --require-hashes -r requirements-runtime.lock \
 && python -m pip --python /opt/kmsagent/bin/python install --no-deps /wheels/kmsagent-*.whl

FROM ${PYTHON_IMAGE}
# 65532 is the usual "nonroot" id (distroless); Kubernetes' runAsNonRoot needs it numeric.
RUN groupadd --system --gid 65532 kmsagent \
 && useradd --system --uid 65532 --gid 65532 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin kmsagent
COPY --from=build /opt/kmsagent /opt/kmsagent
COPY conf/container.toml /etc/kmsagent/kmsagent.toml
ENV PATH=/opt/kmsagent/bin:$PATH KMSAGENT_CONFIG=/etc/kmsagent/kmsagent.toml
USER 65532:65532
STOPSIGNAL SIGTERM
# GET /ping needs no token. A bare socket in `python -I -S` starts in ≈20 ms and ≈11 MB, where
# http.client costs ≈17 MB, `kmsagent get` ≈22 MB and the agent's own modules ≈75 MB: a probe's
# memory counts against the container's limit. Change 2025 here if you change [Server] HttpPort.
# (conf/kubernetes/kmsagent-sidecar.yaml runs the same command as its exec probes.)
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-I", "-S", "-c", "import socket, sys\ntry:\n    s = socket.create_connection(('127.0.0.1', 2025), 2)\n    s.sendall(b'GET /ping HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n')\n    ok = s.makefile('rb').readline().startswith(b'HTTP/1.1 200 ')\nexcept OSError as error:\n    sys.exit(f'kmsagent unreachable: {error}')\nsys.exit(0 if ok else 'kmsagent not healthy')"]
ENTRYPOINT ["kmsagent"]
