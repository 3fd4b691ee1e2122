"""Prometheus metrics of the workers (docs/metrics.md), served by the ``worker`` launcher when
it is given ``--metrics-port N`` (``DIGITSCORE_METRICS_PORT``).

Batches are scored in Celery's pool processes, children of each device's Celery process,
which is a child of the launcher; each counts what it stored in prometheus_client's
multiprocess mode: the launcher makes a fresh directory, gives it to every worker it starts
as ``PROMETHEUS_MULTIPROC_DIR``, and each process writes its counts to files of its own
there. The launcher's HTTP server sums them at each scrape (``MultiProcessCollector``), so
a pool process that died or was replaced still counts, and every device of the launcher is
one set of counters. The queue's depth is read from Redis at the scrape (LLEN of each
priority list), in the launcher, so it is never stale.

A count goes up only for rows this delivery wrote (``store_batch`` returns them): a batch
stored twice counts once, so the counters equal SQL over the ``predictions`` rows the
launcher's workers wrote since it started.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from prometheus_client import Counter, Histogram

from core import wire
from core.columns import BatchColumns

log = logging.getLogger("digitscore.worker")

#: The env var prometheus_client's multiprocess mode reads.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

IMAGES_SCORED = Counter(
    "digitscore_images_scored", "Images scored and stored (rows without an error).")
FAILED_ROWS = Counter(
    "digitscore_failed_rows",
    "Rows stored with the reason an image was not scored, poison batches' rows included.")
BATCHES_SCORED = Counter("digitscore_batches_scored", "Batches scored and stored.")
BATCHES_POISONED = Counter(
    "digitscore_batches_poisoned",
    "Batches given up after three failed deliveries: their rows say why.")
SCORING_SECONDS = Histogram(
    "digitscore_scoring_seconds",
    "Seconds a pool process took to read, score and store one batch.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)


def count_stored(columns: BatchColumns, n_new: int, seconds: float) -> None:
    """Count a scored batch whose rows (``columns``) this delivery stored ``n_new`` of (0:
    it was stored already, and counts nothing)."""
    if not n_new:
        return
    failed = min(n_new, len(columns.errors) - columns.errors.count(None))  # rows of errors
    IMAGES_SCORED.inc(n_new - failed)
    FAILED_ROWS.inc(failed)
    BATCHES_SCORED.inc()
    SCORING_SECONDS.observe(seconds)


def count_poisoned(n_new: int) -> None:
    """Count a batch given up whose ``n_new`` error rows this delivery stored."""
    if n_new:
        FAILED_ROWS.inc(n_new)
        BATCHES_POISONED.inc()


class QueueCollector:
    """``digitscore_queue_messages``: the messages waiting in the queue, per priority step,
    read from Redis at each scrape (nothing when Redis does not answer: no stale figure)."""

    def __init__(self, broker_url: str, queue: str) -> None:
        self.broker_url = broker_url
        self.queue = queue
        self._client: Any = None

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        try:
            depths = self._depths()
        except Exception as e:  # noqa: BLE001 - a scrape must not fail for the broker
            log.warning("metrics: the queue's depth cannot be read: %s", type(e).__name__)
            return
        family = GaugeMetricFamily(
            "digitscore_queue_messages",
            "Messages waiting in the queue (not yet delivered), by priority step "
            "(0 is taken first).", labels=["queue", "priority_step"])
        for step, depth in zip(wire.PRIORITY_STEPS, depths, strict=True):
            family.add_metric([self.queue, str(step)], depth)
        yield family

    def _depths(self) -> list[int]:
        import redis

        from core.defaults import BROKER_CONNECT_TIMEOUT

        if self._client is None:
            self._client = redis.Redis.from_url(
                self.broker_url, socket_connect_timeout=BROKER_CONNECT_TIMEOUT,
                socket_timeout=BROKER_CONNECT_TIMEOUT)
        pipe = self._client.pipeline(transaction=False)
        for name in wire.queue_lists(self.queue):
            pipe.llen(name)
        return [int(n) for n in pipe.execute()]


class MetricsServer:
    """The launcher's HTTP server of the metrics, on ``port`` (every interface), and the
    directory its workers count into (:attr:`env` is what they need to)."""

    def __init__(self, port: int, broker_url: str, queue: str) -> None:
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        self.directory = tempfile.mkdtemp(prefix="digitscore-metrics-")
        try:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.directory)
            registry.register(QueueCollector(broker_url, queue))  # type: ignore[arg-type]
            self._server, self._thread = start_http_server(port, registry=registry)
        except BaseException:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise
        self.env = {MULTIPROC_ENV: self.directory}

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(timeout=5)
        shutil.rmtree(self.directory, ignore_errors=True)
