"""Chaos on real processes: every accepted job ends, exactly once, whatever is killed or stopped.

Each scenario causes its fault from outside (SIGKILL of a pool child or of the whole worker, SIGTERM/SIGKILL of
Redis, a model that cannot load, a bomb upload) except where that cannot be timed from outside: the FAULT_* settings
(shared/config.py) slow or block the forward pass, or pause the web app before it publishes. `make test` runs each
scenario once and small; `make chaos` (CHAOS_FULL=1) at full size, and prints the table the README shows.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from shared.queue import enqueue, make_celery
from tests import chaos
from tests.chaos import Ledger, RedisUnderTest, chaos_settings, kill_group, repeats, start_worker, stop_worker
from tests.conftest import DATA
from tests.test_decode_memory import encoded

pytestmark = pytest.mark.chaos
CLIP = (DATA / "marhaba.webm").read_bytes()


@pytest.fixture(scope="module")
def chaos_redis(tmp_path_factory) -> RedisUnderTest:
    from shared.redis_server import free_port

    server = RedisUnderTest(free_port(), tmp_path_factory.mktemp("chaos-redis"))
    yield server
    if server.proc and server.proc.poll() is None:
        server.stop()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("chaos-cache")


@pytest.fixture()
def logs(tmp_path) -> Path:
    return tmp_path


def web(settings):
    from web import create_app

    return create_app(settings).test_client()


def submit(client, ledger: Ledger, data: bytes = CLIP) -> str:
    response = client.post("/v1/transcriptions", data=data, content_type="audio/webm")
    assert response.status_code == 202, response.get_json()
    return ledger.accept(response.get_json()["id"])


def wait_processing(ledger: Ledger, job_id: str, timeout_s: float = 60, not_owner: str = "") -> int:
    """The pid of the process that holds the job once it is processing (by someone other than ``not_owner``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = ledger.status(job_id)
        if record.get("status") == "processing" and record.get("owner") and record["owner"] != not_owner:
            return int(record["owner"].rpartition(":")[2])
        assert record.get("status") not in ("succeeded", "failed"), record
        time.sleep(0.02)
    raise AssertionError(f"job never started: {ledger.status(job_id)}")


def test_sigkill_of_the_pool_child_mid_job(chaos_redis, cache_dir, logs):
    settings = chaos_settings(chaos_redis.url, cache_dir, QUEUE="chaos-child", FAULT_SLOW_FORWARD_S=1.0)
    worker = start_worker(settings, logs / "worker.log", name="chaos-child")
    ledger, client = Ledger(settings), web(settings)
    try:
        for _ in range(repeats(2, 20)):
            job_id = submit(client, ledger)
            os.kill(wait_processing(ledger, job_id), signal.SIGKILL)
            ledger.wait_all(settings.TASK_TIME_LIMIT_S + 60)
        row = ledger.report("SIGKILL pool child mid-job", "held: 5 of 5 succeeded on redelivery")
        assert row["ok"] and row["outcomes"] == {"succeeded": row["jobs"]}, row

        # a job that kills its process on every attempt (a poison upload): failed after MAX_ATTEMPTS, not looping
        poison = Ledger(settings)
        job_id = submit(client, poison)
        owner = ""
        for _ in range(settings.MAX_ATTEMPTS):
            pid = wait_processing(poison, job_id, not_owner=owner)
            owner = poison.status(job_id)["owner"]
            os.kill(pid, signal.SIGKILL)
        poison.wait_all(settings.TASK_TIME_LIMIT_S + 60)
        row = poison.report(
            f"SIGKILL on every attempt ({settings.MAX_ATTEMPTS})", "only simulated (attempt counter set by hand)"
        )
        assert row["ok"] and row["outcomes"] == {"failed worker_crashed": 1}, row
    finally:
        stop_worker(worker)


def test_sigkill_of_the_whole_worker_mid_job(chaos_redis, cache_dir, logs):
    settings = chaos_settings(chaos_redis.url, cache_dir, QUEUE="chaos-whole", FAULT_SLOW_FORWARD_S=1.0)
    ledger, client = Ledger(settings), web(settings)
    recoveries = []
    for i in range(repeats(1, 5)):
        worker = start_worker(settings, logs / f"worker-{i}.log", name=f"chaos-whole-{i}")
        job_id = submit(client, ledger)
        wait_processing(ledger, job_id)
        kill_group(worker)  # main process and pool at once: OOM killer, host lost
        killed_at = time.monotonic()
        fresh = start_worker(settings, logs / f"fresh-{i}.log", name=f"chaos-fresh-{i}")
        try:
            ledger.wait_all(settings.TASK_TIME_LIMIT_S + 60)
            recoveries.append(time.monotonic() - killed_at)
        finally:
            stop_worker(fresh)
    row = ledger.report(
        "SIGKILL whole worker mid-job, fresh worker",
        "still processing 121 s later (waited for the 3,600 s visibility timeout)",
        extra=f"recovered in {max(recoveries):.1f} s (max)",
    )
    assert row["ok"] and row["outcomes"] == {"succeeded": row["jobs"]}, row


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_redis_stopped_and_restarted_with_jobs_queued_and_running(chaos_redis, cache_dir, logs, sig):
    settings = chaos_settings(chaos_redis.url, cache_dir, QUEUE=f"chaos-redis-{sig}", FAULT_SLOW_FORWARD_S=0.5)
    worker = start_worker(settings, logs / "worker.log", name=f"chaos-redis-{sig}")
    ledger, client = Ledger(settings), web(settings)
    try:
        for _ in range(repeats(1, 3)):
            ids = [submit(client, ledger) for _ in range(6)]
            wait_processing(ledger, ids[0])
            chaos_redis.stop(sig)
            time.sleep(2)
            chaos_redis.start()
            ledger.wait_all(settings.TASK_TIME_LIMIT_S + 60)
        # the known Celery case: a worker that reconnects but no longer consumes
        after = submit(client, ledger)
        ledger.wait_all(60)
        assert after in ledger.finals, "the worker did not consume after Redis came back"
        row = ledger.report(
            f"Redis {signal.Signals(sig).name} + restart, jobs queued and running",
            "SIGTERM: 6 of 6 succeeded" if sig == signal.SIGTERM else "not tried",
        )
        assert row["ok"] and row["outcomes"] == {"succeeded": row["jobs"]}, row
    finally:
        stop_worker(worker)


def test_a_worker_that_cannot_load_its_model_takes_no_job(chaos_redis, cache_dir, logs, tmp_path):
    url = chaos_redis.url.rsplit("/", 1)[0] + "/3"  # a database of its own: /readyz counts every heartbeat in it
    good = chaos_settings(url, cache_dir, QUEUE="chaos-badmodel")
    bad = chaos_settings(url, cache_dir, QUEUE="chaos-badmodel", ASR_MODEL=str(tmp_path / "no-model"))
    bad_worker = start_worker(bad, logs / "bad.log", name="chaos-bad", wait_ready=False)
    ledger, client = Ledger(good), web(good)
    good_worker = None
    try:
        job_id = submit(client, ledger)
        deadline = time.monotonic() + 60  # a loaded machine takes a while to start a worker
        while "model load failed" not in (logs / "bad.log").read_text():
            assert bad_worker.poll() is None or "model load failed" in (logs / "bad.log").read_text()
            assert time.monotonic() < deadline, (logs / "bad.log").read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(3)  # children have failed, backed off and been replaced by now
        assert ledger.status(job_id)["status"] == "queued"  # taken by nobody, lost by nobody
        assert client.get("/readyz").status_code == 503
        good_worker = start_worker(good, logs / "good.log", name="chaos-good")
        ledger.wait_all(good.TASK_TIME_LIMIT_S + 60)
        log = (logs / "bad.log").read_text()
        row = ledger.report(
            "worker whose model cannot load, then a good one",
            "the child lived on without a model, took the job and left it queued for 24 h",
            extra="bad worker: "
            + ("stopped itself after 3 failed loads" if "stopping this worker" in log else "children backing off"),
        )
        assert row["ok"] and row["outcomes"] == {"succeeded": 1}, row
    finally:
        stop_worker(bad_worker)
        if good_worker is not None:
            stop_worker(good_worker)


@pytest.mark.parametrize(
    "pool,fault",
    [("prefork", "FAULT_SLOW_FORWARD_S"), ("prefork", "FAULT_STUCK_FORWARD_S"), ("threads", "FAULT_SLOW_FORWARD_S")],
    ids=["prefork-soft", "prefork-hard", "threads"],
)
def test_a_job_past_the_time_limit_fails_as_timeout(chaos_redis, cache_dir, logs, pool, fault):
    overrides = {fault: 30.0, "TASK_TIME_LIMIT_S": 8}  # soft limit (and the threads pool's deadline) at 3 s
    if pool == "threads":
        overrides |= {"BATCH_MAX_SIZE": 2, "BATCH_WINDOW_MS": 1}
    settings = chaos_settings(chaos_redis.url, cache_dir, QUEUE=f"chaos-limit-{pool}-{fault}", **overrides)
    worker = start_worker(settings, logs / "worker.log", name=f"chaos-limit-{pool}")
    ledger, client = Ledger(settings), web(settings)
    try:
        submit(client, ledger)
        ledger.wait_all(settings.TASK_TIME_LIMIT_S + 60)
        kind = {"FAULT_SLOW_FORWARD_S": "slow", "FAULT_STUCK_FORWARD_S": "stuck"}[fault]
        before = {
            "prefork-FAULT_SLOW_FORWARD_S": "failed timeout (held)",
            "prefork-FAULT_STUCK_FORWARD_S": "acked by the hard limit, left processing",
            "threads-FAULT_SLOW_FORWARD_S": "no limit at all in the threads pool",
        }[f"{pool}-{fault}"]
        row = ledger.report(f"{pool} pool, {kind} forward pass past the limit", before)
        assert row["ok"] and row["outcomes"] == {"failed timeout": 1}, row
        assert row["slowest_s"] < settings.TASK_TIME_LIMIT_S + 10
    finally:
        stop_worker(worker)


def test_duplicate_deliveries_never_change_a_job(chaos_redis, cache_dir, logs):
    settings = chaos_settings(
        chaos_redis.url, cache_dir, QUEUE="chaos-dup", FAULT_SLOW_FORWARD_S=1.0, WORKER_CONCURRENCY=2
    )  # two processes: the duplicate of the running job reaches the other one while the first still holds it
    worker = start_worker(settings, logs / "worker.log", name="chaos-dup")
    ledger, client = Ledger(settings), web(settings)
    celery = make_celery(settings)
    try:
        running = submit(client, ledger)
        wait_processing(ledger, running)
        enqueue(celery, running, settings.QUEUE)  # a second delivery while a live process holds it
        finished = submit(client, ledger)
        ledger.wait_all(60)
        for _ in range(3):
            enqueue(celery, finished, settings.QUEUE)  # deliveries of a finished job
        time.sleep(4)
        assert ledger.status(running)["attempts"] == "1" and ledger.status(finished)["attempts"] == "1"
        row = ledger.report("duplicate deliveries (running and finished job)", "a duplicate set `processing` again")
        assert row["ok"] and row["outcomes"] == {"succeeded": 2}, row
        log = (logs / "worker.log").read_text()
        assert f"job_id={running} outcome=busy" in log and f"job_id={finished} outcome=final" in log
    finally:
        stop_worker(worker)


def test_a_decompression_bomb_is_refused_within_the_memory_budget(chaos_redis, cache_dir, logs):
    settings = chaos_settings(chaos_redis.url, cache_dir, QUEUE="chaos-bomb")
    worker = start_worker(settings, logs / "worker.log", name="chaos-bomb")
    ledger, client = Ledger(settings), web(settings)
    try:
        (child,) = chaos.ready_pids(settings, worker)
        submit(client, ledger)  # one normal job first: the working set of a job
        ledger.wait_all(60)
        bomb = encoded(384_000, 8, 30, tone_s=0)  # 15 KB of FLAC in Matroska: 384 kHz x 8 ch x 30 s of silence
        before = chaos.rss_mb(child)
        chaos.reset_peak_rss(child)
        submit(client, ledger, bomb)
        ledger.wait_all(60)
        growth = chaos.peak_rss_mb(child) - before
        submit(client, ledger)  # and the worker still serves the next one
        ledger.wait_all(60)
        row = ledger.report(
            f"decompression bomb ({len(bomb) // 1024} KB FLAC/MKV, 384 kHz x 8 ch x 30 s)",
            "worker grew by 870 MB",
            extra=f"peak RSS growth {growth:.0f} MB",
        )
        assert row["ok"] and row["outcomes"] == {"succeeded": 2, "failed invalid_audio": 1}, row
        assert growth <= 64, f"worker peak RSS grew by {growth:.0f} MB"
    finally:
        stop_worker(worker)


def test_redis_stopped_between_storing_and_publishing(chaos_redis, cache_dir, logs):
    settings = chaos_settings(chaos_redis.url, cache_dir, QUEUE="chaos-publish")
    paused = web(chaos_settings(chaos_redis.url, cache_dir, QUEUE="chaos-publish", FAULT_PAUSE_BEFORE_PUBLISH_S=1.5))
    answers: list = []
    poster = threading.Thread(
        target=lambda: answers.append(paused.post("/v1/transcriptions", data=CLIP, content_type="audio/webm"))
    )
    poster.start()
    time.sleep(0.5)  # the job is stored; the web app is paused before publishing
    chaos_redis.stop(signal.SIGKILL)
    poster.join(60)
    chaos_redis.start()
    (response,) = answers
    assert response.status_code == 503, response.get_json()
    assert response.get_json()["error"]["code"] == "service_unavailable" and response.headers["Retry-After"]
    # nothing was accepted, so nothing can be lost; and the service takes the retry once Redis is back
    worker = start_worker(settings, logs / "worker.log", name="chaos-publish")
    ledger = Ledger(settings)
    try:
        submit(web(settings), ledger)
        ledger.wait_all(60)
        row = ledger.report(
            "Redis killed between storing a job and publishing it",
            "500, and an orphan `queued` job",
            extra="503 service_unavailable + Retry-After; the retry succeeded",
        )
        assert row["ok"] and row["outcomes"] == {"succeeded": 1}, row
    finally:
        stop_worker(worker)


def test_admission_control_refuses_at_the_door(chaos_redis, cache_dir):
    settings = chaos_settings(chaos_redis.url, cache_dir, QUEUE="chaos-admission-nobody", MAX_QUEUE_DEPTH=3)
    client = web(settings)
    accepted = [client.post("/v1/transcriptions", data=CLIP, content_type="audio/webm") for _ in range(3)]
    assert [r.status_code for r in accepted] == [202] * 3
    refused = client.post("/v1/transcriptions", data=CLIP, content_type="audio/webm")
    assert refused.status_code == 429
    assert refused.get_json()["error"]["code"] == "queue_full" and int(refused.headers["Retry-After"]) > 0
    tight = web(chaos_settings(chaos_redis.url, cache_dir, QUEUE="chaos-admission-2", MAX_REDIS_MEMORY_FRACTION=1e-6))
    refused = tight.post("/v1/transcriptions", data=CLIP, content_type="audio/webm")
    assert refused.status_code == 429 and refused.get_json()["error"]["code"] == "queue_full"


def test_a_load_run_loses_nothing(chaos_redis, cache_dir, logs, tmp_path):
    """Jobs from many clients over the real web server (gunicorn, as `make run` starts it) while hundreds of
    long-polls stay open and /healthz and uploads are timed (bench/longpoll.py)."""
    import json
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from bench.longpoll import measure, web_stack

    n_jobs, n_clients, n_polls, seconds = (2000, 50, 500, 30.0) if chaos.FULL else (120, 12, 100, 6.0)
    with web_stack(tmp_path, redis_url=chaos_redis.url) as stack:
        settings = chaos_settings(chaos_redis.url, cache_dir, QUEUE=stack.settings.QUEUE, WORKER_CONCURRENCY=2)
        worker = start_worker(settings, logs / "worker.log", name="chaos-load")
        ledger, base = Ledger(settings), f"http://127.0.0.1:{stack.port}"

        def client(count: int) -> None:
            for _ in range(count):
                request = urllib.request.Request(
                    f"{base}/v1/transcriptions", data=CLIP, headers={"Content-Type": "audio/webm"}, method="POST"
                )
                with urllib.request.urlopen(request, timeout=30) as response:
                    job = json.load(response)
                ledger.accept(job["id"])
                while job["status"] not in ("succeeded", "failed"):
                    with urllib.request.urlopen(f"{base}{job['url']}?wait=30", timeout=40) as response:
                        job = json.load(response)

        try:
            started = time.monotonic()
            with ThreadPoolExecutor(n_clients) as pool:
                futures = [pool.submit(client, n_jobs // n_clients) for _ in range(n_clients)]
                load = measure(stack, polls=n_polls, wait_s=10.0, duration_s=seconds, warmup_s=2.0)
                for future in futures:
                    future.result()
            elapsed = time.monotonic() - started
            ledger.wait_all(60)
        finally:
            stop_worker(worker)
    healthz, upload = load["healthz"], load["upload"]
    row = ledger.report(
        f"load: {n_jobs} jobs from {n_clients} clients, {n_polls} open long-polls",
        "200 long-polls: neither /healthz nor an upload answered within 40 s",
        extra=(
            f"{n_jobs} jobs in {elapsed:.0f} s; meanwhile /healthz p99 {healthz['p99_ms']} ms, "
            f"upload p99 {upload['p99_ms']} ms ({healthz['ok']}/{healthz['sent']}, {upload['ok']}/{upload['sent']} ok)"
        ),
    )
    assert row["ok"] and row["outcomes"] == {"succeeded": row["jobs"]}, row
    assert healthz["ok"] == healthz["sent"] and upload["ok"] == upload["sent"], load
