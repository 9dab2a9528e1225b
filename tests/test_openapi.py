"""The OpenAPI document (/openapi.json) against the service it describes: the document is valid OpenAPI 3.1, every
route is in it, real responses of every documented route conform to it (status, content type, headers, body), and a
bounded property-based fuzz (schemathesis) of the live app finds no 500 and no response that breaks the document.

The app runs on a real HTTP server (a thread) on a Redis database of this module's own, with auth off and a queue
no worker reads: uploads stay queued, and a test that needs a final job finishes it through the job store the way a
worker does. The one test with the session's real worker (marked integration) checks real results."""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate as validate_spec
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from shared import keys
from shared.access import KeyStore, Limits
from shared.config import Settings
from shared.jobs import ClaimOutcome, JobStore
from shared.redis_server import free_port
from shared.schema import JobStatus, TranscriptionResult, WordTiming
from tests.conftest import DATA, make_settings
from tests.test_openai import serve
from web import create_app, services
from web.openapi import UNDOCUMENTED, build_document, described

DOCS_DB = 8  # the session Redis's database for this module (tests/test_api.py lists the others)


@schemathesis.check
def no_internal_error(ctx, response, case) -> None:
    """No 500: an unhandled exception of ours (documented 5xx, like /readyz's 503, are status_code_conformance's)."""
    assert response.status_code != 500, f"500 from {case.operation.label}: {response.text[:500]}"


