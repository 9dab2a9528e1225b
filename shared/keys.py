"""Redis key names. Everything the project stores lives under ``aw:`` (Celery's own keys are separate)."""

PREFIX = "aw"


def job(job_id: str) -> str:
    """Hash: status, timestamps, attempts, result/error JSON."""
    return f"{PREFIX}:job:{job_id}"


def upload(job_id: str) -> str:
    """String: the uploaded bytes, deleted once the job has a final state."""
    return f"{PREFIX}:upload:{job_id}"


def api_key(digest: str) -> str:
    """Hash: one API key's id, name, limits and state, under the SHA-256 of the key (the key itself is never
    stored)."""
    return f"{PREFIX}:apikey:{digest}"


def api_key_index() -> str:
    """Hash: key id -> digest, for listing and revoking keys by id or name."""
    return f"{PREFIX}:apikeys"


def cached_result(digest: str, decoding: str) -> str:
    """String with the result TTL: the result for an upload's bytes (SHA-256) under one model and decoding."""
    return f"{PREFIX}:cache:{digest}:{decoding}"


def vocabularies() -> str:
    """Hash: name -> a word list registered on the server (one normalized word per line), for ``vocabulary=NAME``."""
    return f"{PREFIX}:vocabularies"


def rate_bucket(subject: str) -> str:
    """Hash: a client's token bucket (tokens, updated_at); ``subject`` is "key:<id>" or "addr:<address>"."""
    return f"{PREFIX}:bucket:{subject}"


def inflight(subject: str) -> str:
    """Sorted set: a client's jobs not yet final -> the time by which they surely are (stale members drop out)."""
    return f"{PREFIX}:inflight:{subject}"


def usage_prefix(subject: str) -> str:
    """Prefix of a client's daily audio counters (milliseconds); the UTC day number (unix time // 86400) follows."""
    return f"{PREFIX}:usage:{subject}:"


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
