"""End to end on real parts: Flask app -> Redis -> Celery worker process -> decode -> model -> Redis -> poll.
What needs no worker (validation, errors, storage, long-poll timeouts) is in tests/test_api.py."""

from __future__ import annotations

import io
import time
from collections import Counter

import numpy as np
import pytest
import redis
import soundfile as sf

from shared import keys
from shared.jobs import JobStore
from shared.queue import TRANSCRIBE_TASK
from shared.text import is_model_text
from tests.conftest import (
    DATA,
    WORKER_MAX_AUDIO_S,
    WORKER_PROCESSES,
    heartbeat_pids,
    model_ready_pids,
    parent_pid,
    post_file,
    read_transcripts,
    wait_for,
)
from web import services

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("worker")]
TRANSCRIPTS = read_transcripts()


@pytest.mark.parametrize("name", sorted(TRANSCRIPTS))
def test_every_format_transcribes(client, name):
    response = post_file(client, DATA / name)
    assert response.status_code == 202
    body = response.get_json()
    assert body["status"] == "queued" and body["url"] == f"/v1/transcriptions/{body['id']}"
    assert response.headers["Location"] == body["url"]

    done = wait_for(client, body["id"])
    assert done["status"] == "succeeded", done
    assert done["error"] is None
    result = done["result"]
    assert is_model_text(result["text"])  # Arabic letters and single spaces; accuracy: `arabic-words evaluate`
    assert 0.0 <= result["confidence"] <= 1.0
    assert set(result["timings_ms"]) == {"queue", "decode", "vad", "inference", "total"}  # VAD on, the default
    assert 0.5 < result["duration_s"] < 5
    assert [w["word"] for w in result["words"]] == result["text"].split()
    for word in result["words"]:
        assert 0 <= word["start"] < word["end"] <= result["duration_s"] + 0.05
        assert 0.0 <= word["confidence"] <= 1.0


def test_raw_body_upload_and_expected(client):
    data = (DATA / "kitab.webm").read_bytes()
    response = client.post("/v1/transcriptions?expected=كِتَاب", data=data, content_type="audio/webm")
    assert response.status_code == 202
    done = wait_for(client, response.get_json()["id"])
    assert done["status"] == "succeeded"
    result = done["result"]
    assert result["text"] == "كتاب"
    # the harakat are dropped before comparing: the same four letters
    assert result["expected"] == {"text": "كِتَاب", "normalized_match": True, "similarity": 1.0}


def test_expected_mismatch_is_reported(client):
    done = wait_for(client, post_file(client, DATA / "shukran.ogg", expected="مدرسة").get_json()["id"])
    assert done["status"] == "succeeded"
    assert done["result"]["text"] == "شكرا"
    # compared loosely, ة -> ه: "مدرسه" (5 letters) against "شكرا" (4). Only ر is shared, at the same place, so
    # the edit distance is 4 (م->ش, د->ك, س->ا, drop ه) and similarity = 1 - 4 / max(5, 4) = 0.2
    expected = done["result"]["expected"]
    assert expected == {"text": "مدرسة", "normalized_match": False, "similarity": 0.2}


def test_long_poll_returns_when_the_job_ends(client):
    job_id = post_file(client, DATA / "marhaba.mp3").get_json()["id"]
    started = time.monotonic()
    body = client.get(f"/v1/transcriptions/{job_id}?wait=25").get_json()
    elapsed = time.monotonic() - started
    assert body["status"] == "succeeded"
    assert elapsed < 10  # well before the 25 s it was allowed to wait
    started = time.monotonic()
    assert client.get(f"/v1/transcriptions/{job_id}?wait=25").get_json()["status"] == "succeeded"
    assert time.monotonic() - started < 1  # a final job answers at once


