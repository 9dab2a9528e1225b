"""Per-process worker state. The model is loaded once per worker *process* (Celery's prefork children), in
``worker_process_init``; the parent process never imports CUDA state or model weights."""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass

import redis

from shared import keys
from shared.config import Settings
from shared.jobs import JobStore
from worker.asr import LoadedModel, load_model, select_device, warm_up

log = logging.getLogger(__name__)


@dataclass
class WorkerState:
    settings: Settings
    model: LoadedModel
    store: JobStore


_state: WorkerState | None = None  # owned by init_process(); one per worker process


def init_process(settings: Settings, process_index: int = 0) -> WorkerState:
    """Load the model, pin the device, warm up, and record the load in Redis (tests assert one per process)."""
    global _state
    started = time.perf_counter()
    device = select_device(process_index)
    model = load_model(settings.ASR_MODEL, device=device, threads=settings.TORCH_THREADS)
    loaded_s = time.perf_counter() - started
    warm_ms = warm_up(model)
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.hincrby(keys.model_loads(), f"{socket.gethostname()}:{os.getpid()}", 1)
    _state = WorkerState(settings=settings, model=model, store=JobStore(client, settings))
    log.info(
        "model ready model=%s device=%s load_s=%.2f warmup_ms=%.0f pid=%d",
        settings.ASR_MODEL, device, loaded_s, warm_ms, os.getpid(),
    )  # fmt: skip
    return _state


def state() -> WorkerState:
    if _state is None:  # e.g. a pool without worker_process_init (solo): load on first use, still once
        return init_process(Settings())
    return _state
