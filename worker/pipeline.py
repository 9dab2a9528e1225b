"""bytes -> TranscriptionResult, with no I/O: what the Celery task and `arabic-words transcribe` both run."""

from __future__ import annotations

import time
from collections.abc import Callable

from shared.schema import TranscriptionResult
from shared.text import compare_expected
from worker.asr import LoadedModel, infer, transcribe_audio
from worker.audio import SAMPLE_RATE, decode
from worker.batching import BatchStats, DynamicBatcher


class JobTimeout(Exception):
    """The job ran past its ``deadline``."""


def transcribe_bytes(
    model: LoadedModel,
    data: bytes,
    *,
    max_audio_s: float,
    expected: str | None = None,
    batcher: DynamicBatcher | None = None,
    before_forward: Callable[[], None] | None = None,
    deadline: float | None = None,
) -> TranscriptionResult:
    """Decode and transcribe one upload. Raises ``worker.audio.InvalidAudio`` for bad input, ``JobTimeout`` past
    ``deadline`` (a ``time.monotonic()`` value; checked between steps and while waiting for a batch).

    With a ``batcher`` the forward pass is shared with other jobs that arrive within its window (the batcher runs
    ``before_forward`` itself then). ``timings_ms`` holds decode, batch wait and inference; the caller adds queue
    time and the end-to-end total.
    """
    t0 = time.perf_counter()
    audio = decode(data, max_audio_s=max_audio_s)
    _check(deadline)
    t1 = time.perf_counter()
    if batcher is None:
        if before_forward is not None:
            before_forward()
        log_probs, stats = infer(model, audio), BatchStats(1, 0.0)
    else:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            log_probs, stats = batcher.submit(audio, timeout=remaining)
        except TimeoutError:
            raise JobTimeout("no batch finished before the deadline") from None
    _check(deadline)
    transcript = transcribe_audio(model, audio, log_probs=log_probs)
    t2 = time.perf_counter()
    timings = {"decode": round((t1 - t0) * 1000, 2)}
    if batcher is not None:
        timings["batch_wait"] = stats.wait_ms
    timings["inference"] = round((t2 - t1) * 1000 - stats.wait_ms, 2)
    return TranscriptionResult(
        text=transcript.text,
        confidence=transcript.confidence,
        words=transcript.words,
        duration_s=round(len(audio) / SAMPLE_RATE, 3),
        model=model.name,
        timings_ms=timings,
        backend=model.backend.value,
        batch_size=stats.size,
        expected=compare_expected(expected, transcript.text).to_dict() if expected else None,
    )


def _check(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise JobTimeout("past the deadline")
