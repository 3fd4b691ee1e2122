"""Every default of digitscore in one place, with its unit and the env var that overrides it.

A command-line flag and its ``DIGITSCORE_*`` env var are one setting: Click reads the env var
through ``envvar=``; code that has no flags (the Celery app) reads it with :func:`setting`.
"""

from __future__ import annotations

import os

#: SQLAlchemy URL of the results database (env ``DIGITSCORE_DATABASE_URL``).
DATABASE_URL = "sqlite:///digitscore.db"
DATABASE_URL_ENV = "DIGITSCORE_DATABASE_URL"

#: Celery broker URL (env ``DIGITSCORE_BROKER_URL``). ``None``: score in this process.
BROKER_URL: str | None = None
BROKER_URL_ENV = "DIGITSCORE_BROKER_URL"
#: Celery pool processes per device (``worker --concurrency``).
WORKER_CONCURRENCY = 1

#: Seconds a delivered, unacknowledged batch stays invisible before Redis hands it to
#: another worker (env ``DIGITSCORE_VISIBILITY_TIMEOUT``). Must exceed the slowest batch.
VISIBILITY_TIMEOUT = 600
VISIBILITY_TIMEOUT_ENV = "DIGITSCORE_VISIBILITY_TIMEOUT"

#: Seconds a queued batch's image bytes wait in Redis for a worker before they expire (env
#: ``DIGITSCORE_PAYLOAD_TTL``); a batch that waited longer is sent again by ``producer resume``.
PAYLOAD_TTL = 7 * 24 * 3600
PAYLOAD_TTL_ENV = "DIGITSCORE_PAYLOAD_TTL"

#: Celery queue the producer sends batches to and the workers consume
#: (env ``DIGITSCORE_QUEUE``; separate fleets sharing one Redis use separate queues).
QUEUE = "digitscore"
QUEUE_ENV = "DIGITSCORE_QUEUE"

#: Whether workers and the producer send Celery task events, for flower (env
#: ``DIGITSCORE_TASK_EVENTS``: 1 or 0). Off by default, as in Celery, which spares each batch
#: three event messages; a running flower turns the workers' events on by itself.
TASK_EVENTS = False
TASK_EVENTS_ENV = "DIGITSCORE_TASK_EVENTS"

#: Most images in one batch (images). Each batch has a fixed cost (a message, a payload, a
#: transaction, Celery's bookkeeping) that larger batches spread thinner; smaller ones share
#: a run's last seconds among more workers (docs/performance.md has the measurements).
BATCH_SIZE = 4096
#: Most encoded image bytes in one batch message (bytes); a single larger file travels alone.
BATCH_BYTES = 8 * 1024 * 1024
#: Files larger than this are not read; they get an error row (bytes).
MAX_FILE_BYTES = 4 * 1024 * 1024

#: File name endings the producer treats as images; other files are skipped and counted.
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm"}
)

#: Training defaults for the SGD model: the most epochs (the epoch kept is the best on
#: validation), the learning rate at the start (it falls to 0 on a cosine over the epochs,
#: and each step is divided by the largest variance of the centred, scaled inputs),
#: images per mini-batch, the seed, the L2 penalties on the weights (one model each,
#: trained side by side; validation chooses), the momentum, and the epochs without a better
#: validation accuracy after which training stops.
EPOCHS = 25
LEARNING_RATE = 4.0
SEED = 42
WEIGHT_DECAYS = (0.0, 0.01, 0.03, 0.1)
#: Images per mini-batch unless ``--batch-size`` is given: the training images / 64, kept
#: within these bounds (core.training.auto_batch_size).
TRAIN_BATCH_SIZE_MIN = 64
TRAIN_BATCH_SIZE_MAX = 256
MOMENTUM = 0.9
PATIENCE = 10
#: Fraction of the training images held out for validation when no ``--valid`` is given.
HOLDOUT_FRACTION = 0.2

#: ``producer --debug`` as an env var: show tracebacks (env ``DIGITSCORE_DEBUG=1``).
DEBUG_ENV = "DIGITSCORE_DEBUG"

#: Seconds between progress polls of ``submit --wait`` (seconds).
POLL_INTERVAL = 0.5
#: Seconds to wait for the broker before ``submit`` gives up (seconds).
BROKER_CONNECT_TIMEOUT = 3.0
#: Worker deaths on one batch after which it is declared poison: its images get error rows.
MAX_DELIVERIES = 3
#: SQLite busy timeout (milliseconds).
SQLITE_BUSY_TIMEOUT_MS = 30_000


def setting(env: str, default: str | None) -> str | None:
    """The value of a ``DIGITSCORE_*`` env var, or ``default`` when it is unset or empty."""
    value = os.environ.get(env, "").strip()
    return value or default


def queue() -> str:
    return setting(QUEUE_ENV, QUEUE) or QUEUE


def task_events() -> bool:
    raw = (setting(TASK_EVENTS_ENV, None) or "").lower()
    if raw in ("", "0", "1", "false", "true", "no", "yes", "off", "on"):
        return raw in ("1", "true", "yes", "on") if raw else TASK_EVENTS
    raise ValueError(f"{TASK_EVENTS_ENV}={raw!r}: use 1 or 0")


def positive_seconds(env: str, default: int) -> int:
    """A whole, positive number of seconds from ``env``, else ``default``."""
    raw = setting(env, str(default))
    try:
        value = int(raw or default)
    except ValueError as e:
        raise ValueError(f"{env}={raw!r} is not a whole number of seconds") from e
    if value <= 0:
        raise ValueError(f"{env} must be a positive number of seconds")
    return value


def visibility_timeout() -> int:
    return positive_seconds(VISIBILITY_TIMEOUT_ENV, VISIBILITY_TIMEOUT)


def payload_ttl() -> int:
    return positive_seconds(PAYLOAD_TTL_ENV, PAYLOAD_TTL)
