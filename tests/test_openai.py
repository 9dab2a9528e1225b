"""The OpenAI-compatible route, POST /v1/audio/transcriptions, driven by the official `openai` client against a real
HTTP server (werkzeug, a thread) serving create_app(settings).

The transcriptions run on the session's real Celery worker (tests/conftest.py); what needs no worker (the 202 path,
validation, auth and limits, the shapes of failures) runs on a Redis database of this module's own with a queue no
worker reads."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import redis
import requests

from shared.access import KeyStore, Limits
from shared.config import Settings
from shared.jobs import JobStore
from shared.schema import JobStatus
from tests.conftest import DATA, make_settings, serve_http
from web import create_app, services
from web.openai import Options, _answer, segment, srt, vtt

OPENAI_DB = 7  # the session Redis's database for the tests without a worker (see tests/test_api.py for the others)
KITAB = DATA / "kitab.webm"


@contextlib.contextmanager
def serve(app) -> Iterator[str]:
    """``app`` on a real HTTP server (tests/conftest.py serve_http); its Redis connections closed afterwards."""
    try:
        with serve_http(app) as url:
            yield url
    finally:
        services(app).waiter.close()
        services(app).store.redis.close()


def client_for(base_url: str, api_key: str = "x") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=60)


def transcribe(client: openai.OpenAI, path: Path = KITAB, **params):
    with open(path, "rb") as f:
        return client.audio.transcriptions.create(model="whisper-1", file=f, **params)


# --------------------------------------------------------------------------------------- with the worker
@pytest.fixture(scope="module")
def live(settings: Settings, worker) -> Iterator[str]:
    """The service on the session's queue, which the session worker consumes."""
    with serve(create_app(settings)) as base_url:
        yield base_url


@pytest.mark.integration
def test_every_response_format_with_the_openai_client(live):
    client = client_for(live)
    assert transcribe(client).text == "كتاب"  # json, the default
    assert transcribe(client, response_format="json").text == "كتاب"
    assert transcribe(client, response_format="text").strip() == "كتاب"

    verbose = transcribe(client, response_format="verbose_json")
    assert verbose.text == "كتاب" and verbose.language == "arabic" and verbose.task == "transcribe"
    assert 1.0 < verbose.duration < 2.0
    assert verbose.words is None  # segment timestamps only, unless words are asked for
    [seg] = verbose.segments
    assert seg.id == 0 and seg.start == 0.0 and seg.end == verbose.duration and seg.text == "كتاب"
    assert seg.temperature == 0.0 and seg.tokens == [] and seg.no_speech_prob == 0.0
    assert -5 < seg.avg_logprob <= 0 and seg.compression_ratio > 0

    subtitles = transcribe(client, response_format="srt")
    assert re.fullmatch(r"1\n00:00:00,000 --> 00:00:01,\d{3}\nكتاب\n\n", subtitles), subtitles
    captions = transcribe(client, response_format="vtt")
    assert re.fullmatch(r"WEBVTT\n\n00:00:00\.000 --> 00:00:01\.\d{3}\nكتاب\n\n", captions), captions


@pytest.mark.integration
def test_word_timestamps_expected_and_the_ignored_fields(live):
    client = client_for(live)
    verbose = transcribe(
        client, response_format="verbose_json", timestamp_granularities=["word"], language="ar",
        prompt="ignored", temperature=0.4, extra_body={"expected": "كِتَاب"},
    )  # fmt: skip
    assert verbose.segments is None
    [word] = verbose.words
    assert word.word == "كتاب" and 0 <= word.start < word.end <= verbose.duration
    assert verbose.expected == {"text": "كِتَاب", "normalized_match": True, "similarity": 1.0}
    assert transcribe(client, extra_body={"expected": "كِتَاب"}).expected["normalized_match"] is True

    both = transcribe(client, response_format="verbose_json", timestamp_granularities=["word", "segment"])
    assert len(both.words) == 1 and len(both.segments) == 1
    cues = transcribe(client, response_format="srt", timestamp_granularities=["word"])
    assert re.fullmatch(r"1\n00:00:00,\d{3} --> 00:00:01,\d{3}\nكتاب\n\n", cues), cues


