# syntax=docker/dockerfile:1
# The gfservice image: the service, the monitor and Ray, with everything installed at build time, so that no pod
# installs packages when it starts. The Kubernetes bundle (deploy/kubernetes/) runs it as its Ray head and workers.
#
#   docker build -t ghcr.io/gfservice/gfservice:0.1.0-cpu .                            # CPU torch
#   docker build --build-arg VARIANT=cuda -t ghcr.io/gfservice/gfservice:0.1.0-cuda .  # CUDA torch (GPU workers)
#
# The install steps are those of scripts/setup.sh (what .ci/run uses): torch 2.13.0 first, from PyTorch's CPU or
# CUDA index (a plain torch requirement would pull the CUDA build), then gfservice with the Ray extra, and Ray
# pinned to the version the RayCluster names (rayVersion). Multi-stage: the runtime stage gets the virtual
# environment only, no compiler or pip cache, and runs as the unprivileged user ray (uid 1000).
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
# PyTorch's CUDA wheel index for VARIANT=cuda (https://download.pytorch.org/whl/<TORCH_CUDA>).
ARG TORCH_CUDA=cu128
ARG RAY_VERSION=2.60.0
ARG EXTRAS=ray
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/gfservice
ENV PATH=/opt/gfservice/bin:$PATH
RUN case "$VARIANT" in \
        cpu) index=https://download.pytorch.org/whl/cpu ;; \
        cuda) index="https://download.pytorch.org/whl/${TORCH_CUDA}" ;; \
        *) echo "VARIANT must be cpu or cuda, not '$VARIANT'" >&2; exit 1 ;; \
    esac \
    && pip install --upgrade pip \
    && pip install --index-url "$index" "torch==${TORCH_VERSION}"
WORKDIR /src
# Only what the wheel is built from (.dockerignore lets nothing else in): the package, the detectors and the
# package data (dashboards, rules, Grafana provisioning, runbooks).
COPY . .
RUN pip install ".[${EXTRAS}]" "ray[default,train]==${RAY_VERSION}" \
    && gfservice --version && python -c "import gfservice, ray, torch"

FROM python:${PYTHON_VERSION}-slim
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="gfservice" \
      org.opencontainers.image.description="Training health for PyTorch: the gfservice service and monitor, with Ray" \
      org.opencontainers.image.source="https://github.com/gfservice/gfservice" \
      org.opencontainers.image.licenses="Apache-2.0"
# wget: KubeRay's default probes call the Ray dashboard and raylet health endpoints with it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 1000 ray \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash ray \
    && install -d -o 1000 -g 1000 -m 0700 /var/lib/gfservice
COPY --from=build /opt/gfservice /opt/gfservice
ENV PATH=/opt/gfservice/bin:$PATH \
    PYTHONUNBUFFERED=1
LABEL io.gfservice.variant="${VARIANT}"
USER 1000:1000
WORKDIR /home/ray
CMD ["gfservice", "--help"]
