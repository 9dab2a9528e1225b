"""bytes -> TranscriptionResult, with no I/O: what the Celery task and `arabic-words transcribe` both run.

Three steps, as in a transformers pipeline: ``preprocess`` (decode the upload to 16 kHz mono), ``forward`` (the
model, alone or in a shared batch) and ``postprocess`` (log-posteriors -> transcript, ``worker.decoding``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from shared.schema import TranscriptionResult
from shared.text import compare_expected
from worker import decoding
from worker.asr import LoadedModel, infer
from worker.audio import SAMPLE_RATE, decode
from worker.batching import BatchStats, DynamicBatcher
from worker.decoding import Transcript


class JobTimeout(Exception):
    """The job ran past its ``deadline``."""


def preprocess(data: bytes, *, max_audio_s: float) -> np.ndarray:
    """An upload's bytes -> 16 kHz mono float32. Raises ``worker.audio.InvalidAudio`` for bad input."""
    return decode(data, max_audio_s=max_audio_s)


def forward(
    model: LoadedModel,
    audio: np.ndarray,
    *,
    batcher: DynamicBatcher | None = None,
    before_forward: Callable[[], None] | None = None,
    deadline: float | None = None,
) -> tuple[np.ndarray, BatchStats]:
    """The clip's (frames, vocab) log-posteriors and how it was batched. Without a ``batcher`` it runs alone, after
    ``before_forward``; with one it shares a forward pass with the jobs that arrive within the batcher's window
    (the batcher runs ``before_forward`` itself then) and waits no later than ``deadline``: ``JobTimeout``."""
    if batcher is None:
        if before_forward is not None:
            before_forward()
        return infer(model, audio), BatchStats(1, 0.0)
    remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        return batcher.submit(audio, timeout=remaining)
    except TimeoutError:
        raise JobTimeout("no batch finished before the deadline") from None


def postprocess(
    model: LoadedModel, audio: np.ndarray, log_probs: np.ndarray, *, vocabulary: list[str] | None = None
) -> Transcript:
    """``decoding.postprocess`` with the model's vocabulary, decoder and frame duration (from its config where it
    says; else the clip's length over its frame count). ``vocabulary``: words this request prefers (its beam search
    boosts them, a beam search of the default width even where the model decodes greedily)."""
    per_frame = model.samples_per_frame or len(audio) / max(log_probs.shape[0], 1)
    decoder = model.decoder
    if vocabulary:
        decoder = (decoder or decoding.BeamDecoder.for_vocabulary(model.vocabulary)).with_hotwords(vocabulary)
    return decoding.postprocess(log_probs, model.vocabulary, frame_s=per_frame / SAMPLE_RATE, decoder=decoder)


def transcribe_bytes(
    model: LoadedModel,
    data: bytes,
    *,
    max_audio_s: float,
    expected: str | None = None,
    vocabulary: list[str] | None = None,
    batcher: DynamicBatcher | None = None,
    before_forward: Callable[[], None] | None = None,
    deadline: float | None = None,
) -> TranscriptionResult:
    """Decode and transcribe one upload (``vocabulary``: words to prefer, see ``postprocess``). Raises
    ``worker.audio.InvalidAudio`` for bad input, ``JobTimeout`` past ``deadline`` (a ``time.monotonic()`` value;
    checked between steps and while waiting for a batch).

    With a ``batcher`` the forward pass is shared with other jobs that arrive within its window (the batcher runs
    ``before_forward`` itself then). ``timings_ms`` holds decode, batch wait and inference (the forward pass and
    postprocessing); the caller adds queue time and the end-to-end total.
    """
    t0 = time.perf_counter()
    audio = preprocess(data, max_audio_s=max_audio_s)
    _check(deadline)
    t1 = time.perf_counter()
    log_probs, stats = forward(model, audio, batcher=batcher, before_forward=before_forward, deadline=deadline)
    _check(deadline)
    transcript = postprocess(model, audio, log_probs, vocabulary=vocabulary)
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
