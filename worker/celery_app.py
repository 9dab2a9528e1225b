"""The worker's Celery app: ``celery -A worker.celery_app worker``."""

from __future__ import annotations

import logging
import os
import signal
import time

from billiard.process import current_process
from celery.concurrency import get_implementation
from celery.concurrency.prefork import TaskPool as PreforkPool
from celery.signals import worker_init, worker_process_init, worker_process_shutdown, worker_shutdown

from shared.config import Settings
from shared.queue import enqueue, make_celery

settings = Settings()
app = make_celery(settings)
app.autodiscover_tasks(["worker"], related_name="tasks", force=True)
log = logging.getLogger(__name__)

# After this many failed model loads in a row, a prefork worker stops (a warm shutdown, so the one message its
# parent holds goes back to the queue for a good worker) instead of holding it while children keep failing.
MAX_INIT_FAILURES = 3
EX_MODEL_LOAD_FAILED = 78  # EX_CONFIG: the supervisor's log says why


def _init_logging() -> None:
    logging.basicConfig(level=settings.LOG_LEVEL, format="%(asctime)s %(levelname)s %(name)s %(message)s")


def _send(job_id: str, queue: str) -> None:
    enqueue(app, job_id, queue)


def _init_or_exit(process_index: int, prefork_child: bool) -> None:
    """Load the model; a process that cannot must take no job. Celery's signal dispatch catches what a handler
    raises and lets the process live on without a model, so this process exits by itself, after a backoff."""
    from worker.lifecycle import clear_init_failures, init_failure_backoff_s, init_process

    try:
        init_process(settings, _send, process_index=process_index)
    except BaseException:
        delay_s, failures = init_failure_backoff_s(settings)
        log.exception("model load failed (failure %d); exiting in %.0f s", failures, delay_s)
        time.sleep(delay_s)
        if prefork_child and failures >= MAX_INIT_FAILURES:
            log.error("model load failed %d times: stopping this worker", failures)
            os.kill(os.getppid(), signal.SIGTERM)
        os._exit(EX_MODEL_LOAD_FAILED)
    clear_init_failures()


@worker_process_init.connect
def _load_model_in_child(**_: object) -> None:
    # Each prefork child gets its own index: it picks GPU index % n_gpus when there are GPUs.
    _init_logging()
    _init_or_exit(getattr(current_process(), "index", 0) or 0, prefork_child=True)


@worker_init.connect
def _load_model_in_main_process(sender: object, **_: object) -> None:
    # The threads pool (dynamic batching) and the solo pool run tasks in the main process, where
    # worker_process_init never fires: load the model here, once, before any task is taken.
    pool = get_implementation(getattr(sender, "pool_cls", None) or app.conf.worker_pool)
    if isinstance(pool, type) and issubclass(pool, PreforkPool):
        return
    _init_logging()
    _init_or_exit(0, prefork_child=False)


@worker_process_shutdown.connect
@worker_shutdown.connect
def _leave_ready_list(**_: object) -> None:
    from worker.lifecycle import leave

    leave()
