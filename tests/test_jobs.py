"""The job state machine (shared/jobs.py) on a real Redis: conditional transitions, TTLs kept, leases."""

from __future__ import annotations

import pytest
import redis

from shared import keys
from shared.jobs import ClaimOutcome, JobStore
from shared.schema import JobError, JobStatus


@pytest.fixture()
def store(settings) -> JobStore:
    s = settings.replace(REDIS_URL=settings.REDIS_URL.rsplit("/", 1)[0] + "/2", MAX_ATTEMPTS=2)
    client = redis.Redis.from_url(s.REDIS_URL)
    client.flushdb()
    return JobStore(client, s)


def test_a_final_job_never_changes_and_keeps_its_ttl(store):
    job = store.create(b"audio")
    store.heartbeat("host:1")
    assert store.claim(job.id, "host:1").attempt == 1
    ttl = store.redis.ttl(keys.job(job.id))
    assert store.succeed(job.id, {"text": "x"}) is True
    assert store.fail(job.id, JobError("timeout", "late")) is False
    assert store.claim(job.id, "host:2").outcome is ClaimOutcome.FINAL
    final = store.get(job.id)
    assert final.status is JobStatus.SUCCEEDED and final.result == {"text": "x"} and final.error is None
    assert 0 < store.redis.ttl(keys.job(job.id)) <= ttl
    assert not store.redis.exists(keys.upload(job.id))


def test_writes_never_recreate_an_expired_record(store):
    job = store.create(b"audio")
    store.redis.delete(keys.job(job.id))
    assert store.claim(job.id, "host:1").outcome is ClaimOutcome.MISSING
    assert store.succeed(job.id, {"text": "x"}) is False
    assert not store.redis.exists(keys.job(job.id))


def test_a_live_holder_keeps_its_job_and_a_dead_one_loses_it(store):
    job = store.create(b"audio")
    store.heartbeat("host:1")
    store.claim(job.id, "host:1")
    busy = store.claim(job.id, "host:2")
    assert busy.outcome is ClaimOutcome.BUSY and busy.detail == "host:1"
    assert store.reap_check(job.id) == ("held", "host:1")
    assert store.claim(job.id, "host:2", take_over="host:1").attempt == 2  # the caller saw host:1's pid gone
    store.redis.zrem(keys.model_processes(), "host:2")  # host:2 is silent: its heartbeat is gone
    assert store.reap_check(job.id) == ("failed", "host:2")  # and its attempts are used up (MAX_ATTEMPTS=2)
    assert store.get(job.id).error["code"] == "worker_crashed"


def test_the_reaper_requeues_a_job_whose_holder_went_silent(store):
    job = store.create(b"audio")
    store.claim(job.id, "gone:7")  # never beat a heartbeat
    assert store.reap_candidates() == [job.id]
    assert store.reap_check(job.id) == ("stale", "gone:7")
    assert store.mark_requeued(job.id, "gone:7") is True
    assert store.mark_requeued(job.id, "gone:7") is False  # once
    requeued = store.get(job.id)
    assert requeued.status is JobStatus.QUEUED and requeued.owner == "" and requeued.attempts == 1
    assert store.reap_candidates() == []
    store.heartbeat("host:3")
    assert store.claim(job.id, "host:3").attempt == 2
    assert store.claim(job.id, "host:4").outcome is ClaimOutcome.BUSY  # host:3 beats and its lease runs
