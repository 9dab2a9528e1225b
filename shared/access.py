"""Who may submit work, and how much: API keys and per-client limits, kept in Redis so every web process agrees.

A key is ``aw_<random>`` (256 random bits); Redis holds only its SHA-256, with the key's id, name and limits, so a
copy of the database gives nobody a usable key. A client is a *subject*: ``key:<id>`` for a key, ``addr:<address>``
for an anonymous client when auth is off. Each subject has three limits, checked together by one Lua script so that
concurrent requests on many web processes cannot slip past them:

- a token bucket of ``rate_per_min`` requests (capacity one minute's worth);
- at most ``max_inflight`` jobs not yet final (the job's final transition in ``shared.jobs`` releases its place);
- at most ``audio_s_per_day`` seconds of transcribed audio per UTC day (the final transition of a succeeded job adds
  its duration).

0 means no limit, for each.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from dataclasses import dataclass

import redis

from shared import keys
from shared.schema import ErrorCode

KEY_PREFIX = "aw_"


@dataclass(frozen=True)
class Limits:
    rate_per_min: int = 0
    max_inflight: int = 0
    audio_s_per_day: float = 0.0


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    created_at: float
    revoked: bool
    limits: Limits

    @property
    def subject(self) -> str:
        return f"key:{self.id}"

    def public(self) -> dict:
        return {"id": self.id, "name": self.name, "created_at": self.created_at, "revoked": self.revoked,
                "rate_per_min": self.limits.rate_per_min, "max_inflight": self.limits.max_inflight,
                "audio_s_per_day": self.limits.audio_s_per_day}  # fmt: skip


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


class KeyStore:
    """Create, list, revoke and look up API keys."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def create(self, name: str, limits: Limits) -> tuple[ApiKey, str]:
        """A new key: (its record, the key itself, which is shown once and never stored)."""
        if not name.strip():
            raise ValueError("a key needs a name")
        if any(k.name == name and not k.revoked for k in self.list()):
            raise ValueError(f"a key named {name!r} exists; revoke it first or choose another name")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        record = ApiKey(uuid.uuid4().hex[:12], name, time.time(), False, limits)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.api_key(digest(secret)), mapping=_fields(record))
            pipe.hset(keys.api_key_index(), record.id, digest(secret))
            pipe.execute()
        return record, secret

    def lookup(self, secret: str) -> ApiKey | None:
        if not secret.startswith(KEY_PREFIX) or len(secret) > 128:
            return None
        return _record(self.redis.hgetall(keys.api_key(digest(secret))))

    def list(self) -> list[ApiKey]:
        found = []
        for hashed in self.redis.hvals(keys.api_key_index()):
            record = _record(self.redis.hgetall(keys.api_key(hashed.decode())))
            if record is not None:
                found.append(record)
        return sorted(found, key=lambda k: k.created_at)

    def revoke(self, name_or_id: str) -> list[ApiKey]:
        """Revoke the key with this id, or every live key with this name; returns what was revoked."""
        index = {k.decode(): v.decode() for k, v in self.redis.hgetall(keys.api_key_index()).items()}
        revoked = []
        for record in self.list():
            if not record.revoked and name_or_id in (record.id, record.name):
                self.redis.hset(keys.api_key(index[record.id]), "revoked", "1")
                revoked.append(record)
        return revoked


def _fields(record: ApiKey) -> dict[str, str]:
    return {"id": record.id, "name": record.name, "created_at": repr(record.created_at),
            "revoked": "1" if record.revoked else "0", "rate_per_min": str(record.limits.rate_per_min),
            "max_inflight": str(record.limits.max_inflight),
            "audio_s_per_day": repr(float(record.limits.audio_s_per_day))}  # fmt: skip


def _record(raw: dict[bytes, bytes]) -> ApiKey | None:
    if not raw:
        return None
    f = {k.decode(): v.decode() for k, v in raw.items()}
    limits = Limits(int(f["rate_per_min"]), int(f["max_inflight"]), float(f["audio_s_per_day"]))
    return ApiKey(f["id"], f["name"], float(f["created_at"]), f["revoked"] == "1", limits)


# KEYS: bucket, inflight set. ARGV: rate per minute, max in flight, audio s per day, job id ('' = a request that
# starts no job), seconds the job may stay in flight at most, the usage counters' prefix (the day is the server's:
# shared.jobs adds a job's seconds under the same day number).
# Returns {outcome, retry_after_s, remaining tokens, seconds until the bucket is full}.
_ADMIT = """
local t = redis.call('TIME') local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local rate, max_inflight, quota = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local job = ARGV[4]
if job ~= '' and quota > 0 then
  local used_ms = tonumber(redis.call('GET', ARGV[6] .. math.floor(now / 86400)) or '0')
  if used_ms >= quota * 1000 then return {'quota_exceeded', tostring(math.ceil(86400 - now % 86400)), '0', '0'} end
end
if job ~= '' and max_inflight > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= max_inflight then return {'too_many_inflight', '2', '0', '0'} end
end
local tokens, full_in = 0, 0
if rate > 0 then
  local per_s = rate / 60
  local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
  tokens = tonumber(state[1] or rate)
  local at = tonumber(state[2] or now)
  tokens = math.min(rate, tokens + math.max(0, now - at) * per_s)
  if tokens < 1 then
    local retry, full = math.ceil((1 - tokens) / per_s), math.ceil((rate - tokens) / per_s)
    return {'rate_limited', tostring(retry), '0', tostring(full)}
  end
  tokens = tokens - 1
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
  redis.call('EXPIRE', KEYS[1], 120)
  full_in = math.ceil((rate - tokens) / per_s)
end
if job ~= '' then
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), job)
  redis.call('EXPIRE', KEYS[2], math.ceil(tonumber(ARGV[5])))
end
return {'ok', '0', tostring(math.floor(tokens)), tostring(full_in)}
"""

_REFUSALS = {
    "rate_limited": (ErrorCode.RATE_LIMITED, "too many requests for this client; slow down"),
    "too_many_inflight": (ErrorCode.TOO_MANY_INFLIGHT, "too many jobs of this client are not finished yet"),
    "quota_exceeded": (ErrorCode.QUOTA_EXCEEDED, "this client's audio for today is used up"),
}


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limits: Limits
    retry_after_s: int = 0
    remaining: int = 0  # requests left in the bucket now
    reset_s: int = 0  # seconds until the bucket is full again
    code: ErrorCode | None = None
    message: str = ""


class Limiter:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._admit = client.register_script(_ADMIT)

    def admit(self, subject: str, limits: Limits, *, job_id: str = "", hold_s: float = 0) -> Decision:
        """Spend one request of ``subject``'s rate; with a ``job_id``, also check its quota and jobs in flight and
        reserve a place for the job for at most ``hold_s`` (its final transition, or ``release``, frees it)."""
        outcome, retry, remaining, reset = self._admit(
            keys=[keys.rate_bucket(subject), keys.inflight(subject)],
            args=[limits.rate_per_min, limits.max_inflight, limits.audio_s_per_day, job_id, hold_s,
                  keys.usage_prefix(subject)],
        )  # fmt: skip
        outcome = outcome.decode()
        if outcome == "ok":
            return Decision(True, limits, remaining=int(remaining), reset_s=int(reset))
        code, message = _REFUSALS[outcome]
        return Decision(False, limits, int(retry), int(remaining), int(reset), code, message)

    def release(self, subject: str, job_id: str) -> None:
        """Give back a place reserved for a job that was never created (its upload was refused)."""
        self.redis.zrem(keys.inflight(subject), job_id)
