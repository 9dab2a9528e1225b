"""The worker's Celery app, built from one ``Settings`` by ``arabic-words worker`` (``arabic_words/processes.py``).

Lifecycle, by Celery signal: each prefork child loads the model in ``worker_process_init`` (the threads and solo
pools, which run tasks in the main process, in ``worker_init``); a process that cannot load it takes no job and exits
after a backoff; a process leaving cleanly takes itself off the ready list. Pool children are forked from the process
that built the app, so they share its settings without reading the environment again.
"""

from __future__ import annotations

import logging
import os
import signal
import time

from billiard.process import current_process
from celery import Celery
from celery.concurrency import get_implementation
from celery.concurrency.prefork import TaskPool as PreforkPool
from celery.signals import worker_init, worker_process_init, worker_process_shutdown, worker_shutdown

from shared.config import Settings
from shared.queue import enqueue, make_celery
from worker import lifecycle, tasks

log = logging.getLogger(__name__)

# After this many failed model loads in a row, a prefork worker stops (a warm shutdown, so the one message its
# parent holds goes back to the queue for a good worker) instead of holding it while children keep failing.
MAX_INIT_FAILURES = 3
EX_MODEL_LOAD_FAILED = 78  # EX_CONFIG: the supervisor's log says why


def create_worker_app(settings: Settings) -> Celery:
    """The Celery app a worker runs: the shared configuration, the transcription task and the lifecycle hooks."""
    app = make_celery(settings)
    tasks.register(app, settings)

    def init_or_exit(process_index: int, prefork_child: bool) -> None:
        """Load the model; a process that cannot must take no job. Celery's signal dispatch catches what a handler
        raises and lets the process live on without a model, so this process exits by itself, after a backoff."""
        try:
            lifecycle.init_process(settings, lambda job_id, queue: enqueue(app, job_id, queue), process_index)
        except BaseException:
            delay_s, failures = lifecycle.init_failure_backoff_s(settings)
            log.exception("model load failed (failure %d); exiting in %.0f s", failures, delay_s)
            time.sleep(delay_s)
            if prefork_child and failures >= MAX_INIT_FAILURES:
                log.error("model load failed %d times: stopping this worker", failures)
                os.kill(os.getppid(), signal.SIGTERM)
            os._exit(EX_MODEL_LOAD_FAILED)
        lifecycle.clear_init_failures()

    def load_model_in_child(**_: object) -> None:
        # Each prefork child gets its own index: it picks GPU index % n_gpus when there are GPUs.
        init_or_exit(getattr(current_process(), "index", 0) or 0, prefork_child=True)

    def load_model_in_main_process(sender: object, **_: object) -> None:
        # The threads pool (dynamic batching) and the solo pool run tasks in the main process, where
        # worker_process_init never fires: load the model here, once, before any task is taken.
        pool = get_implementation(getattr(sender, "pool_cls", None) or app.conf.worker_pool)
        if isinstance(pool, type) and issubclass(pool, PreforkPool):
            return
        init_or_exit(0, prefork_child=False)

    def leave_ready_list(**_: object) -> None:
        lifecycle.leave()

    # weak=False: the handlers are closures that live as long as the app; dispatch_uid: one of each per process
    worker_process_init.connect(load_model_in_child, weak=False, dispatch_uid="arabic_words.load_model_in_child")
    worker_init.connect(load_model_in_main_process, weak=False, dispatch_uid="arabic_words.load_model_in_main")
    for sig in (worker_process_shutdown, worker_shutdown):
        sig.connect(leave_ready_list, weak=False, dispatch_uid=f"arabic_words.leave_ready_list.{sig.name}")
    return app


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.LOG_LEVEL, format="%(asctime)s %(levelname)s %(name)s %(message)s")
