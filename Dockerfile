# syntax=docker/dockerfile:1
# ingestor worker image.
#   docker build -t ingestor:dev .
#   docker run --rm -e KAFKA_BOOTSTRAP_SERVERS=... -e INGESTOR_TOPICS=... \
#     -e STRIPE_API_KEY_FILE=/run/secrets/stripe ingestor:dev
# The runtime user is UID/GID 10001: helm/ingestor/values.yaml (podSecurityContext) must match.

# The base image, in one place. Pin its digest too for byte-identical rebuilds: look it up with
#   docker buildx imagetools inspect python:3.11.14-slim-bookworm --format '{{json .Manifest.Digest}}'
# and build with --build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:<digest> (or edit it here).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---- builder: every dependency and the project itself as wheels ----------------------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src

# Dependencies first, exactly as locked (every file checked against its sha256): this layer is rebuilt
# only when a lock file changes, not on every source edit. See scripts/lock.sh.
COPY requirements/build.lock requirements/runtime.lock ./requirements/
RUN pip install --require-hashes --no-deps --requirement requirements/build.lock \
    && pip wheel --require-hashes --no-deps --wheel-dir /wheels/deps --requirement requirements/runtime.lock

# Then the source: only the project's own wheel is rebuilt when it changes (with the locked setuptools).
COPY pyproject.toml README.md ./
COPY ingestor ./ingestor
# The runtime alone: the development tools (ingestor_dev/: emulator, local Kafka, demo) are neither in the
# build context (.dockerignore) nor in the wheel (pyproject.toml excludes them).
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /wheels/app .

# ---- runtime: the same Python, the wheels installed, no compilers, no build files ----------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

RUN groupadd --system --gid 10001 ingestor \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin ingestor

# Wheels are bind-mounted from the builder, so they never end up in a layer of the runtime image.
RUN --mount=type=bind,from=builder,source=/wheels/deps,target=/wheels/deps \
    pip install --no-index --no-deps /wheels/deps/*.whl
RUN --mount=type=bind,from=builder,source=/wheels/app,target=/wheels/app \
    pip install --no-index --no-deps /wheels/app/*.whl

USER 10001:10001
# /metrics, /healthz, /readyz (INGESTOR_METRICS_PORT). The webhook port, when enabled, is chosen at run time.
EXPOSE 9464
# Exec form: the worker is PID 1 and receives SIGTERM itself (it drains within INGESTOR_DRAIN_TIMEOUT_S).
# No HEALTHCHECK: Kubernetes probes /healthz and /readyz (see the Helm chart).
ENTRYPOINT ["ingestor"]
CMD ["run"]
