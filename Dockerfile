# One image for every part of digitscore: `worker` (the default command), `producer`, and
# flower (Celery's monitor, run as `celery --app worker.tasks flower`).
#
#   docker build -t digitscore .                                   # CPU build of torch
#   docker build -t digitscore --build-arg TORCH_VARIANT=cu126 .   # CUDA 12.6 (GPU hosts)
#
# TORCH_VARIANT: cpu (PyTorch's CPU-only wheels, a small image), cuXYZ (that CUDA version's
# wheels from PyTorch's index, e.g. cu126), or cuda (PyPI's Linux wheel). The CUDA wheels bring
# the CUDA runtime with them: the host needs only the NVIDIA driver and the NVIDIA Container
# Toolkit, and a driver recent enough for the wheel's CUDA (NVIDIA's minor version
# compatibility; check with `nvidia-smi`):
#   cu124, cu126, cu128 (CUDA 12.x)  driver 525 or newer: the 535-570 drivers common on H100
#                                    hosts; docker-compose.yml builds cu126 by default
#   cuda, cu130 (CUDA 13.x)          driver 580 or newer (PyPI's torch 2.13 wheel is CUDA 13)
# With a driver too old for the wheel, `worker` exits with status 2 naming the cause.
FROM python:3.11-slim

ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG FLOWER_VERSION=2.2.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, in its own layer: it is by far the largest and changes least often.
RUN set -eu; \
    case "$TORCH_VARIANT" in \
      cpu|cu[0-9]*) \
        pip install --index-url "https://download.pytorch.org/whl/$TORCH_VARIANT" \
          "torch==$TORCH_VERSION" ;; \
      cuda) \
        pip install "torch==$TORCH_VERSION" ;; \
      *) \
        echo "TORCH_VARIANT must be cpu, cuda or cuXYZ (e.g. cu128), not '$TORCH_VARIANT'" >&2; \
        exit 1 ;; \
    esac

WORKDIR /src
COPY pyproject.toml README.md ./
COPY core ./core
COPY producer ./producer
COPY worker ./worker
COPY db ./db
RUN pip install . "flower==$FLOWER_VERSION" && rm -rf /src

# Never root: Celery warns against it, and nothing here needs it.
RUN useradd --create-home --uid 10001 --user-group digitscore
USER digitscore
# Without DIGITSCORE_DATABASE_URL, results go to ./digitscore.db: a directory it may write.
WORKDIR /home/digitscore

CMD ["worker"]
