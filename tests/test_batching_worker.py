"""A real worker with dynamic batching (threads pool, BATCH_MAX_SIZE > 1): concurrent jobs share forward passes
and each gets the same transcript the unbatched model gives."""

from __future__ import annotations

import dataclasses

import pytest

from shared.config import Settings
from tests.conftest import DATA, start_worker, stop_worker, wait_for
from worker.asr import load_model
from worker.model import build_decoder
from worker.pipeline import transcribe_bytes

pytestmark = pytest.mark.integration

CLIPS = ["marhaba.webm", "shukran.webm", "sabah_alkhayr.webm", "marhaba.ogg", "shukran.mp3", "kitab.wav"]


@pytest.fixture(scope="module")
def batching_settings(settings: Settings) -> Settings:
    return settings.replace(
        REDIS_URL=settings.REDIS_URL.rsplit("/", 1)[0] + "/1",  # its own keys (model loads, jobs)
        QUEUE="test-batching",
        BATCH_MAX_SIZE=4,
        BATCH_WINDOW_MS=200,  # wide, so that jobs posted one after another still meet
    )


@pytest.fixture(scope="module")
def batching_client(batching_settings, tmp_path_factory):
    from web import create_app

    proc = start_worker(batching_settings, tmp_path_factory.mktemp("batching-worker") / "worker.log", 1)
    yield create_app(batching_settings).test_client()
    stop_worker(proc)


def test_concurrent_jobs_are_batched_and_keep_their_transcripts(batching_client, batching_settings):
    uploads = [(DATA / name).read_bytes() for name in CLIPS * 2]
    ids = [
        batching_client.post("/v1/transcriptions", data=data, content_type="audio/webm").get_json()["id"]
        for data in uploads
    ]
    bodies = [wait_for(batching_client, i) for i in ids]
    assert [b["status"] for b in bodies] == ["succeeded"] * len(ids), bodies
    results = [b["result"] for b in bodies]
    assert max(r["batch_size"] for r in results) > 1
    assert all(1 <= r["batch_size"] <= 4 and "batch_wait" in r["timings_ms"] for r in results)

    backend = results[0]["backend"]
    single = load_model(
        batching_settings.ASR_MODEL, backend=backend, cache_dir=batching_settings.ASR_CACHE_DIR, threads=1
    )
    single = dataclasses.replace(single, decoder=build_decoder(single, batching_settings))  # beam and word list
    for data, result in zip(uploads, results, strict=True):
        assert result["backend"] == backend
        assert result["text"] == transcribe_bytes(single, data, max_audio_s=20).text


def test_a_bad_upload_in_a_batching_worker_fails_alone(batching_client):
    bad = batching_client.post("/v1/transcriptions", data=b"\x1aE\xdf\xa3junk", content_type="audio/webm")
    good = batching_client.post("/v1/transcriptions", data=(DATA / "marhaba.webm").read_bytes(),
                                content_type="audio/webm")  # fmt: skip
    assert wait_for(batching_client, bad.get_json()["id"])["status"] == "failed"
    assert wait_for(batching_client, good.get_json()["id"])["status"] == "succeeded"
