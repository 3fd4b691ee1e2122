# One image for every part of digitscore: `worker` (the default command), `producer`, and
# flower (Celery's monitor, run as `celery --app worker.tasks flower`).
#
#   docker build -t digitscore .                                   # CPU build of torch
#   docker build -t digitscore --build-arg TORCH_VARIANT=cuda .    # CUDA build (GPU hosts)
#
# TORCH_VARIANT: cpu (PyTorch's CPU-only wheels, a small image), cuda (PyPI's Linux wheel,
# which brings the CUDA runtime with it: the host needs only the NVIDIA driver and the NVIDIA
# Container Toolkit), or cuXYZ (e.g. cu128: that CUDA version's wheels from PyTorch's index).
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
