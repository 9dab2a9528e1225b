"""API keys, job ownership, per-client limits, CORS and security headers, on a real Redis (no worker: jobs stay queued
unless a test finishes them through the job store, as a worker would)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis

from shared.access import KeyStore, Limits
from shared.config import Settings
from tests.conftest import DATA
from web import create_app, services

ROOT = Path(__file__).resolve().parent.parent
WEBM = (DATA / "kitab.webm").read_bytes()
AWAY = {"REMOTE_ADDR": "203.0.113.7"}  # a client that is not this machine


@pytest.fixture()
def db(redis_url: str) -> str:
    """A Redis database of these tests' own, emptied for each (keys, buckets and queues start fresh)."""
    url = redis_url.rsplit("/", 1)[0] + "/5"
    redis.Redis.from_url(url).flushdb()
    return url


def make_app(db: str, **overrides):
    settings = Settings(REDIS_URL=db, QUEUE="auth-test", **overrides)
    return create_app(settings)


def post(client, key: str | None = None, data: bytes = WEBM, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return client.post("/v1/transcriptions", data=data, content_type="audio/webm", headers=headers, **kw)


def get(client, job_id: str, key: str | None = None, query: str = ""):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return client.get(f"/v1/transcriptions/{job_id}{query}", headers=headers)


def new_key(app, name: str, **limits) -> str:
    return KeyStore(services(app).store.redis).create(name, Limits(**limits))[1]


def finish(app, job_id: str, duration_s: float = 1.0) -> None:
    """What a worker does at the end of a job (claim, then the final transition)."""
    store = services(app).store
    assert store.claim(job_id, "test-host:1").outcome.value == "claimed"
    assert store.succeed(job_id, {"text": "كتاب", "duration_s": duration_s})


def test_local_use_needs_no_key(db):
    app = make_app(db)  # HOST 127.0.0.1, AUTH_MODE auto: off
    response = post(app.test_client())
    assert response.status_code == 202
    assert "RateLimit-Limit" not in response.headers  # the local machine is not limited
    assert get(app.test_client(), response.get_json()["id"]).status_code == 200


def test_a_public_address_requires_a_key_by_default(db):
    app = make_app(db, HOST="0.0.0.0")
    assert services(app).settings.auth_required
    response = post(app.test_client())
    assert response.status_code == 401 and response.get_json()["error"]["code"] == "unauthorized"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_every_api_route_refuses_a_missing_wrong_or_revoked_key(db):
    app = make_app(db, AUTH_MODE="required")
    client = app.test_client()
    key = new_key(app, "learners")
    job_id = post(client, key).get_json()["id"]
    KeyStore(services(app).store.redis).revoke("learners")
    for token in (None, "aw_not-a-key", "Basic abc", key):
        for response in (post(client, token), get(client, job_id, token), get(client, job_id, token, "?wait=1")):
            expected = (403, "key_revoked") if token == key else (401, "unauthorized")
            assert (response.status_code, response.get_json()["error"]["code"]) == expected
    assert client.get("/healthz").status_code == 200  # probes and the page stay open
    assert client.get("/").status_code == 200


def test_a_job_belongs_to_the_key_that_created_it(db):
    app = make_app(db, AUTH_MODE="required")
    client = app.test_client()
    mine, theirs = new_key(app, "a"), new_key(app, "b")
    job_id = post(client, mine).get_json()["id"]
    assert get(client, job_id, mine).get_json()["status"] == "queued"
    for query in ("", "?wait=0.2"):
        response = get(client, job_id, theirs, query)
        assert response.status_code == 404 and response.get_json()["error"]["code"] == "not_found"
    unknown = get(client, "0" * 32, theirs)  # the same answer as for another key's job: ids cannot be probed
    assert unknown.status_code == 404 and unknown.get_json()["error"]["code"] == "not_found"
    assert uuid.UUID(job_id).version == 4  # 122 random bits


def test_a_burst_over_the_rate_is_refused_and_nothing_is_queued(db):
    app = make_app(db, AUTH_MODE="required")
    client = app.test_client()
    key = new_key(app, "burst", rate_per_min=10)
    statuses = []
    for _ in range(1000):
        response = post(client, key)
        statuses.append(response.status_code)
        if response.status_code == 429:
            assert response.get_json()["error"]["code"] == "rate_limited"
            assert 1 <= int(response.headers["Retry-After"]) <= 6  # one token every 6 s
            assert response.headers["RateLimit-Limit"] == "10" and response.headers["RateLimit-Remaining"] == "0"
    assert statuses.count(202) == 10 and statuses.count(429) == 990
    assert services(app).store.redis.llen("auth-test") == 10  # the refused ones were never queued


def test_jobs_in_flight_are_capped_and_freed_when_final(db):
    app = make_app(db, AUTH_MODE="required")
    client = app.test_client()
    key = new_key(app, "inflight", max_inflight=2)
    first, _ = (post(client, key).get_json()["id"] for _ in range(2))
    refused = post(client, key)
    assert refused.status_code == 429 and refused.get_json()["error"]["code"] == "too_many_inflight"
    assert post(client, key, data=b"").status_code == 429  # still full: a refused upload changes nothing
    finish(app, first)
    assert post(client, key).status_code == 202


def test_a_refused_upload_gives_its_place_back(db):
    app = make_app(db, AUTH_MODE="required")
    client = app.test_client()
    key = new_key(app, "one", max_inflight=1)
    for bad in (b"", b"not audio at all"):
        assert post(client, key, data=bad).status_code in (400, 415)
    assert post(client, key).status_code == 202


def test_daily_audio_quota(db):
    app = make_app(db, AUTH_MODE="required")
    client = app.test_client()
    key = new_key(app, "quota", audio_s_per_day=2.0)
    job_id = post(client, key).get_json()["id"]
    finish(app, job_id, duration_s=2.5)
    refused = post(client, key)
    assert refused.status_code == 429 and refused.get_json()["error"]["code"] == "quota_exceeded"
    assert 1 <= int(refused.headers["Retry-After"]) <= 86400
    other = new_key(app, "other", audio_s_per_day=2.0)  # quotas are per key
    assert post(client, other).status_code == 202


def test_with_auth_off_each_remote_address_is_limited(db):
    app = make_app(db, RATE_LIMIT_PER_MIN=3)
    client = app.test_client()
    codes = [post(client, environ_base=AWAY).status_code for _ in range(4)]
    assert codes == [202, 202, 202, 429]
    other = post(client, environ_base={"REMOTE_ADDR": "198.51.100.1"})
    assert other.status_code == 202 and other.headers["RateLimit-Remaining"] == "2"
    assert [post(client).status_code for _ in range(5)] == [202] * 5  # this machine is not limited


def test_cors_preflight_and_exposed_headers(db):
    app = make_app(db, AUTH_MODE="required", CORS_ORIGINS="https://learn.example.org")
    client = app.test_client()
    preflight = client.options(
        "/v1/transcriptions",
        headers={"Origin": "https://learn.example.org", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"},
    )  # fmt: skip
    assert preflight.status_code == 200  # no key needed for a preflight
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://learn.example.org"
    assert "authorization" in preflight.headers["Access-Control-Allow-Headers"].lower()
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    key = new_key(app, "browser")
    response = client.post(
        "/v1/transcriptions", data=WEBM, content_type="audio/webm",
        headers={"Authorization": f"Bearer {key}", "Origin": "https://learn.example.org"},
    )  # fmt: skip
    assert response.status_code == 202
    assert response.headers["Access-Control-Allow-Origin"] == "https://learn.example.org"
    assert "Location" in response.headers["Access-Control-Expose-Headers"]
    denied = client.options(
        "/v1/transcriptions", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert "Access-Control-Allow-Origin" not in denied.headers
    refused = client.post("/v1/transcriptions", headers={"Origin": "https://learn.example.org"})
    assert refused.status_code == 401 and refused.headers["Access-Control-Allow-Origin"]  # readable by the page


def test_no_cors_by_default(db):
    client = make_app(db).test_client()
    response = client.options(
        "/v1/transcriptions", headers={"Origin": "https://x.example", "Access-Control-Request-Method": "POST"}
    )
    assert "Access-Control-Allow-Origin" not in response.headers


def test_page_security_headers_and_no_inline_code(db):
    client = make_app(db).test_client()
    response = client.get("/")
    csp = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    html = response.get_data(as_text=True)
    assert not re.search(r"<script(?![^>]*\bsrc=)", html) and "<style" not in html
    assert not re.search(r"\son[a-z]+=", html) and "style=" not in html
    for asset in ("/static/app.js", "/static/app.css"):
        assert client.get(asset).status_code == 200


def _cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "arabic_words", *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env={**os.environ, **env})  # fmt: skip


def test_keys_command_stores_only_a_hash(db):
    env = {"REDIS_URL": db}
    created = _cli("keys", "create", "mobile-app", "--rate", "30/min", "--max-inflight", "4", env=env)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("aw_") and len(key) >= 40
    record = json.loads(created.stderr.strip().splitlines()[-1])
    assert record["name"] == "mobile-app" and record["rate_per_min"] == 30 and record["max_inflight"] == 4
    listed = _cli("keys", "list", env=env)
    assert key not in listed.stdout and json.loads(listed.stdout)["id"] == record["id"]
    client = redis.Redis.from_url(db)
    for name in client.scan_iter():  # neither the key nor any part of its random half is kept
        value = client.dump(name) or b""
        assert key.encode() not in name + value and key[3:].encode() not in value
    app = make_app(db, AUTH_MODE="required")
    assert post(app.test_client(), key).status_code == 202
    assert _cli("keys", "create", "mobile-app", env=env).returncode == 1  # names are unique among live keys
    assert _cli("keys", "revoke", "mobile-app", env=env).returncode == 0
    assert post(app.test_client(), key).status_code == 403
    assert _cli("keys", "revoke", "mobile-app", env=env).returncode == 1
