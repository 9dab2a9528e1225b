"""Long-polls under load: a real gunicorn (the service's own command) on a real redis-server, no worker, so every job
stays queued and every long-poll waits its full time; and the per-process listener across a Redis restart."""

from __future__ import annotations

import threading
import time

from bench.longpoll import measure, web_stack
from shared.redis_server import free_port, start_redis
from web import create_app, services

POLLS = 300


def test_many_long_polls_leave_health_uploads_and_wakes_answering(tmp_path):
    with web_stack(tmp_path) as stack:
        result = measure(
            stack, polls=POLLS, wait_s=3, duration_s=6, warmup_s=2, healthz_rate=5, upload_rate=2, wake_checks=2,
            probe_timeout_s=5,
        )  # fmt: skip
    polls = result["long_polls"]
    # every long-poll was open at once, and each answer was a valid "still queued" after its full wait
    assert polls["peak_open"] == POLLS and polls["open_at_end"] == POLLS, polls
    assert polls["errors"] == {} and polls["invalid"] == {}, polls
    assert polls["answers"] >= POLLS and polls["valid"] == polls["answers"], polls
    assert polls["early"] == 0, polls
    for name in ("healthz", "upload"):  # answered during the load (a generous bound: speed is the bench's business)
        probe = result[name]
        assert probe["sent"] > 0 and probe["errors"] == {} and probe["ok"] == probe["sent"], (name, probe)
        assert probe["max_ms"] < 2000, (name, probe)
    # a job finished the way a worker finishes it (JobStore.succeed publishes on its done channel) ends its
    # long-poll at once, not at the end of its 20 s wait
    wake = result["wake"]
    assert wake["sent"] == 2 and wake["ok"] == 2 and wake["errors"] == {}, wake
    assert wake["max_ms"] < 2000, wake


def test_waiters_survive_a_redis_restart(tmp_path):
    port = free_port()
    redis_proc = start_redis(port, tmp_path, persistent=True)  # AOF: the job outlives the restart
    try:
        app = create_app({"REDIS_URL": f"redis://127.0.0.1:{port}/0"})
        store, waiter = services(app).store, services(app).waiter
        assert not waiter.subscribed  # built lazily: nothing listens before the first wait
        job = store.create(b"never sent to a worker")
        answers: list[tuple[str, float]] = []

        def long_poll() -> None:
            started = time.monotonic()
            body = app.test_client().get(f"/v1/transcriptions/{job.id}?wait=20").get_json()
            answers.append((body["status"], time.monotonic() - started))

        threads = [threading.Thread(target=long_poll) for _ in range(5)]
        for thread in threads:
            thread.start()
        _until(lambda: waiter.subscribed and waiter.waiting == 5)

        redis_proc.terminate()
        redis_proc.wait(timeout=10)
        _until(lambda: not waiter.subscribed)
        time.sleep(0.5)
        redis_proc = start_redis(port, tmp_path, persistent=True)
        _until(lambda: waiter.subscribed, timeout_s=10)  # reconnected with backoff (at most 5 s between attempts)

        finished = time.monotonic()
        store.succeed(job.id, {"text": ""})
        for thread in threads:
            thread.join(timeout=25)
        assert len(answers) == 5 and {status for status, _ in answers} == {"succeeded"}, answers
        assert time.monotonic() - finished < 2  # woken by the new subscription, not by their 20 s timeout
        waiter.close()
    finally:
        redis_proc.terminate()
        redis_proc.wait(timeout=10)


def _until(condition, timeout_s: float = 5) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
