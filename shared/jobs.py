"""The job record in Redis: created by the web app, advanced by the worker, read (and waited on) by clients.

A job is a hash under ``keys.job(id)`` that outlives Celery's own message: status answers come from it, never
from Celery's AsyncResult (which reads unknown ids as PENDING). The upload's bytes sit beside it under
``keys.upload(id)`` until the job is final.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass

import redis

from shared import keys
from shared.config import Settings
from shared.schema import JobError, JobStatus

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")


def is_job_id(value: str) -> bool:
    return bool(_JOB_ID.match(value))


@dataclass(frozen=True)
class Job:
    id: str
    status: JobStatus
    created_at: float
    attempts: int
    expected: str | None
    result: dict | None
    error: dict | None

    def public(self) -> dict:
        """The API's view of a job."""
        return {"id": self.id, "status": self.status.value, "result": self.result, "error": self.error}


class JobStore:
    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings

    def create(self, data: bytes, expected: str | None = None) -> Job:
        job_id = uuid.uuid4().hex
        now = time.time()
        fields = {"status": JobStatus.QUEUED.value, "created_at": repr(now), "attempts": 0, "size": len(data)}
        if expected:
            fields["expected"] = expected
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(keys.upload(job_id), data, ex=self.settings.UPLOAD_TTL_S)
            pipe.hset(keys.job(job_id), mapping=fields)
            pipe.expire(keys.job(job_id), self.settings.RESULT_TTL_S)
            pipe.execute()
        return Job(job_id, JobStatus.QUEUED, now, 0, expected, None, None)

    def get(self, job_id: str) -> Job | None:
        if not is_job_id(job_id):
            return None
        raw = self.redis.hgetall(keys.job(job_id))
        if not raw:
            return None
        field = {k.decode(): v.decode() for k, v in raw.items()}
        return Job(
            id=job_id,
            status=JobStatus(field["status"]),
            created_at=float(field["created_at"]),
            attempts=int(field.get("attempts", 0)),
            expected=field.get("expected"),
            result=json.loads(field["result"]) if "result" in field else None,
            error=json.loads(field["error"]) if "error" in field else None,
        )

    def start_attempt(self, job_id: str) -> int:
        """Mark the job processing and count this delivery; returns the attempt number (1 for the first)."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(keys.job(job_id), "attempts", 1)
            pipe.hset(keys.job(job_id), mapping={"status": JobStatus.PROCESSING.value, "started_at": repr(time.time())})
            attempts, _ = pipe.execute()
        return int(attempts)

    def fetch_upload(self, job_id: str) -> bytes | None:
        return self.redis.get(keys.upload(job_id))

    def succeed(self, job_id: str, result: dict) -> None:
        self._finish(job_id, JobStatus.SUCCEEDED, "result", result)

    def fail(self, job_id: str, error: JobError | dict) -> None:
        self._finish(job_id, JobStatus.FAILED, "error", error if isinstance(error, dict) else error.to_dict())

    def _finish(self, job_id: str, status: JobStatus, field: str, value: dict) -> None:
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                keys.job(job_id),
                mapping={
                    "status": status.value,
                    field: json.dumps(value, ensure_ascii=False),
                    "finished_at": repr(time.time()),
                },
            )
            pipe.delete(keys.upload(job_id))
            pipe.publish(keys.job_done_channel(job_id), status.value)
            pipe.execute()

    def wait(self, job_id: str, timeout_s: float) -> Job | None:
        """The job once it is final or ``timeout_s`` has passed, blocking on Redis pub/sub (no polling loop)."""
        job = self.get(job_id)
        if job is None or job.status.is_final or timeout_s <= 0:
            return job
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(keys.job_done_channel(job_id))
            job = self.get(job_id)  # it may have finished between the first read and the subscription
            deadline = time.monotonic() + timeout_s
            while job is not None and not job.status.is_final:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if pubsub.get_message(timeout=remaining) is not None:
                    job = self.get(job_id)
        finally:
            pubsub.close()
        return job
