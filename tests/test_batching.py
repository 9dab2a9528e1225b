"""DynamicBatcher: grouping, fan-out, the window for a lone request, errors."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from worker.batching import DynamicBatcher


class Recorder:
    def __init__(self, delay_s: float = 0.0) -> None:
        self.sizes: list[int] = []
        self.delay_s = delay_s

    def __call__(self, clips: list[np.ndarray]) -> list[np.ndarray]:
        self.sizes.append(len(clips))
        time.sleep(self.delay_s)
        return [c * 2 for c in clips]


def test_a_lone_request_runs_by_itself():
    run = Recorder()
    batcher = DynamicBatcher(run, max_batch=8, window_s=0.02)
    try:
        out, stats = batcher.submit(np.ones(3, np.float32))
    finally:
        batcher.close()
    assert run.sizes == [1] and stats.size == 1
    np.testing.assert_array_equal(out, np.full(3, 2.0))
    assert stats.wait_ms < 1000  # it waited for the window, not for company that never came


def test_concurrent_requests_share_batches_and_each_gets_its_own_result():
    run = Recorder(delay_s=0.05)  # while one batch runs, the next requests queue up
    batcher = DynamicBatcher(run, max_batch=4, window_s=0.05)
    results: dict[int, tuple] = {}

    def client(i: int) -> None:
        results[i] = batcher.submit(np.full(2, i, np.float32))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    finally:
        batcher.close()
    assert sorted(results) == list(range(12))
    for i, (out, stats) in results.items():
        np.testing.assert_array_equal(out, np.full(2, 2 * i))
        assert 1 <= stats.size <= 4
    assert sum(run.sizes) == 12 and max(run.sizes) > 1 and max(run.sizes) <= 4


def test_a_failing_batch_fails_its_requests_and_the_batcher_goes_on():
    calls = []

    def run(clips):
        calls.append(len(clips))
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return clips

    batcher = DynamicBatcher(run, max_batch=2, window_s=0.0)
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            batcher.submit(np.zeros(1))
        out, _ = batcher.submit(np.ones(1))
    finally:
        batcher.close()
    np.testing.assert_array_equal(out, np.ones(1))


@pytest.mark.parametrize("kwargs", [{"max_batch": 0}, {"window_s": -1}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        DynamicBatcher(Recorder(), **kwargs)


def test_a_job_stops_waiting_at_its_timeout_and_its_clip_is_skipped():
    run = Recorder(delay_s=0.5)  # a slow (or stuck) forward pass
    batcher = DynamicBatcher(run, max_batch=1, window_s=0.0)
    try:
        first = threading.Thread(target=batcher.submit, args=(np.ones(2, np.float32),))
        first.start()
        time.sleep(0.05)  # the first clip's batch is running
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            batcher.submit(np.ones(3, np.float32), timeout=0.1)  # queued behind it: gives up
        assert time.monotonic() - started < 0.4
        first.join()
        out, _ = batcher.submit(np.ones(4, np.float32), timeout=5)
    finally:
        batcher.close()
    assert run.sizes == [1, 1]  # the abandoned clip never reached the model
    np.testing.assert_array_equal(out, np.full(4, 2.0))
