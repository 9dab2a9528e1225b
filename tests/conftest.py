"""Real parts: a redis-server on a free port and a real `celery worker` subprocess (prefork, 2 processes)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import torch
from transformers import (
    Wav2Vec2Config,
    Wav2Vec2CTCTokenizer,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForCTC,
    Wav2Vec2Processor,
)
from werkzeug.serving import make_server

from arabic_words.processes import command, stop_process
from shared import keys
from shared.config import BUNDLED_MODEL_DIR, Settings
from shared.queue import make_celery
from shared.redis_server import free_port, start_redis
from shared.text import ARABIC_LETTERS

DATA = Path(__file__).parent / "data"
WORKER_PROCESSES = 2
WORKER_MAX_AUDIO_S = 20.0


def read_transcripts() -> dict[str, str]:
    rows = (DATA / "transcripts.tsv").read_text(encoding="utf-8").splitlines()
    return dict(line.split("\t", 1) for line in rows if line.strip())


def save_tiny_wav2vec2(
    path: Path,
    mask_safe: bool = True,
    extra_tokens: tuple[str, ...] = (),
    adjust: Callable[[Wav2Vec2ForCTC, dict[str, int]], None] | None = None,
) -> Path:
    """A tiny raw-waveform wav2vec2 CTC checkpoint with random weights: the production architecture.
    ``mask_safe``: large-style (layer norm, attention mask) or base-style (group norm, no mask). ``extra_tokens``
    join the vocabulary after the letters; ``adjust(model, vocab)`` may change the weights before they are saved."""
    path.mkdir(parents=True, exist_ok=True)
    tokens = ["<pad>", "<unk>", "|", *ARABIC_LETTERS, *extra_tokens]
    vocab = {token: i for i, token in enumerate(tokens)}
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    tokenizer = Wav2Vec2CTCTokenizer(str(path / "vocab.json"), pad_token="<pad>", unk_token="<unk>")
    extractor = Wav2Vec2FeatureExtractor(sampling_rate=16_000, return_attention_mask=mask_safe)
    config = Wav2Vec2Config(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(32, 32, 32, 32, 32, 32, 32), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        pad_token_id=0, feat_extract_norm="layer" if mask_safe else "group", do_stable_layer_norm=mask_safe,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Wav2Vec2ForCTC(config).eval()
    if adjust is not None:
        adjust(model, vocab)
    model.save_pretrained(path)
    Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_wav2vec2(tmp_path_factory) -> Path:
    return save_tiny_wav2vec2(tmp_path_factory.mktemp("tiny-wav2vec2"))


@pytest.fixture(scope="session")
def asr_cache_dir(tmp_path_factory) -> Path:
    """One ONNX export cache for the session: the worker and the backend tests share the bundled model's export."""
    return tmp_path_factory.mktemp("asr-cache")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> str:
    port = free_port()
    proc = start_redis(port, tmp_path_factory.mktemp("redis"), persistent=False)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


def make_settings(redis_url: str, asr_cache_dir: Path, **overrides: object) -> Settings:
    """The tests' settings on ``redis_url``; ``overrides`` change any of them."""
    values = {
        "REDIS_URL": redis_url,
        "ASR_MODEL": str(BUNDLED_MODEL_DIR),
        "ASR_BACKEND": "auto",  # the default: measured once into the session's cache, then reused
        "ASR_CACHE_DIR": str(asr_cache_dir),
        "MAX_AUDIO_S": WORKER_MAX_AUDIO_S,
        "MAX_UPLOAD_BYTES": 2_000_000,
        "QUEUE": "test-transcribe",
        "TORCH_THREADS": 1,
        "WORKER_CONCURRENCY": WORKER_PROCESSES,
        # the suite sends the same fixtures many times and each must reach a worker (tests/test_lanes.py turns the
        # result cache on for its own worker)
        "CACHE": "off",
    }
    return Settings(**{**values, **overrides})


@pytest.fixture(scope="session")
def settings(redis_url: str, asr_cache_dir: Path) -> Settings:
    return make_settings(redis_url, asr_cache_dir)


MODEL_READY = re.compile(r"\bmodel ready model=.* pid=(\d+)$", re.MULTILINE)  # worker/lifecycle.py, once a load ends


