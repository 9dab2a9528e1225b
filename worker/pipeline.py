"""bytes -> TranscriptionResult, with no I/O: what the Celery task and `arabic-words transcribe` both run.

Three steps, as in a transformers pipeline: ``preprocess`` (decode the upload to 16 kHz mono), ``forward`` (the
model, alone or in a shared batch) and ``postprocess`` (log-posteriors -> transcript, ``worker.decoding``). Between
the first two, ``speech_span`` trims leading and trailing non-speech (``worker.vad``) when the model was configured
with a speech detector (``VAD=on``): the model sees the speech and a margin, word timings stay the original clip's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from shared.schema import TranscriptionResult
from shared.text import compare_expected
from worker import decoding
from worker.asr import LoadedModel, infer
from worker.audio import SAMPLE_RATE, InvalidAudio, decode
from worker.batching import BatchStats, DynamicBatcher
from worker.decoding import Transcript
from worker.vad import SpeechDetector


class JobTimeout(Exception):
    """The job ran past its ``deadline``."""


def preprocess(data: bytes, *, max_audio_s: float) -> np.ndarray:
    """An upload's bytes -> 16 kHz mono float32. Raises ``worker.audio.InvalidAudio`` for bad input."""
    return decode(data, max_audio_s=max_audio_s)


def speech_span(model: LoadedModel, audio: np.ndarray) -> tuple[int, int]:
    """``(start, end)`` samples of ``audio`` to run the model on: all of it without a speech detector (a model from
    ``worker.model.load_configured_model`` has one unless ``VAD=off``), else the detected speech and its margin,
    with ``start`` moved back onto the model's frame grid (the trimmed clip's frames then fall where the whole clip's
    would). Raises ``InvalidAudio("silent")`` when the detector finds no speech."""
    detector: SpeechDetector | None = getattr(model, "vad", None)
    if detector is None:
        return 0, len(audio)
    span = detector.speech_span(audio)
    if span is None:
        raise InvalidAudio("silent", "no speech was found in the audio")
    start, end = span
    if model.samples_per_frame:
        start -= start % int(model.samples_per_frame)
    return start, end


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
    model: LoadedModel,
    audio: np.ndarray,
    log_probs: np.ndarray,
    *,
    vocabulary: list[str] | None = None,
    offset_s: float = 0.0,
) -> Transcript:
    """``decoding.postprocess`` with the model's vocabulary, decoder and frame duration (from its config where it
    says; else the clip's length over its frame count). ``vocabulary``: words this request prefers (its beam search
    boosts them, a beam search of the default width even where the model decodes greedily). ``offset_s``: where
    ``audio`` starts in the recording (trimmed by ``speech_span``); word timings are given from the recording's
    start."""
    per_frame = model.samples_per_frame or len(audio) / max(log_probs.shape[0], 1)
    decoder = model.decoder
    if vocabulary:
        decoder = (decoder or decoding.BeamDecoder.for_vocabulary(model.vocabulary)).with_hotwords(vocabulary)
    transcript = decoding.postprocess(log_probs, model.vocabulary, frame_s=per_frame / SAMPLE_RATE, decoder=decoder)
    if not offset_s:
        return transcript
    words = [replace(w, start=round(w.start + offset_s, 3), end=round(w.end + offset_s, 3)) for w in transcript.words]
    return replace(transcript, words=words)


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
    ``before_forward`` itself then). ``timings_ms`` holds decode, vad (the speech detector, when the model has one),
    batch wait and inference (the forward pass and postprocessing); the caller adds queue time and the end-to-end
    total. With a speech detector, a clip without speech raises ``InvalidAudio("silent")`` before the model runs;
    ``duration_s`` and word timings are the whole recording's either way.
    """
    t0 = time.perf_counter()
    audio = preprocess(data, max_audio_s=max_audio_s)
    _check(deadline)
    t1 = time.perf_counter()
    start, end = speech_span(model, audio)
    speech = audio[start:end]
    t2 = time.perf_counter()
    log_probs, stats = forward(model, speech, batcher=batcher, before_forward=before_forward, deadline=deadline)
    _check(deadline)
    transcript = postprocess(model, speech, log_probs, vocabulary=vocabulary, offset_s=start / SAMPLE_RATE)
    t3 = time.perf_counter()
    timings = {"decode": round((t1 - t0) * 1000, 2)}
    if getattr(model, "vad", None) is not None:
        timings["vad"] = round((t2 - t1) * 1000, 2)
    if batcher is not None:
        timings["batch_wait"] = stats.wait_ms
    timings["inference"] = round((t3 - t2) * 1000 - stats.wait_ms, 2)
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
