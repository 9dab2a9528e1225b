"""The worker's Prometheus metrics. Every process of a worker (the Celery parent, its prefork children) writes them;
the parent serves their sum on ``HOST:METRICS_PORT/metrics`` (shared/metrics.py, started by
``arabic_words/processes.py``)."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import Counter, Histogram

from shared.schema import ErrorCode

# a result's timings_ms (vad: with VAD on; batch_wait: batching only)
STAGES = ("queue", "decode", "vad", "batch_wait", "inference", "total")
# the codes a job fails with in a worker (the web answers the others as HTTP errors, counted by status)
JOB_FAILURE_CODES = tuple(
    code.value
    for code in (
        ErrorCode.INVALID_AUDIO,
        ErrorCode.AUDIO_TOO_LONG,
        ErrorCode.UPLOAD_EXPIRED,
        ErrorCode.TIMEOUT,
        ErrorCode.WORKER_CRASHED,
        ErrorCode.INTERNAL,
    )
)

JOB_STAGE = Histogram(
    "arabic_words_job_stage_seconds",
    "Seconds a succeeded job spent in each stage (its result's timings_ms): queue (accepted to picked up), decode, "
    "vad, batch_wait, inference, total (accepted to stored)",
    ["stage"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
)
JOB_FAILURES = Counter(
    "arabic_words_job_failures_total",
    "Jobs failed by a worker, by error code (a job counts once, by the process that made it final)",
    ["code"],
)
BATCH_SIZE = Histogram(
    "arabic_words_batch_size",
    "Clips per forward pass with dynamic batching (BATCH_MAX_SIZE > 1)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
MODEL_LOAD = Histogram(
    "arabic_words_model_load_seconds",
    "Seconds a worker process took to load the model (before its warm-up), one observation per load",
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600),
)

for _code in JOB_FAILURE_CODES:  # every code present from the start, at 0: rate() sees its first failure
    JOB_FAILURES.labels(_code)


def job_succeeded(timings_ms: Mapping[str, float]) -> None:
    for stage, ms in timings_ms.items():
        if stage in STAGES:  # a stage added to timings_ms later is not a new series until listed here
            JOB_STAGE.labels(stage).observe(ms / 1000)


def job_failed(code: str) -> None:
    JOB_FAILURES.labels(code).inc()  # an ErrorCode value: a bounded set
