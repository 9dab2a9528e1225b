"""The Celery app's configuration, shared by the web app (which only sends tasks) and the worker."""

from __future__ import annotations

from celery import Celery

from shared.config import Settings
from shared.redis_client import is_sentinel_url, parse_sentinel_url

TRANSCRIBE_TASK = "arabic_words.transcribe"


def enqueue(celery: Celery, job_id: str, queue: str) -> None:
    """Send the job's task. Its Celery task id is the job id, so Flower and the logs name jobs as the API does."""
    celery.send_task(TRANSCRIBE_TASK, args=[job_id], queue=queue, task_id=job_id)


def broker(settings: Settings) -> tuple[str, dict]:
    """(broker URL, transport options) for REDIS_URL: a plain Redis URL as it is; a ``sentinel://`` one
    (shared/redis_client.py) in the terms of kombu's Sentinel transport, which reads the master's name (and the
    sentinels' password) from transport options, not from the URL, and the master's password and database from each
    ``;``-separated URL."""
    if not is_sentinel_url(settings.REDIS_URL):
        return settings.REDIS_URL, {}
    parsed = parse_sentinel_url(settings.REDIS_URL)
    return parsed.kombu_url(), parsed.kombu_transport_options()


def make_celery(settings: Settings, main: str = "arabic_words") -> Celery:
    broker_url, sentinel_options = broker(settings)
    app = Celery(main, broker=broker_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_accept_content=["json"],
        task_ignore_result=True,  # results live in our own job record (shared.jobs)
        task_default_queue=settings.QUEUE,
        # A message is acked when its job is final, and given back when the pool child running it dies; the job
        # record (shared.jobs) decides whether a delivery runs, so a duplicate never changes a final job.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_send_task_events=True,  # Flower
        task_send_sent_event=True,
        task_time_limit=settings.TASK_TIME_LIMIT_S,
        task_soft_time_limit=max(1, settings.TASK_TIME_LIMIT_S - 5),
        # "priority": a worker asks Redis for the queues in the order it was given them (QUEUE first, then the batch
        # lane) every time, instead of taking turns: interactive work always goes first.
        broker_transport_options={
            "visibility_timeout": settings.broker_visibility_timeout_s,
            "queue_order_strategy": "priority",
            **sentinel_options,  # a sentinel:// REDIS_URL: the master's name; kombu follows a failover
        },
        broker_connection_retry_on_startup=True,
        worker_proc_alive_timeout=settings.WORKER_INIT_TIMEOUT_S,  # model loads take longer than the 4 s default
        # Dynamic batching needs the jobs of one model in one process: a threads pool, a thread per batch slot.
        worker_pool="threads" if settings.BATCH_MAX_SIZE > 1 else "prefork",
        worker_concurrency=settings.BATCH_MAX_SIZE if settings.BATCH_MAX_SIZE > 1 else settings.WORKER_CONCURRENCY,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    return app
