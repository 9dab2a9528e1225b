"""Per-process worker state. The model is loaded once per worker *process* (Celery's prefork children), in
``worker_process_init``; the parent process never imports CUDA state or model weights."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import redis
import torch

from shared import keys
from shared.config import Settings
from shared.jobs import JobStore
from worker.asr import LoadedModel, infer_batch, load_model, select_device, warm_up
from worker.batching import DynamicBatcher
from worker.decoding import BeamDecoder
from worker.lexicon import Lexicon

log = logging.getLogger(__name__)


@dataclass
class WorkerState:
    settings: Settings
    model: LoadedModel
    store: JobStore
    batcher: DynamicBatcher | None = None  # when BATCH_MAX_SIZE > 1 (threads pool)


_state: WorkerState | None = None  # owned by init_process(); one per worker process


def load_configured_model(settings: Settings, device: torch.device) -> LoadedModel:
    """The model, backend, cache and decoder the settings name (the worker and `arabic-words transcribe` and
    `evaluate` all use it)."""
    model = load_model(
        settings.ASR_MODEL,
        device=device,
        threads=settings.TORCH_THREADS,
        backend=settings.ASR_BACKEND,
        cache_dir=Path(settings.ASR_CACHE_DIR) if settings.ASR_CACHE_DIR else None,
    )
    return replace(model, decoder=build_decoder(model, settings))


MIN_ARABIC_SHARE = 0.8  # of a vocabulary's letters, for the Arabic word list to apply


def build_decoder(model: LoadedModel, settings: Settings) -> BeamDecoder | None:
    """The beam search the settings ask for (None: greedy), with the word list when the model writes Arabic."""
    if settings.ASR_BEAM_SIZE <= 1:
        return None
    decoder = BeamDecoder.for_vocabulary(
        model.id_to_token, model.blank_id, model.delimiter, model.special_ids,
        beam_size=settings.ASR_BEAM_SIZE, oov_penalty=settings.ASR_LEXICON_PENALTY,
    )  # fmt: skip
    if settings.ASR_LEXICON.strip().lower() in ("", "none"):
        return decoder
    if decoder.arabic_share() < MIN_ARABIC_SHARE:
        log.warning("word list not used: the model's vocabulary is not Arabic letters lexicon=%s", settings.ASR_LEXICON)
        return decoder
    return replace(decoder, lexicon=Lexicon.load(settings.ASR_LEXICON))


def init_process(settings: Settings, process_index: int = 0) -> WorkerState:
    """Load the model, pin the device, warm up, and record the load in Redis (tests assert one per process)."""
    global _state
    started = time.perf_counter()
    device = select_device(process_index)
    model = load_configured_model(settings, device)
    loaded_s = time.perf_counter() - started
    batcher = None
    batch_sizes: tuple[int, ...] = (1,)
    if settings.BATCH_MAX_SIZE > 1:
        batcher = DynamicBatcher(
            lambda clips: infer_batch(model, clips), settings.BATCH_MAX_SIZE, settings.BATCH_WINDOW_MS / 1000
        )
        batch_sizes = tuple(sorted({1, min(4, settings.BATCH_MAX_SIZE), settings.BATCH_MAX_SIZE}))
    warm_ms = warm_up(model, batch_sizes=batch_sizes)  # the shapes it will serve (GPU kernels, allocator)
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.hincrby(keys.model_loads(), _process_name(), 1)
    _state = WorkerState(settings=settings, model=model, store=JobStore(client, settings), batcher=batcher)
    threading.Thread(target=_heartbeat, args=(client,), name="model-heartbeat", daemon=True).start()
    log.info(
        "model ready model=%s backend=%s device=%s batch_max=%d load_s=%.2f warmup_ms=%.0f pid=%d",
        settings.ASR_MODEL, model.backend, device, settings.BATCH_MAX_SIZE, loaded_s, warm_ms, os.getpid(),
    )  # fmt: skip
    return _state


def _process_name() -> str:
    """This worker process as "<hostname>:<pid>", its name in the Redis keys that track processes."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _heartbeat(client: redis.Redis) -> None:
    """Tell ``/readyz`` that this process has its model loaded, every ``MODEL_HEARTBEAT_S`` while it lives. (Celery's
    ping is answered by the prefork parent, which says nothing about whether any child could load the model.)"""
    member = _process_name()
    while True:
        try:
            now = time.time()
            with client.pipeline() as pipe:
                pipe.zadd(keys.model_processes(), {member: now})
                pipe.zremrangebyscore(keys.model_processes(), "-inf", now - keys.MODEL_HEARTBEAT_STALE_S)
                pipe.execute()
        except redis.RedisError as exc:  # Redis away for a while: try again next beat
            log.warning("model heartbeat failed: %s", exc)
        time.sleep(keys.MODEL_HEARTBEAT_S)


def leave() -> None:
    """Take this process off the ready list at once (a clean shutdown); a killed one drops off when stale."""
    if _state is not None:
        with contextlib.suppress(redis.RedisError):  # shutting down anyway
            _state.store.redis.zrem(keys.model_processes(), _process_name())


_init_lock = threading.Lock()


def state() -> WorkerState:
    if _state is None:  # a pool without worker_process_init that skipped worker_init: load on first use, once
        with _init_lock:
            if _state is None:
                return init_process(Settings())
    return _state
