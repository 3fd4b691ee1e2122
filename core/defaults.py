"""Every default and fixed limit of digitscore in one place, with its unit, and the env var
that overrides it where one does.

These are constants only: the settings a user can change are read, checked and passed down as
one :class:`core.settings.Settings`.
"""

from __future__ import annotations

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
CONCURRENCY_ENV = "DIGITSCORE_CONCURRENCY"
#: The port the ``worker`` launcher serves Prometheus metrics on (``--metrics-port``,
#: ``DIGITSCORE_METRICS_PORT``); unset: no metrics served.
METRICS_PORT: int | None = None
METRICS_PORT_ENV = "DIGITSCORE_METRICS_PORT"
#: ``worker --require-gpu`` (env ``DIGITSCORE_REQUIRE_GPU=1``): no GPU is an error, not a
#: worker on the CPU.
REQUIRE_GPU_ENV = "DIGITSCORE_REQUIRE_GPU"

#: Seconds a delivered, unacknowledged batch stays invisible before Redis hands it to
#: another worker (env ``DIGITSCORE_VISIBILITY_TIMEOUT``). Must exceed the slowest batch.
VISIBILITY_TIMEOUT = 600
VISIBILITY_TIMEOUT_ENV = "DIGITSCORE_VISIBILITY_TIMEOUT"
#: Most seconds a batch may take in a worker process before Celery kills that process: a hung
#: GPU gives its batch back to the queue this soon rather than after the visibility timeout.
#: The limit is this or 4/5 of the visibility timeout, whichever is less
#: (``Settings.task_time_limit``); the batch counts as a failed delivery
#: (:data:`MAX_DELIVERIES`), and its next delivery splits it in two (worker/splitting.py).
TASK_TIME_LIMIT = 300
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
#: A run's priority (``submit --priority``), most urgent first; a run's batches are taken
#: from the queue in that order (core/wire.message_priority).
PRIORITY = "normal"
PRIORITIES = ("high", "normal", "low")
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
#: File name endings the producer opens as archives of images (core.archives), any case.
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")

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
#: Seconds between two progress polls of ``--wait`` (each one query on the run's row): a
#: run's end is seen within this.
PROGRESS_POLL_INTERVAL = 0.05
#: Seconds to wait for the broker before ``submit`` gives up (seconds).
BROKER_CONNECT_TIMEOUT = 3.0
#: Seconds between a worker's heartbeats into the database's ``workers`` table; a worker not
#: seen for three of them is taken to be gone.
HEARTBEAT_SECONDS = 10

#: Seconds between two sweeps for lost batches while ``--wait`` waits (env
#: ``DIGITSCORE_HEAL_EVERY``; 0: no healing, `producer resume RUN` by hand). A batch is
#: suspected lost once it has waited two sweeps since it was last sent (doubling with each
#: re-send, up to six), and re-sent when the next sweep confirms it (producer/heal.py).
HEAL_EVERY = 5.0
HEAL_EVERY_ENV = "DIGITSCORE_HEAL_EVERY"

#: Seconds a ``submit`` or ``resume`` holds its run's lease (``runs.lease_until``) past its
#: last renewal, and seconds between renewals: a sender killed outright is taken to be gone
#: this soon.
LEASE_SECONDS = 20
LEASE_RENEW_EVERY = 5

#: Failed deliveries of one batch (its worker process died, or its model or its scoring
#: failed) after which it is poison: its images get error rows and the batch is ``failed``.
MAX_DELIVERIES = 3
#: Seconds a pool process waits before a batch whose model could not be loaded, or whose
#: scoring failed, goes back to the queue, doubling with each failed delivery (1, 2, 4 s for
#: the three a batch may have; never more than a quarter of the task time limit): a model
#: that cannot load costs each pool process at most one try a second, not thousands.
FAILURE_BACKOFF = 1.0
#: Most seconds between two tries of a batch whose database was unreachable: this, or half
#: the visibility timeout when that is less (``Settings.db_retry_max``): a retry waits in its
#: worker unacknowledged, and Redis hands a message held longer than the timeout to another
#: worker.
DB_RETRY_MAX = 60
#: A secret shared by the producer and every worker (env ``DIGITSCORE_SECRET``, at least
#: :data:`MIN_SECRET_CHARS` characters). Set, the producer signs each message and every
#: worker refuses a message without a valid signature; unset (the default), nothing is signed.
SECRET_ENV = "DIGITSCORE_SECRET"
MIN_SECRET_CHARS = 16
#: ``DIGITSCORE_ALLOW_EVICTION=1``: use a Redis whose ``maxmemory-policy`` cannot be read
#: (a managed service that hides ``CONFIG``) or is not ``noeviction``, at the risk of
#: batches evicted from the queue without a trace.
ALLOW_EVICTION_ENV = "DIGITSCORE_ALLOW_EVICTION"
#: SQLite busy timeout (milliseconds).
SQLITE_BUSY_TIMEOUT_MS = 30_000


#: Seconds between two looks of the ``worker`` launcher at its children (has one exited?).
CHILD_CHECK_EVERY = 0.2
#: Seconds the launcher's throwaway child may take to import torch and count GPUs.
GPU_COUNT_TIMEOUT = 120.0
#: Seconds a broker socket may wait on a read or write before kombu gives up on it.
BROKER_SOCKET_TIMEOUT = 30

#: Flow control of ``producer submit``: most sent batches remembered as possibly still
#: queued (past it the producer checks which are gone and waits, as over the byte bound:
#: Redis holds a message per queued batch too); the first and longest sleep while waiting
#: for workers (seconds); how often a long wait is reported again (seconds).
MAX_TRACKED_BATCHES = 10_000
QUEUE_WAIT_FIRST = 0.05
QUEUE_WAIT_LONGEST = 1.0
QUEUE_WAIT_REPORT_EVERY = 5.0

#: Elements of the difference tensor ``core.scoring.distances`` fills at once on the CPU
#: (elements): it is written and read five times, so it is sized for a core's cache (2 MiB of
#: floats: 66 images of 28x28 against ten ideals). Every image is scored on its own row, so
#: the results do not depend on it.
CPU_DIFFERENCE_ELEMENTS = 2**19
#: The same on a GPU (elements), which wants few large kernels: 64 MiB of floats.
GPU_DIFFERENCE_ELEMENTS = 2**24
#: Validation images per class below which ``producer train`` warns that the validation
#: accuracy, and so the epoch and weight decay it keeps, rest on too few images to trust.
MIN_VALID_PER_CLASS = 10
#: Mistakes kept per run and predictor (rows of ``run_mistakes``); a longer list is read from
#: ``predictions`` directly.
MISTAKES_KEPT = 100
