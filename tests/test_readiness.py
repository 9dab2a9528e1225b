"""/readyz tells a worker that answers pings apart from one whose processes have a model loaded."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
import redis

from arabic_words.processes import command, stop_process
from shared import keys
from shared.config import Settings
from shared.redis_server import free_port, start_redis


@pytest.fixture()
def lone_redis(tmp_path) -> str:
    """A Redis of this test's own: the session's has the session worker's heartbeats in it."""
    port = free_port()
    proc = start_redis(port, tmp_path / "redis", persistent=False)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


def _readyz(redis_url: str) -> tuple[int, dict]:
    from web import create_app

    client = create_app(Settings(REDIS_URL=redis_url, QUEUE="readiness-test")).test_client()
    response = client.get("/readyz")
    return response.status_code, response.get_json()


def test_a_stale_heartbeat_is_not_a_loaded_model(lone_redis):
    client = redis.Redis.from_url(lone_redis)
    client.zadd(keys.model_processes(), {"gone-host:1": time.time() - keys.MODEL_HEARTBEAT_STALE_S - 1})
    status, body = _readyz(lone_redis)
    assert status == 503 and body["model_processes"] == 0 and body["redis"] is True


@pytest.mark.integration
def test_worker_whose_processes_cannot_load_the_model_is_not_ready(lone_redis, tmp_path):
    """A bad ASR_MODEL: Celery's parent answers pings while its children fail to start; /readyz must say so."""
    settings = Settings(REDIS_URL=lone_redis, ASR_MODEL=str(tmp_path / "no-such-model"), QUEUE="readiness-test",
                        WORKER_CONCURRENCY=1, ASR_CACHE_DIR=str(tmp_path / "cache"))  # fmt: skip
    log_path = tmp_path / "worker.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            command("worker", "-n", f"readiness-{os.getpid()}@%h", "--without-mingle", "--without-gossip"),
            env={**os.environ, **settings.as_env()}, stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            status, body = _readyz(lone_redis)
            if body["workers"] > 0:
                break
            assert proc.poll() is None, "the worker exited:\n" + log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the worker never answered a ping:\n" + log_path.read_text()[-3000:]
            time.sleep(0.5)
        time.sleep(2)  # children have had time to fail (and be restarted) by now
        status, body = _readyz(lone_redis)
        assert body["workers"] >= 1 and body["model_processes"] == 0
        assert status == 503 and body["status"] == "not_ready"
    finally:
        stop_process(proc, 30)
