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
#: Celery pool processes per device (``worker --concurrency``, env
#: ``DIGITSCORE_CONCURRENCY``). Unset: the cores this host lets the launcher use, divided
#: among the devices, at least 1 (``worker.devices.default_concurrency``).
WORKER_CONCURRENCY: int | None = None
WORKER_CONCURRENCY_ENV = "DIGITSCORE_CONCURRENCY"
#: ``worker --require-gpu`` (env ``DIGITSCORE_REQUIRE_GPU=1``): no GPU is an error, not a
#: worker on the CPU.
REQUIRE_GPU_ENV = "DIGITSCORE_REQUIRE_GPU"

#: Seconds a delivered, unacknowledged batch stays invisible before Redis hands it to
#: another worker (env ``DIGITSCORE_VISIBILITY_TIMEOUT``). Must exceed the slowest batch.
VISIBILITY_TIMEOUT = 600
VISIBILITY_TIMEOUT_ENV = "DIGITSCORE_VISIBILITY_TIMEOUT"
#: Seconds a batch may take in a worker process before Celery kills that process (env
#: ``DIGITSCORE_TASK_TIME_LIMIT``): a hung GPU gives its batch back to the queue this soon
#: rather than after the visibility timeout, which it must be below: unset, it is 300 s or
#: 4/5 of the visibility timeout, whichever is less. The batch counts as a worker death
#: (:data:`MAX_DELIVERIES`). A batch of 4,096 takes about 0.1-0.5 s.
TASK_TIME_LIMIT = 300
TASK_TIME_LIMIT_ENV = "DIGITSCORE_TASK_TIME_LIMIT"
#: Seconds a worker's new pool process may take to start, CUDA initialised, before Celery
#: kills it (Celery's own default, 4 s, is short for a GPU's first context).
PROCESS_START_TIMEOUT = 60.0

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

#: How a batch's images reach the workers (``submit --send``, env ``DIGITSCORE_SEND``):
#: ``bytes``, the producer reads the files and their bytes wait in Redis; ``paths``, the
#: producer only walks and each worker reads its batch's files from the run's directory,
#: which every worker host must see (at the same path, or mapped by ``DIGITSCORE_PATH_MAP``).
SEND = "bytes"
SEND_MODES = ("bytes", "paths")
SEND_ENV = "DIGITSCORE_SEND"

#: Where a worker finds the run's source directory when its host mounts it elsewhere than
#: the producer's (env ``DIGITSCORE_PATH_MAP=/producer/prefix=/worker/prefix``).
PATH_MAP_ENV = "DIGITSCORE_PATH_MAP"

#: Most payload bytes one producer keeps waiting in Redis (bytes; env
#: ``DIGITSCORE_MAX_QUEUED_BYTES``); past it, the producer waits for workers. Unset: the
#: smaller of this and half of Redis's ``maxmemory``, when one is set.
MAX_QUEUED_BYTES = 256 * 1024 * 1024
MAX_QUEUED_BYTES_ENV = "DIGITSCORE_MAX_QUEUED_BYTES"
#: What a queued batch costs Redis besides its payload (bytes): the Celery message and its
#: bookkeeping, counted against the bound so that batches of a few tiny files add up too.
QUEUED_MESSAGE_BYTES = 2048
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

#: Seconds ``--wait`` waits with no batch of the run stored before it says why it may be
#: stuck (env ``DIGITSCORE_STALL_HINT_AFTER``).
STALL_HINT_AFTER = 30
STALL_HINT_AFTER_ENV = "DIGITSCORE_STALL_HINT_AFTER"
#: Seconds between two progress lines of ``--wait`` when stderr is not a terminal (seconds).
PROGRESS_EVERY = 10
#: Seconds to wait for the workers' replies when asking which of them consume the queue.
INSPECT_TIMEOUT = 1.0
#: Seconds between progress polls of ``submit --wait``: the first after ``POLL_FIRST``, then
#: half as long again each time up to ``POLL_INTERVAL``, so that a short run's end is
#: noticed within a few milliseconds and a long one costs a query a quarter second.
POLL_FIRST = 0.01
POLL_INTERVAL = 0.25
#: Seconds to wait for the broker before ``submit`` gives up (seconds).
BROKER_CONNECT_TIMEOUT = 3.0
#: Seconds between a worker's heartbeats into the database's ``workers`` table; a worker not
#: seen for three of them is taken to be gone.
HEARTBEAT_SECONDS = 10

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


def stall_hint_after() -> int:
    return positive_seconds(STALL_HINT_AFTER_ENV, STALL_HINT_AFTER)


def task_time_limit() -> int:
    """The task time limit, checked to be below the visibility timeout."""
    timeout = visibility_timeout()
    if setting(TASK_TIME_LIMIT_ENV, None) is None:
        return max(1, min(TASK_TIME_LIMIT, timeout * 4 // 5))
    limit = positive_seconds(TASK_TIME_LIMIT_ENV, TASK_TIME_LIMIT)
    if limit >= timeout:
        raise ValueError(
            f"{TASK_TIME_LIMIT_ENV}={limit} must be below {VISIBILITY_TIMEOUT_ENV}={timeout}: "
            "a batch still running when the timeout ends is handed to a second worker"
        )
    return limit


def payload_ttl() -> int:
    return positive_seconds(PAYLOAD_TTL_ENV, PAYLOAD_TTL)


def max_queued_bytes() -> int | None:
    """``DIGITSCORE_MAX_QUEUED_BYTES`` as a positive number of bytes, or ``None`` if unset."""
    raw = setting(MAX_QUEUED_BYTES_ENV, None)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError as e:
        raise ValueError(f"{MAX_QUEUED_BYTES_ENV}={raw!r} is not a whole number of bytes") from e
    if value <= 0:
        raise ValueError(f"{MAX_QUEUED_BYTES_ENV} must be a positive number of bytes")
    return value


def path_map() -> tuple[str, str] | None:
    """``DIGITSCORE_PATH_MAP`` as ``(producer prefix, worker prefix)``, or ``None`` if unset."""
    raw = setting(PATH_MAP_ENV, None)
    if raw is None:
        return None
    source, sep, target = raw.partition("=")
    if not sep or not source.startswith("/") or not target.startswith("/"):
        raise ValueError(
            f"{PATH_MAP_ENV}={raw!r}: use /producer/prefix=/worker/prefix (two absolute paths)"
        )
    return source.rstrip("/") or "/", target.rstrip("/") or "/"
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
