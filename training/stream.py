"""Fresh training clips made while the model trains, for machines with many cores and a GPU.

``ClipStream`` runs N processes that each synthesize and augment clips (``training.make_dataset.make_train_clip``,
the same recipe as the stored shards) and compute their filterbank features; ``ReplayBuffer`` keeps the newest
clips and draws length-bucketed batches from them. Every clip is new words in a new voice setting, so the model is
never shown the same few thousand utterances epoch after epoch; ``max_reuse`` bounds how often, on average, a clip
is trained on before the producers must catch up (a fast GPU would otherwise memorize the buffer).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import random
import time
from collections.abc import Callable

import numpy as np

_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _produce(seed: int, words: list[str], voices: list, out: mp.Queue, stop) -> None:
    import torch

    torch.set_num_threads(1)
    from training.make_dataset import make_train_clip
    from training.train import features

    rng, nprng = random.Random(seed), np.random.default_rng(seed)
    while not stop.is_set():
        made = make_train_clip(words, voices, rng, nprng)
        if made is None:
            continue
        item = (features(made[0]), made[1])
        while not stop.is_set():
            try:
                out.put(item, timeout=0.5)
                break
            except queue.Full:
                pass
    # clips still in this process's pipe buffer are not wanted any more; without this the exit waits for a
    # reader that has stopped reading (multiprocessing's "joining processes that use queues")
    out.cancel_join_thread()


class ClipStream:
    """``workers`` processes producing ``(features, text)`` pairs; start it before CUDA is touched."""

    def __init__(self, words: list[str], voices: list, workers: int, seed: int) -> None:
        ctx = mp.get_context("spawn")  # no fork of a process that may hold CUDA or thread pools
        self._queue: mp.Queue = ctx.Queue(maxsize=4096)
        self._stop = ctx.Event()
        self._procs = [
            ctx.Process(
                target=_produce, args=(seed * 1_000_003 + i, words, voices, self._queue, self._stop), daemon=True
            )
            for i in range(workers)
        ]
        # one thread each: the producers are many already, and numpy's BLAS reads this when it loads
        saved = {name: os.environ.get(name) for name in _THREAD_VARIABLES}
        os.environ.update(dict.fromkeys(_THREAD_VARIABLES, "1"))
        try:
            for proc in self._procs:
                proc.start()
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    def take(self, wait_for: int = 0, limit: int = 100_000) -> list[tuple[np.ndarray, str]]:
        """What has arrived (at most ``limit``), blocking until at least ``wait_for`` items did."""
        items: list[tuple[np.ndarray, str]] = []
        while len(items) < limit:
            try:
                items.append(self._queue.get(block=len(items) < wait_for, timeout=60))
            except queue.Empty:
                if len(items) < wait_for and not any(p.is_alive() for p in self._procs):
                    raise RuntimeError("every clip producer has exited") from None
                if len(items) >= wait_for:
                    break
        return items

    def close(self, grace_s: float = 5.0) -> None:
        """Stop the producers: ``grace_s`` for all of them together (not each), then terminate the rest."""
        self._stop.set()
        deadline = time.monotonic() + grace_s
        for proc in self._procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=1)
        self._queue.close()


class ReplayBuffer:
    """The newest ``capacity`` clips; batches of at most ``max_frames`` padded frames drawn from them."""

    def __init__(self, capacity: int, max_frames: int, rng: random.Random) -> None:
        self.capacity, self.max_frames, self.rng = capacity, max_frames, rng
        self.items: list[tuple[np.ndarray, list[int]]] = []
        self._next = 0  # ring position once full
        self.added = 0
        self.drawn = 0
        self._pending: list[list[int]] = []

    def add(self, feats: np.ndarray, label: list[int]) -> None:
        if len(self.items) < self.capacity:
            self.items.append((feats, label))
        else:
            self.items[self._next] = (feats, label)
            self._next = (self._next + 1) % self.capacity
        self.added += 1

    def reuse(self) -> float:
        """Clips trained on per clip produced, so far."""
        return self.drawn / max(self.added, 1)

    def next_batch(self, bucketing: Callable[[list[int], int, random.Random], list[list[int]]]):
        """A batch of ``(features, label)`` pairs; ``bucketing`` groups sampled indices by length."""
        if not self._pending:
            sample = self.rng.sample(range(len(self.items)), min(len(self.items), 64 * 32))
            lengths = [len(self.items[i][0]) for i in sample]
            self._pending = [[sample[j] for j in group] for group in bucketing(lengths, self.max_frames, self.rng)]
        batch = [self.items[i] for i in self._pending.pop()]
        self.drawn += len(batch)
        return batch
