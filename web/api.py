"""v1 API: POST an upload, GET its status (optionally long-polling), health and readiness."""

from __future__ import annotations

import contextlib
import logging
import time

import redis
from flask import Blueprint, jsonify, request, url_for

from shared import keys
from shared.audio_format import UNRECOGNIZED_FORMAT_MESSAGE, sniff_container
from shared.cache import content_digest
from shared.config import Settings
from shared.jobs import Job, JobStore
from shared.queue import enqueue
from shared.schema import ErrorCode, Health, JobCreated, Readiness, dump
from shared.text import compare_expected
from shared.vocabularies import InvalidVocabulary
from web import auth, services
from web.errors import ApiError
from web.openapi import Reply, errors, json_body, operation

log = logging.getLogger(__name__)
bp = Blueprint("api", __name__)
bp.before_request(auth.check_access)  # who is calling, and their limits (web/auth.py)
bp.after_request(auth.rate_headers)
bp.teardown_request(auth.release_unused)

MAX_EXPECTED_CHARS = 500
MAX_VOCABULARY_CHARS = 50_000  # a thousand words of forty letters, separators and vowel marks included
MAX_VOCABULARY_QUERY = 2_000  # in the URL: a few dozen words or a list's name (servers limit URLs to ~8 KB)
PRIORITIES = ("interactive", "batch")
_RAW_TYPES = ("audio/", "video/webm", "video/ogg", "video/mp4", "application/octet-stream", "application/ogg")


def _read_upload(limit: int) -> bytes:
    """The uploaded bytes: multipart field ``file``, or a raw body with an audio content type."""
    if request.mimetype == "multipart/form-data":
        upload = request.files.get("file")
        if upload is None:
            raise ApiError(400, ErrorCode.NO_FILE, "send the recording in a multipart field named 'file'")
        data = upload.stream.read(limit + 1)
    elif request.mimetype.startswith(_RAW_TYPES):
        data = request.stream.read(limit + 1)
    elif not request.mimetype and not request.content_length:
        raise ApiError(400, ErrorCode.NO_FILE, "no recording was sent")
    else:
        raise ApiError(
            415,
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            f"send multipart/form-data with a 'file' field or an audio/* body, not {request.mimetype!r}",
        )
    if len(data) > limit:
        raise ApiError(413, ErrorCode.UPLOAD_TOO_LARGE, f"uploads are limited to {limit} bytes")
    if not data:
        raise ApiError(400, ErrorCode.EMPTY_UPLOAD, "the uploaded file is empty")
    if sniff_container(data) is None:  # the worker would refuse it too: say so now, store and queue nothing
        raise ApiError(415, ErrorCode.INVALID_AUDIO, UNRECOGNIZED_FORMAT_MESSAGE)
    return data


def _read_expected() -> str | None:
    expected = request.form.get("expected") if request.mimetype == "multipart/form-data" else None
    expected = expected if expected is not None else request.args.get("expected")
    if expected is None or not expected.strip():
        return None
    if len(expected) > MAX_EXPECTED_CHARS:
        raise ApiError(400, ErrorCode.INVALID_EXPECTED, f"'expected' is limited to {MAX_EXPECTED_CHARS} characters")
    return expected.strip()


def _form_or_query(name: str) -> str | None:
    value = request.form.get(name) if request.mimetype == "multipart/form-data" else None
    return value if value is not None else request.args.get(name)


def _read_queue(settings: Settings) -> str:
    """The lane the job goes to: ``priority=interactive`` (the default: a learner waits) or ``batch`` (backfills),
    which workers take only when no interactive job waits."""
    priority = (_form_or_query("priority") or "interactive").strip().lower()
    if priority not in PRIORITIES:
        raise ApiError(400, ErrorCode.INVALID_PRIORITY, "'priority' is 'interactive' (the default) or 'batch'")
    return settings.batch_queue if priority == "batch" else settings.QUEUE


def _read_vocabulary() -> list[str]:
    """``vocabulary``: words the beam search prefers, or the name of a word list registered on the server."""
    value = request.form.get("vocabulary") if request.mimetype == "multipart/form-data" else None
    limit = MAX_VOCABULARY_CHARS
    if value is None:
        value, limit = request.args.get("vocabulary"), MAX_VOCABULARY_QUERY
    if value is None or not value.strip():
        return []
    if len(value) > limit:
        raise ApiError(400, ErrorCode.INVALID_VOCABULARY, f"'vocabulary' is limited to {limit} characters here")
    try:
        return services().vocabularies.resolve(value)
    except InvalidVocabulary as exc:
        raise ApiError(400, ErrorCode.INVALID_VOCABULARY, str(exc)) from None


