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
#: Most images in one batch a worker scores, and so the largest ``--batch-size`` (images; env
#: ``DIGITSCORE_MAX_BATCH_IMAGES``). A recorded batch above it is dropped unscored by the
#: worker: a batch holds the database's write lock while it is stored.
MAX_BATCH_IMAGES = 65536
MAX_BATCH_IMAGES_ENV = "DIGITSCORE_MAX_BATCH_IMAGES"
#: Most encoded image bytes in one batch message (bytes); a single larger file travels alone.
BATCH_BYTES = 8 * 1024 * 1024
#: Files larger than this are not read; they get an error row (bytes).
MAX_FILE_BYTES = 4 * 1024 * 1024

#: File name endings the producer treats as images; other files are skipped and counted.
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm"}
)

#: Training defaults for the SGD model.
EPOCHS = 20
LEARNING_RATE = 0.5
TRAIN_BATCH_SIZE = 256
SEED = 42
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
#: Longest wait between two tries of a batch whose database was unreachable (seconds; env
#: ``DIGITSCORE_DB_RETRY_MAX``). Unset: 60, or half the visibility timeout when that is less.
#: It must stay below the visibility timeout: a retry waits in its worker unacknowledged,
#: and Redis hands a message held longer than the timeout to another worker.
DB_RETRY_MAX = 60
DB_RETRY_MAX_ENV = "DIGITSCORE_DB_RETRY_MAX"
#: A secret shared by the producer and every worker (env ``DIGITSCORE_SECRET``, at least
#: :data:`MIN_SECRET_CHARS` characters). Set, the producer signs each message and every
#: worker refuses a message without a valid signature; unset (the default), nothing is signed.
SECRET_ENV = "DIGITSCORE_SECRET"
MIN_SECRET_CHARS = 16
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


def positive_seconds(env: str, default: int, unit: str = "seconds") -> int:
    """A whole, positive number (of seconds, or of ``unit``) from ``env``, else ``default``."""
    raw = setting(env, str(default))
    try:
        value = int(raw or default)
    except ValueError as e:
        raise ValueError(f"{env}={raw!r} is not a whole number of {unit}") from e
    if value <= 0:
        raise ValueError(f"{env} must be a positive number of {unit}")
    return value


def visibility_timeout() -> int:
    return positive_seconds(VISIBILITY_TIMEOUT_ENV, VISIBILITY_TIMEOUT)


def payload_ttl() -> int:
    return positive_seconds(PAYLOAD_TTL_ENV, PAYLOAD_TTL)


def max_batch_images() -> int:
    return positive_seconds(MAX_BATCH_IMAGES_ENV, MAX_BATCH_IMAGES, unit="images")


def db_retry_max() -> int:
    """The longest wait between two tries after a database error, below the visibility
    timeout; a ``DIGITSCORE_DB_RETRY_MAX`` that is not raises ``ValueError`` naming both."""
    timeout = visibility_timeout()
    if setting(DB_RETRY_MAX_ENV, None) is None:
        return max(1, min(DB_RETRY_MAX, timeout // 2))
    value = positive_seconds(DB_RETRY_MAX_ENV, DB_RETRY_MAX)
    if value >= timeout:
        raise ValueError(
            f"{DB_RETRY_MAX_ENV}={value} s is not below {VISIBILITY_TIMEOUT_ENV}={timeout} s: "
            "a batch waiting that long to retry would be handed to another worker meanwhile; "
            f"lower {DB_RETRY_MAX_ENV} or raise {VISIBILITY_TIMEOUT_ENV}"
        )
    return value


def secret() -> bytes | None:
    """The shared message secret, or ``None`` when ``DIGITSCORE_SECRET`` is unset."""
    value = setting(SECRET_ENV, None)
    if value is None:
        return None
    if len(value) < MIN_SECRET_CHARS:
        raise ValueError(
            f"{SECRET_ENV} is shorter than {MIN_SECRET_CHARS} characters: use a random one, "
            "e.g. `openssl rand -hex 32`"
        )
    return value.encode()
