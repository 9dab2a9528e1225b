"""Real parts: a redis-server on a free port and a real `celery worker` subprocess (prefork, 2 processes)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from shared.config import BUNDLED_MODEL_DIR, Settings
from shared.queue import make_celery
from shared.redis_server import free_port, start_redis

DATA = Path(__file__).parent / "data"
WORKER_PROCESSES = 2
WORKER_MAX_AUDIO_S = 20.0


def read_transcripts() -> dict[str, str]:
    rows = (DATA / "transcripts.tsv").read_text(encoding="utf-8").splitlines()
    return dict(line.split("\t", 1) for line in rows if line.strip())


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> str:
    port = free_port()
    proc = start_redis(port, tmp_path_factory.mktemp("redis"), persistent=False)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def settings(redis_url: str) -> Settings:
    return Settings.from_env(
        REDIS_URL=redis_url,
        ASR_MODEL=str(BUNDLED_MODEL_DIR),
        MAX_AUDIO_S=WORKER_MAX_AUDIO_S,
        MAX_UPLOAD_BYTES=2_000_000,
        QUEUE="test-transcribe",
        TORCH_THREADS=1,
        WORKER_CONCURRENCY=WORKER_PROCESSES,
    )


@pytest.fixture(scope="session")
def worker(settings: Settings, tmp_path_factory) -> subprocess.Popen:
    """A real Celery worker process with its own prefork children, each loading the model once."""
    env = dict(os.environ)
    env.update({k: str(v) for k, v in settings.as_dict().items()})
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    log_file = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--loglevel", "INFO",
         "-Q", settings.QUEUE, "-n", f"test-{os.getpid()}@%h", "--without-mingle", "--without-gossip"],
        env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    app = make_celery(settings)
    deadline = time.monotonic() + 180
    while len(app.control.ping(timeout=0.5) or []) == 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"celery worker did not start:\n{log_path.read_text()[-4000:]}")
    # the children load the model in worker_process_init; wait until every one has
    client = redis.Redis.from_url(settings.REDIS_URL)
    from shared import keys

    while client.hlen(keys.model_loads()) < WORKER_PROCESSES:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"worker processes did not load the model:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.2)
    yield proc
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log_file.close()


@pytest.fixture(scope="session")
def app(settings: Settings):
    from web import create_app

    return create_app(settings)


@pytest.fixture()
def client(app):
    return app.test_client()


def wait_for(client, job_id: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        body = client.get(f"/v1/transcriptions/{job_id}?wait=10").get_json()
        if body["status"] in ("succeeded", "failed") or time.monotonic() > deadline:
            return body