def _admit(store: JobStore, settings: Settings, queue: str) -> None:
    """Refuse new work at the door while the lane's queue or Redis memory is past its limit: 429 with Retry-After,
    so overload is never met by evicting what was accepted."""
    depth, memory = store.load(queue)
    if depth >= settings.MAX_QUEUE_DEPTH:
        raise ApiError(429, ErrorCode.QUEUE_FULL, f"{depth} jobs are waiting; retry later", retry_after_s=5)
    used, limit = memory
    if limit and used >= settings.MAX_REDIS_MEMORY_FRACTION * limit:
        raise ApiError(429, ErrorCode.QUEUE_FULL, "the job store is nearly full; retry later", retry_after_s=10)


def submit() -> Job:
    """The one way a job is created, for every route that takes an upload (POST /v1/transcriptions and the
    OpenAI-compatible route): read and check the upload, ``expected``, ``priority`` and ``vocabulary``; answer it at
    once from the result cache when the same bytes were transcribed the same way; else admission control for its
    lane, store the job under the id ``auth.check_access`` reserved for it, queue its task. Raises ApiError (nothing
    stored or queued) otherwise."""
    started = time.perf_counter()
    app = services()
    settings, store = app.settings, app.store
    data = _read_upload(settings.MAX_UPLOAD_BYTES)
    expected = _read_expected()
    queue = _read_queue(settings)
    vocabulary = _read_vocabulary()
    caller = auth.client()
    key_id = caller.key.id if caller.key else ""
    digest = content_digest(data) if app.cache.enabled else ""
    cached = app.cache.get(digest, vocabulary) if digest else None
    if cached is not None:  # the same bytes, model and decoding: finished now, no worker (shared/cache.py)
        result = {**cached, "cached": True, "timings_ms": {"total": round((time.perf_counter() - started) * 1000, 2)}}
        if expected:
            result["expected"] = compare_expected(expected, cached["text"]).to_dict()
        job = store.create_succeeded(result, expected=expected, job_id=auth.reserved_job_id(), queue=queue,
                                     key_id=key_id)  # fmt: skip
        store.replicate(job.id)
        log.info("job answered from the cache job_id=%s subject=%s", job.id, caller.subject)
        return job
    _admit(store, settings, queue)
    job = store.create(
        data, expected=expected, queue=queue, job_id=auth.reserved_job_id(), subject=caller.counted, key_id=key_id,
        vocabulary=vocabulary, digest=digest,
    )  # fmt: skip
    if settings.FAULT_PAUSE_BEFORE_PUBLISH_S > 0:  # fault injection (chaos suite): off by default
        time.sleep(settings.FAULT_PAUSE_BEFORE_PUBLISH_S)
    try:
        enqueue(app.celery, job.id, job.queue)
    except Exception as exc:  # kombu's publish retries are spent: the job was not accepted, so say so
        log.error("publish failed job_id=%s: %s", job.id, exc)
        with contextlib.suppress(redis.RedisError):  # else it expires unseen: nobody was given its id
            store.discard(job.id)
        raise ApiError(
            503,
            ErrorCode.SERVICE_UNAVAILABLE,
            "the queue is unavailable; the upload was not accepted, retry later",
            retry_after_s=5,
        ) from exc
    store.replicate(job.id)  # 202 only once a replica has the job, where REDIS_REPLICA_ACKS asks for one
    auth.created()
    log.info("job queued job_id=%s bytes=%d subject=%s", job.id, len(data), caller.subject)
    return job


def accepted(job: Job):
    """202 for a queued job: its id and URL (also in ``Location``)."""
    url = url_for("api.get_transcription", job_id=job.id)
    body = JobCreated(id=job.id, status=job.status, url=url)
    return jsonify(dump(body)), 202, {"Location": url}


# ------------------------------------------------------------------------------------- OpenAPI descriptions
_UPLOAD = {"type": "string", "format": "binary", "description": "the recording (WebM, OGG, MP3, M4A/MP4, AAC, WAV, "
           "FLAC or AIFF), at most MAX_UPLOAD_BYTES"}  # fmt: skip
_EXPECTED = {"type": "string", "maxLength": MAX_EXPECTED_CHARS, "description": "the Arabic text the speaker was "
             "asked to say: the result compares the transcript with it"}  # fmt: skip
_PRIORITY = {"type": "string", "enum": list(PRIORITIES), "default": "interactive", "description": "the lane: "
             "`batch` (backfills) waits while interactive jobs wait"}  # fmt: skip
_VOCAB = {"type": "string", "maxLength": MAX_VOCABULARY_CHARS, "description": "words the transcription should "
          "prefer (a JSON list, or separated by commas or spaces), or the name of a word list registered on the "
          "server (`arabic-words vocabulary add`)"}  # fmt: skip