CHECKS = [
    no_internal_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
KITAB = DATA / "kitab.webm"
CORRUPT_WAV = b"RIFF\x24\x08\x00\x00WAVEfmt " + bytes(range(256)) * 8  # passes the upload's sniffing, fails decoding


@pytest.fixture(scope="module")
def db(redis_url: str) -> str:
    url = redis_url.rsplit("/", 1)[0] + f"/{DOCS_DB}"
    redis.Redis.from_url(url).flushdb()
    return url


def docs_settings(db: str, asr_cache_dir: Path, **overrides) -> Settings:
    values = {"QUEUE": "test-openapi-no-worker", "AUTH_MODE": "off", "MAX_WAIT_S": FUZZ_MAX_WAIT_S} | overrides
    return make_settings(db, asr_cache_dir, **values)


@pytest.fixture(scope="module")
def live(db: str, asr_cache_dir: Path) -> Iterator[str]:
    with serve(create_app(docs_settings(db, asr_cache_dir))) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def api_schema(live: str):
    """The document as the live server serves it, with the server as base URL."""
    return schemathesis.openapi.from_url(f"{live}/openapi.json")


def conforms(schema, method: str, path: str, response) -> None:
    """``response`` (requests' or the Flask test client's) is one the document allows for ``method path``: a documented
    status, a documented content type, the required headers, a body matching its schema. (No check for 500 here: the
    OpenAI route documents it for a job that failed as worker_crashed; the tests assert each status themselves.)"""
    schema[path][method.upper()].Case().validate_response(response, checks=CHECKS[1:])


# ------------------------------------------------------------------------------------------------ document
def test_the_document_is_valid_openapi_3_1(live):
    document = requests.get(f"{live}/openapi.json", timeout=10).json()
    assert document["openapi"] == "3.1.0"
    validate_spec(document)  # raises on any violation of the OpenAPI 3.1 schema
    assert document["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": "an API key (`arabic-words keys create`)",
    }  # fmt: skip
    wait = next(p for p in document["paths"]["/v1/transcriptions/{job_id}"]["get"]["parameters"] if p["name"] == "wait")
    assert wait["schema"]["maximum"] == 0.2  # the served app's MAX_WAIT_S: the document describes its own server


def test_every_route_is_documented(db, asr_cache_dir):
    app = create_app(docs_settings(db, asr_cache_dir))
    document = app.test_client().get("/openapi.json").get_json()
    for rule in app.url_map.iter_rules():
        if rule.endpoint in UNDOCUMENTED:
            continue
        assert described(app, rule.endpoint) is not None, f"{rule.rule} ({rule.endpoint}) has no @operation"
        path = rule.rule.replace("<", "{").replace(">", "}")
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert method.lower() in document["paths"][path], (path, method)
    for path, item in document["paths"].items():
        for method, spec in item.items():
            if path.startswith("/v1/"):
                assert spec["security"] == [{"bearerAuth": []}], (method, path)
                for status in ("401", "403", "429"):
                    assert status in spec["responses"], (method, path, status)
            for status, reply in spec["responses"].items():
                if status in ("429", "503") and path.startswith("/v1/"):
                    assert "Retry-After" in reply["headers"], (method, path, status)
    services(app).store.redis.close()


def test_the_docs_page_is_served_from_local_files_under_the_strict_csp(live):
    page = requests.get(f"{live}/docs", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self';" in csp and "style-src 'self';" in csp and "unsafe" not in csp
    assert "<script>" not in page.text and "style=" not in page.text and "http" not in page.text  # no inline, no CDN
    for asset in ("/static/docs/swagger-ui-bundle.js", "/static/docs/swagger-ui.css", "/static/docs/docs.js"):
        assert asset in page.text
        assert requests.get(live + asset, timeout=10).status_code == 200, asset
    assert "/openapi.json" in requests.get(f"{live}/static/docs/docs.js", timeout=10).text


# ------------------------------------------------------------------------------- real responses, no worker
def _post_file(base: str, path: str, data: bytes, name: str = "a.webm", **fields) -> requests.Response:
    return requests.post(base + path, files={"file": (name, data)}, data=fields, timeout=30)


def test_real_responses_of_every_documented_route_conform(live, api_schema, db, asr_cache_dir):
    webm = KITAB.read_bytes()
    created = requests.post(f"{live}/v1/transcriptions", data=webm, headers={"Content-Type": "audio/webm"}, timeout=30)
    job_url = created.headers["Location"]
    openai_202 = _post_file(live, "/v1/audio/transcriptions", webm, model="whisper-1")
    assert openai_202.status_code == 202
    seen = [
        ("GET", "/", requests.get(f"{live}/", timeout=10), 200),
        ("GET", "/docs", requests.get(f"{live}/docs", timeout=10), 200),
        ("GET", "/openapi.json", requests.get(f"{live}/openapi.json", timeout=10), 200),
        ("GET", "/healthz", requests.get(f"{live}/healthz", timeout=10), 200),
        ("GET", "/readyz", requests.get(f"{live}/readyz", timeout=10), 503),  # no worker on this database
        ("POST", "/v1/transcriptions", created, 202),
        ("POST", "/v1/transcriptions", _post_file(live, "/v1/transcriptions", webm, expected="كتاب"), 202),
        ("POST", "/v1/transcriptions", requests.post(f"{live}/v1/transcriptions", timeout=10), 400),
        ("POST", "/v1/transcriptions", _post_file(live, "/v1/transcriptions", b""), 400),
        ("POST", "/v1/transcriptions", _post_file(live, "/v1/transcriptions", webm, expected="ب" * 501), 400),
        ("POST", "/v1/transcriptions", _post_file(live, "/v1/transcriptions", b"\0" * 2_100_000), 413),
        ("POST", "/v1/transcriptions", _post_file(live, "/v1/transcriptions", b"<html></html>"), 415),
        ("POST", "/v1/transcriptions", requests.post(f"{live}/v1/transcriptions", json={}, timeout=10), 415),
        ("GET", "/v1/transcriptions/{job_id}", requests.get(live + job_url, timeout=10), 200),
        ("GET", "/v1/transcriptions/{job_id}", requests.get(live + job_url + "?wait=0.05", timeout=10), 200),
        ("GET", "/v1/transcriptions/{job_id}", requests.get(live + job_url + "?wait=31", timeout=10), 400),
        ("GET", "/v1/transcriptions/{job_id}", requests.get(f"{live}/v1/transcriptions/{'0' * 32}", timeout=10), 404),
        ("POST", "/v1/audio/transcriptions", openai_202, 202),
        ("POST", "/v1/audio/transcriptions", _post_file(live, "/v1/audio/transcriptions", webm, language="en"), 400),
        ("POST", "/v1/audio/transcriptions", _post_file(live, "/v1/audio/transcriptions", b"\0" * 2_100_000), 413),
        ("POST", "/v1/audio/transcriptions", _post_file(live, "/v1/audio/transcriptions", b"not audio"), 415),
    ]
    for method, path, response, status in seen:
        assert response.status_code == status, (method, path, response.status_code, response.text[:300])
        conforms(api_schema, method, path, response)


def test_auth_limit_and_outage_responses_conform(api_schema, db, asr_cache_dir):
    """401, 403 and 429 on every /v1 route, and 503 with Redis gone (the Flask test client: no server needed)."""
    app = create_app(docs_settings(db, asr_cache_dir, AUTH_MODE="required"))
    client = app.test_client()
    store = KeyStore(services(app).store.redis)
    revoked = store.create("revoked", Limits())[1]
    store.revoke("revoked")
    slow_key, slow = store.create("slow", Limits(rate_per_min=1))
    routes = [
        ("POST", "/v1/transcriptions", lambda **kw: client.post("/v1/transcriptions", data=KITAB.read_bytes(),
                                                                 content_type="audio/webm", **kw)),
        ("GET", "/v1/transcriptions/{job_id}", lambda **kw: client.get(f"/v1/transcriptions/{'0' * 32}", **kw)),
        ("POST", "/v1/audio/transcriptions", lambda **kw: client.post(
            "/v1/audio/transcriptions", data={"file": (io.BytesIO(KITAB.read_bytes()), "a.webm")},
            content_type="multipart/form-data", **kw)),
    ]  # fmt: skip
    for method, path, call in routes:
        for headers, status in (
            ({}, 401),
            ({"Authorization": "Bearer aw_unknown"}, 401),
            ({"Authorization": f"Bearer {revoked}"}, 403),
        ):
            response = call(headers=headers)
            assert response.status_code == status, (path, headers, response.get_data(as_text=True))
            conforms(api_schema, method, path, response)
        services(app).store.redis.delete(keys.rate_bucket(slow_key.subject))  # a fresh minute for each route
        first, second = (
            call(headers={"Authorization": f"Bearer {slow}"}),
            call(headers={"Authorization": f"Bearer {slow}"}),
        )
        assert second.status_code == 429 and second.get_json()["error"]["code"] == "rate_limited", path
        assert first.headers["RateLimit-Limit"] == "1"
        for response in (first, second):
            conforms(api_schema, method, path, response)
    full = create_app(docs_settings(db, asr_cache_dir, MAX_QUEUE_DEPTH=1)).test_client()
    full.post("/v1/transcriptions", data=KITAB.read_bytes(), content_type="audio/webm")  # the queue holds one job now
    for path in ("/v1/transcriptions", "/v1/audio/transcriptions"):
        response = full.post(path, data={"file": (io.BytesIO(KITAB.read_bytes()), "a.webm")},
                             content_type="multipart/form-data")  # fmt: skip
        assert response.status_code == 429 and response.get_json()["error"]["code"] == "queue_full"
        conforms(api_schema, "POST", path, response)
    services(app).store.redis.close()

    down = create_app(docs_settings(f"redis://127.0.0.1:{free_port()}/0", asr_cache_dir)).test_client()
    for method, path, response in (
        ("POST", "/v1/transcriptions", down.post("/v1/transcriptions", data=KITAB.read_bytes(),
                                                 content_type="audio/webm")),
        ("GET", "/v1/transcriptions/{job_id}", down.get(f"/v1/transcriptions/{'0' * 32}")),
        ("POST", "/v1/audio/transcriptions", down.post("/v1/audio/transcriptions", data={
            "file": (io.BytesIO(KITAB.read_bytes()), "a.webm")}, content_type="multipart/form-data")),
        ("GET", "/readyz", down.get("/readyz")),
    ):  # fmt: skip
        assert response.status_code == 503, (path, response.get_data(as_text=True))
        conforms(api_schema, method, path, response)


@contextlib.contextmanager
def finishing_jobs(store: JobStore, finish: Callable[[str], None]) -> Iterator[None]:
    """A stand-in worker: claims each queued job of ``store`` and ends it with ``finish(job_id)``."""
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            for key in store.redis.scan_iter(keys.job("*")):
                job_id = key.decode().rsplit(":", 1)[1]
                job = store.get(job_id)
                queued = job is not None and job.status is JobStatus.QUEUED
                if queued and store.claim(job_id, "stand-in:1").outcome is ClaimOutcome.CLAIMED:
                    finish(job_id)
            stop.wait(0.02)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


RESULT = TranscriptionResult(
    text="صباح الخير", confidence=0.8, duration_s=1.6, model="m", timings_ms={"queue": 1.0, "total": 2.0},
    words=[WordTiming("صباح", 0.22, 0.64, 0.8), WordTiming("الخير", 0.7, 1.5, 0.9)],
    expected={"text": "صباح الخير", "normalized_match": True, "similarity": 1.0},
).to_dict()  # fmt: skip


@pytest.mark.parametrize(
    ("outcome", "status"),
    [("succeeded", 200), ("invalid_audio", 400), ("audio_too_long", 400), ("worker_crashed", 500),
     ("internal_error", 500), ("upload_expired", 503), ("timeout", 504)],
)  # fmt: skip
def test_final_jobs_answers_conform(api_schema, db, asr_cache_dir, outcome, status):
    app = create_app(docs_settings(db, asr_cache_dir, MAX_WAIT_S=10, QUEUE=f"test-openapi-{outcome}"))
    store = services(app).store

    def finish(job_id: str) -> None:
        if outcome == "succeeded":
            store.succeed(job_id, RESULT)
        else:
            store.fail(job_id, {"code": outcome, "message": "as a worker says it", "reason": "corrupt"})

    client = app.test_client()
    formats = ["json", "text", "verbose_json", "srt", "vtt"] if status == 200 else ["json"]
    with finishing_jobs(store, finish):
        for response_format in formats:
            response = client.post("/v1/audio/transcriptions", data={
                "file": (io.BytesIO(KITAB.read_bytes()), "a.webm"), "response_format": response_format,
                "timestamp_granularities[]": ["word", "segment"]}, content_type="multipart/form-data")  # fmt: skip
            assert response.status_code == status, response.get_data(as_text=True)
            conforms(api_schema, "POST", "/v1/audio/transcriptions", response)
        job_id = client.post("/v1/transcriptions", data=KITAB.read_bytes(), content_type="audio/webm").get_json()["id"]
        job = client.get(f"/v1/transcriptions/{job_id}?wait=10")
    assert job.get_json()["status"] == ("succeeded" if outcome == "succeeded" else "failed")
    conforms(api_schema, "GET", "/v1/transcriptions/{job_id}", job)
    services(app).waiter.close()
    store.redis.close()


@pytest.mark.integration
def test_real_results_of_the_worker_conform(settings, worker, api_schema):
    """With the session's worker: its real results and failures, and a ready /readyz."""
    with serve(create_app(settings)) as base:
        created = requests.post(f"{base}/v1/transcriptions?expected=كِتَاب", data=KITAB.read_bytes(),
                                headers={"Content-Type": "audio/webm"}, timeout=30)  # fmt: skip
        done = requests.get(base + created.headers["Location"] + "?wait=30", timeout=60)
        assert done.json()["status"] == "succeeded" and "expected" in done.json()["result"]
        conforms(api_schema, "GET", "/v1/transcriptions/{job_id}", done)
        bad = requests.post(f"{base}/v1/transcriptions", data=CORRUPT_WAV, headers={"Content-Type": "audio/wav"},
                            timeout=30)  # fmt: skip
        failed = requests.get(base + bad.headers["Location"] + "?wait=30", timeout=60)
        assert failed.json()["error"]["code"] == "invalid_audio" and failed.json()["error"]["reason"]
        conforms(api_schema, "GET", "/v1/transcriptions/{job_id}", failed)
        for response_format in ("json", "text", "verbose_json", "srt", "vtt"):
            answer = _post_file(base, "/v1/audio/transcriptions", KITAB.read_bytes(), response_format=response_format,
                                expected="كتاب", **{"timestamp_granularities[]": ["word", "segment"]})  # fmt: skip
            assert answer.status_code == 200, answer.text
            conforms(api_schema, "POST", "/v1/audio/transcriptions", answer)
        failure = _post_file(base, "/v1/audio/transcriptions", CORRUPT_WAV, name="bad.wav")
        assert failure.status_code == 400 and failure.json()["error"]["code"] == "invalid_audio"
        conforms(api_schema, "POST", "/v1/audio/transcriptions", failure)
        ready = requests.get(f"{base}/readyz", timeout=10)
        assert ready.status_code == 200
        conforms(api_schema, "GET", "/readyz", ready)


# --------------------------------------------------------------------------------------------------- fuzz
# The document to fuzz is loaded when the module is (schemathesis parametrizes one test per operation at collection);
# an app with this module's settings builds it without touching Redis, and the live server must serve the same one.
FUZZ_MAX_WAIT_S = 0.2
FUZZ_DOCUMENT = build_document(create_app(Settings(REDIS_URL="redis://127.0.0.1:1/0", MAX_WAIT_S=FUZZ_MAX_WAIT_S)))
schema = schemathesis.openapi.from_dict(FUZZ_DOCUMENT)
# Raw audio bodies (`audio/*`): real recordings whole or cut short (accepted: 202), or any bytes (mostly 415).
RECORDINGS = [(DATA / name).read_bytes() for name in ("kitab.webm", "shukran.wav", "marhaba.mp3")]
schemathesis.openapi.media_type(
    "audio/*",
    st.one_of(
        st.sampled_from(RECORDINGS),
        st.builds(lambda data, size: data[:size], st.sampled_from(RECORDINGS), st.integers(1, 4096)),
        st.binary(max_size=4096),
    ),
)


def test_the_fuzzed_document_is_the_served_one(live):
    assert requests.get(f"{live}/openapi.json", timeout=10).json() == FUZZ_DOCUMENT


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzz_the_live_api(case, live):
    """Bounded property-based fuzz of every documented operation against the live server: no 500, and every response
    allowed by the document (status, content type, headers, body)."""
    case.call_and_validate(base_url=live, checks=CHECKS, timeout=30)
