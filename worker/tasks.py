"""The transcription task: fetch the upload, decode, run the model, store the result. Small on purpose: the work
is in ``worker.audio`` and ``worker.asr``; this module is the I/O edge."""

from __future__ import annotations

import logging
import time

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded

from shared.queue import TRANSCRIBE_TASK
from shared.schema import ErrorCode, JobError
from worker.audio import InvalidAudio
from worker.lifecycle import state
from worker.pipeline import transcribe_bytes

log = logging.getLogger(__name__)


@shared_task(name=TRANSCRIBE_TASK, acks_late=True, reject_on_worker_lost=True)
def transcribe(job_id: str) -> None:
    worker = state()
    store, settings = worker.store, worker.settings
    job = store.get(job_id)
    if job is None or job.status.is_final:  # expired, or a duplicate delivery of a finished job
        return
    attempt = store.start_attempt(job_id)
    if attempt > settings.MAX_ATTEMPTS:  # earlier deliveries killed their worker: stop the loop here
        store.fail(
            job_id,
            JobError(ErrorCode.WORKER_CRASHED.value, f"the job was attempted {attempt - 1} times and never finished"),
        )
        return
    try:
        _run(job_id, job.created_at, job.expected)
    except SoftTimeLimitExceeded:
        store.fail(job_id, JobError(ErrorCode.TIMEOUT.value, "transcription took too long"))
    except Exception:  # never leave a job 'processing' forever
        log.exception("job failed unexpectedly job_id=%s", job_id)
        store.fail(job_id, JobError(ErrorCode.INTERNAL.value, "internal error while transcribing"))


def _run(job_id: str, created_at: float, expected: str | None) -> None:
    worker = state()
    store = worker.store
    picked_up = time.time()
    data = store.fetch_upload(job_id)
    if data is None:
        store.fail(job_id, JobError(ErrorCode.UPLOAD_EXPIRED.value, "the upload expired before a worker took it"))
        return
    try:
        result = transcribe_bytes(
            worker.model, data, max_audio_s=worker.settings.MAX_AUDIO_S, expected=expected, batcher=worker.batcher
        )
    except InvalidAudio as exc:
        code = ErrorCode.AUDIO_TOO_LONG if exc.reason == "audio_too_long" else ErrorCode.INVALID_AUDIO
        store.fail(job_id, {"code": code.value, "message": exc.message, "reason": exc.reason})
        log.info("job rejected job_id=%s reason=%s", job_id, exc.reason)
        return
    result.timings_ms = {
        "queue": round((picked_up - created_at) * 1000, 1),
        **result.timings_ms,
        "total": round((time.time() - created_at) * 1000, 1),
    }
    store.succeed(job_id, result.to_dict())
    log.info("job done job_id=%s duration_s=%.2f timings_ms=%s", job_id, result.duration_s, result.timings_ms)
