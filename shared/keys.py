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


def model_processes() -> str:
    """Sorted set: "<hostname>:<pid>" of each worker process with its model loaded and warm -> the unix time of its
    last heartbeat (every ``MODEL_HEARTBEAT_S``). ``/readyz`` counts the fresh ones."""
    return f"{PREFIX}:model_processes"


def processing() -> str:
    """Sorted set: id of each job a worker process holds -> its lease deadline. The reaper walks it."""
    return f"{PREFIX}:processing"


def reaper_lock() -> str:
    """String with a short expiry: the worker process sweeping for lost jobs now (one at a time)."""
    return f"{PREFIX}:reaper"


def init_failures(parent: str) -> str:
    """Counter: model loads that failed in children of one worker parent ("<hostname>:<pid>"), for backoff."""
    return f"{PREFIX}:init_failures:{parent}"


# A heartbeat every 2 s; silent for 10 s means the process is gone (killed or crashed): the reaper then gives its
# jobs to another process and /readyz stops counting it. Short, because that silence is the recovery window.
MODEL_HEARTBEAT_S = 2.0
MODEL_HEARTBEAT_STALE_S = 5 * MODEL_HEARTBEAT_S
