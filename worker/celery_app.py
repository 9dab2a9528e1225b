"""The worker's Celery app: ``celery -A worker.celery_app worker``."""

from __future__ import annotations

import logging

from billiard.process import current_process
from celery.signals import worker_process_init

from shared.config import Settings
from shared.queue import make_celery

settings = Settings()
app = make_celery(settings)
app.autodiscover_tasks(["worker"], related_name="tasks", force=True)


@worker_process_init.connect
def _load_model_in_child(**_: object) -> None:
    # Each prefork child gets its own index: it picks GPU index % n_gpus when there are GPUs.
    from worker.lifecycle import init_process

    logging.basicConfig(level=settings.LOG_LEVEL, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    init_process(settings, process_index=getattr(current_process(), "index", 0) or 0)
