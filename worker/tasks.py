"""The transcription task: claim the job, fetch the upload, decode, run the model, store the final state. Small on
purpose: the work is in ``worker.pipeline``; this module is the I/O edge and the failure handling.

Every delivery ends in one of three ways: the job is final (succeeded, or failed with a code), the delivery was a
duplicate (the job is final already, or a live process holds it), or Redis stayed unreachable for
``REDIS_RETRY_S`` and the message goes back to the broker. Our own bugs fail the job as ``internal_error`` with a
logged traceback; they are never reported as bad input.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis
from celery import Celery, Task
from celery.exceptions import Reject, SoftTimeLimitExceeded, TimeLimitExceeded

from shared.cache import ResultCache
from shared.config import Settings
from shared.jobs import ClaimOutcome, JobStore
from shared.queue import TRANSCRIBE_TASK
from shared.redis_client import connect
from shared.schema import ErrorCode, JobError
from worker import metrics
from worker.audio import InvalidAudio
from worker.lifecycle import WorkerState, state
from worker.pipeline import JobTimeout, transcribe_bytes
from worker.recovery import is_dead_here

log = logging.getLogger(__name__)
T = TypeVar("T")

_TIMEOUT = JobError(ErrorCode.TIMEOUT.value, "transcription took too long")
_INTERNAL = JobError(ErrorCode.INTERNAL.value, "internal error while transcribing")
# Redis away for a while (a restart, a Sentinel failover): retried, never a failed job. READONLY is a client still
# talking to a demoted master (a plain URL behind DNS or a proxy; a Sentinel client turns it into a ConnectionError).
_REDIS_AWAY = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.BusyLoadingError, redis.ReadOnlyError)


class TranscriptionTask(Task):
    """The task's class; ``register`` gives it the worker's ``settings``. Delivery options (late acks, a killed pool
    child's message going back to the queue) are the app's, in ``shared.queue.make_celery``."""

    settings: Settings

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        # Celery calls this in the prefork parent when a hard time limit killed the child: the job that child held
        # is failed here, or it would stay `processing` until its lease ran out.
        if isinstance(exc, TimeLimitExceeded) and args:
            client = connect(self.settings.REDIS_URL, socket_timeout=5)
            try:
                if JobStore(client, self.settings).fail(args[0], _TIMEOUT):
                    metrics.job_failed(_TIMEOUT.code)
                log.warning("job failed: hard time limit job_id=%s", args[0])
            except redis.RedisError:  # the lease runs out and the reaper takes it back
                log.exception("could not fail a timed-out job job_id=%s", args[0])
            finally:
                client.close()


def register(app: Celery, settings: Settings) -> None:
    """Add the transcription task to the worker's app."""
    app.task(name=TRANSCRIBE_TASK, base=TranscriptionTask, settings=settings)(transcribe)


def _with_redis(worker: WorkerState, what: str, call: Callable[[], T]) -> T:
    """``call()``, retried with backoff while Redis is unreachable (a restart, a failover). Past REDIS_RETRY_S the
    message goes back to the broker: an infrastructure error never fails or acks away a job."""
    deadline = time.monotonic() + worker.settings.REDIS_RETRY_S
    delay = 0.25
    while True:
        try:
            return call()
        except _REDIS_AWAY as exc:
            if time.monotonic() + delay > deadline:
                log.error("redis unreachable for %.0f s (%s): message handed back", worker.settings.REDIS_RETRY_S, what)
                raise Reject(exc, requeue=True) from exc
            log.warning("redis unreachable (%s), retrying in %.2f s: %s", what, delay, exc)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def transcribe(job_id: str) -> None:
    worker = state()
    if worker is None:  # cannot happen in a process whose model load succeeded; the message waits for one that did
        raise Reject("no model in this process", requeue=True)
    store = worker.store
    claim = _with_redis(worker, "claim", lambda: store.claim(job_id, worker.name))
    if claim.outcome is ClaimOutcome.BUSY and is_dead_here(claim.detail):  # its pool child was just killed
        holder = claim.detail
        claim = _with_redis(worker, "claim", lambda: store.claim(job_id, worker.name, take_over=holder))
    if claim.outcome is not ClaimOutcome.CLAIMED:
        if claim.outcome is ClaimOutcome.EXHAUSTED:  # the claim failed it
            metrics.job_failed(ErrorCode.WORKER_CRASHED.value)
        log.info("delivery not run job_id=%s outcome=%s detail=%s", job_id, claim.outcome, claim.detail)
        return
    job = _with_redis(worker, "read job", lambda: store.get(job_id))
    data = _with_redis(worker, "fetch upload", lambda: store.fetch_upload(job_id))
    if job is None:  # expired in between
        return
    if data is None:
        error = JobError(ErrorCode.UPLOAD_EXPIRED.value, "the upload expired before a worker took it")
        if _with_redis(worker, "fail", lambda: store.fail(job_id, error)):
            metrics.job_failed(error.code)
        return
    picked_up = time.time()
    try:
        result = transcribe_bytes(
            worker.model,
            data,
            max_audio_s=worker.settings.MAX_AUDIO_S,
            expected=job.expected,
            vocabulary=job.vocabulary,
            batcher=worker.batcher,
            before_forward=worker.fault,
            deadline=_deadline(worker),
        )
    except (SoftTimeLimitExceeded, JobTimeout):
        log.warning("job failed: time limit job_id=%s attempt=%d", job_id, claim.attempt)
        if _with_redis(worker, "fail", lambda: store.fail(job_id, _TIMEOUT)):
            metrics.job_failed(_TIMEOUT.code)
        return
    except InvalidAudio as exc:
        code = ErrorCode.AUDIO_TOO_LONG if exc.reason == "audio_too_long" else ErrorCode.INVALID_AUDIO
        error = {"code": code.value, "message": exc.message, "reason": exc.reason}
        if _with_redis(worker, "fail", lambda: store.fail(job_id, error)):
            metrics.job_failed(code.value)
        log.info("job rejected job_id=%s reason=%s", job_id, exc.reason)
        return
    except Exception:  # a bug of ours: a failed job with a traceback in the log, never a job left processing
        log.exception("job failed unexpectedly job_id=%s", job_id)
        if _with_redis(worker, "fail", lambda: store.fail(job_id, _INTERNAL)):
            metrics.job_failed(_INTERNAL.code)
        return
    result.timings_ms = {
        "queue": round((picked_up - job.created_at) * 1000, 1),
        **result.timings_ms,
        "total": round((time.time() - job.created_at) * 1000, 1),
    }
    stored = _with_redis(worker, "store result", lambda: store.succeed(job_id, result.to_dict()))
    if stored:
        metrics.job_succeeded(result.timings_ms)
        if job.digest:  # the next upload of the same bytes finishes from this result (shared.cache)
            cache = ResultCache(store.redis, worker.settings)
            _with_redis(worker, "cache result", lambda: cache.put(job.digest, job.vocabulary, result.to_dict()))
    log.info("job done job_id=%s stored=%s duration_s=%.2f timings_ms=%s", job_id, stored, result.duration_s,
             result.timings_ms)  # fmt: skip


def _deadline(worker: WorkerState) -> float | None:
    """When this job must be over (time.monotonic()), where no one else enforces it: the threads pool ignores
    Celery's time limits, so the pipeline checks this one (the soft limit's moment). Prefork: None."""
    if worker.batcher is None:
        return None
    return time.monotonic() + max(1, worker.settings.TASK_TIME_LIMIT_S - 5)
