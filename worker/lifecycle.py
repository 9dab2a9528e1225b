"""Per-process worker state. The model is loaded once per worker *process* (Celery's prefork children), in
``worker_process_init``; the parent process never imports CUDA state or model weights."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from shared import keys
from shared.config import Settings
from shared.jobs import JobStore
from shared.redis_client import connect
from worker import metrics
from worker.asr import LoadedModel, infer_batch, select_device, warm_up
from worker.batching import DynamicBatcher
from worker.model import load_configured_model
from worker.recovery import forward_fault, process_name, sweep_lost_jobs

log = logging.getLogger(__name__)


@dataclass
class WorkerState:
    settings: Settings
    model: LoadedModel
    store: JobStore
    name: str  # "<hostname>:<pid>": this process in the heartbeats and as the owner of the jobs it runs
    batcher: DynamicBatcher | None = None  # when BATCH_MAX_SIZE > 1 (threads pool)
    fault: Callable[[], None] | None = None  # fault injection before each forward pass (off by default)


_state: WorkerState | None = None  # owned by init_process(); one per worker process


def init_process(settings: Settings, send: Callable[[str, str], None], process_index: int = 0) -> WorkerState:
    """Load the model, pin the device, warm up, then start the heartbeat that also sweeps for lost jobs
    (``send(job_id, queue)`` sends a task again). The heartbeat is how Redis knows this process has a model."""
    global _state
    started = time.perf_counter()
    device = select_device(process_index)
    model = load_configured_model(settings, device)
    loaded_s = time.perf_counter() - started
    metrics.MODEL_LOAD.observe(loaded_s)
    fault = forward_fault(settings)
    batcher = None
    batch_sizes: tuple[int, ...] = (1,)
    if settings.BATCH_MAX_SIZE > 1:

        def run_batch(clips: list) -> list:
            if fault is not None:
                fault()
            return infer_batch(model, clips)

        batcher = DynamicBatcher(run_batch, settings.BATCH_MAX_SIZE, settings.BATCH_WINDOW_MS / 1000)
        batch_sizes = tuple(sorted({1, min(4, settings.BATCH_MAX_SIZE), settings.BATCH_MAX_SIZE}))
    warm_ms = warm_up(model, batch_sizes=batch_sizes)  # the shapes it will serve (GPU kernels, allocator)
    client = connect(settings.REDIS_URL)
    name = process_name()
    store = JobStore(client, settings)
    _state = WorkerState(settings=settings, model=model, store=store, name=name, batcher=batcher, fault=fault)
    store.heartbeat(name)  # ready at once, not a beat later
    threading.Thread(target=_heartbeat, args=(store, name, send), name="model-heartbeat", daemon=True).start()
    log.info(
        "model ready model=%s backend=%s device=%s batch_max=%d load_s=%.2f warmup_ms=%.0f pid=%d",
        settings.ASR_MODEL, model.backend, device, settings.BATCH_MAX_SIZE, loaded_s, warm_ms, os.getpid(),
    )  # fmt: skip
    return _state


def _heartbeat(store: JobStore, name: str, send: Callable[[str, str], None]) -> None:
    """Tell ``/readyz`` and the reaper that this process has its model loaded, every ``MODEL_HEARTBEAT_S`` while it
    lives, and sweep for jobs whose process is gone. (Celery's ping is answered by the prefork parent, which says
    nothing about whether any child could load the model.)"""
    while True:
        try:
            store.heartbeat(name)
            sweep_lost_jobs(store, name, send)
        except redis.RedisError as exc:  # Redis away for a while: try again next beat
            log.warning("model heartbeat failed: %s", exc)
        except Exception:  # a bug here must not stop the heartbeat (the process would look dead)
            log.exception("heartbeat or sweep failed")
        time.sleep(keys.MODEL_HEARTBEAT_S)


def leave() -> None:
    """Take this process off the ready list at once (a clean shutdown); a killed one drops off when stale."""
    if _state is not None:
        with contextlib.suppress(redis.RedisError):  # shutting down anyway
            _state.store.redis.zrem(keys.model_processes(), _state.name)


def state() -> WorkerState | None:
    """This process's state; None where no model was loaded (the task then hands its message back)."""
    return _state


def init_failure_backoff_s(settings: Settings) -> tuple[float, int]:
    """(seconds to wait, failures so far) after a failed model load in a child of this worker: 1, 2, 4 ... 30 s,
    counted per worker parent in Redis, so a broken model does not make the pool spin."""
    parent = process_name(os.getppid())
    try:
        client = connect(settings.REDIS_URL, socket_timeout=2)
        failures = int(client.incr(keys.init_failures(parent)))
        client.expire(keys.init_failures(parent), 600)
    except redis.RedisError:
        return 5.0, 1
    return float(min(30, 2 ** (failures - 1))), failures


def clear_init_failures() -> None:
    if _state is not None:
        with contextlib.suppress(redis.RedisError):
            _state.store.redis.delete(keys.init_failures(process_name(os.getppid())))
