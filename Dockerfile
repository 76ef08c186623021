# The production image: `docker build -t orderstream .`
#
# Two stages: the build stage installs the locked dependencies (their own
# cached layer, rebuilt only when requirements.txt changes) and then the
# service and its generated client into a virtualenv; the runtime stage is
# the slim base plus that virtualenv, run as a non-root user.
#
# The base is pinned by digest (python:3.11.10-slim-bookworm); bump both
# together. No registry is reachable from the development machines, so the
# digest could not be checked here: it is the one several independent public
# pins of this tag agree on. Confirm it with `docker buildx imagetools
# inspect` when first building where a registry is reachable.
ARG PYTHON_IMAGE=python:3.11.10-slim-bookworm@sha256:840e180ebcc6e5c8efab209c43f5e40fd2af98cb49db5c7103c90539c56bb30e

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH
# A compiler for the service's C extensions (the wire.c encoders); it stays
# in this stage, the runtime stage gets only the built virtualenv. The base's
# digest fixes the Debian release these come from.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
WORKDIR /src
# Exact pins and --no-deps: the image holds exactly requirements.txt.
COPY requirements.txt ./
RUN pip install --no-deps -r requirements.txt
# The generated stubs are committed under clients/python/src, so the image
# needs no code generator.
COPY clients/python ./clients/python
COPY pyproject.toml setup.py ./
COPY service ./service
RUN pip install --no-deps ./clients/python . \
    && python -m compileall -q /opt/venv

FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH
RUN groupadd --system --gid 10001 orderstream \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin orderstream
COPY --from=build /opt/venv /opt/venv
# Numeric, so Kubernetes' runAsNonRoot can check it.
USER 10001:10001
# gRPC, plain-text health for probes, Prometheus metrics.
EXPOSE 50051 50052 9090
# The same command the tests start (tests/test_deploy.py runs this line).
ENTRYPOINT ["python", "-m", "service", "serve"]