_RAW = {"type": "string", "format": "binary"}
UPLOAD_BODY = {
    "required": True,
    "description": "multipart with a `file` field, or the recording itself as the body with an audio content type "
    "(`audio/*`, `video/webm`, `video/ogg`, `video/mp4`, `application/ogg` or `application/octet-stream`)",
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {"file": _UPLOAD, "expected": _EXPECTED, "priority": _PRIORITY, "vocabulary": _VOCAB},
            },
        },
        "audio/*": {"schema": _RAW},
        "application/octet-stream": {"schema": _RAW},
    },
}
EXPECTED_QUERY = {"name": "expected", "in": "query", "required": False, "schema": _EXPECTED,
                  "description": "as the `expected` form field (the form field wins)"}  # fmt: skip
_UPLOAD_400 = "`no_file`, `empty_upload`, `invalid_expected`, `invalid_priority` or `invalid_vocabulary`"
UPLOAD_QUERY = [
    EXPECTED_QUERY,
    {"name": "priority", "in": "query", "required": False, "schema": _PRIORITY,
     "description": "as the `priority` form field (the form field wins)"},
    {"name": "vocabulary", "in": "query", "required": False, "schema": {**_VOCAB, "maxLength": MAX_VOCABULARY_QUERY},
     "description": "as the `vocabulary` form field (the form field wins); a long list goes in the form"},
]  # fmt: skip


def _wait_parameter(settings: Settings) -> list[dict]:
    return [{
        "name": "wait", "in": "query", "required": False,
        "description": "hold the request until the job is final or this many seconds pass (MAX_WAIT_S at most)",
        "schema": {"type": "number", "minimum": 0, "maximum": settings.MAX_WAIT_S},
    }]  # fmt: skip


@bp.post("/v1/transcriptions")
@operation(
    "Submit a recording",
    {202: Reply("accepted and queued (or `succeeded` at once from an identical upload's result): poll `url`",
                json_body("JobCreated"), ("Location",)),
     **errors(400, 401, 403, 413, 415, 429, 503, notes={400: _UPLOAD_400})},
    tags=("transcriptions",), parameters=UPLOAD_QUERY, request_body=UPLOAD_BODY,
)  # fmt: skip
def create_transcription():
    return accepted(submit())


@bp.get("/v1/transcriptions/<job_id>")
@operation(
    "A job's status and result",
    {200: Reply("the job; `result` once it succeeded, `error` once it failed", json_body("JobView")),
     **errors(400, 401, 403, 404, 429, 503, notes={400: "`invalid_wait`"})},
    tags=("transcriptions",), parameters=_wait_parameter, path={"job_id": "the id a POST answered"},
)  # fmt: skip
def get_transcription(job_id: str):
    app = services()
    settings = app.settings
    wait_arg = request.args.get("wait")
    wait_s = 0.0
    if wait_arg is not None:
        try:
            wait_s = float(wait_arg)
        except ValueError:
            wait_s = -1.0
        if not 0 <= wait_s <= settings.MAX_WAIT_S:  # also refuses nan
            raise ApiError(
                400, ErrorCode.INVALID_WAIT, f"'wait' must be a number of seconds from 0 to {settings.MAX_WAIT_S:g}"
            )
    job = app.store.get(job_id)
    if job is None or not auth.owns(job):  # another key's job does not exist for this one (ids are not probeable)
        shown = job_id if len(job_id) <= 64 else job_id[:64] + "..."  # a 100 KB id is not echoed back whole
        raise ApiError(404, ErrorCode.NOT_FOUND, f"no transcription job {shown!r} (unknown or expired)")
    if wait_s > 0 and not job.status.is_final:
        job = app.waiter.wait(job_id, wait_s) or job
    return jsonify(job.public())


@bp.get("/healthz")
@operation("Liveness: the process is up", {200: Reply("up", json_body("Health"))}, tags=("health",), secured=False)
def healthz():
    return jsonify(dump(Health(status="ok")))


@bp.get("/readyz")
@operation(
    "Readiness: Redis, a worker and a loaded model",
    {200: Reply("ready", json_body("Readiness")), 503: Reply("not ready; the body says what is missing",
                                                             json_body("Readiness"))},
    tags=("health",), secured=False,
)  # fmt: skip
def readyz():
    """Ready when Redis answers, a worker answers Celery's ping, and a worker process has its model loaded (fresh
    heartbeat): the ping alone is answered by the prefork parent even while every child fails to load the model."""
    checks = {"redis": False, "workers": 0, "model_processes": 0}
    try:
        app = services()
        redis_client = app.store.redis
        checks["redis"] = bool(redis_client.ping())
        if checks["redis"]:
            replies = app.celery.control.ping(timeout=1.0)
            checks["workers"] = len(replies or [])
            fresh_since = time.time() - keys.MODEL_HEARTBEAT_STALE_S
            checks["model_processes"] = int(redis_client.zcount(keys.model_processes(), fresh_since, "+inf"))
    except Exception as exc:  # readiness answers, it does not raise
        log.warning("readiness check failed: %s", exc)
    ready = checks["redis"] and checks["workers"] > 0 and checks["model_processes"] > 0
    body = Readiness(status="ready" if ready else "not_ready", **checks)
    return jsonify(dump(body)), 200 if ready else 503
