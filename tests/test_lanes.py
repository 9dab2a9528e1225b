"""Priority lanes, the result cache and per-request vocabularies, through the real web app, Redis and (where marked)
real Celery workers."""

from __future__ import annotations

import time

import pytest
import redis

from shared.cache import ResultCache, content_digest
from shared.vocabularies import VocabularyStore
from tests.conftest import DATA, make_settings, post_file, start_worker, stop_worker, wait_for
from web import create_app, services

KITAB = DATA / "kitab.webm"


@pytest.fixture()
def fresh(redis_url, asr_cache_dir):
    """Settings on a Redis database of these tests' own, emptied first, with queues no session worker reads."""
    url = redis_url.rsplit("/", 1)[0] + "/9"
    redis.Redis.from_url(url).flushdb()
    return make_settings(url, asr_cache_dir, QUEUE="lanes-test")


def test_priority_picks_the_lane(fresh):
    client = create_app(fresh).test_client()
    r = redis.Redis.from_url(fresh.REDIS_URL)
    assert post_file(client, KITAB).status_code == 202
    assert post_file(client, KITAB, priority="batch").status_code == 202
    assert client.post("/v1/transcriptions?priority=batch", data=KITAB.read_bytes(),
                       content_type="audio/webm").status_code == 202  # fmt: skip
    assert (r.llen(fresh.QUEUE), r.llen(fresh.batch_queue)) == (1, 2)
    jobs_before = len(list(r.scan_iter("aw:job:*")))
    refused = post_file(client, KITAB, priority="urgent")
    assert refused.status_code == 400 and refused.get_json()["error"]["code"] == "invalid_priority"
    assert len(list(r.scan_iter("aw:job:*"))) == jobs_before  # nothing stored for a refused upload


def test_vocabulary_words_or_a_registered_list(fresh):
    app = create_app(fresh)
    client = app.test_client()
    store = services(app).store
    VocabularyStore(store.redis).add("lesson-3", "كِتَاب\nمدرسة، قلم")
    cases = {
        "كتاب, مدرسة": ["كتاب", "مدرسة"],
        '["مَدْرَسَة", "قلم", "قلم"]': ["مدرسة", "قلم"],
        "lesson-3": ["كتاب", "مدرسة", "قلم"],
    }
    for value, words in cases.items():
        job_id = post_file(client, KITAB, vocabulary=value).get_json()["id"]
        assert store.get(job_id).vocabulary == words
    for bad in ("no-such-list", "hello world", "[1, 2]", "[", "،،،", "ب" * 41):
        response = post_file(client, KITAB, vocabulary=bad)
        assert response.status_code == 400 and response.get_json()["error"]["code"] == "invalid_vocabulary", bad


def test_a_cached_result_answers_at_once_and_recomputes_expected(fresh):
    fresh = fresh.replace(CACHE="on")
    app = create_app(fresh)
    client = app.test_client()
    data = KITAB.read_bytes()
    # what a worker stores after transcribing these bytes (tests below do it with a real worker)
    ResultCache(services(app).store.redis, fresh).put(
        content_digest(data), [], {"text": "كتاب", "confidence": 0.9, "words": [], "duration_s": 1.35,
                                   "model": "m", "backend": "onnx-fp32", "timings_ms": {"total": 50.0},
                                   "expected": {"text": "x", "normalized_match": False, "similarity": 0.0}},
    )  # fmt: skip
    response = client.post("/v1/transcriptions?expected=كِتَاب", data=data, content_type="audio/webm")
    assert response.status_code == 202 and response.get_json()["status"] == "succeeded"
    result = client.get(response.headers["Location"]).get_json()["result"]
    assert result["cached"] is True and result["text"] == "كتاب"
    assert result["expected"] == {"text": "كِتَاب", "normalized_match": True, "similarity": 1.0}
    assert set(result["timings_ms"]) == {"total"}
    assert redis.Redis.from_url(fresh.REDIS_URL).llen(fresh.QUEUE) == 0  # no task for a worker
    other_vocabulary = post_file(client, KITAB, vocabulary="كتاب")
    assert other_vocabulary.get_json()["status"] == "queued"  # a different decoding is a different entry
    off = create_app(fresh.replace(CACHE="off")).test_client()
    assert off.post("/v1/transcriptions", data=data, content_type="audio/webm").get_json()["status"] == "queued"


@pytest.fixture(scope="module")
def lanes_worker(redis_url, asr_cache_dir, tmp_path_factory):
    """One worker process with the result cache on, each forward pass slowed to 0.4 s (so queue order shows)."""
    url = redis_url.rsplit("/", 1)[0] + "/10"
    redis.Redis.from_url(url).flushdb()
    settings = make_settings(
        url, asr_cache_dir, QUEUE="lanes-order", WORKER_CONCURRENCY=1, FAULT_SLOW_FORWARD_S=0.4, CACHE="on"
    )
    worker = start_worker(settings, tmp_path_factory.mktemp("lanes") / "worker.log", expected_loads=1)
    yield settings
    stop_worker(worker)


@pytest.mark.integration
def test_workers_take_the_interactive_lane_first(lanes_worker):
    """8 batch jobs queued, then 1 interactive: it ends before every batch job but those already taken (the running
    one and the one its process prefetched)."""
    app = create_app(lanes_worker)
    client = app.test_client()
    batch = [post_file(client, DATA / "kitab.webm", priority="batch").get_json()["id"] for _ in range(8)]
    time.sleep(0.6)  # the worker is busy with the first
    interactive = post_file(client, DATA / "shukran.webm").get_json()["id"]
    done = {job_id: wait_for(client, job_id, timeout_s=60) for job_id in [*batch, interactive]}
    assert all(job["status"] == "succeeded" for job in done.values()), done
    store = services(app).store
    finished = {job_id: float(store.redis.hget(f"aw:job:{job_id}", "finished_at")) for job_id in done}
    before = sum(finished[job_id] < finished[interactive] for job_id in batch)
    assert before <= 2, f"{before} batch jobs finished before the interactive one"


@pytest.mark.integration
def test_an_identical_upload_is_answered_from_the_workers_result(lanes_worker):
    client = create_app(lanes_worker).test_client()
    data = (DATA / "madrasa.wav").read_bytes()
    first = wait_for(client, client.post("/v1/transcriptions", data=data, content_type="audio/wav").get_json()["id"])
    assert first["status"] == "succeeded" and first["result"]["cached"] is False
    started = time.perf_counter()
    again = client.post("/v1/transcriptions?expected=مدرسة", data=data, content_type="audio/wav")
    assert again.get_json()["status"] == "succeeded"
    assert time.perf_counter() - started < 0.4  # faster than the worker's forward pass alone (bench.lanes: the figure)
    cached = client.get(again.headers["Location"]).get_json()["result"]
    assert cached["cached"] is True
    for name in ("text", "confidence", "words", "duration_s", "model", "backend"):
        assert cached[name] == first["result"][name]
    assert cached["expected"]["normalized_match"] == (first["result"]["text"] == "مدرسة")
