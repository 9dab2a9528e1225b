"""The HTTP API without a worker: validation, errors, storage and long-poll timeouts, on a real redis-server.

Each test gets a fresh app on a Redis database of this module's own (flushed first) with a queue no worker reads, so
nothing here waits for a model and nothing queued here is ever run. The worker's side: tests/test_service.py."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from shared import keys
from shared.config import Settings
from tests.conftest import DATA, make_settings, post_file
from web import services

API_DB = 3  # the session Redis's other databases: 0 the session worker, 1 the batching worker, 2 test_jobs


@pytest.fixture()
def settings(redis_url: str, asr_cache_dir: Path) -> Settings:
    """The session's settings, but on database ``API_DB`` and a queue no worker consumes."""
    return make_settings(redis_url.rsplit("/", 1)[0] + f"/{API_DB}", asr_cache_dir, QUEUE="test-api-no-worker")


@pytest.fixture()
def app(settings: Settings):
    from web import create_app

    client = redis.Redis.from_url(settings.REDIS_URL)
    client.flushdb()
    client.close()
    app = create_app(settings)
    yield app
    services(app).waiter.close()  # a long-poll's pub/sub listener, when a test started one
    services(app).store.redis.close()


@pytest.fixture()
def client(app):
    return app.test_client()


def test_an_accepted_upload_is_stored_with_a_ttl_and_queued(client, settings):
    response = post_file(client, DATA / "shukran.flac")
    assert response.status_code == 202
    job_id = response.get_json()["id"]
    r = redis.Redis.from_url(settings.REDIS_URL)
    assert r.get(keys.upload(job_id)) == (DATA / "shukran.flac").read_bytes()
    assert 0 < r.ttl(keys.upload(job_id)) <= settings.UPLOAD_TTL_S  # no worker here: nothing can have deleted it
    assert 0 < r.ttl(keys.job(job_id)) <= settings.RESULT_TTL_S
    assert r.llen(settings.QUEUE) == 1  # its task, waiting in Celery's list for the queue
    assert client.get(f"/v1/transcriptions/{job_id}").get_json()["status"] == "queued"


def test_long_poll_times_out_on_a_job_nobody_runs(app, client):
    job = services(app).store.create(b"never sent to a worker")
    started = time.monotonic()
    body = client.get(f"/v1/transcriptions/{job.id}?wait=1.5").get_json()
    assert body["status"] == "queued"
    assert 1.4 <= time.monotonic() - started < 5


@pytest.mark.parametrize("wait", ["abc", "-1", "31", "nan"])
def test_bad_wait_is_400(client, wait):
    job_id = "0" * 32
    response = client.get(f"/v1/transcriptions/{job_id}?wait={wait}")
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "invalid_wait"


@pytest.mark.parametrize("job_id", ["0123456789abcdef0123456789abcdef", "not-a-job", "x" * 300])
def test_unknown_id_is_404(client, job_id):
    response = client.get(f"/v1/transcriptions/{job_id}")
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "not_found"


def test_empty_upload_is_400(client):
    response = client.post("/v1/transcriptions", data={"file": (io.BytesIO(b""), "empty.webm")},
                           content_type="multipart/form-data")  # fmt: skip
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "empty_upload"
    response = client.post("/v1/transcriptions", data=b"", content_type="audio/webm")
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "empty_upload"


def test_missing_file_field_is_400(client):
    response = client.post("/v1/transcriptions", data={"other": "x"}, content_type="multipart/form-data")
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "no_file"
    response = client.post("/v1/transcriptions")
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "no_file"


def test_wrong_content_type_is_415(client):
    response = client.post("/v1/transcriptions", data=json.dumps({"file": "x"}), content_type="application/json")
    assert response.status_code == 415
    assert response.get_json()["error"]["code"] == "unsupported_media_type"


def test_upload_that_is_not_an_audio_container_is_415_and_stores_nothing(client, settings):
    r = redis.Redis.from_url(settings.REDIS_URL)

    def job_keys() -> set[bytes]:
        return set(r.scan_iter(keys.job("*"))) | set(r.scan_iter(keys.upload("*")))

    keys_before = job_keys()
    text = (DATA.parent.parent / "README.md").read_bytes()[:4000]
    for response in (
        client.post("/v1/transcriptions", data={"file": (io.BytesIO(text), "notes.webm")},
                    content_type="multipart/form-data"),
        client.post("/v1/transcriptions", data=b"PK\x03\x04" + np.random.default_rng(1).bytes(5000),
                    content_type="audio/webm"),  # a zip file
        client.post("/v1/transcriptions", data=b"<html><body>hi</body></html>", content_type="audio/wav"),
    ):  # fmt: skip
        assert response.status_code == 415
        error = response.get_json()["error"]
        assert error["code"] == "invalid_audio" and "WebM" in error["message"]
    assert not job_keys() - keys_before  # no upload stored, no job record (so nothing was queued)


def test_expected_too_long_is_400(client):
    response = post_file(client, DATA / "kitab.flac", expected="ب" * 501)
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "invalid_expected"


@pytest.mark.parametrize("multipart", [True, False])
def test_oversize_upload_is_413(app, client, multipart):
    limit = services(app).settings.MAX_UPLOAD_BYTES
    blob = b"\0" * (limit + 1)
    if multipart:
        response = client.post("/v1/transcriptions", data={"file": (io.BytesIO(blob), "big.wav")},
                               content_type="multipart/form-data")  # fmt: skip
    else:
        response = client.post("/v1/transcriptions", data=blob, content_type="audio/wav")
    assert response.status_code == 413
    assert response.get_json()["error"]["code"] == "upload_too_large"
    huge = b"\0" * (limit + 100 * 1024)  # beyond MAX_CONTENT_LENGTH: refused before the body is read
    response = client.post("/v1/transcriptions", data=huge, content_type="audio/wav")
    assert response.status_code == 413
    assert response.get_json()["error"]["code"] == "upload_too_large"


def test_unknown_route_and_method_are_json(client):
    response = client.get("/v1/nothing")
    assert response.status_code == 404 and response.get_json()["error"]["code"] == "not_found"
    response = client.delete("/v1/transcriptions")
    assert response.status_code == 405 and response.get_json()["error"]["code"] == "method_not_allowed"


def test_index_page(client):
    response = client.get("/")
    assert response.status_code == 200
    assert b'<script src="/static/app.js"' in response.data
    assert b"MediaRecorder" in client.get("/static/app.js").data