def test_garbage_fails_the_job_and_the_worker_keeps_serving(client, settings):
    # WebM's magic bytes and then noise: past the upload's format check, refused by the worker's decoder
    garbage = b"\x1a\x45\xdf\xa3" + np.random.default_rng(1).bytes(5000)
    bad = client.post("/v1/transcriptions", data=garbage, content_type="audio/webm")
    assert bad.status_code == 202
    done = wait_for(client, bad.get_json()["id"])
    assert done["status"] == "failed"
    assert done["result"] is None
    assert done["error"]["code"] == "invalid_audio"
    assert done["error"]["message"]
    good = wait_for(client, post_file(client, DATA / "madrasa.webm").get_json()["id"])
    assert good["status"] == "succeeded"
    r = redis.Redis.from_url(settings.REDIS_URL)
    assert not r.exists(keys.upload(bad.get_json()["id"]))


def test_truncated_webm_fails_with_invalid_audio(client):
    data = (DATA / "marhaba.webm").read_bytes()[:200]
    done = wait_for(client, client.post("/v1/transcriptions", data=data, content_type="audio/webm").get_json()["id"])
    assert done["status"] == "failed"
    assert done["error"]["code"] == "invalid_audio"


def test_audio_too_long_fails_the_job(client):
    buf = io.BytesIO()
    noise = (np.random.default_rng(0).standard_normal(int(16_000 * (WORKER_MAX_AUDIO_S + 5))) * 0.05).astype("float32")
    sf.write(buf, noise, 16_000, format="WAV", subtype="PCM_16")
    done = wait_for(client, client.post("/v1/transcriptions", data=buf.getvalue(), content_type="audio/wav")
                    .get_json()["id"])  # fmt: skip
    assert done["status"] == "failed"
    assert done["error"]["code"] == "audio_too_long"


def test_upload_is_deleted_once_the_job_is_final(client, settings):
    job_id = post_file(client, DATA / "shukran.flac").get_json()["id"]
    r = redis.Redis.from_url(settings.REDIS_URL)
    # that it is stored with a TTL: tests/test_api.py, where no worker can delete it before it is looked at
    assert wait_for(client, job_id)["status"] == "succeeded"
    assert not r.exists(keys.upload(job_id))
    assert 0 < r.ttl(keys.job(job_id)) <= settings.RESULT_TTL_S  # the record itself expires too


def test_expired_upload_fails_with_its_own_code(app, client, settings):
    store: JobStore = services(app).store
    job = store.create((DATA / "kitab.mp3").read_bytes())
    store.redis.delete(keys.upload(job.id))
    services(app).celery.send_task(TRANSCRIBE_TASK, args=[job.id], queue=settings.QUEUE)
    done = wait_for(client, job.id)
    assert done["status"] == "failed"
    assert done["error"]["code"] == "upload_expired"


def test_a_job_redelivered_too_often_is_failed_not_retried(app, client, settings):
    store: JobStore = services(app).store
    job = store.create((DATA / "kitab.mp3").read_bytes())
    store.redis.hset(keys.job(job.id), "attempts", settings.MAX_ATTEMPTS)  # as if it had killed its worker before
    services(app).celery.send_task(TRANSCRIBE_TASK, args=[job.id], queue=settings.QUEUE)
    done = wait_for(client, job.id)
    assert done["status"] == "failed"
    assert done["error"]["code"] == "worker_crashed"
    assert not store.redis.exists(keys.upload(job.id))


def test_model_is_loaded_once_per_worker_process(client, settings, worker, worker_log):
    ids = [post_file(client, DATA / name).get_json()["id"] for name in sorted(TRANSCRIPTS)[:8]]
    assert all(wait_for(client, i)["status"] == "succeeded" for i in ids)
    beating = heartbeat_pids(settings)  # this database's only worker is the session's
    assert len(beating) == WORKER_PROCESSES, beating
    assert worker.pid not in beating and {parent_pid(pid) for pid in beating} == {worker.pid}  # its prefork children
    loads = Counter(model_ready_pids(worker_log))  # one "model ready" line per load, since the worker started
    assert loads == Counter(dict.fromkeys(beating, 1)), loads  # one load each, and no load in any other process


def test_health_and_readiness(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.get_json()["workers"] >= 1
    assert ready.get_json()["model_processes"] >= WORKER_PROCESSES  # each prefork child's heartbeat
