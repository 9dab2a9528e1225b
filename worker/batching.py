"""Dynamic batching: jobs that reach one worker process within a short window share one padded forward pass.

Each job's thread (Celery's ``threads`` pool) calls ``submit(audio)`` and blocks; one background thread takes the
first waiting clip, gathers more until ``max_batch`` clips or ``window_s`` after the first, runs them together
and hands each job its own result. A lone request waits at most the window; under load a batch fills at once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from worker import metrics

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    audio: np.ndarray
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class BatchStats:
    size: int
    wait_ms: float  # how long this clip waited for its batch to start


class DynamicBatcher:
    def __init__(
        self,
        run_batch: Callable[[list[np.ndarray]], list[np.ndarray]],
        max_batch: int = 16,
        window_s: float = 0.01,
    ) -> None:
        if max_batch < 1 or window_s < 0:
            raise ValueError("max_batch must be >= 1 and window_s >= 0")
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.window_s = window_s
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="dynamic-batcher", daemon=True)
        self._thread.start()

    def submit(self, audio: np.ndarray, timeout: float | None = None) -> tuple[np.ndarray, BatchStats]:
        """Block until this clip's batch has run; return its output and how it was batched. Past ``timeout``
        seconds, ``TimeoutError`` (the clip is dropped if its batch has not started)."""
        pending = _Pending(audio)
        self._queue.put(pending)
        try:
            return pending.future.result(timeout=timeout)
        except TimeoutError:
            pending.future.cancel()  # a batch that has not taken it yet skips it
            raise

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = first.queued_at + self.window_s
            stop = False
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._run(batch)
            if stop:
                return

    def _run(self, batch: list[_Pending]) -> None:
        batch = [p for p in batch if p.future.set_running_or_notify_cancel()]  # drop clips whose job gave up
        if not batch:
            return
        started = time.perf_counter()
        try:
            outputs = self._run_batch([p.audio for p in batch])
        except BaseException as exc:  # every waiting job must hear about it, not hang
            for p in batch:
                p.future.set_exception(exc)
            return
        metrics.BATCH_SIZE.observe(len(batch))
        for p, out in zip(batch, outputs, strict=True):
            p.future.set_result((out, BatchStats(len(batch), round((started - p.queued_at) * 1000, 2))))
        log.debug("batch ran size=%d ms=%.1f", len(batch), (time.perf_counter() - started) * 1000)
