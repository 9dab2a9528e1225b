"""Redis key names. Everything the project stores lives under ``aw:`` (Celery's own keys are separate)."""

PREFIX = "aw"


def job(job_id: str) -> str:
    """Hash: status, timestamps, attempts, result/error JSON."""
    return f"{PREFIX}:job:{job_id}"


def upload(job_id: str) -> str:
    """String: the uploaded bytes, deleted once the job has a final state."""
    return f"{PREFIX}:upload:{job_id}"


def job_done_channel(job_id: str) -> str:
    """Pub/sub channel a worker publishes to when the job reaches a final state (wakes long-polls)."""
    return f"{PREFIX}:done:{job_id}"


def model_loads() -> str:
    """Hash: "<hostname>:<pid>" -> number of model loads in that worker process (should stay 1)."""
    return f"{PREFIX}:model_loads"


def model_processes() -> str:
    """Sorted set: "<hostname>:<pid>" of each worker process with its model loaded and warm -> the unix time of its
    last heartbeat (every ``MODEL_HEARTBEAT_S``). ``/readyz`` counts the fresh ones."""
    return f"{PREFIX}:model_processes"


MODEL_HEARTBEAT_S = 10.0
MODEL_HEARTBEAT_STALE_S = 3 * MODEL_HEARTBEAT_S  # a process silent this long is gone (killed or crashed)
