"""Prometheus metrics on real processes (shared/metrics.py, web/metrics.py, worker/metrics.py): the web server's
/metrics sums every gunicorn process, killed ones included; a worker's endpoint sums its prefork children; the
dashboard asks only for metrics the service exports. (tests/test_metrics.py is about accuracy metrics.)"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from arabic_words.processes import command, stop_process
from shared import metrics as shared_metrics
from shared.config import Settings
from shared.redis_server import free_port
from tests.conftest import (
    DATA,
    make_settings,
    model_ready_pids,
    parent_pid,
    post_file,
    start_worker,
    stop_worker,
    wait_for,
)

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "arabic-words.json"
HOST = "127.0.0.1"


# ------------------------------------------------------------------------------------------------- helpers
def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape_until(url: str, done, timeout_s: float = 10) -> dict[tuple[str, frozenset], float]:
    """A scrape for which ``done(samples)`` holds, or the last one after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not done(samples := scrape(url)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return samples


def total(samples: dict, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples that carry ``labels`` (and any others)."""
    want = set(labels.items())
    return sum(value for (sample, have), value in samples.items() if sample == name and want <= have)


def get(url: str, timeout: float = 10) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def children(pid: int) -> set[int]:
    return {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and parent_pid(int(p.name)) == pid}


@contextmanager
def web_server(settings: Settings, log_path: Path) -> Iterator[subprocess.Popen]:
    """`arabic-words web` (gunicorn, gevent, WEB_PROCESSES workers) on loopback; SIGINT on the way out."""
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(command("web"), env={**os.environ, **settings.as_env()}, cwd=REPO, stdout=log_file,
                                stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while len(children(proc.pid)) < settings.WEB_PROCESSES or get_ok(settings, "/readyz") is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the web server did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        yield proc
    finally:
        stop_process(proc, 15, signal.SIGINT)  # quick shutdown


def get_ok(settings: Settings, path: str) -> int | None:
    """The status of GET ``path``, or None while nothing answers."""
    try:
        return get(f"http://{HOST}:{settings.PORT}{path}", timeout=5)
    except OSError:
        return None


# --------------------------------------------------------------------------------------------- directories
def test_group_directory_is_emptied_and_dead_groups_removed(tmp_path):
    settings = Settings(REDIS_URL="redis://127.0.0.1:1/0", METRICS_DIR=str(tmp_path))
    gone = subprocess.Popen(["true"])
    gone.wait()
    parent = tmp_path / "web"
    for pid in (gone.pid, os.getppid(), os.getpid()):
        (parent / str(pid)).mkdir(parents=True)
        (parent / str(pid) / "counter_1.db").write_bytes(b"x")
    path = shared_metrics.prepare_group_dir(settings, "web")
    assert path == parent / str(os.getpid()) and list(path.iterdir()) == []  # ours: emptied
    assert not (parent / str(gone.pid)).exists()  # a server that is gone: removed
    assert (parent / str(os.getppid()) / "counter_1.db").exists()  # a live one's: kept
    assert oct(path.stat().st_mode & 0o777) == "0o700"


def test_dead_process_live_gauge_is_dropped_and_its_counter_kept(tmp_path):
    """What a SIGKILLed pool child leaves: its counter still counts, its live gauge no longer does."""
    code = (
        "from prometheus_client import Counter, Gauge\n"
        "Counter('t_done_total', 'd').inc(3)\n"
        "Gauge('t_busy', 'b', multiprocess_mode='livesum').set(5)\n"
        "import sys, time; print('ok', flush=True); time.sleep(float(sys.argv[1]))\n"
    )
    env = {**os.environ, shared_metrics.MULTIPROC_ENV: str(tmp_path)}
    subprocess.run([sys.executable, "-c", code, "0"], env=env, check=True, capture_output=True)
    alive = subprocess.Popen([sys.executable, "-c", code, "60"], env=env, stdout=subprocess.PIPE)
    try:
        assert alive.stdout.readline() == b"ok\n"
        registry = shared_metrics.exposition_registry(tmp_path)
        assert registry.get_sample_value("t_done_total") == 6  # both processes' counts
        assert registry.get_sample_value("t_busy") == 5  # only the live one's gauge
    finally:
        alive.kill()
        alive.wait()
    assert registry.get_sample_value("t_busy") is None or registry.get_sample_value("t_busy") == 0
    assert registry.get_sample_value("t_done_total") == 6


# ------------------------------------------------------------------------------------------------- web
def test_web_metrics_sum_every_gunicorn_process(tmp_path, redis_url):
    """Requests counted by route whatever process served them, across a SIGKILL of every gunicorn worker; a killed
    process's open long-poll leaves the in-progress gauge; the queue depth read from Redis."""
    queue = f"test-metrics-web-{uuid.uuid4().hex[:8]}"
    settings = Settings(REDIS_URL=redis_url, HOST=HOST, PORT=free_port(), WEB_PROCESSES=2, LOG_LEVEL="WARNING",
                        QUEUE=queue, METRICS_DIR=str(tmp_path / "metrics"))  # fmt: skip
    base = f"http://{HOST}:{settings.PORT}"
    with web_server(settings, tmp_path / "gunicorn.log") as web:
        group = tmp_path / "metrics" / "web" / str(web.pid)
        assert group.is_dir()
        healthz_ok = sum(get(f"{base}/healthz") == 200 for _ in range(10))

        with open(DATA / "kitab.wav", "rb") as f:  # no worker takes this queue: the job stays queued
            request = urllib.request.Request(f"{base}/v1/transcriptions", data=f.read(),
                                             headers={"Content-Type": "audio/wav"}, method="POST")  # fmt: skip
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 202
            job_id = json.load(response)["id"]
        assert get(f"{base}/v1/transcriptions/{job_id}") == 200
        assert get(f"{base}/v1/transcriptions/{uuid.uuid4().hex}") == 404
        assert get(f"{base}/no/such/{job_id}") == 404

        def long_poll() -> None:
            with contextlib.suppress(OSError):  # its process is killed below
                get(f"{base}/v1/transcriptions/{job_id}?wait=30", timeout=40)

        poller = threading.Thread(target=long_poll, daemon=True)
        poller.start()
        deadline = time.monotonic() + 10
        while total(scrape(f"{base}/metrics"), "arabic_words_http_requests_in_progress") < 2:  # the poll + this scrape
            assert time.monotonic() < deadline, "the long-poll was not counted in progress"
            time.sleep(0.05)

        first = children(web.pid)
        for pid in first:
            os.kill(pid, signal.SIGKILL)
        poller.join(timeout=10)
        deadline = time.monotonic() + 30
        while len(children(web.pid) - first) < 2 or get_ok(settings, "/readyz") is None:
            assert time.monotonic() < deadline, "gunicorn did not replace its workers"
            time.sleep(0.1)
        healthz_ok += sum(get(f"{base}/healthz") == 200 for _ in range(10))
        samples = scrape(f"{base}/metrics")

        assert healthz_ok == 20
        assert total(samples, "arabic_words_http_requests_total", route="/healthz") == 20
        assert total(samples, "arabic_words_http_request_duration_seconds_count", route="/healthz", method="GET") == 20
        assert total(samples, "arabic_words_http_request_duration_seconds_bucket", route="/healthz", le="+Inf") == 20
        assert total(samples, "arabic_words_http_requests_total", route="/v1/transcriptions", method="POST",
                     status="202") == 1  # fmt: skip
        route = "/v1/transcriptions/<job_id>"
        assert total(samples, "arabic_words_http_requests_total", route=route, method="GET", status="200") == 1
        assert total(samples, "arabic_words_http_requests_total", route=route, method="GET", status="404") == 1
        assert total(samples, "arabic_words_http_requests_total", route="<unmatched>", status="404") == 1
        assert not any(job_id in value for _, labels in samples for _, value in labels)  # routes, never paths
        # the killed process's open long-poll no longer counts: only this scrape is in progress
        assert total(samples, "arabic_words_http_requests_in_progress") == 1
        assert total(samples, "arabic_words_queue_depth", lane="interactive", queue=settings.QUEUE) == 1

        counted = shared_metrics.file_pids(group)
        assert first & counted and (children(web.pid) - first) & counted  # processes before and after the kill


# ---------------------------------------------------------------------------------------------- worker
@pytest.mark.integration
def test_worker_metrics_sum_its_prefork_children(tmp_path, redis_url, asr_cache_dir):
    """Stage histograms count every job, failures their code, model loads every process; a killed child's counts
    stay in the sum."""
    db_url = re.sub(r"/\d+$", "/11", redis_url)  # a database of its own: heartbeats, job records
    settings = make_settings(db_url, asr_cache_dir, QUEUE=f"test-metrics-{uuid.uuid4().hex[:8]}",
                             WORKER_CONCURRENCY=2, ASR_BACKEND="torch-fp32", METRICS_PORT=free_port(),
                             METRICS_DIR=str(tmp_path / "m"))  # fmt: skip
    log_path = tmp_path / "worker.log"
    proc = start_worker(settings, log_path, expected_loads=2)
    url = f"http://{HOST}:{settings.METRICS_PORT}/metrics"
    try:
        from web import create_app

        client = create_app(settings).test_client()
        good = ["kitab.wav", "marhaba.webm", "shukran.mp3"]
        ids = [post_file(client, DATA / name).get_json()["id"] for name in good]
        bad = client.post("/v1/transcriptions", data=b"RIFF\x10\x00\x00\x00WAVE" + secrets.token_bytes(4000),
                          content_type="audio/wav")  # fmt: skip
        assert bad.status_code == 202  # WAV's magic bytes pass the web's check; decoding fails in the worker
        done = [wait_for(client, job_id) for job_id in [*ids, bad.get_json()["id"]]]
        assert [d["status"] for d in done] == ["succeeded"] * 3 + ["failed"], done
        assert done[-1]["error"]["code"] == "invalid_audio"

        # a process counts a job just after storing its final state: the poll may see the state a moment earlier
        samples = scrape_until(url, lambda s: total(s, "arabic_words_job_stage_seconds_count", stage="total") >= 3
                               and total(s, "arabic_words_job_failures_total") >= 1)  # fmt: skip
        for stage in ("queue", "decode", "inference", "total"):
            assert total(samples, "arabic_words_job_stage_seconds_count", stage=stage) == 3, stage
        assert total(samples, "arabic_words_job_stage_seconds_count", stage="batch_wait") == 0  # prefork: no batching
        assert total(samples, "arabic_words_job_failures_total", code="invalid_audio") == 1
        assert total(samples, "arabic_words_job_failures_total") == 1
        assert total(samples, "arabic_words_model_load_seconds_count") == 2
        assert total(samples, "arabic_words_batch_size_count") == 0

        # a child killed: the pool replaces it; what it counted stays, the new one's model load adds one
        group = tmp_path / "m" / "worker" / str(proc.pid)
        assert group.is_dir()
        victim = min(children(proc.pid) & set(model_ready_pids(log_path)))
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while len(model_ready_pids(log_path)) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        samples = scrape(url)
        assert total(samples, "arabic_words_job_stage_seconds_count", stage="total") == 3
        assert total(samples, "arabic_words_job_failures_total", code="invalid_audio") == 1
        assert total(samples, "arabic_words_model_load_seconds_count") == 3
        assert victim in shared_metrics.file_pids(group)
    finally:
        stop_worker(proc)


# ------------------------------------------------------------------------------------------- dashboard
def exported_names() -> set[str]:
    """Every sample name the web and the worker export (from the definitions, no process needed)."""
    from prometheus_client import REGISTRY

    import web.metrics
    import worker.metrics  # noqa: F401  (defines the worker's metrics in this process's registry)

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    names = {web.metrics.QUEUE_DEPTH}  # read from Redis at scrape time: not a registered metric
    for family in REGISTRY.collect():
        if family.name.startswith("arabic_words_"):
            names.update(family.name + suffix for suffix in suffixes[family.type])
    return names


def test_dashboard_asks_only_for_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(exprs) >= 10
    used = {name for expr in exprs for name in re.findall(r"\barabic_words_[a-z_]+", expr)}
    exported = exported_names()
    assert used <= exported, used - exported
    for family in ("arabic_words_http_requests_total", "arabic_words_http_request_duration_seconds_bucket",
                   "arabic_words_job_stage_seconds_bucket", "arabic_words_job_failures_total",
                   "arabic_words_queue_depth", "arabic_words_model_load_seconds_count",
                   "arabic_words_batch_size_bucket"):  # fmt: skip
        assert family in used, family
    assert dashboard["uid"] and dashboard["title"]


def test_prometheus_config_scrapes_web_and_worker():
    import yaml

    config = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text(encoding="utf-8"))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) >= {"arabic-words-web", "arabic-words-worker"}
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in jobs.values())
