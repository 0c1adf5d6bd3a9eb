# One image for the whole suite. The command picks what runs:
#   loyalty serve <service>      one service (what each Deployment of the Helm chart runs)
#   loyalty migrate <service>    its database migrations (the chart's hook Jobs)
#   loyalty demo-receipt ...     the POS smoke client (the chart's `helm test` pod)
#   loyalty run                  the default: all six services in one process with demo data
#
# Build:  docker build -t loyalty:0.1.0 .
# The base image is pinned by version; pin it by digest too (Renovate or Dependabot keep
# both current) where builds must be reproducible.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/loyalty
WORKDIR /src
# Only what the package is built from (the .dockerignore admits nothing else).
COPY pyproject.toml README.md ./
COPY libs/ libs/
COPY services/ services/
# A regular (not editable) install: the venv is the whole application, with the
# migrations and alembic.ini as package data. Bytecode is compiled here because the
# running container's root filesystem is read-only.
RUN /opt/loyalty/bin/pip install --no-compile . \
 && /opt/loyalty/bin/python -m compileall -q -j 0 /opt/loyalty/lib

FROM ${PYTHON_IMAGE} AS runtime
# A fixed numeric id, so Kubernetes can check runAsNonRoot without resolving names.
RUN groupadd --system --gid 10001 loyalty \
 && useradd --system --uid 10001 --gid loyalty --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin loyalty \
 && install -d -o loyalty -g loyalty /var/lib/loyalty
COPY --from=build /opt/loyalty /opt/loyalty
ENV PATH=/opt/loyalty/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LOYALTY_BIND_HOST=0.0.0.0 \
    LOYALTY_DATA_DIR=/var/lib/loyalty
WORKDIR /var/lib/loyalty
USER 10001:10001
# gRPC: gateway 50051 … notifications 50056; Prometheus metrics: 9101 … 9106.
EXPOSE 50051 50052 50053 50054 50055 50056 9101 9102 9103 9104 9105 9106
CMD ["loyalty", "run"]
