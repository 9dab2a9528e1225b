"""The worker's Celery app: ``celery -A worker.celery_app worker``."""

from __future__ import annotations

import logging

from billiard.process import current_process
from celery.concurrency import get_implementation
from celery.concurrency.prefork import TaskPool as PreforkPool
from celery.signals import worker_init, worker_process_init, worker_process_shutdown, worker_shutdown

from shared.config import Settings
from shared.queue import make_celery

settings = Settings()
app = make_celery(settings)
app.autodiscover_tasks(["worker"], related_name="tasks", force=True)


def _init_logging() -> None:
    logging.basicConfig(level=settings.LOG_LEVEL, format="%(asctime)s %(levelname)s %(name)s %(message)s")


@worker_process_init.connect
def _load_model_in_child(**_: object) -> None:
    # Each prefork child gets its own index: it picks GPU index % n_gpus when there are GPUs.
    from worker.lifecycle import init_process

    _init_logging()
    init_process(settings, process_index=getattr(current_process(), "index", 0) or 0)


@worker_init.connect
def _load_model_in_main_process(sender: object, **_: object) -> None:
    # The threads pool (dynamic batching) and the solo pool run tasks in the main process, where
    # worker_process_init never fires: load the model here, once, before any task is taken.
    pool = get_implementation(getattr(sender, "pool_cls", None) or app.conf.worker_pool)
    if isinstance(pool, type) and issubclass(pool, PreforkPool):
        return
    from worker.lifecycle import init_process

    _init_logging()
    init_process(settings)


@worker_process_shutdown.connect
@worker_shutdown.connect
def _leave_ready_list(**_: object) -> None:
    from worker.lifecycle import leave

    leave()
