# roomcast: one image for both services. The command picks the service:
#   docker run IMAGE gateway     (WebSocket 8080, admin /metrics /healthz /readyz 9100)
#   docker run IMAGE chat        (history API + /healthz /readyz /metrics 8081)
# Settings come from ROOMCAST_* environment variables (roomcast/config.py).
# Note: roomcast refuses to start on an unknown ROOMCAST_* variable, so nothing
# here (healthcheck included) invents one; the healthcheck's override is
# HEALTHCHECK_PORT.

# The base tag pins both the Python patch release and the Debian release, so the
# builder and the runtime share one interpreter at one path (/usr/local/bin) and
# the venv built in one runs unchanged in the other. CI should add the digest
# (python:3.11.14-slim-bookworm@sha256:...) when it resolves the tag.
FROM python:3.11.14-slim-bookworm AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# ---- builder: a venv at /opt/roomcast with roomcast and its dependencies -------
FROM base AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# gcc only for a dependency that has no wheel for the target platform (every
# current dependency ships manylinux wheels for amd64 and arm64); it never
# reaches the runtime stage. DL3008 (pin apt versions) is ignored for this one
# line only: the Debian release is already pinned by the base tag, a compiler
# that never ships needs no exact version, and pinned point-release versions
# (libc6-dev=2.36-9+deb12uN) vanish from the mirror and break the build.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/* \
 && python -m venv /opt/roomcast
ENV PATH=/opt/roomcast/bin:$PATH
WORKDIR /src
# Dependencies first, from pyproject.toml alone, so a source-only change reuses
# this layer. Only `dependencies`, no extra: the embedded broker and Redis
# (`embedded`) and the test and bench tools never reach production (a test in
# tests/integration/test_deploy_artifacts.py resolves this list and checks).
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt
# Then roomcast itself, as a regular (non-editable) install into site-packages;
# pip byte-compiles it here, so the read-only runtime never needs to write .pyc.
COPY . .
RUN pip install --no-cache-dir --no-deps .

# ---- runtime ----------------------------------------------------------------------
FROM base AS runtime
# A fixed numeric UID/GID: Kubernetes' runAsNonRoot can only verify a numeric
# USER, and the manifests set the same runAsUser/fsGroup.
RUN groupadd --system --gid 10001 roomcast \
 && useradd --system --no-log-init --uid 10001 --gid 10001 \
      --home-dir /var/lib/roomcast --shell /usr/sbin/nologin roomcast \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/roomcast
COPY --from=builder /opt/roomcast /opt/roomcast
ENV PATH=/opt/roomcast/bin:$PATH
# The working directory is the only writable place in the image: the default
# sqlite:///roomcast.db of `roomcast chat` lands here when run outside Kubernetes
# (in Kubernetes the root filesystem is read-only and chat uses Postgres).
WORKDIR /var/lib/roomcast
USER 10001:10001
# 8080 gateway WebSocket, 8081 chat HTTP, 9100 gateway admin (metrics, probes).
EXPOSE 8080 8081 9100
# No curl in the image: the interpreter does the probe. It checks the service PID 1
# runs: chat -> ROOMCAST_HTTP_PORT (8081); gateway -> ROOMCAST_ADMIN_PORT (9100),
# or ROOMCAST_PORT (8080, which also serves /healthz) when the admin port is 0.
# HEALTHCHECK_PORT overrides both (e.g. when the port is given as a flag). Proxies
# are bypassed: the target is always loopback. Kubernetes ignores HEALTHCHECK and
# uses the probes in k8s/.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as u; e = os.environ.get; c = b'chat' in open('/proc/1/cmdline', 'rb').read().split(b'\\0'); a = e('ROOMCAST_ADMIN_PORT', '9100'); p = e('HEALTHCHECK_PORT') or (e('ROOMCAST_HTTP_PORT', '8081') if c else a if a != '0' else e('ROOMCAST_PORT', '8080')); u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%s/healthz' % p, timeout=3)"]
ENTRYPOINT ["roomcast"]
CMD ["--help"]
