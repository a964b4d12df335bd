# strata: the image the Ray head, the Ray workers and the RayJob submitter all run.
#
# GPU (default; the CUDA build of torch from PyPI brings its own CUDA libraries, the host
# needs an NVIDIA driver new enough for them):
#   docker build -t strata:0.1.0 .
# CPU only (torch's CPU build from the PyTorch CPU index, on a slim Python base):
#   docker build -t strata:0.1.0-cpu --build-arg VARIANT=cpu --build-arg BASE=python:3.11-slim-bookworm .
#
# Every node of one Ray cluster must run the same Ray and Python versions: build the
# head and the workers from this one image (infra/kuberay/*.yaml do).
# No credentials go into this image: object-store keys come from a Kubernetes Secret
# (or the node's instance role) at run time.

ARG BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# ---------------------------------------------------------------- common base
FROM ${BASE} AS base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LANG=C.UTF-8
# Python 3 (>= 3.11) from the base's own packages when it has none (the CUDA images),
# plus wget: KubeRay's default head/worker probes call it. Versions come with the base.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates wget \
    && if ! command -v python3 >/dev/null; then \
        apt-get install -y --no-install-recommends python3 python3-venv; \
    fi \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -c 'import sys; assert sys.version_info >= (3, 11), sys.version'

# ---------------------------------------------------------------- builder
FROM base AS builder
ARG VARIANT=cuda
ARG TORCH_VERSION=2.13.0
ARG RAY_VERSION=2.60.0
# hadolint ignore=DL3008
RUN if ! python3 -m venv --help >/dev/null 2>&1; then \
        apt-get update && apt-get install -y --no-install-recommends python3-venv && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/strata
ENV PATH=/opt/strata/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, from the index that matches the variant (it is most of the image)
RUN case "$VARIANT" in \
        cpu)  pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu ;; \
        cuda) pip install --no-cache-dir "torch==${TORCH_VERSION}" ;; \
        *)    echo "VARIANT must be cuda or cpu, not $VARIANT" >&2; exit 1 ;; \
    esac
WORKDIR /src
# only what the package is built from (README.md when the checkout has one)
COPY pyproject.toml README.m[d] ./
COPY pipeline/ pipeline/
COPY workers/ workers/
# the project and its dependencies; ray[default] for the dashboard, Jobs API and agents
RUN pip install --no-cache-dir . "ray[default]==${RAY_VERSION}" \
    && strata --help >/dev/null \
    && python -c "import strata_quant.pipeline.cli, strata_quant.workers.actor, torch, ray; print('torch', torch.__version__, 'ray', ray.__version__)"

# ---------------------------------------------------------------- runtime
FROM base AS runtime
ARG VARIANT=cuda
LABEL org.opencontainers.image.title="strata" \
      org.opencontainers.image.description="Quantize large transformer checkpoints block by block on Ray" \
      org.opencontainers.image.licenses="Apache-2.0" \
      ai.strata.variant="${VARIANT}"
COPY --from=builder /opt/strata /opt/strata
COPY configs/ /opt/strata/share/configs/
# a non-root user with a fixed uid (the manifests' securityContext uses it); KubeRay runs
# `bash -lc 'ray start ...'`, and a login shell resets PATH, so profile.d puts the venv back
# (single quotes on purpose: $PATH expands when the profile runs, not now)
# hadolint ignore=SC2016
RUN useradd --uid 10001 --user-group --create-home --shell /bin/bash strata \
    && echo 'export PATH=/opt/strata/bin:$PATH' > /etc/profile.d/strata.sh \
    && mkdir -p /work \
    && chown strata:strata /work
ENV PATH=/opt/strata/bin:$PATH \
    HOME=/home/strata \
    STRATA_CACHE=/home/strata/.cache/strata
USER 10001:10001
WORKDIR /work
ENTRYPOINT ["strata"]
CMD ["--help"]