@pytest.mark.integration
def test_a_job_that_fails_answers_an_openai_error(live):
    corrupt = b"RIFF\x24\x08\x00\x00WAVEfmt " + bytes(range(256)) * 8  # a WAV header, then nothing decodable
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(live).audio.transcriptions.create(model="whisper-1", file=("bad.wav", corrupt, "audio/wav"))
    error = caught.value
    assert error.status_code == 400
    assert error.code == "invalid_audio" and error.type == "invalid_request_error" and error.param == "file"
    assert set(error.response.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.integration
def test_the_answer_names_the_job_record(live):
    with open(KITAB, "rb") as f:
        response = requests.post(f"{live}/v1/audio/transcriptions", files={"file": f}, timeout=60)
    assert response.status_code == 200 and response.json() == {"text": "كتاب"}
    job = requests.get(live + response.headers["Content-Location"], timeout=10).json()
    assert job["status"] == "succeeded" and job["result"]["text"] == "كتاب"
    assert job["result"]["words"][0]["confidence"] > 0


# ---------------------------------------------------------------------------------------- without a worker
@pytest.fixture()
def db(redis_url: str) -> str:
    url = redis_url.rsplit("/", 1)[0] + f"/{OPENAI_DB}"
    redis.Redis.from_url(url).flushdb()
    return url


def no_worker_settings(db: str, asr_cache_dir: Path, **overrides) -> Settings:
    return make_settings(db, asr_cache_dir, QUEUE="test-openai-no-worker", **overrides)


def test_past_the_wait_limit_it_answers_202_and_the_job_goes_on(db, asr_cache_dir):
    settings = no_worker_settings(db, asr_cache_dir, MAX_WAIT_S=0.01)
    with serve(create_app(settings)) as base_url:
        with open(KITAB, "rb") as f:
            response = requests.post(f"{base_url}/v1/audio/transcriptions", files={"file": f},
                                     data={"model": "whisper-1"}, timeout=30)  # fmt: skip
        assert response.status_code == 202, response.text
        body = response.json()
        assert body["status"] == "queued" and response.headers["Location"] == body["url"]
        assert body["url"] == f"/v1/transcriptions/{body['id']}"
        job = requests.get(base_url + body["url"], timeout=10)
        assert job.status_code == 200 and job.json()["status"] == "queued"
        assert redis.Redis.from_url(db).llen(settings.QUEUE) == 1  # queued once, like any upload

        # the OpenAI client takes the 202 for a success it cannot parse: the raw response has the job
        raw = client_for(base_url).audio.transcriptions.with_raw_response.create(
            model="whisper-1", file=KITAB.open("rb")
        )
        assert raw.status_code == 202 and raw.headers["location"].startswith("/v1/transcriptions/")


@pytest.mark.parametrize(
    ("params", "code", "param"),
    [
        ({"language": "en"}, "unsupported_language", "language"),
        ({"response_format": "xml"}, "invalid_response_format", "response_format"),
        ({"timestamp_granularities": ["char"]}, "invalid_timestamp_granularities", "timestamp_granularities[]"),
        ({"extra_body": {"expected": "ب" * 501}}, "invalid_expected", "expected"),
    ],
)
def test_bad_fields_are_refused_before_anything_is_queued(db, asr_cache_dir, params, code, param):
    settings = no_worker_settings(db, asr_cache_dir)
    with serve(create_app(settings)) as base_url, pytest.raises(openai.BadRequestError) as caught:
        transcribe(client_for(base_url), **params)
    assert caught.value.code == code and caught.value.param == param
    assert caught.value.type == "invalid_request_error"
    assert redis.Redis.from_url(db).llen(settings.QUEUE) == 0


def test_upload_errors_have_the_openai_shape(db, asr_cache_dir):
    app = create_app(no_worker_settings(db, asr_cache_dir, MAX_WAIT_S=0.01))
    client = app.test_client()
    control = client.post("/v1/audio/transcriptions", data={"file": (KITAB.open("rb"), "x.webm"), "model": "m"},
                            content_type="multipart/form-data")  # fmt: skip
    assert control.status_code == 202  # control: a real recording is accepted (no worker: it stays queued)
    for response, status, code in (
        (client.post("/v1/audio/transcriptions", data={"model": "whisper-1"}, content_type="multipart/form-data"),
         400, "no_file"),
        (client.post("/v1/audio/transcriptions", data={"file": ((DATA.parent / "conftest.py").open("rb"), "a.webm")},
                     content_type="multipart/form-data"), 415, "invalid_audio"),
        (client.post("/v1/audio/transcriptions", data=b"{}", content_type="application/json"), 415,
         "unsupported_media_type"),
        (client.post("/v1/audio/transcriptions", data=b"\0" * 3_000_000, content_type="audio/wav"), 413,
         "upload_too_large"),
    ):  # fmt: skip
        assert response.status_code == status, response.get_data(as_text=True)
        error = response.get_json()["error"]
        assert error["code"] == code and error["type"] == "invalid_request_error" and error["param"] == "file"
        assert set(error) == {"message", "type", "param", "code"}
    services(app).store.redis.close()


def test_keys_and_limits_apply_as_on_the_rest_of_the_api(db, asr_cache_dir):
    settings = no_worker_settings(db, asr_cache_dir, AUTH_MODE="required", MAX_WAIT_S=0.01)
    app = create_app(settings)
    key = KeyStore(services(app).store.redis).create("openai", Limits(rate_per_min=10, max_inflight=1))[1]
    with serve(app) as base_url:
        with pytest.raises(openai.AuthenticationError) as caught:
            transcribe(client_for(base_url, api_key="x"))
        assert caught.value.code == "unauthorized" and caught.value.type == "authentication_error"

        first = client_for(base_url, key).audio.transcriptions.with_raw_response.create(
            model="whisper-1", file=KITAB.open("rb")
        )
        assert first.status_code == 202  # no worker: still queued, so it holds the key's one place in flight
        assert first.headers["RateLimit-Remaining"] == "9"
        with pytest.raises(openai.RateLimitError) as caught:
            transcribe(client_for(base_url, key))
        assert caught.value.code == "too_many_inflight" and caught.value.type == "rate_limit_error"
        assert caught.value.response.headers["Retry-After"]
        job_id = first.headers["location"].rsplit("/", 1)[1]
        assert requests.get(f"{base_url}/v1/transcriptions/{job_id}", timeout=10).status_code == 401
        mine = requests.get(f"{base_url}/v1/transcriptions/{job_id}", headers={"Authorization": f"Bearer {key}"},
                            timeout=10)  # fmt: skip
        assert mine.status_code == 200 and mine.json()["status"] == "queued"


@pytest.mark.parametrize(
    ("code", "status"),
    [("invalid_audio", 400), ("audio_too_long", 400), ("timeout", 504), ("worker_crashed", 500),
     ("internal_error", 500), ("upload_expired", 503), ("something_new", 500)],
)  # fmt: skip
def test_a_failed_job_answers_the_status_of_its_failure(db, asr_cache_dir, code, status):
    app = create_app(no_worker_settings(db, asr_cache_dir))
    store: JobStore = services(app).store
    job = store.create(b"never run")
    assert store.claim(job.id, "test-host:1").outcome.value == "claimed"
    assert store.fail(job.id, {"code": code, "message": "what went wrong"})
    failed = store.get(job.id)
    assert failed.status is JobStatus.FAILED
    with app.test_request_context():
        body, answered, headers = _answer(failed, Options("json", frozenset({"segment"})))
    assert answered == status
    assert body.get_json() == {"error": {"message": "what went wrong", "type": "server_error" if status >= 500
                                         else "invalid_request_error", "param": "file" if status == 400 else None,
                                         "code": code}}  # fmt: skip
    assert ("Retry-After" in headers) == (status == 503)
    store.redis.close()


def test_segment_and_subtitle_formats():
    result = {"text": "صباح الخير", "confidence": 0.5, "duration_s": 1.6,
              "words": [{"word": "صباح", "start": 0.22, "end": 0.64, "confidence": 0.5},
                        {"word": "الخير", "start": 0.7, "end": 1.5, "confidence": 1.0}]}  # fmt: skip
    seg = segment(result, 1.6)
    assert seg.end == 1.6 and seg.no_speech_prob == 0.0
    assert seg.avg_logprob == pytest.approx((-0.693147 + 0.0) / 2, abs=1e-5)
    empty = segment({"text": "", "confidence": 0.9, "words": []}, 0.5)
    assert empty.no_speech_prob == 0.9 and empty.avg_logprob == pytest.approx(-0.105361, abs=1e-5)
    assert empty.compression_ratio == 0.0
    cues = [(0.22, 0.64, "صباح"), (0.7, 3725.5, "الخير")]
    assert srt(cues) == "1\n00:00:00,220 --> 00:00:00,640\nصباح\n\n2\n00:00:00,700 --> 01:02:05,500\nالخير\n\n"
    assert vtt(cues) == "WEBVTT\n\n00:00:00.220 --> 00:00:00.640\nصباح\n\n00:00:00.700 --> 01:02:05.500\nالخير\n\n"
    assert srt([]) == "" and vtt([]) == "WEBVTT\n\n"
