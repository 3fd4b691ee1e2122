"""The Celery application: Redis broker, msgpack only, at-least-once delivery.

Configuration comes from ``DIGITSCORE_*`` env vars (see worker/defaults.py), read when the
app is made, so the producer and every worker agree on them.
"""

from __future__ import annotations

from celery import Celery

from worker import defaults

#: A batch with its image bytes inside the message (brokers other than Redis).
TASK_NAME = "digitscore.score_batch"
#: A batch whose image bytes wait in Redis under a key the message names (worker/payloads.py).
STORED_TASK_NAME = "digitscore.score_stored_batch"


def make_app(broker_url: str | None = None) -> Celery:
    broker = broker_url or defaults.setting(defaults.BROKER_URL_ENV, defaults.DEFAULT_WORKER_BROKER)
    timeout = defaults.visibility_timeout()
    events = defaults.task_events()
    app = Celery("digitscore", broker=broker, set_as_current=False)
    # The visibility timeout is read from the broker's and the result backend's transport
    # options; we keep no results, but set both so no part of Celery falls back to 1 hour.
    transport = {
        "visibility_timeout": timeout,
        # kombu sweeps for unacked messages of dead workers every interval x throttle seconds
        # (100 s by default, whatever the timeout): sweep every timeout/5 (1-10 s) instead, so
        # a batch whose worker died is back in the queue within about 1.2 x the timeout.
        "unacked_restore_interval": max(1, min(10, timeout // 5)),
        "unacked_restore_throttle": 1,
        "socket_connect_timeout": defaults.BROKER_CONNECT_TIMEOUT,
        "socket_timeout": 30,
    }
    app.conf.update(
        task_serializer="msgpack",
        result_serializer="msgpack",
        accept_content=["msgpack"],  # anything else (pickle!) is rejected and logged
        event_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,  # ack after the rows are committed
        task_reject_on_worker_lost=True,  # a killed worker's batch goes back to the queue
        worker_prefetch_multiplier=1,
        task_default_queue=defaults.queue(),
        broker_transport_options=transport,
        result_backend_transport_options={"visibility_timeout": timeout},
        broker_connection_timeout=defaults.BROKER_CONNECT_TIMEOUT,
        broker_connection_retry_on_startup=True,
        worker_send_task_events=events,  # for flower; see defaults.TASK_EVENTS
        task_send_sent_event=events,
        worker_hijack_root_logger=False,
    )
    return app