def model_ready_pids(log_path: Path) -> list[int]:
    """The pid of every "model ready" line in a worker's log, in order: one line per model load."""
    return [int(pid) for pid in MODEL_READY.findall(log_path.read_text(errors="replace"))]


def parent_pid(pid: int) -> int | None:
    """``pid``'s parent (from /proc), or None once it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def heartbeat_pids(settings: Settings) -> set[int]:
    """The pids on this host with a fresh model heartbeat in ``settings.REDIS_URL``: processes with a model loaded."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        fresh = client.zrangebyscore(keys.model_processes(), time.time() - keys.MODEL_HEARTBEAT_STALE_S, "+inf")
    finally:
        client.close()
    pids = set()
    for member in fresh:  # "<hostname>:<pid>"
        host, _, pid = member.decode().rpartition(":")
        if host == socket.gethostname():
            pids.add(int(pid))
    return pids


def start_worker(settings: Settings, log_path: Path, expected_loads: int) -> subprocess.Popen:
    """A real `celery worker` process for ``settings.QUEUE``; returns once ``expected_loads`` of its processes (prefork
    children in worker_process_init, or the main process for a threads pool) have a fresh heartbeat and have logged
    "model ready" (the heartbeat starts just before that line is written)."""
    log_file = log_path.open("w")
    proc = subprocess.Popen(
        command("worker", "-n", f"{settings.QUEUE}-{os.getpid()}@%h", "--without-mingle", "--without-gossip"),
        env={**os.environ, **settings.as_env()}, stdout=log_file, stderr=subprocess.STDOUT,
        cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    log_file.close()

    def loaded() -> bool:
        ours = {pid for pid in heartbeat_pids(settings) if proc.pid in (pid, parent_pid(pid))}
        return len(ours) >= expected_loads and ours <= set(model_ready_pids(log_path))

    deadline = time.monotonic() + 240
    while not loaded():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"worker processes did not load the model:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.2)
    app = make_celery(settings)
    while len(app.control.ping(timeout=0.5) or []) == 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"celery worker did not start:\n{log_path.read_text()[-4000:]}")
    return proc


def stop_worker(proc: subprocess.Popen) -> None:
    stop_process(proc, 30)


@pytest.fixture(scope="session")
def worker_log(tmp_path_factory) -> Path:
    """The session worker's stdout and stderr (its processes' "model ready" lines among them)."""
    return tmp_path_factory.mktemp("worker") / "worker.log"


@pytest.fixture(scope="session")
def worker(settings: Settings, worker_log: Path) -> subprocess.Popen:
    """A real Celery worker process with its own prefork children, each loading the model once."""
    proc = start_worker(settings, worker_log, WORKER_PROCESSES)
    yield proc
    stop_worker(proc)


@pytest.fixture(scope="session")
def app(settings: Settings):
    from web import create_app

    return create_app(settings)


@pytest.fixture()
def client(app):
    return app.test_client()


@contextlib.contextmanager
def serve_http(app, port: int | None = None) -> Iterator[str]:
    """A WSGI ``app`` on a real, threaded HTTP server (werkzeug's) on loopback, in a thread; yields its base URL.
    Long-polls block a thread each here, as under any non-gevent server."""
    server = make_server("127.0.0.1", port or 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def post_file(client, path: Path, **form):
    """POST ``path`` as the multipart field ``file``, with ``form``'s other fields (e.g. expected=...)."""
    with open(path, "rb") as f:
        return client.post("/v1/transcriptions", data={"file": (f, path.name), **form},
                           content_type="multipart/form-data")  # fmt: skip


def wait_for(client, job_id: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        body = client.get(f"/v1/transcriptions/{job_id}?wait=10").get_json()
        if body["status"] in ("succeeded", "failed") or time.monotonic() > deadline:
            return body


def pytest_terminal_summary(terminalreporter) -> None:
    """The chaos scenarios' table (tests/chaos.py), when any ran."""
    from tests.chaos import FULL, ROWS, format_table

    if ROWS:
        terminalreporter.write_sep("=", f"chaos scenarios ({'full' if FULL else 'fast'} size)")
        terminalreporter.write_line(format_table(ROWS))
